"""The client's side of the wire protocol (docs/protocol.md): connect, speak JSON, map failures.

Failures a user can act on (wrong address, wrong key, server still loading) become a
:class:`ClientError` carrying a documented exit status, so scripts can tell them apart without
parsing messages. The event names of both protocol dialects are folded into one here, so the rest
of the client never has to know which dialect the server chose.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from server.protocol.server_events import GA_NAMES  # beta name -> GA name of a server event

#: Exit statuses of ``stepaudio client`` (documented in its --help and the README).
EXIT_OK = 0
EXIT_ERROR = 1  # bad input file, missing optional package, no reply in time
EXIT_USAGE = 2  # argparse's own status for bad options
EXIT_UNREACHABLE = 3  # nothing listens there, or it is not a realtime server
EXIT_AUTH = 4  # the server refused the API key (HTTP 401)
EXIT_NOT_READY = 5  # the server is still loading, shutting down, or full (HTTP 503, close 1013)
EXIT_LOST = 6  # the connection dropped in the middle of the session
EXIT_FORBIDDEN = 7  # the server refused the host name or origin (HTTP 403)
EXIT_CODES = {
    EXIT_OK: "the session ended normally",
    EXIT_ERROR: "bad input, a missing optional package, or no reply in time",
    EXIT_USAGE: "bad command-line options",
    EXIT_UNREACHABLE: "server unreachable (nothing listens at the address, or not a realtime "
    "server)",
    EXIT_AUTH: "the server refused the API key",
    EXIT_NOT_READY: "the server is not ready yet (still loading models), shutting down, or full",
    EXIT_LOST: "the connection was lost during the session",
    EXIT_FORBIDDEN: "the server does not answer to this host name or origin "
    "(server.allowed_hosts / allowed_origins)",
}

CLOSE_GOING_AWAY = 1001
CLOSE_TRY_LATER = 1013
CLOSE_UNAUTHORIZED = 4001  # servers before HTTP refusals closed a wrong key with this

SAMPLE_RATE = 24000  # pcm16 24 kHz mono: the protocol's default audio format, both directions


class ClientError(Exception):
    """An expected failure with the exit status that names it."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def event_type(event: dict[str, Any]) -> str:
    """The event's type under its GA name (beta servers name a few events differently)."""
    t = str(event.get("type", ""))
    return GA_NAMES.get(t, t)


def encode_pcm16(samples: np.ndarray) -> str:
    """Float samples in [-1, 1] → base64 pcm16 little-endian, what ``input_audio_buffer.append``
    carries."""
    pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    return base64.b64encode((pcm * 32767.0).astype("<i2").tobytes()).decode("ascii")


def decode_pcm16(data: str) -> np.ndarray:
    """base64 pcm16 → float32 samples."""
    raw = base64.b64decode(data)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def closed_error(err: ConnectionClosed, url: str, *, during: str = "session") -> ClientError:
    """Turn a close frame into the message and exit status the user should see."""
    rcvd = err.rcvd
    code = rcvd.code if rcvd is not None else None
    reason = (rcvd.reason if rcvd is not None else "") or "no reason given"
    if code == CLOSE_UNAUTHORIZED:
        return ClientError(f"{url}: the server refused the API key ({reason}); pass --api-key or "
                           "set STEPAUDIO_API_KEY", EXIT_AUTH)
    if code == CLOSE_TRY_LATER:
        return ClientError(f"{url}: the server cannot take this session now ({reason})",
                           EXIT_NOT_READY)
    if code == CLOSE_GOING_AWAY:
        return ClientError(f"{url}: the server is shutting down ({reason})", EXIT_LOST)
    what = f"close code {code}" if code is not None else "no close frame"
    return ClientError(f"{url}: connection lost during the {during} ({what}: {reason})", EXIT_LOST)


def refused_error(err: InvalidStatus, url: str) -> ClientError:
    """Turn an HTTP refusal of the handshake into the message and exit status to show."""
    response = err.response
    status = response.status_code
    body = (response.body or b"").decode("utf-8", "replace").strip().splitlines()
    reason = f" ({body[0][:200]})" if body else ""
    if status == 401:
        return ClientError(f"{url}: the server refused the API key (HTTP 401){reason}; pass "
                           "--api-key or set STEPAUDIO_API_KEY", EXIT_AUTH)
    if status == 403:
        return ClientError(f"{url}: the server refused this connection (HTTP 403){reason}",
                           EXIT_FORBIDDEN)
    if status == 503:
        retry = response.headers.get("Retry-After")
        when = f"; try again in {retry} s" if retry else ""
        return ClientError(f"{url}: the server cannot take this session now (HTTP 503)"
                           f"{reason}{when}", EXIT_NOT_READY)
    return ClientError(f"{url}: not a realtime endpoint (HTTP {status}); is the address "
                       "right?", EXIT_UNREACHABLE)


