"""How to run the Step-Audio Step1 checkpoints on upstream vLLM: one place for the flags.

Shared by ``stepaudio vllm-command`` (prints ``vllm serve`` commands for the ``openai`` engine) and
the in-process ``vllm`` engine (``AsyncEngineArgs`` keywords), so the two deployments cannot drift.
Importing this module never imports vLLM. Every flag was checked against the source of the vLLM
version pinned in the ``vllm`` extra; docs/vllm.md explains each one.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stepaudio.llm.engine import SamplingParams

#: The vLLM release these flags were read from (pyproject's ``vllm`` extra pins the same series).
VLLM_VERSION = "0.33.0"
#: vLLM's Step1 passes ``use_alibi_sqrt=True``; only the Triton backend implements it, and the
#: default backend choice ignores ALiBi, so any other backend raises at start-up.
ATTENTION_BACKEND = "TRITON_ATTN"
#: The released config.json has no tie_word_embeddings key (so True by default) but the checkpoints
#: hold their own lm_head.weight; tying would replace it by the embeddings.
HF_OVERRIDES = {"tie_word_embeddings": False}
#: Prefix caching is vLLM 0.33's default for generative models (``EngineArgs.enable_prefix_caching``
#: is None and becomes ``ModelConfig.is_prefix_caching_supported``), but a conversation's every
#: turn depends on it, so the commands say it rather than inherit it. The prompt-token details make
#: each response report how much of its prompt the cache served (the server's /metrics adds it up).
PREFIX_CACHE_FLAGS = ("--enable-prefix-caching", "--enable-prompt-tokens-details")
#: The TTS-3B repetition rule as a Model Runner V2 logits processor (vLLM 0.33's default runner).
TTS_LOGITS_PROCESSOR = "stepaudio.tts.vllm_repetition:RepetitionAwareV2"
CHAT_SERVED_NAME = "step-audio-chat"
TTS_SERVED_NAME = "step-audio-tts-3b"
INSTALL_HINT = "pip install 'stepaudio-realtime[vllm]'"


def checkpoint_max_len(model_dir: str | os.PathLike[str], default: int = 32768) -> int:
    """``max_seq_len`` from a checkpoint's config.json, or ``default`` when it cannot be read."""
    path = Path(model_dir) / "config.json"
    try:
        return int(json.loads(path.read_text(encoding="utf-8")).get("max_seq_len") or default)
    except (OSError, ValueError):
        return default


