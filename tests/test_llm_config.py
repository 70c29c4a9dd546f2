"""The llm section of the config and the two shipped YAML files."""

from __future__ import annotations

from pathlib import Path

import pytest

from stepaudio.config import DEFAULT_CONFIG, load_config
from stepaudio.errors import ConfigError
from stepaudio.llm.engine import SamplingParams

CONFIGS = DEFAULT_CONFIG.parent


@pytest.mark.parametrize("name", ["default.yaml", "step-audio.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.llm.temperature == 0.7 and cfg.llm.top_p == 0.9 and cfg.llm.max_new_tokens == 2048


def test_default_runs_the_chat_in_process_on_cpu_in_fp32():
    llm = load_config(CONFIGS / "default.yaml").llm
    assert (llm.engine, llm.device, llm.dtype) == ("transformers", "cpu", "float32")


def test_step_audio_config_uses_a_four_gpu_vllm_server_and_the_tokenizer_on_gpu():
    cfg = load_config(CONFIGS / "step-audio.yaml")
    assert cfg.models.profile == "real"
    assert cfg.llm.engine == "openai" and cfg.llm.dialect == "vllm"
    assert cfg.llm.tensor_parallel_size == 4
    assert cfg.tokenizer.device.startswith("cuda")
    assert cfg.llm.budget(cfg.llm.max_model_len) == cfg.llm.max_model_len - cfg.llm.max_new_tokens


@pytest.mark.parametrize(
    "text, key",
    [
        ("llm:\n  engin: vllm\n", "llm.engin: unknown key"),
        ("llm:\n  engine: tgi\n", "llm.engine"),
        ("llm:\n  top_p: 1.5\n", "llm.top_p"),
        ("llm:\n  connect_retries: -1\n", "llm.connect_retries"),
    ],
)
def test_a_bad_llm_key_or_value_gives_one_line_naming_it(tmp_path: Path, text, key):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_sampling_params_follow_the_config():
    cfg = load_config(None).llm.model_copy(update={"temperature": 0.3, "seed": 5})
    params = SamplingParams.from_config(cfg, max_new_tokens=9)
    assert (params.temperature, params.seed, params.max_new_tokens, params.top_k) == (0.3, 5, 9, 50)
    assert params.stop_token_ids == (3,)


def test_context_budget_defaults_to_window_minus_reply():
    llm = load_config(None).llm
    assert llm.budget(32768) == 32768 - 2048
    assert llm.model_copy(update={"context_budget_tokens": 1000}).budget(32768) == 1000
