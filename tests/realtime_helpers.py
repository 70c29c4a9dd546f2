"""Shared pieces of the server tests: one in-process server per test session, a small realtime
client over a real socket, and the speech fixtures as 24 kHz pcm16.

The server runs on the tiny checkpoints at 127.0.0.1 on an ephemeral port, in the tests' own event
loop (session-scoped), so a test can also look at the server object (metrics, sessions).
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection, connect

from stepaudio.audio import load_audio, resample
from stepaudio.config import Config

AUDIO = Path(__file__).parent / "fixtures" / "audio"
RATE = 24000
CHUNK_MS = 20
#: multilingual1.wav: speech from 0.34 s to 2.24 s (22.05 kHz, 2.28 s).
SPEECH_START_S, SPEECH_END_S = 0.30, 2.26


def speech_pcm16() -> bytes:
    """The fixture utterance as 24 kHz pcm16, trimmed to its speech."""
    wav, sr = load_audio(AUDIO / "multilingual1.wav")
    w = resample(wav, sr, RATE)[int(SPEECH_START_S * RATE): int(SPEECH_END_S * RATE)]
    return (np.clip(w, -1, 1) * 32767).astype("<i2").tobytes()


def silence(ms: float) -> bytes:
    return bytes(2 * int(RATE * ms / 1000))


def server_config(**server: Any) -> Config:
    """The tiny profile, tuned for quick tests: short replies, an ephemeral port."""
    cfg = Config()
    cfg.server.port = 0
    cfg.server.api_key_env = None
    cfg.server.max_event_bytes = 256 * 1024
    cfg.server.max_send_queue_bytes = 256 * 1024
    # The test client keeps streaming (silence included); a busy CI box can stall it for a few
    # hundred ms, which must not count as the user going quiet.
    cfg.server.stall_grace_ms = 1000
    cfg.llm.max_new_tokens = 300
    cfg.session.max_output_tokens = 10
    cfg.llm.seed = 1
    cfg.session.max_transcript_tokens = 8
    for k, v in server.items():
        setattr(cfg.server, k, v)
    return cfg


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def server(tiny_root: Path):
    """One warmed-up server for every server test (loading + warm-up once)."""
    from server.app import Server

    srv = Server(server_config(), tiny_root)
    await srv.start()
    await srv.load()
    yield srv
    await srv.stop(grace_s=0.5)


@pytest.fixture(scope="session")
def speech() -> bytes:
    return speech_pcm16()


class RealtimeClient:
    """A minimal realtime client: sends events, records every server event, waits for some."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Condition()
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed: asyncio.Future[tuple[int | None, str | None]] = (
            asyncio.get_running_loop().create_future())

    @classmethod
    async def open(cls, port: int, path: str = "/v1/realtime", **kwargs: Any) -> RealtimeClient:
        ws = await connect(f"ws://127.0.0.1:{port}{path}", max_size=None, **kwargs)
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                async with self._new:
                    self.events.append(json.loads(message))
                    self._new.notify_all()
        except Exception:
            pass
        finally:
            if not self.closed.done():
                self.closed.set_result((self.ws.close_code, self.ws.close_reason))
            async with self._new:
                self._new.notify_all()

    async def send(self, event: dict[str, Any] | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def append(self, pcm: bytes) -> None:
        await self.send({"type": "input_audio_buffer.append",
                         "audio": base64.b64encode(pcm).decode("ascii")})

    async def stream(self, pcm: bytes, speed: float = 1.0, chunk_ms: int = CHUNK_MS) -> None:
        """Send audio in ``chunk_ms`` pieces, paced at ``speed`` × real time (0: no pacing)."""
        step = 2 * RATE * chunk_ms // 1000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for k, i in enumerate(range(0, len(pcm), step)):
            await self.append(pcm[i: i + step])
            if speed > 0:
                delay = t0 + (k + 1) * chunk_ms / 1000.0 / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)

    def of(self, etype: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == etype]

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    async def wait_for(self, etype: str, pred: Callable[[dict[str, Any]], bool] | None = None,
                       timeout: float = 20.0, after: int = 0) -> dict[str, Any]:
        """The first event of ``etype`` (at index ≥ ``after``) that satisfies ``pred``."""

        def find() -> dict[str, Any] | None:
            for e in self.events[after:]:
                if e["type"] == etype and (pred is None or pred(e)):
                    return e
            return None

        async def wait() -> dict[str, Any]:
            async with self._new:
                while True:
                    hit = find()
                    if hit is not None:
                        return hit
                    if self.closed.done():
                        raise AssertionError(f"connection closed {self.closed.result()} before "
                                             f"{etype}; got {self.types()[-30:]}")
                    await self._new.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise AssertionError(f"no {etype} within {timeout} s; got {self.types()[-40:]}"
                                 ) from None

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


async def turn(client: RealtimeClient, speech: bytes, speed: float = 3.0,
               tail_ms: float = 1300) -> dict[str, Any]:
    """One spoken turn (silence, speech, silence) and its reply's ``response.done``."""
    start = len(client.events)
    await client.stream(silence(300) + speech + silence(tail_ms), speed)
    return await client.wait_for("response.done", after=start, timeout=30)
