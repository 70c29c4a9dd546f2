"""Property-based fuzz (hypothesis) of what a hostile client controls: the handshake's headers,
each event's bytes, and a session fed a sequence of such events.

Properties: nothing raises; every refusal is an ``error`` (or an HTTP status) of bounded size;
every message the server sends can be encoded to UTF-8 (a WebSocket text frame must be); the
session is still answering afterwards. Strings include lone UTF-16 surrogates (which JSON can
escape) and header names repeat (which HTTP allows). Bounded to a few seconds: the 10,000-event
loopback fuzz is ``bench/fuzz_loopback.py``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Request

from server.admission import offered_subprotocols
from server.app import Server
from server.instruments.zero_cost import zero_cost_stages
from server.metrics import Metrics
from server.protocol import (
    CLIENT_EVENTS,
    ProtocolError,
    default_session_config,
    dialect_from_handshake,
    parse_client_event,
)
from server.session import Session, SessionEnv
from stepaudio.config import Config

FUZZ = settings(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

#: Any code point, lone surrogates included (hypothesis leaves category Cs out by default).
any_text = st.text(st.characters(blacklist_categories=()), max_size=24)
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(
    allow_nan=False, allow_infinity=False) | any_text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(any_text, inner, max_size=4), max_leaves=10)
FIELDS = ["event_id", "session", "item", "response", "audio", "item_id", "audio_end_ms",
          "content_index", "previous_item_id", "response_id", "instructions", "voice",
          "metadata", "text", "type"]
TYPES = sorted(CLIENT_EVENTS) + ["response.audio.delta", "x", ""]


def _text_item(text: str, role: str = "user") -> dict[str, Any]:
    kind = "input_text" if role != "assistant" else "text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


shaped = st.one_of(
    st.builds(lambda t, rest: {"type": t, **rest}, st.sampled_from(TYPES),
              st.dictionaries(st.sampled_from(FIELDS) | any_text, values, max_size=4)),
    st.builds(lambda s: {"type": "session.update", "session": s},
              st.fixed_dictionaries({}, optional={"instructions": any_text, "voice": any_text,
                                                  "model": any_text,
                                                  "stepaudio": st.fixed_dictionaries(
                                                      {}, optional={"instruction": any_text})})),
    st.builds(lambda text, role, eid, iid: {"type": "conversation.item.create", "event_id": eid,
                                            "item": {**_text_item(text, role), "id": iid}},
              any_text, st.sampled_from(["user", "assistant", "system"]), any_text, any_text),
    st.builds(lambda meta, instr: {"type": "response.create", "response": {
        "metadata": meta, "instructions": instr, "max_output_tokens": 2}},
        st.dictionaries(any_text, any_text, max_size=3), any_text),
    st.builds(lambda item, eid: {"type": "conversation.item.retrieve", "item_id": item,
                                 "event_id": eid}, any_text, any_text),
)
wire = st.one_of(shaped.map(json.dumps), values.map(json.dumps), st.text(max_size=40),
                 st.binary(max_size=40))


def _sendable(message: str) -> None:
    """What the socket layer does with a server event: UTF-8, or the send fails."""
    message.encode("utf-8")


@FUZZ
@given(wire)
def test_the_parser_answers_anything_with_an_event_or_a_small_error(data: str | bytes) -> None:
    out = parse_client_event(data)
    if isinstance(out, ProtocolError):
        text = out.to_event().to_json("ga")
        assert text is not None
        _sendable(text)
        assert len(text) < 1500


# -- the handshake -------------------------------------------------------------------------------

header_names = st.sampled_from(["Sec-WebSocket-Protocol", "OpenAI-Beta", "Authorization",
                                "Origin", "Host", "Cookie", "X-Forwarded-For", "X-Other"])
header_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)


@pytest.fixture(scope="module")
def gatekeeper(tiny_root: Path) -> Server:
    """A server object (never started) whose HTTP routing the handshake fuzz calls directly."""
    cfg = Config()
    cfg.server.api_key_env = None
    return Server(cfg, tiny_root)


@FUZZ
@given(st.lists(st.tuples(header_names, header_values), max_size=8),
       st.sampled_from(["/v1/realtime", "/metrics", "/readyz", "/"])
       | header_values.map(lambda t: "/" + t))
def test_any_handshake_headers_get_an_answer_not_an_exception(gatekeeper, headers, path):
    request = Request(path, Headers(headers))
    response = gatekeeper._process_request(None, request)  # type: ignore[arg-type]
    assert response is None or 200 <= response.status_code < 600
    dialect_from_handshake(request.headers, offered_subprotocols(request.headers), {})


# -- a session fed fuzzed events ------------------------------------------------------------------


class RecordingSocket:
    """The part of a WebSocket a session uses; ``send`` encodes like the real one does."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: tuple[int, str] | None = None

    async def send(self, message: str) -> None:
        _sendable(message)
        self.sent.append(message)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed_with = (code, reason)


@pytest.fixture(scope="module")
def loop_and_env(tiny_root: Path) -> Iterator[tuple[asyncio.AbstractEventLoop, SessionEnv]]:
    loop = asyncio.new_event_loop()
    cfg = Config()
    metrics = Metrics()
    stages = zero_cost_stages(cfg, tiny_root, metrics)

    async def start() -> None:
        stages.pump.start()

    loop.run_until_complete(start())
    try:
        yield loop, SessionEnv(cfg, stages, metrics, default_session_config(cfg.session))
    finally:
        loop.run_until_complete(stages.aclose())
        loop.close()


async def _drive(env: SessionEnv, messages: list[str | bytes]) -> RecordingSocket:
    ws = RecordingSocket()
    session = Session(ws, env, "ga")
    session.outbox.start()
    try:
        for m in messages:
            await session.on_message(m)
        probe = '{"type":"session.update","event_id":"probe","session":{"instructions":"ok"}}'
        await session.on_message(probe)
        for _ in range(200):  # the writer task hands everything to the socket
            if any('"session.updated"' in m and '"instructions":"ok"' in m for m in ws.sent):
                break
            await asyncio.sleep(0.005)
        assert ws.closed_with is None and not session.outbox.closed, ws.closed_with
        assert any('"session.updated"' in m and '"instructions":"ok"' in m for m in ws.sent)
    finally:
        await session.close()
    return ws


@settings(FUZZ, max_examples=60)
@given(st.lists(wire, min_size=1, max_size=8))
def test_a_session_fed_fuzzed_events_sends_only_utf8_and_lives_on(loop_and_env, messages):
    loop, env = loop_and_env
    ws = loop.run_until_complete(_drive(env, messages))
    for m in ws.sent:
        event = json.loads(m)
        if event["type"] == "error":
            assert len(m) < 1500
