"""The shipped server configs load and validate (unknown keys would be refused)."""

from __future__ import annotations

from pathlib import Path

from stepaudio.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_configs_are_valid():
    default = load_config(CONFIGS / "default.yaml")
    assert default.models.profile == "tiny" and default.server.instrument == "none"
    assert default.llm.engine == "transformers" and default.tts.device == "cpu"
    real = load_config(CONFIGS / "step-audio.yaml")
    assert real.models.profile == "real"
    assert real.llm.engine == "openai" and real.llm.tensor_parallel_size == 4
    assert real.tokenizer.device == real.tts.device == "cuda:4"
    assert real.server.instrument == "none"
    assert real.tts.engine == "openai" and real.tts.base_url.endswith(":8001/v1")
    assert real.tts.streaming == "cosyvoice"  # the recipe the published vocoders came with


def test_default_config_is_what_serve_uses_without_one():
    assert load_config(None).model_dump() == load_config(CONFIGS / "default.yaml").model_dump()

