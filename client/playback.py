"""Bot audio as the listener hears it: queued, played in real time, dropped at a barge-in.

A barge-in must tell the server how much of the reply the user actually heard
(``conversation.item.truncate.audio_end_ms``), so playback is accounted per item. With a speaker
the count comes from the samples the sound card consumed; without one (output to a file, or none)
a virtual player plays the audio in real time from its arrival, the way a speaker would, so the
dialogue behaves the same with and without a sound card.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf

from client.realtime import SAMPLE_RATE, ClientError


class Recorder:
    """Writes each reply as it was played (truncated at a barge-in) to one wav file, in order,
    with a short gap between replies; written per reply so an interrupted client leaves a valid
    file."""

    GAP_S = 0.3

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file = sf.SoundFile(str(self.path), "w", samplerate=SAMPLE_RATE, channels=1,
                                  subtype="PCM_16")
        self._items: dict[str, list[np.ndarray]] = {}
        self.seconds = 0.0

    def add(self, item_id: str, samples: np.ndarray) -> None:
        self._items.setdefault(item_id, []).append(samples)

    def finish(self, item_id: str, played: int | None = None) -> None:
        """Write an item, cut to ``played`` samples when given (what the listener heard)."""
        chunks = self._items.pop(item_id, None)
        if not chunks:
            return
        audio = np.concatenate(chunks)
        if played is not None:
            audio = audio[:played]
        if self.seconds:
            self._file.write(np.zeros(int(self.GAP_S * SAMPLE_RATE), dtype=np.float32))
        self._file.write(audio)
        self._file.flush()
        self.seconds += audio.size / SAMPLE_RATE

    def pending(self) -> list[str]:
        """Items received but not written yet."""
        return list(self._items)

    def close(self) -> None:
        for item_id in list(self._items):
            self.finish(item_id)
        self._file.close()


@dataclass
class _Chunk:
    item_id: str
    start: float  # monotonic time it starts playing (virtual player)
    samples: np.ndarray


@dataclass
class Player:
    """Plays in real time without a sound card: a chunk starts when it arrives or when the one
    before it ends, whichever is later."""

    recorder: Recorder | None = None
    _chunks: list[_Chunk] = field(default_factory=list)
    _end: float = 0.0
    _done: set[str] = field(default_factory=set)  # items whose audio was all received

    def add(self, item_id: str, samples: np.ndarray) -> None:
        now = time.monotonic()
        start = max(self._end, now)
        self._chunks.append(_Chunk(item_id, start, samples))
        self._end = start + samples.size / SAMPLE_RATE
        self._record(item_id, samples)

    def _record(self, item_id: str, samples: np.ndarray) -> None:
        """Keep the audio for the recorder; replies that ended before this one are written now
        (a reply is only known to be heard whole once the next one starts or the session ends)."""
        if self.recorder is None:
            return
        for done in [i for i in self._done if i != item_id]:
            self.recorder.finish(done)
            self._done.discard(done)
        self.recorder.add(item_id, samples)

    def played_samples(self, item_id: str) -> int:
        now = time.monotonic()
        return sum(min(c.samples.size, max(0, int((now - c.start) * SAMPLE_RATE)))
                   for c in self._chunks if c.item_id == item_id)

    def playing(self) -> str | None:
        """The item whose audio is still queued or playing, if any."""
        now = time.monotonic()
        for c in self._chunks:
            if now < c.start + c.samples.size / SAMPLE_RATE:
                return c.item_id
        return None

    def idle(self) -> bool:
        return time.monotonic() >= self._end

    def flush(self) -> tuple[str, int] | None:
        """Stop now and drop the queue; ``(item_id, ms played)`` of the item cut short, if any."""
        item = self.playing()
        cut = None
        if item is not None:
            played = self.played_samples(item)
            cut = (item, played * 1000 // SAMPLE_RATE)
            if self.recorder is not None:
                self.recorder.finish(item, played)
            self._done.discard(item)
        self._drop()
        return cut

    def item_done(self, item_id: str) -> None:
        """The server sent all of an item's audio."""
        self._done.add(item_id)

    def _drop(self) -> None:
        self._chunks.clear()
        self._end = time.monotonic()

    def close(self) -> None:
        """Stop; the recorder gets every reply as far as it was played."""
        if self.recorder is not None:
            for item_id in list(self.recorder.pending()):
                self.recorder.finish(item_id, self.played_samples(item_id))
        self._drop()
        if self.recorder is not None:
            self.recorder.close()


class SpeakerPlayer(Player):
    """Plays through the default output device with ``sounddevice``; what counts as played is
    what the device callback consumed."""

    def __init__(self, recorder: Recorder | None = None) -> None:
        super().__init__(recorder)
        sd = import_sounddevice("speaker output (--play)")
        from stepaudio.audio import StreamingResampler

        self._lock = threading.Lock()
        self._queue: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        self._played: dict[str, int] = {}  # device samples per item
        self.rate = SAMPLE_RATE
        try:
            sd.check_output_settings(samplerate=SAMPLE_RATE, channels=1, dtype="float32")
        except Exception:  # noqa: BLE001 - PortAudio reports unsupported rates as plain errors
            self.rate = int(sd.query_devices(kind="output")["default_samplerate"])
        self._resampler = StreamingResampler(SAMPLE_RATE, self.rate) \
            if self.rate != SAMPLE_RATE else None
        try:
            self._stream = sd.OutputStream(samplerate=self.rate, channels=1, dtype="float32",
                                           callback=self._callback)
            self._stream.start()
        except Exception as err:  # noqa: BLE001
            raise ClientError(f"cannot open the speaker: {err}") from None

    def _callback(self, outdata: np.ndarray, frames: int, _time: object, _status: object) -> None:
        out = outdata[:, 0]
        filled = 0
        with self._lock:
            while filled < frames and self._queue:
                item_id, samples = self._queue[0]
                n = min(frames - filled, samples.size)
                out[filled:filled + n] = samples[:n]
                filled += n
                self._played[item_id] = self._played.get(item_id, 0) + n
                if n == samples.size:
                    self._queue.popleft()
                else:
                    self._queue[0] = (item_id, samples[n:])
        out[filled:] = 0.0

    def add(self, item_id: str, samples: np.ndarray) -> None:
        dev = self._resampler.process(samples) if self._resampler is not None else samples
        with self._lock:
            self._queue.append((item_id, dev))
        self._record(item_id, samples)

    def played_samples(self, item_id: str) -> int:
        """In wire samples (24 kHz), whatever rate the device plays at."""
        with self._lock:
            return self._played.get(item_id, 0) * SAMPLE_RATE // self.rate

    def playing(self) -> str | None:
        with self._lock:
            return self._queue[0][0] if self._queue else None

    def idle(self) -> bool:
        with self._lock:
            return not self._queue

    def _drop(self) -> None:
        with self._lock:
            self._queue.clear()

    def close(self) -> None:
        super().close()
        self._stream.stop()
        self._stream.close()


def import_sounddevice(purpose: str):  # noqa: ANN201 - the module, typed loosely on purpose
    """``sounddevice`` is optional: say what to install instead of a traceback."""
    try:
        import sounddevice
    except (ImportError, OSError) as err:
        raise ClientError(
            f"{purpose} needs the optional `sounddevice` package and the PortAudio library: "
            f"pip install sounddevice (Debian/Ubuntu: apt-get install libportaudio2) ({err})"
        ) from None
    return sounddevice
