"""Where the user's voice comes from: sound files (any rate, wav/flac/mp3) or the microphone.

Everything is converted once to the protocol's pcm16 24 kHz mono, so the sender only ever paces
and encodes fixed-size chunks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from client.playback import import_sounddevice
from client.realtime import SAMPLE_RATE, ClientError


def load_speech(path: str | Path) -> np.ndarray:
    """A sound file as float32 mono at 24 kHz."""
    from stepaudio.audio import load_audio, resample
    from stepaudio.errors import StepAudioError

    try:
        wav, sr = load_audio(path)
    except StepAudioError as err:
        raise ClientError(str(err)) from None
    return resample(wav, sr, SAMPLE_RATE) if sr != SAMPLE_RATE else wav


def chunks(samples: np.ndarray, chunk_ms: int) -> list[np.ndarray]:
    """Fixed chunks (the last one shorter): the protocol advises 20-100 ms per append."""
    n = SAMPLE_RATE * chunk_ms // 1000
    return [samples[i:i + n] for i in range(0, samples.size, n)]


async def microphone(chunk_ms: int) -> AsyncIterator[np.ndarray]:
    """Microphone blocks at 24 kHz until cancelled; the device's own rate is resampled when it
    cannot record at 24 kHz directly."""
    sd = import_sounddevice("microphone input (--mic)")
    from stepaudio.audio import StreamingResampler

    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[np.ndarray] = asyncio.Queue(maxsize=200)

    def callback(indata: np.ndarray, _frames: int, _time: object, _status: object) -> None:
        block = indata[:, 0].copy()
        loop.call_soon_threadsafe(_put_nowait, queue, block)

    rate = SAMPLE_RATE
    try:
        sd.check_input_settings(samplerate=SAMPLE_RATE, channels=1, dtype="float32")
    except Exception:  # noqa: BLE001 - PortAudio reports unsupported rates with plain Exceptions
        rate = int(sd.query_devices(kind="input")["default_samplerate"])
    resampler = StreamingResampler(rate, SAMPLE_RATE) if rate != SAMPLE_RATE else None
    try:
        stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32",
                                blocksize=rate * chunk_ms // 1000, callback=callback)
    except Exception as err:  # noqa: BLE001
        raise ClientError(f"cannot open the microphone: {err}") from None
    with stream:
        while True:
            block = await queue.get()
            yield resampler.process(block) if resampler is not None else block


def _put_nowait(queue: asyncio.Queue[np.ndarray], block: np.ndarray) -> None:
    if queue.full():  # the loop fell behind: drop the oldest block rather than grow
        queue.get_nowait()
    queue.put_nowait(block)
