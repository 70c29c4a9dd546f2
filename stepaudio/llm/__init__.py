"""Step1 language models (Step-Audio-Chat, TTS-3B): model, tokenizer and prompts.

The package is lazy (PEP 562): importing it, or a light submodule such as ``stepaudio.llm.prompt``
or ``stepaudio.llm.engine``, must not import transformers (several seconds), because the server,
the CLI and the remote engines need prompts long before (or without ever) loading a model.
Asking the package for a model class (``from stepaudio.llm import Step1ForCausalLM``) imports it
and registers ``model_type: step1`` with transformers' Auto classes; code that loads through
``AutoModelForCausalLM`` without touching those names calls :func:`register_step1` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stepaudio.llm.step1 import Step1Config, Step1ForCausalLM, Step1Model

__all__ = ["Step1Config", "Step1ForCausalLM", "Step1Model", "register_step1"]

_MODEL_NAMES = frozenset({"Step1Config", "Step1ForCausalLM", "Step1Model"})


def register_step1() -> None:
    """Register Step1 with the Auto classes; safe to call any number of times.

    ``exist_ok`` makes a second registration a no-op instead of an error, which matters because
    tests, the CLI and library users may all call this.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from stepaudio.llm.step1 import Step1Config, Step1ForCausalLM

    AutoConfig.register(Step1Config.model_type, Step1Config, exist_ok=True)
    AutoModelForCausalLM.register(Step1Config, Step1ForCausalLM, exist_ok=True)


def __getattr__(name: str) -> Any:
    # Whoever asks for the model classes is about to build or load a model: registering now keeps
    # the old promise that ``from stepaudio.llm import Step1ForCausalLM`` makes Auto* loading work.
    if name in _MODEL_NAMES:
        from stepaudio.llm import step1

        register_step1()
        value = getattr(step1, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
