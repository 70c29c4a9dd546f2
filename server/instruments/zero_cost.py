"""Benchmark instrument ``zero-cost stages``: stand-ins for the tokenizer, chat model and TTS.

They cost nothing, so a load test run on them measures the server itself: the WebSocket stack,
JSON, the VAD pump (Silero stays real, as in the pipecat peer), the controller, the thread hops of
every worker interface, prompt fitting with the real text tokenizer, resampling and encoding of
the reply audio. Each stand-in goes through the same stage class as the real model, so the
plumbing measured is the plumbing users get.

The reply is the peer's: one second of canned audio per turn (a quiet tone, so a load client can
tell reply from silence). Never the default: ``server.instrument: zero-cost stages``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.metrics import Metrics
from server.workers import ChatStage, InputPump, SpeechStage, Stages, TokenizerStage
from stepaudio.llm.engine import Delta, FinishReason, Generation, SamplingParams, Usage
from stepaudio.vad import SileroVAD

if TYPE_CHECKING:
    from stepaudio.config import Config

REPLY_TEXT = "好的。"
REPLY_SECONDS = 1.0
TTS_RATE = 22050
#: One interleaved id per 24 ms of 16 kHz audio, as the real tokenizer (5 ids per 120 ms group).
SAMPLES_PER_ID = 384


class ZeroCostTokenStream:
    """Ids by arithmetic: the same count the real tokenizer would give, no model."""

    def __init__(self) -> None:
        self.samples = 0
        self._ids: list[int] = []
        self.finished = False

    @property
    def ids(self) -> list[int]:
        return self._ids

    def _emit(self, upto: int) -> list[int]:
        new = [65536 + (len(self._ids) + k) % 1024 for k in range(upto - len(self._ids))]
        self._ids.extend(new)
        return new

    def feed(self, pcm: np.ndarray, sr: int) -> list[int]:
        self.samples += len(pcm)
        return self._emit(self.samples // SAMPLES_PER_ID // 5 * 5)

    def snapshot(self) -> list[int]:
        return list(self._ids) + [
            65536 + k % 1024 for k in range(len(self._ids), self._final_count())]

    def _final_count(self) -> int:
        return max(5, -(-self.samples // SAMPLES_PER_ID) // 5 * 5)

    def finish(self) -> list[int]:
        self.finished = True
        self._emit(self._final_count())
        return list(self._ids)


class _CannedGeneration(Generation):
    def __init__(self, text: str, latency_s: float = 0.0) -> None:
        self.request_id = "zero-cost"
        self._latency_s = latency_s
        self._left = [Delta(text=text, token_ids=(0,)),
                      Delta(finish_reason=FinishReason.STOP, usage=Usage(1, 1))]

    def cancel(self) -> None:
        self._left.clear()

    async def aclose(self) -> None:
        self._left.clear()

    async def __anext__(self) -> Delta:
        # A real engine hands deltas over from its worker; the first may take a fixed latency.
        await asyncio.sleep(self._latency_s)
        self._latency_s = 0.0
        if not self._left:
            raise StopAsyncIteration
        d = self._left.pop(0)
        if d.finish_reason is not None:
            self.finish_reason, self.usage = d.finish_reason, d.usage
        return d


class ZeroCostEngine:
    """Answers every prompt at once with :data:`REPLY_TEXT`; keeps the real text tokenizer, so
    prompt fitting costs what it really costs."""

    name = "zero-cost"

    def __init__(self, tokenizer: Any, max_model_len: int = 32768, latency_ms: int = 0) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.latency_s = latency_ms / 1000.0

    def generate(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                 request_id: str | None = None) -> Generation:
        return _CannedGeneration(REPLY_TEXT, self.latency_s)

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class _Chunk:
    pcm: np.ndarray
    sample_rate: int
    clause: int
    text: str


class _CannedSpeech:
    """One reply: its first clause of text releases :data:`REPLY_SECONDS` of canned audio."""

    def __init__(self, audio: np.ndarray) -> None:
        self._audio = audio
        self._text = ""
        self._out: asyncio.Queue[_Chunk | None] = asyncio.Queue()
        self._sent = False

    def push_text(self, delta: str) -> None:
        self._text += delta
        if not self._sent and self._text.strip():
            self._sent = True
            self._out.put_nowait(_Chunk(self._audio, TTS_RATE, 0, self._text))

    def end_text(self) -> None:
        self._out.put_nowait(None)

    def cancel(self) -> None:
        self._out.put_nowait(None)

    async def aclose(self) -> None:
        self.cancel()

    def __aiter__(self) -> AsyncIterator[_Chunk]:
        return self

    async def __anext__(self) -> _Chunk:
        item = await self._out.get()
        if item is None:
            raise StopAsyncIteration
        return item


class ZeroCostSynth:
    """The synthesizer's interface (``voice``, ``open``) with canned audio."""

    def __init__(self) -> None:
        t = np.arange(int(TTS_RATE * REPLY_SECONDS)) / TTS_RATE
        self.audio = (0.1 * np.sin(2 * np.pi * 220.0 * t)).astype(np.float32)

    def voice(self, speaker: str | None = None, **_: Any) -> str:
        return speaker or ""

    def open(self, voice: Any, seed: int | None = None) -> _CannedSpeech:
        return _CannedSpeech(self.audio)


def zero_cost_stages(cfg: Config, root: Path, metrics: Metrics) -> Stages:
    from stepaudio.llm.tokenizer import load_text_tokenizer
    from stepaudio.models import model_paths

    tokenizer = load_text_tokenizer(model_paths(root).chat)
    # The transcription would use the same stand-in: the canned reply arrives at once either way.
    engine = ZeroCostEngine(tokenizer, latency_ms=cfg.server.instrument_latency_ms)
    chat = ChatStage(engine, metrics, budget=cfg.llm.budget(engine.max_model_len),
                     send_text=False, base_params=SamplingParams.from_config(cfg.llm))
    return Stages(
        pump=InputPump(SileroVAD(), metrics, cfg.server.tick_ms),
        tokenizer=TokenizerStage(ZeroCostTokenStream, metrics, cfg.server.tokenizer_threads,
                                 name="zero-cost"),
        chat=chat,
        speech=SpeechStage(ZeroCostSynth(), metrics, name="zero-cost"),
        profile="zero-cost stages",
        note="benchmark instrument: zero-cost stand-ins for the tokenizer, chat model and TTS "
        "(the VAD is real); every reply is one second of tone",
        models={"vad": "silero-vad", "tokenizer": "zero-cost", "chat": "zero-cost",
                "tts": "zero-cost"},
    )