@dataclass
class Connection:
    """One realtime WebSocket: JSON events in and out."""

    ws: ClientConnection
    url: str
    first_event: dict[str, Any] = field(default_factory=dict)  # the session.created event

    async def send(self, event: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(event, ensure_ascii=False))

    async def recv(self) -> dict[str, Any]:
        """The next server event (binary frames are not part of the protocol and are skipped)."""
        while True:
            try:
                message = await self.ws.recv()
            except ConnectionClosed as err:
                raise closed_error(err, self.url) from None
            if isinstance(message, str):
                try:
                    event = json.loads(message)
                except ValueError:
                    continue
                if isinstance(event, dict):
                    return event

    async def close(self) -> None:
        await self.ws.close()


async def open_connection(url: str, api_key: str | None, *, timeout_s: float = 10.0
                          ) -> Connection:
    """Connect and wait for ``session.created``, so a refusal shows up here and not later.

    The server refuses over HTTP (401 key, 403 host or origin, 503 not ready or full); a server
    that fills up between the check and the upgrade closes with 1013, so only the first event
    proves the session is really open.
    """
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        ws = await connect(url, additional_headers=headers, subprotocols=["realtime"],  # type: ignore[list-item]
                           open_timeout=timeout_s, max_size=None, compression=None,
                           ping_interval=20, ping_timeout=20)
    except InvalidURI as err:
        raise ClientError(f"{url}: not a WebSocket URL ({err})", EXIT_USAGE) from None
    except InvalidStatus as err:
        raise refused_error(err, url) from None
    except (OSError, TimeoutError, asyncio.TimeoutError, InvalidHandshake) as err:
        detail = str(err) or type(err).__name__
        raise ClientError(f"{url}: server unreachable ({detail}); is `stepaudio serve` running "
                          "there?", EXIT_UNREACHABLE) from None
    conn = Connection(ws, url)
    try:
        first = await asyncio.wait_for(conn.recv(), timeout_s)
    except (TimeoutError, asyncio.TimeoutError):
        await ws.close()
        raise ClientError(f"{url}: no session.created within {timeout_s:g} s",
                          EXIT_UNREACHABLE) from None
    except ClientError as err:
        if err.code == EXIT_LOST:  # closed before the session even started
            err.code = EXIT_UNREACHABLE
        raise
    if event_type(first) == "error":
        await ws.close()
        raise ClientError(f"{url}: the server answered with an error: "
                          f"{first.get('error', {}).get('message')}")
    if event_type(first) != "session.created":
        await ws.close()
        raise ClientError(f"{url}: expected session.created, got {first.get('type')!r}",
                          EXIT_UNREACHABLE)
    conn.first_event = first
    return conn


@dataclass
class SessionOptions:
    """What ``session.update`` should change; ``None`` leaves the server's default."""

    voice: str | None = None
    instructions: str | None = None
    instruction_tags: str | None = None
    vad_threshold: float | None = None
    silence_ms: int | None = None
    prefix_padding_ms: int | None = None
    pause_ms: int | None = None
    min_barge_in_ms: int | None = None
    speculative: bool | None = None
    max_output_tokens: int | None = None

    def update_event(self) -> dict[str, Any] | None:
        """A GA ``session.update`` with just the fields set, or ``None`` when nothing is."""
        session: dict[str, Any] = {"type": "realtime"}
        if self.instructions is not None:
            session["instructions"] = self.instructions
        if self.max_output_tokens is not None:
            session["max_output_tokens"] = self.max_output_tokens
        if self.voice is not None:
            session.setdefault("audio", {}).setdefault("output", {})["voice"] = self.voice
        td = {k: v for k, v in (("threshold", self.vad_threshold),
                                ("silence_duration_ms", self.silence_ms),
                                ("prefix_padding_ms", self.prefix_padding_ms)) if v is not None}
        if td:
            session.setdefault("audio", {}).setdefault("input", {})["turn_detection"] = td
        extra = {k: v for k, v in (("instruction", self.instruction_tags),
                                   ("pause_ms", self.pause_ms),
                                   ("min_barge_in_ms", self.min_barge_in_ms),
                                   ("speculative", self.speculative)) if v is not None}
        if extra:
            session["stepaudio"] = extra
        if len(session) == 1:
            return None
        return {"type": "session.update", "session": session}
