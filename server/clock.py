"""The turn clock of one session: milliseconds of input audio, running on wall time in stalls.

Turn-taking is decided on the audio the client sent, not on the wall clock: a turn then ends the
same way whether the audio came in real time, faster (a file) or with network jitter, and VAD
times are reproducible. But a client that stops sending (push-to-talk released, a file that ended)
must still get its end of turn, so when no audio has arrived for longer than ``grace_ms`` the clock
moves on with the wall clock, and the time that passed is added to every later audio position.

Audio positions (ms of audio received, the VAD's and tokenizer's unit) and clock times are mapped
both ways through the offsets added at each stall.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable


class InputClock:
    """``audio`` ms ↔ ``clock`` ms, with wall-time stretches where the input stalled."""

    def __init__(self, grace_ms: float = 150.0,
                 wall: Callable[[], float] = time.perf_counter) -> None:
        self.grace_ms = float(grace_ms)
        self.wall = wall
        self.audio_ms = 0.0  # audio received so far
        self._offset = 0.0
        self._last_arrival: float | None = None
        # (audio position, clock time) at the start of each stretch with a new offset
        self._breaks_audio: list[float] = [0.0]
        self._breaks_offset: list[float] = [0.0]

    def _stall_ms(self, now_wall: float) -> float:
        if self._last_arrival is None:
            return 0.0
        return max(0.0, (now_wall - self._last_arrival) * 1000.0 - self.grace_ms)

    def on_audio(self, duration_ms: float) -> None:
        """Audio of ``duration_ms`` just arrived; a stall before it becomes a permanent offset."""
        now = self.wall()
        stall = self._stall_ms(now)
        if stall > 0:
            self._offset += stall
            self._breaks_audio.append(self.audio_ms)
            self._breaks_offset.append(self._offset)
            if len(self._breaks_audio) > 256:  # old positions are never asked about again
                del self._breaks_audio[1:65]
                del self._breaks_offset[1:65]
        self._last_arrival = now
        self.audio_ms += duration_ms

    def now(self) -> float:
        """The clock now: audio received, plus the stall in progress beyond the grace time."""
        return self.audio_ms + self._offset + self._stall_ms(self.wall())

    def at(self, audio_ms: float) -> float:
        """Clock time of an audio position."""
        k = bisect.bisect_right(self._breaks_audio, audio_ms) - 1
        # A position exactly at a break was received before the stall: the older offset.
        if k > 0 and audio_ms == self._breaks_audio[k]:
            k -= 1
        return audio_ms + self._breaks_offset[max(k, 0)]

    def audio_at(self, clock_ms: float) -> float:
        """Audio position of a clock time (a time inside a stall maps to where the audio stopped)."""
        starts = [a + o for a, o in zip(self._breaks_audio, self._breaks_offset, strict=True)]
        k = max(0, bisect.bisect_right(starts, clock_ms) - 1)
        audio = clock_ms - self._breaks_offset[k]
        if k + 1 < len(self._breaks_audio):
            audio = min(audio, self._breaks_audio[k + 1])
        return max(0.0, min(audio, self.audio_ms))
