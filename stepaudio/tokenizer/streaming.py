"""Streaming tokenization: per-session state over the shared dual tokenizer.

Live audio arrives in chunks of any size at the client's sample rate. Each stream resamples exactly
as the offline path does and keeps two views of the utterance:

- **Final codes** (:meth:`AudioTokenStream.snapshot`, :meth:`AudioTokenStream.finish`): exactly the
  reference's offline codes of the audio so far (whole-utterance peak normalisation, one
  linguistic stream, one S3 pass per 30 s piece). The work is done as the audio arrives, under
  the peak seen so far (``utterance.py``), so the end of a turn costs little more than the
  streaming tail. These are what a model may hear.
- **Provisional ids** (what :meth:`AudioTokenStream.feed` returns, when the stream is opened with
  ``provisional=True``): interleaved ids the moment a 120 ms group is complete, from a live
  pipeline that scales by the running peak and runs S3 on windows with a little look-ahead.
  They arrive early but are not the reference's (bench/RESULTS.md: 89-98 % equal for 2-20 s
  utterances on the tiny models, less on the real S3 model, a full-attention transformer): use
  them only for provisional work. The server opens its streams without them.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from ..audio import StreamingResampler, check_sample_rate, to_mono_float32
from ..errors import AudioError, StepAudioError
from .dual import TokenizeResult
from .interleave import Interleaver, interleave_ids
from .preprocess import SR
from .utterance import PEAK_FLOOR, UtteranceCodes

if TYPE_CHECKING:
    from .dual import StepAudioTokenizer

PcmLike = np.ndarray | bytes | bytearray | memoryview


class _Provisional:
    """The live pipeline: running-peak scaling, the linguistic stream and the S3 windows."""

    def __init__(self, tok: StepAudioTokenizer) -> None:
        self.tok = tok
        self.ling = tok.linguistic.new_stream()
        self.sem = tok.semantic.new_stream()
        self.inter = Interleaver()
        self.peak = 0.0

    def _scale(self, y: np.ndarray) -> np.ndarray:
        self.peak = max(self.peak, float(np.abs(y).max()))
        return (y / max(self.peak, PEAK_FLOOR) * 0.999).astype(np.float32)

    def feed(self, y: np.ndarray) -> list[int]:
        y = self._scale(y)
        vq02 = self.tok.linguistic.feed(self.ling, y, is_final=False)
        vq06 = self.tok.semantic.feed(self.sem, y)
        return self.inter.push(vq02, vq06)

    def finish(self, y: np.ndarray) -> list[int]:
        y = self._scale(y) if len(y) else y
        vq02 = self.tok.linguistic.feed(self.ling, y, is_final=True)
        vq06 = list(self.tok.semantic.feed(self.sem, y)) if len(y) else []
        vq06 += list(self.tok.semantic.finish(self.sem))
        return self.inter.push(vq02, vq06)


class AudioTokenStream:
    """One utterance's streaming state. Thread safe; feed() after finish() is an error."""

    def __init__(self, tokenizer: StepAudioTokenizer, provisional: bool = True) -> None:
        self.tok = tokenizer
        self.sr: int | None = None
        self.resampler: StreamingResampler | None = None
        self.exact = UtteranceCodes(tokenizer)
        self.live = _Provisional(tokenizer) if provisional else None
        self.result: TokenizeResult | None = None  # the final codes, once finished
        # The last snapshot that needed the resampler's tail: (samples before it, the tail, codes).
        self._tail_snap: tuple[int, np.ndarray, TokenizeResult] | None = None
        self.samples_16k = 0
        self.finished = False
        self.lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def provisional_ids(self) -> list[int]:
        """Every provisional id so far (empty without the live pipeline)."""
        if self.live is None:
            return []
        return interleave_ids(self.live.inter.vq02, self.live.inter.vq06)

    def _final(self) -> TokenizeResult:
        if self.result is None:
            raise StepAudioError("the final codes exist once the stream is finished")
        return self.result

    @property
    def vq02(self) -> list[int]:
        return self._final().vq02

    @property
    def vq06(self) -> list[int]:
        return self._final().vq06

    @property
    def ids(self) -> list[int]:
        """The final interleaved ids (after :meth:`finish`)."""
        return self._final().ids

    def _start(self, sr: int) -> None:
        sr = check_sample_rate(sr)
        if self.sr is None:
            self.sr = sr
            self.resampler = StreamingResampler(sr, SR)
        elif sr != self.sr:
            raise AudioError(f"sample rate changed mid-stream from {self.sr} to {sr} Hz")

    def feed(self, pcm: PcmLike, sr: int) -> list[int]:
        """New provisional ids (possibly none; always none without the live pipeline)."""
        x = to_mono_float32(pcm)
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            self._start(sr)
            assert self.resampler is not None
            self.last_used = time.monotonic()
            y = self.resampler.process(x)
            if not len(y):
                return []
            self.samples_16k += len(y)
            self.exact.append(y)
            return self.live.feed(y) if self.live is not None else []

    def snapshot(self) -> list[int]:
        """The final ids the utterance would have if it ended here; the stream stays open.

        The server's speculative reply reads these at the user's pause, and the committed turn
        reads the same (cached) codes when the user says no more.
        """
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            self.last_used = time.monotonic()
            if self.resampler is None:
                return []
            if self.resampler.identity:
                return self.exact.codes().ids
            # The resampler holds back its last few output samples until more input comes; an
            # utterance ending here would flush them.
            tail = copy.deepcopy(self.resampler).flush()
            if not len(tail):
                return self.exact.codes().ids
            twin = self.exact.fork()
            twin.append(tail)
            codes = twin.codes()
            self._tail_snap = (self.exact.n, tail, codes)
            return codes.ids

    def finish(self) -> list[int]:
        """Flush everything buffered; returns the final ids. The stream is closed afterwards."""
        with self.lock:
            if self.finished:
                raise StepAudioError("audio stream already finished")
            self.finished = True
            if self.resampler is None:
                self.result = TokenizeResult()
                return []
            y = self.resampler.flush()
            self.samples_16k += len(y)
            snap = self._tail_snap
            if self.live is not None:
                self.live.finish(y)
            if snap is not None and snap[0] == self.exact.n and np.array_equal(snap[1], y):
                self.result = snap[2]  # nothing came since the snapshot: its codes are final
            else:
                self.exact.append(y)
                self.result = self.exact.codes()
            self.exact.release()
            return self.result.ids


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
        """The session's final ids; the stream is forgotten. A session with no audio yields none."""
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
