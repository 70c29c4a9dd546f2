"""Benchmark instruments, kept apart from the server they measure.

- :mod:`.loadtest`: the load client (``stepaudio bench load``) and a server spawned for it;
- :mod:`.zero_cost`: stand-ins for the tokenizer, chat model and TTS that cost nothing
  (``server.instrument: zero-cost stages``), so a load test measures the server itself;
- :mod:`.standin_chat`: a chat engine with the 130B model's timing and no model
  (``llm.engine: stand-in``);
- :mod:`.random_profile`: the stages of ``models.profile: random`` (the speech models at their
  published shapes with random weights, the stand-ins for the rest).

The server never imports them: the app asks :func:`instrument_stages` and :func:`chat_engine`
where it builds its stages, and only a config that names an instrument gets one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.metrics import Metrics
    from server.workers import Stages
    from stepaudio.config import Config
    from stepaudio.llm.engine import Engine


def instrument_stages(cfg: Config, root: Path, metrics: Metrics) -> Stages | None:
    """The stages of the instrument the config names (blocking: they load models), or None."""
    if cfg.server.instrument == "zero-cost stages":
        from server.instruments.zero_cost import zero_cost_stages

        return zero_cost_stages(cfg, root, metrics)
    if cfg.models.profile == "random":
        from server.instruments.random_profile import random_stages

        return random_stages(cfg, metrics)
    return None


def chat_engine(cfg: Config) -> Callable[[Path], Engine] | None:
    """With ``llm.engine: stand-in``: a builder of the stand-in chat engine from the checkpoint
    folder (its text tokenizer is the real one); None for a real engine."""
    if cfg.llm.engine != "stand-in":
        return None
    from server.instruments.random_profile import stand_in_chat
    from stepaudio.llm.tokenizer import load_text_tokenizer

    return lambda folder: stand_in_chat(cfg, load_text_tokenizer(folder))
