"""The user's turn as 16 kHz audio and audio tokens: a ring of recent audio, and a tokenizer
stream fed as the VAD confirms the speech.

Why fed "as confirmed" and not as received: the speculative reply at a pause and the committed turn
at the end must read the same ids, ending exactly where the speech ended (the VAD's ``at_ms``).
The stream is therefore fed only up to the point where the VAD's reading of the audio is settled
(:attr:`stepaudio.vad.SpeechSegmenter.settled_ms`) while the user speaks, and only up to the end of
speech while the user pauses. A speculation takes the stream's snapshot there (its final ids as if
the turn ended there; the stream stays open); the end of turn finishes the stream itself at the
same point. If the user resumes, the pause's audio is fed too and the turn goes on.

The ids a model hears are the tokenizer's final codes, identical to the reference's offline codes
of the turn (``stepaudio/tokenizer/utterance.py``). They are computed once per end of speech, at
the pause (:meth:`TurnInput.prepare`, or the speculation's snapshot, whichever comes first); the
speculative reply and the committed turn share that one result.

Memory is bounded: the ring holds :data:`RING_SECONDS` of audio (longer than the longest allowed
end-of-turn silence plus the input backlog); the session stops reading its socket before the
tokenizer could fall that far behind. The tokenizer stream keeps its own copy of the turn (16 kHz
float32, 64 KB a second: the final codes need the whole turn under its final peak) until the turn
is committed or discarded.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from server.workers import TokenizerStage, Tokens, TokenStream
from stepaudio.errors import StepAudioError

log = logging.getLogger(__name__)

SR = 16000
RING_SECONDS = 14.0


class TokenizerFailed(StepAudioError):
    """The tokenizer failed on this utterance: its ids are incomplete."""


class AudioRing:
    """The most recent audio, addressed by absolute sample position since the session began."""

    def __init__(self, seconds: float = RING_SECONDS) -> None:
        self.size = int(seconds * SR)
        self._buf = np.zeros(self.size, dtype=np.float32)
        self.end = 0  # samples written so far

    @property
    def start(self) -> int:
        return max(0, self.end - self.size)

    def append(self, x: np.ndarray) -> None:
        n = len(x)
        if n == 0:
            return
        if n >= self.size:
            x = x[-self.size :]
            self.end += n - self.size
            n = self.size
        i = self.end % self.size
        first = min(n, self.size - i)
        self._buf[i : i + first] = x[:first]
        if first < n:
            self._buf[: n - first] = x[first:]
        self.end += n

    def read(self, a: int, b: int) -> np.ndarray:
        a, b = max(a, self.start), min(b, self.end)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        i, j = a % self.size, b % self.size
        if i < j or (j == 0 and b - a == self.size - i):
            return self._buf[i : i + (b - a)].copy()
        return np.concatenate([self._buf[i:], self._buf[:j]])


@dataclass
class _Utterance:
    stream: TokenStream
    start: int  # first sample fed
    fed: int  # samples fed so far
    closed: bool = False
    #: A feed failed: the utterance's tokens are lost, and its snapshot and finish say so.
    failed: BaseException | None = None


class TurnInput:
    """One session's turn audio and its tokenizer stream (owned by the session's event loop)."""

    def __init__(self, stage: TokenizerStage) -> None:
        self.stage = stage
        self.ring = AudioRing()
        self.limit = 0  # samples the stream may be fed up to
        self._utt: _Utterance | None = None
        self._lock = asyncio.Lock()  # one tokenizer job at a time for this session
        self._feeder: asyncio.Task[None] | None = None
        self._grown = asyncio.Event()
        # The final codes being computed for (utterance, end sample).
        self._prepared: tuple[_Utterance, int, asyncio.Task[Tokens]] | None = None

    # -- positions ------------------------------------------------------------------------------

    @staticmethod
    def sample(ms: float) -> int:
        return int(round(ms * SR / 1000.0))

    @property
    def is_open(self) -> bool:
        return self._utt is not None

    @property
    def lag_samples(self) -> int:
        """Samples the stream still has to catch up on (below the feed limit)."""
        u = self._utt
        return 0 if u is None else max(0, min(self.limit, self.ring.end) - u.fed)

    @property
    def unfed_samples(self) -> int:
        """Audio after the stream's position that the ring must keep."""
        u = self._utt
        return 0 if u is None else self.ring.end - u.fed

    # -- audio in -------------------------------------------------------------------------------

    def append(self, audio16k: np.ndarray) -> None:
        self.ring.append(audio16k)
        self._grown.set()

    async def _until(self, sample: int, timeout: float = 2.0) -> None:
        """Wait until the ring holds audio up to ``sample`` (the VAD pump may be one cycle
        behind an append that came just before a commit). The resampler holds back a few
        samples until more input comes, so a millisecond short counts as there."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.ring.end < sample - 32 and loop.time() < end:
            self._grown.clear()
            try:
                await asyncio.wait_for(self._grown.wait(), max(0.0, end - loop.time()))
            except TimeoutError:
                break

    def open(self, start_ms: float) -> None:
        """Start the utterance at ``start_ms`` (clamped to the audio still in the ring)."""
        self.discard()
        start = max(self.ring.start, min(self.sample(start_ms), self.ring.end))
        self._utt = _Utterance(self.stage.open(), start, start)
        self.limit = start

    def set_limit(self, ms: float) -> None:
        """The stream may be fed up to here; feeding starts in the background."""
        self.limit = max(self.limit, self.sample(ms))
        self._kick()

    def discard(self) -> None:
        if self._utt is not None:
            self._utt.closed = True
        self._utt = None
        self._prepared = None

    def prepare(self, end_ms: float) -> asyncio.Task[Tokens] | None:
        """The user paused with the speech ending at ``end_ms``: compute the turn's final ids
        now, in the background, so that the speculative reply and the end of the turn find them
        ready. Idempotent for the same end; None without an open utterance."""
        u = self._utt
        if u is None:
            return None
        end = self.sample(end_ms)
        p = self._prepared
        if p is not None and p[0] is u and p[1] == end:
            return p[2]
        task = asyncio.get_running_loop().create_task(self._snapshot(u, end))
        task.add_done_callback(_retrieve)
        self._prepared = (u, end, task)
        return task

    def _ready(self, u: _Utterance, end: int) -> asyncio.Task[Tokens] | None:
        p = self._prepared
        return p[2] if p is not None and p[0] is u and p[1] == end else None

    # -- tokenizer jobs ---------------------------------------------------------------------------

    def _kick(self) -> None:
        u = self._utt
        if u is None or u.fed >= min(self.limit, self.ring.end):
            return
        if self._feeder is None or self._feeder.done():
            self._feeder = asyncio.get_running_loop().create_task(self._feed_loop())

    async def _feed_to(self, u: _Utterance, upto: int) -> None:
        if u.failed is not None:
            raise TokenizerFailed(f"this turn's audio could not be tokenized: {u.failed}") from u.failed
        while not u.closed and u.fed < upto:
            if u.fed < self.ring.start:  # fell out of the ring (cannot happen with backpressure)
                log.warning("tokenizer fell %d samples behind the ring", self.ring.start - u.fed)
                u.fed = self.ring.start
            end = min(upto, self.ring.end)
            if end <= u.fed:
                return
            pcm = self.ring.read(u.fed, end)
            u.fed = end
            await self.stage.feed(u.stream, pcm)

    async def _feed_loop(self) -> None:
        while True:
            u = self._utt
            if u is None or u.closed or u.fed >= min(self.limit, self.ring.end):
                return
            try:
                async with self._lock:
                    await self._feed_to(u, min(self.limit, self.ring.end))
            except Exception as err:  # a tokenizer failure ends this turn, not the session
                log.warning("tokenizer feed failed: %s", err)
                u.failed = err  # the turn's snapshot and finish raise, so its reply fails
                u.closed = True
                return

    async def snapshot(self, end_ms: float) -> Tokens:
        """The ids of the utterance as if it ended at ``end_ms``; the stream stays open."""
        task = self.prepare(end_ms)
        if task is None:
            return Tokens([], 0.0, 0.0, 0.0)
        return await asyncio.shield(task)

    async def _snapshot(self, u: _Utterance, end: int) -> Tokens:
        await self._until(end)
        async with self._lock:
            await self._feed_to(u, end)
            return await self.stage.snapshot(u.stream)

    async def finish(self, end_ms: float) -> Tokens:
        """Feed up to ``end_ms``, finish the stream and close the utterance."""
        u = self._utt
        if u is None:
            return Tokens([], 0.0, 0.0, 0.0)
        ready = self._ready(u, self.sample(end_ms))
        self._utt = None
        self._prepared = None
        if ready is not None:  # computed at the pause: the same ids, no second encode
            u.closed = True
            return await asyncio.shield(ready)
        await self._until(self.sample(end_ms))
        async with self._lock:
            await self._feed_to(u, self.sample(end_ms))
            u.closed = True
            return await self.stage.finish(u.stream)


def _retrieve(task: asyncio.Task[Tokens]) -> None:
    """A prepared result nobody awaited (the user went on speaking) must not log as lost."""
    if not task.cancelled():
        task.exception()
