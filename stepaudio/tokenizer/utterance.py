"""The exact codes of an utterance that is still growing: what the reference gives offline.

The reference normalises the whole utterance by its peak (``wav / max(max|wav|, 0.01) * 0.999``),
runs the linguistic encoder over it as one stream and the S3 tokenizer once per 30 s piece. The
peak is known only at the end, and both models read the scaled signal, so codes computed earlier
under a smaller peak are not the reference's. Redoing everything at the end of the turn would put
the whole turn's encoding between the user's pause and the reply; this class does the work as the
audio arrives, under the peak seen so far, and keeps it only while that peak holds:

- The linguistic stream is fed the audio scaled by the current peak. When louder audio raises the
  peak, it is thrown away and re-run from the utterance's start under the new one (speech reaches
  its peak early in most turns; bench/RESULTS.md records how much audio gets re-encoded).
- Each complete 30 s piece is run through S3 under the current peak, again when the peak changes.
- :meth:`codes` then costs only the flush of the linguistic tail (on a copy of the stream, which
  goes on) and S3 over the last, partial piece: the same work as the reference's, in the same
  order, on the same samples, so the codes are identical to the offline ones.

Not thread safe: the owning :class:`~stepaudio.tokenizer.streaming.AudioTokenStream` serialises
calls.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import numpy as np

from ..audio import energy_normalize
from .dual import TokenizeResult
from .semantic import MAX_SEGMENT, MIN_SEGMENT

if TYPE_CHECKING:
    from .dual import StepAudioTokenizer
    from .linguistic import LinguisticStream

#: The reference's floor under the peak: below it the scale no longer changes.
PEAK_FLOOR = 0.01


class UtteranceCodes:
    """Raw 16 kHz audio in, offline-identical codes of everything so far out."""

    def __init__(self, tokenizer: StepAudioTokenizer) -> None:
        self.tok = tokenizer
        self._buf = np.zeros(16000, dtype=np.float32)
        self.n = 0  # samples so far
        self.peak = 0.0  # max |x| so far
        self._ling: LinguisticStream | None = None
        self._ling_peak = 0.0  # the normalising peak the linguistic stream was fed under
        self._ling_fed = 0
        self._vq02: list[int] = []
        self._pieces: dict[int, tuple[float, np.ndarray]] = {}  # complete 30 s piece -> codes
        self._cached: tuple[int, TokenizeResult] | None = None
        #: Work accounting for the benchmark: re-runs of the linguistic stream and the audio
        #: they re-encoded.
        self.restarts = 0
        self.reencoded = 0

    @property
    def audio(self) -> np.ndarray:
        """The raw (not normalised) 16 kHz samples so far; a view."""
        return self._buf[: self.n]

    def _norm_peak(self, peak: float) -> float:
        return max(peak, PEAK_FLOOR)

    def append(self, y: np.ndarray) -> None:
        """Add raw 16 kHz samples and bring the work under the current peak up to date."""
        if not len(y):
            return
        if self.n + len(y) > len(self._buf):
            grown = np.zeros(max(2 * len(self._buf), self.n + len(y)), dtype=np.float32)
            grown[: self.n] = self._buf[: self.n]
            self._buf = grown
        self._buf[self.n : self.n + len(y)] = y
        self.n += len(y)
        self.peak = max(self.peak, float(np.abs(y).max()))
        self._advance()

    def _advance(self) -> None:
        ling = self.tok.linguistic
        peak = self._norm_peak(self.peak)
        if self._ling is None or peak != self._ling_peak:
            if self._ling is not None:
                self.restarts += 1
                self.reencoded += self._ling_fed
            self._ling = ling.new_stream()
            self._ling_peak = peak
            self._ling_fed = 0
            self._vq02 = []
        if self._ling_fed < self.n:
            x = energy_normalize(self._buf[self._ling_fed : self.n], self.peak)
            self._vq02.extend(int(c) for c in ling.feed(self._ling, x, is_final=False))
            self._ling_fed = self.n
        for k in range(self.n // MAX_SEGMENT):
            self._piece(k, peak)

    def _piece(self, k: int, peak: float) -> np.ndarray:
        """S3 codes of complete piece k under ``peak`` (cached while the peak holds)."""
        done = self._pieces.get(k)
        if done is None or done[0] != peak:
            x = energy_normalize(self._buf[k * MAX_SEGMENT : (k + 1) * MAX_SEGMENT], self.peak)
            done = self._pieces[k] = (peak, self.tok.semantic.run_segment(x))
        return done[1]

    def codes(self) -> TokenizeResult:
        """The reference's codes for the utterance as if it ended here; the work so far is kept,
        so more audio can follow."""
        if self._cached is not None and self._cached[0] == self.n:
            return self._cached[1]
        if self.n == 0:
            return TokenizeResult()
        assert self._ling is not None
        ling = self.tok.linguistic
        tail = ling.feed(ling.copy_stream(self._ling), np.zeros(0, np.float32), is_final=True)
        vq02 = self._vq02 + [int(c) for c in tail]
        peak = self._norm_peak(self.peak)
        full = self.n // MAX_SEGMENT
        parts = [self._piece(k, peak) for k in range(full)]
        rest = self._buf[full * MAX_SEGMENT : self.n]
        if len(rest) >= MIN_SEGMENT:  # the reference drops shorter pieces
            parts.append(self.tok.semantic.run_segment(energy_normalize(rest, self.peak)))
        vq06 = [int(c) for p in parts for c in p]
        out = TokenizeResult(vq02, vq06)
        self._cached = (self.n, out)
        return out

    def fork(self) -> UtteranceCodes:
        """An independent copy (the audio and the stream state; the models are shared): feeding
        it more audio leaves this one as it is."""
        twin = copy.copy(self)
        twin._buf = self._buf[: max(self.n, 1)].copy()
        twin._pieces = dict(self._pieces)
        if self._ling is not None:
            twin._ling = self.tok.linguistic.copy_stream(self._ling)
        twin._vq02 = list(self._vq02)
        return twin

    def release(self) -> None:
        """Drop the audio and the stream state (the utterance is over)."""
        self._buf = np.zeros(0, dtype=np.float32)
        self._ling = None
        self._pieces.clear()
