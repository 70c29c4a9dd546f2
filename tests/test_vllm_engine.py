"""vLLM: the flags both deployments share, the guarded import, and the engine where it can run."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest

from stepaudio.cli import main as cli_main
from stepaudio.config import LLMConfig
from stepaudio.llm.engine import EngineError, SamplingParams, make_engine
from stepaudio.llm.engine_vllm import import_vllm
from stepaudio.llm.vllm_args import (
    ATTENTION_BACKEND,
    chat_spec,
    engine_kwargs,
    sampling_kwargs,
    tts_spec,
)

HAVE_VLLM = importlib.util.find_spec("vllm") is not None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_engine_args_carry_trust_remote_code_triton_alibi_and_untied_head(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"max_seq_len": 4096}))
    kw = engine_kwargs(tmp_path, tensor_parallel_size=4, gpu_memory_utilization=0.8)
    assert kw["trust_remote_code"] is True
    assert kw["attention_backend"] == ATTENTION_BACKEND == "TRITON_ATTN"
    assert kw["hf_overrides"] == {"tie_word_embeddings": False}
    assert kw["dtype"] == "bfloat16" and kw["tensor_parallel_size"] == 4
    assert kw["max_model_len"] == 4096  # from the checkpoint when not configured
    assert engine_kwargs(tmp_path, max_model_len=1024)["max_model_len"] == 1024


def test_sampling_kwargs_stop_on_eot_and_keep_special_tokens():
    kw = sampling_kwargs(SamplingParams(seed=3, max_new_tokens=77))
    assert kw["stop_token_ids"] == [3] and kw["max_tokens"] == 77 and kw["seed"] == 3
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (0.7, 0.9, 50)
    assert kw["skip_special_tokens"] is False and kw["spaces_between_special_tokens"] is False


def test_serve_command_round_trips_through_a_shell_and_names_every_flag(tmp_path: Path):
    spec = chat_spec(tmp_path / "my models", tensor_parallel_size=4, max_model_len=16384)
    line = spec.command().replace("\\\n", " ")
    words = shlex.split(line)
    assert words[0] == "CUDA_VISIBLE_DEVICES=0,1,2,3"
    argv = words[1:]
    assert argv == spec.argv()
    assert argv[:3] == ["vllm", "serve", str(tmp_path / "my models" / "Step-Audio-Chat")]
    assert _flag(argv, "--served-model-name") == "step-audio-chat"
    assert _flag(argv, "--dtype") == "bfloat16"
    assert _flag(argv, "--tensor-parallel-size") == "4"
    assert _flag(argv, "--max-model-len") == "16384"
    assert "--trust-remote-code" in argv
    assert "--enable-prefix-caching" in argv and "--enable-prompt-tokens-details" in argv
    assert _flag(argv, "--attention-backend") == "TRITON_ATTN"
    assert json.loads(_flag(argv, "--hf-overrides")) == {"tie_word_embeddings": False}
    assert json.loads(_flag(argv, "--override-generation-config")) == {
        "temperature": 0.7, "top_p": 0.9, "top_k": 50,
    }


def test_tts_command_uses_the_next_gpu_alone(tmp_path: Path):
    argv = tts_spec(tmp_path, gpu=4).argv()
    assert argv[2].endswith("Step-Audio-TTS-3B")
    assert _flag(argv, "--tensor-parallel-size") == "1" and _flag(argv, "--port") == "8001"
    assert "CUDA_VISIBLE_DEVICES=4 " in tts_spec(tmp_path, gpu=4).command()


def test_tts_command_loads_the_repetition_rule_processor(tiny_root: Path, capsys):
    """The printed TTS-3B command passes the processor by the FQCN vLLM 0.33 loads
    (`--logits-processors MODULE:CLASS`, nargs +), and that name resolves to the V2 processor."""
    import importlib

    from stepaudio.tts.vllm_repetition import RepetitionAwareV2

    argv = tts_spec(tiny_root, gpu=4).argv()
    fqcn = _flag(argv, "--logits-processors")
    assert fqcn == "stepaudio.tts.vllm_repetition:RepetitionAwareV2"
    module, name = fqcn.split(":")
    assert getattr(importlib.import_module(module), name) is RepetitionAwareV2
    assert "--logits-processors" not in chat_spec(tiny_root).argv()  # the chat model has no rule
    assert cli_main(["vllm-command", "--models", str(tiny_root), "--tts"]) == 0
    tts = [c for c in capsys.readouterr().out.split("\n\n") if "Step-Audio-TTS-3B" in c][0]
    words = shlex.split(tts.split("\n", 1)[-1].replace("\\\n", " "))
    assert _flag(words, "--logits-processors") == fqcn


def test_vllm_command_cli_prints_chat_and_tts_commands(tiny_root: Path, capsys):
    assert cli_main(["vllm-command", "--models", str(tiny_root), "--tp", "2", "--tts"]) == 0
    out = capsys.readouterr().out
    commands = [c for c in out.split("\n\n") if "vllm serve" in c]
    assert len(commands) == 2
    chat = shlex.split(commands[0].split("\n", 1)[1].replace("\\\n", " "))
    assert chat[0] == "CUDA_VISIBLE_DEVICES=0,1" and _flag(chat, "--max-model-len") == "32768"
    assert "CUDA_VISIBLE_DEVICES=2 vllm serve" in commands[1]


def test_vllm_command_takes_its_defaults_from_a_server_config(tmp_path: Path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("llm:\n  engine: openai\n  base_url: http://127.0.0.1:9123/v1\n"
                   "  tensor_parallel_size: 4\n  max_model_len: 8192\n"
                   "  served_model_name: chat-a\n")
    assert cli_main(["vllm-command", "--models", str(tmp_path), "--config", str(cfg)]) == 0
    captured = capsys.readouterr()
    argv = shlex.split(captured.out.split("\n", 1)[1].replace("\\\n", " "))[1:]
    assert _flag(argv, "--port") == "9123" and _flag(argv, "--max-model-len") == "8192"
    assert _flag(argv, "--served-model-name") == "chat-a"
    assert _flag(argv, "--tensor-parallel-size") == "4"
    assert "no config.json" in captured.err  # the models root is empty: said, not fatal


def test_missing_vllm_is_a_clear_error_naming_the_extra(monkeypatch, tmp_path: Path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(EngineError, match=r"pip install 'stepaudio-realtime\[vllm\]'"):
        import_vllm()
    with pytest.raises(EngineError, match="vllm-command"):
        make_engine(LLMConfig(engine="vllm"), tmp_path)


def test_choosing_another_engine_never_imports_vllm(tiny_root: Path):
    before = "vllm" in sys.modules
    engine = make_engine(LLMConfig(engine="openai"), tiny_root / "Step-Audio-Chat")
    assert engine.name == "openai"
    assert ("vllm" in sys.modules) == before


@pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (optional extra)")
def test_every_flag_exists_in_the_installed_vllm():
    from vllm.engine.arg_utils import AsyncEngineArgs

    fields = set(AsyncEngineArgs.__dataclass_fields__)
    assert set(engine_kwargs(".", max_model_len=16)) <= fields


@pytest.mark.skipif(not (HAVE_VLLM and _has_cuda()), reason="needs vLLM and a CUDA GPU")
async def test_vllm_engine_streams_a_reply_from_a_real_checkpoint(tmp_path: Path):
    # The tiny checkpoints carry no configuration_step1.py for --trust-remote-code, so this runs
    # only where STEPAUDIO_REAL_CHAT points at a real Step-Audio-Chat-shaped folder.
    import os

    folder = os.environ.get("STEPAUDIO_REAL_CHAT")
    if not folder:
        pytest.skip("set STEPAUDIO_REAL_CHAT to a Step1 checkpoint folder with its remote code")
    engine = make_engine(LLMConfig(engine="vllm", max_model_len=2048), folder)
    try:
        gen = engine.generate("<|BOT|>human\nhello<|EOT|><|BOT|>assistant\n",
                              SamplingParams(max_new_tokens=8, seed=0))
        text, ids = await gen.collect()
        assert ids and gen.usage.completion_tokens >= len(ids)
    finally:
        await engine.aclose()
