"""Step1 language models (Step-Audio-Chat, TTS-3B): model, tokenizer and prompts.

Importing this package registers ``model_type: step1`` with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(folder)`` works on a real checkpoint folder without
``trust_remote_code``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from stepaudio.llm.step1 import Step1Config, Step1ForCausalLM, Step1Model

__all__ = ["Step1Config", "Step1ForCausalLM", "Step1Model", "register_step1"]


def register_step1() -> None:
    """Register Step1 with the Auto classes; safe to call any number of times.

    ``exist_ok`` makes a second registration a no-op instead of an error, which matters because
    tests, the CLI and library users may all import or call this.
    """
    AutoConfig.register(Step1Config.model_type, Step1Config, exist_ok=True)
    AutoModelForCausalLM.register(Step1Config, Step1ForCausalLM, exist_ok=True)


register_step1()
