"""The in-process engine refuses a checkpoint that cannot fit, before reading a single weight."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stepaudio.errors import ModelError
from stepaudio.llm.engine_transformers import TransformersEngine
from stepaudio.llm.memory import available_bytes, check_fits, checkpoint_size

#: Step-Audio-Chat's published config.json (the fields that size it).
CHAT_CONFIG = {
    "architectures": ["Step1ForCausalLM"], "model_type": "step1", "torch_dtype": "bfloat16",
    "hidden_size": 12288, "intermediate_size": 31232, "num_attention_heads": 96,
    "num_attention_groups": 8, "num_hidden_layers": 88, "max_seq_len": 32768,
    "vocab_size": 74752, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 3,
}
TTS_CONFIG = dict(CHAT_CONFIG, hidden_size=3072, intermediate_size=8192, num_attention_heads=48,
                  num_attention_groups=4, num_hidden_layers=32)


def _chat_folder(tmp_path: Path, with_index: bool) -> Path:
    folder = tmp_path / "Step-Audio-Chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CHAT_CONFIG))
    if with_index:  # the published layout: shards (absent here) named by an index
        index = {"metadata": {"total_size": 264_180_000_000},
                 "weight_map": {"model.embed_tokens.weight": "model-00001-of-00050.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("with_index", [True, False])
def test_the_130b_chat_in_float32_on_cpu_is_refused_pointing_to_vllm(tmp_path, with_index):
    folder = _chat_folder(tmp_path, with_index)
    with pytest.raises(ModelError) as err:  # no weight files here: refused by size alone
        TransformersEngine.from_pretrained(folder, device="cpu", dtype="float32")
    msg = str(err.value)
    assert re.search(r"13[12]\.\d B parameters \(52[78] GB in float32", msg), msg
    assert "vLLM" in msg and "stepaudio vllm-command" in msg and "docs/vllm.md" in msg


def test_sizes_come_from_headers_index_or_config(tiny_root, tmp_path):
    tiny = checkpoint_size(tiny_root / "Step-Audio-TTS-3B")
    assert tiny.source == "safetensors headers" and 0 < tiny.parameters < 50_000_000
    assert checkpoint_size(_chat_folder(tmp_path / "a", True)).source == "the safetensors index"
    by_config = checkpoint_size(_chat_folder(tmp_path / "b", False))
    assert by_config.source == "config.json"
    assert abs(by_config.parameters - 132.1e9) < 0.5e9  # step-audio.md's size check


def test_a_model_that_fits_only_in_bfloat16_says_so(tmp_path):
    folder = tmp_path / "Step-Audio-TTS-3B"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TTS_CONFIG))
    with pytest.raises(ModelError, match="load it in bfloat16"):
        check_fits(folder, "cpu", "float32", available=10 * 10**9)  # 14 GB needed
    assert check_fits(folder, "cpu", "bfloat16", available=10 * 10**9).parameters > 3e9


def test_the_tiny_checkpoints_still_load(tiny_root):
    assert available_bytes("cpu") > 10**8
    engine = TransformersEngine.from_pretrained(tiny_root / "Step-Audio-Chat")
    assert engine.max_model_len > 0