def engine_kwargs(
    model_dir: str | os.PathLike[str],
    *,
    served_model_name: str = CHAT_SERVED_NAME,
    tensor_parallel_size: int = 1,
    max_model_len: int | None = None,
    gpu_memory_utilization: float = 0.9,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Keywords for ``vllm.AsyncEngineArgs`` that load a Step-Audio Step1 checkpoint correctly."""
    folder = os.fspath(model_dir)
    return {
        "model": folder,
        "tokenizer": folder,
        "served_model_name": served_model_name,
        # The config class comes from the checkpoint's auto_map (configuration_step1.py).
        "trust_remote_code": True,
        "dtype": dtype,
        "tensor_parallel_size": tensor_parallel_size,
        "max_model_len": max_model_len or checkpoint_max_len(model_dir),
        "hf_overrides": dict(HF_OVERRIDES),
        "attention_backend": ATTENTION_BACKEND,
        "gpu_memory_utilization": gpu_memory_utilization,
        "enable_prefix_caching": True,
    }


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keywords for ``vllm.SamplingParams`` equal to our :class:`SamplingParams`.

    Stop ids are passed per request: vLLM's own eos is the tokenizer's ``</s>`` (id 2); id 3 only
    stops by default while the folder has no generation_config.json that says otherwise.
    """
    return {
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,
        "max_tokens": params.max_new_tokens,
        "stop_token_ids": list(params.stop_token_ids),
        "seed": params.seed,
        "skip_special_tokens": params.skip_special_tokens,
        "spaces_between_special_tokens": False,
    }


@dataclass(frozen=True)
class ServeSpec:
    """One ``vllm serve`` process: which checkpoint, which GPUs, which port."""

    model_dir: Path
    served_model_name: str
    gpus: tuple[int, ...]
    max_model_len: int
    port: int
    host: str = "127.0.0.1"
    gpu_memory_utilization: float | None = None
    generation_defaults: dict[str, Any] | None = None
    logits_processors: tuple[str, ...] = ()

    def argv(self) -> list[str]:
        args = [
            "vllm", "serve", os.fspath(self.model_dir),
            "--served-model-name", self.served_model_name,
            "--dtype", "bfloat16",
            "--tensor-parallel-size", str(len(self.gpus)),
            "--max-model-len", str(self.max_model_len),
            "--trust-remote-code",
            "--attention-backend", ATTENTION_BACKEND,
            "--hf-overrides", json.dumps(HF_OVERRIDES),
            *PREFIX_CACHE_FLAGS,
        ]
        if self.generation_defaults:
            args += ["--override-generation-config", json.dumps(self.generation_defaults)]
        if self.gpu_memory_utilization is not None:
            args += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        if self.logits_processors:
            args += ["--logits-processors", *self.logits_processors]
        args += ["--host", self.host, "--port", str(self.port)]
        return args

    def command(self) -> str:
        """A shell line: the GPU selection, then the quoted argv, one flag per line."""
        argv = self.argv()
        env = f"CUDA_VISIBLE_DEVICES={','.join(str(g) for g in self.gpus)}"
        parts = [f"{env} {shlex.join(argv[:3])}"]
        i = 3
        while i < len(argv):
            flag = argv[i]
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                parts.append(f"{flag} {shlex.quote(argv[i + 1])}")
                i += 2
            else:
                parts.append(flag)
                i += 1
        return " \\\n    ".join(parts)


def chat_spec(
    models_dir: str | os.PathLike[str],
    *,
    tensor_parallel_size: int = 4,
    max_model_len: int | None = None,
    port: int = 8000,
    host: str = "127.0.0.1",
    first_gpu: int = 0,
) -> ServeSpec:
    """Step-Audio-Chat (130B) sharded over ``tensor_parallel_size`` GPUs.

    The generation defaults make plain OpenAI clients sample as the reference does; this project's
    client sends every parameter with each request anyway.
    """
    folder = Path(models_dir) / "Step-Audio-Chat"
    defaults = SamplingParams()
    return ServeSpec(
        model_dir=folder,
        served_model_name=CHAT_SERVED_NAME,
        gpus=tuple(range(first_gpu, first_gpu + tensor_parallel_size)),
        max_model_len=max_model_len or checkpoint_max_len(folder),
        port=port,
        host=host,
        generation_defaults={
            "temperature": defaults.temperature,
            "top_p": defaults.top_p,
            "top_k": defaults.top_k,
        },
    )


def tts_spec(
    models_dir: str | os.PathLike[str],
    *,
    gpu: int = 4,
    max_model_len: int = 8192,
    port: int = 8001,
    host: str = "127.0.0.1",
    gpu_memory_utilization: float = 0.5,
) -> ServeSpec:
    """Step-Audio-TTS-3B on one GPU, leaving room on it for the flow, vocoder and tokenizer.

    8192 is the reference's ``max_length`` for TTS generation (prompt included). The reference
    samples with temperature 0.7 and transformers' default top_k 50, no top_p, and always with
    its repetition rule: the server loads it as a logits processor (stepaudio must be importable
    in vLLM's environment), and our client asks for it with every request.
    """
    return ServeSpec(
        model_dir=Path(models_dir) / "Step-Audio-TTS-3B",
        served_model_name=TTS_SERVED_NAME,
        gpus=(gpu,),
        max_model_len=max_model_len,
        port=port,
        host=host,
        gpu_memory_utilization=gpu_memory_utilization,
        generation_defaults={"temperature": 0.7, "top_k": 50},
        logits_processors=(TTS_LOGITS_PROCESSOR,),
    )
