"""The stages of ``models.profile: random``: the speech side at its published shapes on the GPU,
stand-ins for what one GPU cannot hold.

- Speech: TTS-3B, flow and HiFT built in memory at their real sizes with random weights
  (:mod:`stepaudio.random_models`), running exactly as the real ones would: the fast decode
  path, the batched vocoder, CUDA graphs. The voices are noise.
- Chat: :class:`~server.instruments.standin_chat.StandInChat`, the 130B model's measured timing and no model
  (it runs on four other GPUs in the real deployment).
- Audio tokenizer: the zero-cost stand-in's arithmetic ids (its paraformer and S3 models need
  pip FunASR and the published files; the ids only have to exist for the stand-in chat).
- VAD: the real Silero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from server.instruments.standin_chat import StandInChat
from server.instruments.zero_cost import ZeroCostTokenStream
from server.metrics import Metrics
from server.workers import (
    ChatStage,
    InputPump,
    SpeechStage,
    Stages,
    TokenizerStage,
    synth_options,
    tts_engine_options,
)
from stepaudio.errors import ConfigError
from stepaudio.llm.engine import SamplingParams
from stepaudio.vad import SileroVAD

if TYPE_CHECKING:
    from stepaudio.config import Config


def stand_in_chat(cfg: Config, tokenizer: object) -> StandInChat:
    return StandInChat(tokenizer, prefill_ms_per_1k=cfg.llm.standin_prefill_ms_per_1k,
                       ms_per_token=cfg.llm.standin_ms_per_token,
                       max_model_len=cfg.llm.max_model_len or 16384)


def random_stages(cfg: Config, metrics: Metrics) -> Stages:
    from stepaudio.random_models import random_synthesizer

    if cfg.llm.engine != "stand-in":
        raise ConfigError("models.profile random: set llm.engine to stand-in (the random profile "
                          "builds no chat model)")
    if cfg.tts.engine != "transformers":
        raise ConfigError("models.profile random: tts.engine must be transformers (TTS-3B is "
                          "built in this process)")
    m = cfg.models
    synth = random_synthesizer(cfg.tts.device, seed=m.seed, sizes=m.sizes,
                               options=synth_options(cfg.tts, m.profile),
                               engine_options=tts_engine_options(cfg.tts),
                               speakers_dir=cfg.tts.speakers_dir)
    engine = stand_in_chat(cfg, synth.engine.tokenizer)
    chat = ChatStage(engine, metrics, budget=cfg.llm.budget(engine.max_model_len), send_text=False,
                     base_params=SamplingParams.from_config(cfg.llm),
                     max_transcript_tokens=cfg.session.max_transcript_tokens)
    pump = InputPump(SileroVAD(), metrics, cfg.server.tick_ms)
    shapes = "published" if m.sizes == "published" else "CPU-sized"
    return Stages(
        pump=pump,
        tokenizer=TokenizerStage(ZeroCostTokenStream, metrics, cfg.server.tokenizer_threads,
                                 name="stand-in"),
        chat=chat,
        speech=SpeechStage(synth, metrics, name="step-audio-tts-3b (random weights)"),
        profile="random",
        note=f"random weights at {shapes} shapes on {cfg.tts.device}: the voices are noise; "
        "the chat model is a stand-in with the 130B model's timing, the audio tokenizer a "
        "zero-cost stand-in",
        models={"vad": f"silero-vad ({pump.model.backend})", "tokenizer": "stand-in (zero cost)",
                "chat": f"stand-in ({cfg.llm.standin_prefill_ms_per_1k:g} ms per 1k prompt "
                f"tokens, {cfg.llm.standin_ms_per_token:g} ms per token)",
                "tts": f"TTS-3B, flow, HiFT at {shapes} shapes, random weights"},
    )
