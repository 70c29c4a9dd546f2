"""What a session sends: a bounded queue drained by one writer task.

Why a queue of our own instead of awaiting ``send`` where events are made: the session's handlers
never wait on a slow client, and a barge-in can drop the reply audio that is still queued (the
client must not hear it, and the playback accounting must not count it). Why bounded: a client that
never reads would otherwise grow the server's memory without limit; past ``max_bytes`` the
connection is closed with 1008 and a reason that says so.

The writer reports every audio delta once it is handed to the socket (``on_sent``): that moment is
when the playback model assumes the client starts playing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from websockets.exceptions import ConnectionClosed

log = logging.getLogger(__name__)

CLOSE_SEND_QUEUE = 1008

R = TypeVar("R")


# What a reply's message carries back when the socket takes it (``on_sent``): enough for the
# reply and the conversation to know what the client has now been sent.


@dataclass(frozen=True)
class SentText:
    """A text delta of a text-only reply."""


@dataclass(frozen=True)
class SentCaption:
    """The caption of a clause whose audio starts next."""

    text: str


@dataclass(frozen=True)
class SentAudio:
    """Audio of clause number ``clause``, which says ``text``."""

    clause: int
    text: str


@dataclass(frozen=True)
class SentDone:
    """``response.done``: the last message of a reply."""


Sent = SentText | SentCaption | SentAudio | SentDone


@dataclass
class Outgoing(Generic[R]):
    wire: str
    size: int
    reply: R | None = None  # the reply this belongs to
    audio_ms: float = 0.0
    sent: Sent | None = None  # what it carries back (reply messages only)

    @property
    def droppable(self) -> bool:
        """Reply media (text, captions, audio): dropped when the reply is interrupted."""
        return isinstance(self.sent, (SentText, SentCaption, SentAudio))


class Outbox(Generic[R]):
    """Bounded FIFO of wire messages for one WebSocket."""

    def __init__(self, ws: Any, max_bytes: int, on_sent: Callable[[Outgoing[R], float], None],
                 on_bytes: Callable[[int], None] | None = None,
                 wall: Callable[[], float] = time.perf_counter) -> None:
        self.ws = ws
        self.wall = wall
        self.max_bytes = max_bytes
        self.on_sent = on_sent
        self.on_bytes = on_bytes
        self.bytes = 0
        self._q: deque[Outgoing[R]] = deque()
        self._wake = asyncio.Event()
        self._empty = asyncio.Event()  # nothing queued (or closed): what drain waits for
        self._empty.set()
        self._task: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self.closed = False
        self.overflowed = False
        self.close_code: int | None = None  # the code this side closed with

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="outbox")

    def _account(self, delta: int) -> None:
        self.bytes += delta
        if self.on_bytes is not None:
            self.on_bytes(delta)

    def put(self, msg: Outgoing[R]) -> bool:
        """Queue a message; False (and the connection closing) when the client is not reading.

        "Not reading" is judged by what is already queued: one message larger than the whole
        limit (the echo of a big but valid item) still goes out to a client that keeps up, so
        the queue holds at most ``max_bytes`` plus one message."""
        if self.closed:
            return False
        if self.bytes and self.bytes + msg.size > self.max_bytes:
            self.overflow()
            return False
        self._q.append(msg)
        self._account(msg.size)
        self._empty.clear()
        self._wake.set()
        return True

    def purge(self, reply: R) -> int:
        """Drop the queued media of one reply (a barge-in); returns how many were dropped."""
        keep: deque[Outgoing[R]] = deque()
        dropped = 0
        for m in self._q:
            if m.droppable and m.reply is reply:
                dropped += 1
                self._account(-m.size)
            else:
                keep.append(m)
        self._q = keep
        if not keep:
            self._empty.set()
        return dropped

    def overflow(self) -> None:
        if self.overflowed:
            return
        self.overflowed = True
        log.warning("closing a session: its send queue is over %d bytes", self.max_bytes)
        self._closing = asyncio.get_running_loop().create_task(self.close(
            CLOSE_SEND_QUEUE,
            f"send queue over {self.max_bytes // 1024} KiB: the client is not reading"))

    async def close(self, code: int, reason: str, timeout: float = 2.0) -> None:
        """Close the socket now (queued messages are dropped); never waits on the client long."""
        if self.closed:
            return
        self.closed = True
        self.close_code = code
        self._account(-self.bytes)
        self._q.clear()
        self._empty.set()
        self._wake.set()
        try:
            await asyncio.wait_for(self.ws.close(code, reason[:120]), timeout)
        except (TimeoutError, ConnectionClosed, OSError):
            transport = getattr(self.ws, "transport", None)
            if transport is not None:
                transport.abort()

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until everything queued has been written."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout)

    async def _run(self) -> None:
        try:
            while not self.closed:
                if not self._q:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                msg = self._q.popleft()
                self._account(-msg.size)
                await self.ws.send(msg.wire)
                if msg.reply is not None:
                    self.on_sent(msg, self.wall())
                if not self._q:
                    self._empty.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            with contextlib.suppress(Exception):
                self._account(-self.bytes)
            self._q.clear()
            self._empty.set()

    async def aclose(self) -> None:
        self.closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
