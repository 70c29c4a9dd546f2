"""Streaming tokenization: per-session state over the shared dual tokenizer.

Live audio arrives in chunks of any size at the client's sample rate. Each stream resamples exactly
as the offline path does, keeps the paraformer's encoder caches and the semantic window, and hands
back interleaved ids the moment a 120 ms group is complete, so the controller can start a
speculative reply on the tokens so far. `finish()` flushes the tail (the end-of-turn lag).

Energy normalisation needs the utterance's peak, which a live stream does not know yet: a stream
scales each chunk by the running peak so far (never below the reference's 0.01 floor), so its
ids depend on where the chunks fall and can differ from the offline ones until the loudest part has
been heard (bench/RESULTS.md: 89-98 % equal for 2-20 s utterances). Callers that normalise
themselves pass `normalize=False`, which makes the ids independent of the chunking.
"""

from __future__ import annotations

import copy
import dataclasses
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..audio import StreamingResampler, check_sample_rate, to_mono_float32
from ..errors import AudioError, StepAudioError
from .interleave import Interleaver, interleave_ids
from .preprocess import SR

if TYPE_CHECKING:
    from .dual import StepAudioTokenizer

PcmLike = np.ndarray | bytes | bytearray | memoryview


class AudioTokenStream:
    """One utterance's streaming state. Thread safe; feed() after finish() is an error."""

    def __init__(self, tokenizer: StepAudioTokenizer, normalize: bool = True) -> None:
        self.tok = tokenizer
        self.normalize = normalize
        self.sr: int | None = None
        self.resampler: StreamingResampler | None = None
        self.ling = tokenizer.linguistic.new_stream()
        self.sem = tokenizer.semantic.new_stream()
        self.inter = Interleaver()
        self.peak = 0.0
        self.samples_16k = 0
        self.finished = False
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def vq02(self) -> list[int]:
        return self.inter.vq02

    @property
    def vq06(self) -> list[int]:
        return self.inter.vq06

    @property
    def ids(self) -> list[int]:
        """Interleaved LLM ids of every complete group so far."""
        return interleave_ids(self.inter.vq02, self.inter.vq06)

    def fork(self) -> AudioTokenStream:
        """An independent copy of this stream's state (the shared models are not copied).

        Finishing the fork gives the ids the utterance would have if it ended here, while this
        stream goes on: the server's speculative reply reads exactly the ids the end of the turn
        will produce, without closing the turn.
        """
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            twin = copy.copy(self)
            twin.lock = threading.Lock()
            twin.resampler = copy.deepcopy(self.resampler)
            twin.ling = dataclasses.replace(
                self.ling,
                frontend_cache=copy.deepcopy(self.ling.frontend_cache),
                encoder_cache=copy.deepcopy(self.ling.encoder_cache),
                pending=self.ling.pending.copy(),
                lock=threading.Lock(),
            )
            twin.sem = dataclasses.replace(self.sem, audio=self.sem.audio.copy())
            twin.inter = Interleaver()
            twin.inter.vq02 = list(self.inter.vq02)
            twin.inter.vq06 = list(self.inter.vq06)
            twin.inter.groups = self.inter.groups
            return twin

    def _scale(self, y: np.ndarray) -> np.ndarray:
        if not self.normalize or not len(y):
            return y
        self.peak = max(self.peak, float(np.abs(y).max()))
        return (y / max(self.peak, 0.01) * 0.999).astype(np.float32)

    def _start(self, sr: int) -> None:
        sr = check_sample_rate(sr)
        if self.sr is None:
            self.sr = sr
            self.resampler = StreamingResampler(sr, SR)
        elif sr != self.sr:
            raise AudioError(f"sample rate changed mid-stream from {self.sr} to {sr} Hz")

    def feed(self, pcm: PcmLike, sr: int) -> list[int]:
        """New interleaved ids (possibly none) after this chunk."""
        x = to_mono_float32(pcm)
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            self._start(sr)
            assert self.resampler is not None
            self.last_used = time.monotonic()
            y = self._scale(self.resampler.process(x))
            if not len(y):
                return []
            self.samples_16k += len(y)
            vq02 = self.tok.linguistic.feed(self.ling, y, is_final=False)
            vq06 = self.tok.semantic.feed(self.sem, y)
            return self.inter.push(vq02, vq06)

    def finish(self) -> list[int]:
        """Flush everything buffered; returns the last ids. The stream is closed afterwards."""
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            self.finished = True
            if self.resampler is None:
                return []
            y = self._scale(self.resampler.flush())
            self.samples_16k += len(y)
            vq02 = self.tok.linguistic.feed(self.ling, y, is_final=True)
            vq06 = list(self.tok.semantic.feed(self.sem, y)) if len(y) else []
            vq06 += list(self.tok.semantic.finish(self.sem))
            return self.inter.push(vq02, vq06)


class TokenizerStreams:
    """One stream per session id, created on first audio, evicted when idle.

    Sessions that vanish without finishing (a dropped socket) would otherwise hold encoder caches
    forever; every call sweeps streams idle longer than `idle_timeout_s`.
    """

    def __init__(
        self,
        tokenizer: StepAudioTokenizer,
        idle_timeout_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if idle_timeout_s <= 0:
            raise StepAudioError("idle_timeout_s must be positive")
        self.tok = tokenizer
        self.idle_timeout_s = idle_timeout_s
        self.clock = clock
        self._streams: dict[str, AudioTokenStream] = {}
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def __contains__(self, session_id: object) -> bool:
        with self._lock:
            return session_id in self._streams

    def _get(self, session_id: str, create: bool) -> AudioTokenStream | None:
        if not isinstance(session_id, str) or not session_id:
            raise StepAudioError("session id must be a non-empty string")
        with self._lock:
            self._evict_locked(self.clock())
            stream = self._streams.get(session_id)
            if stream is None and create:
                stream = AudioTokenStream(self.tok)
                self._streams[session_id] = stream
            if stream is not None:
                self._touched[session_id] = self.clock()
            return stream

    def feed(self, session_id: str, pcm: PcmLike, sr: int) -> list[int]:
        stream = self._get(session_id, create=True)
        assert stream is not None
        return stream.feed(pcm, sr)

    def finish(self, session_id: str) -> list[int]:
        """Flush and forget the session's stream; a session with no audio yields no ids."""
        stream = self._get(session_id, create=False)
        if stream is None:
            return []
        try:
            return stream.finish()
        finally:
            self.discard(session_id)

    def stream(self, session_id: str) -> AudioTokenStream | None:
        return self._get(session_id, create=False)

    def discard(self, session_id: str) -> None:
        with self._lock:
            self._streams.pop(session_id, None)
            self._touched.pop(session_id, None)

    def evict_idle(self) -> list[str]:
        with self._lock:
            return self._evict_locked(self.clock())

    def _evict_locked(self, now: float) -> list[str]:
        old = [s for s, t in self._touched.items() if now - t > self.idle_timeout_s]
        for s in old:
            self._streams.pop(s, None)
            self._touched.pop(s, None)
        return old
