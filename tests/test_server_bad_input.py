"""Bad input over a real socket: an ``error`` naming the problem and the session lives on, or a
clear close code for what cannot go on; bounded memory; other sessions unaffected."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from realtime_helpers import RealtimeClient, silence, turn
from websockets.asyncio.client import connect

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _still_alive(c: RealtimeClient) -> None:
    mark = len(c.events)
    await c.send({"type": "session.update", "session": {"instructions": "still here"}})
    upd = await c.wait_for("session.updated", after=mark)
    assert upd["session"]["instructions"] == "still here"


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ('{"type": "no.such.event"}', "unknown_event_type", "type"),
        ('{"type": "response.audio.delta", "delta": ""}', "unknown_event_type", "type"),
        ('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_base64",
         "audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_audio", "audio"),
        ('{"type": "input_audio_buffer.append"}', "missing_required_parameter", "audio"),
        ('{"type": "session.update", "session": {"turn_detection": {"silence_duration_ms": "9"}}}',
         "invalid_type", "session.turn_detection.silence_duration_ms"),
        ('{"type": "session.update", "session": {"voice": "nobody-knows-me"}}', "invalid_value",
         "session.voice"),
        ('{"type": "session.update", "session": {"modalitiez": ["text"]}}', "unknown_parameter",
         "session.modalitiez"),
        ('{"type": "response.cancel"}', "response_cancel_not_active", None),
        ('{"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 5}',
         "invalid_value", "item_id"),
    ],
)
async def test_bad_event_gets_an_error_and_the_session_lives_on(server, message, code, param):
    c = await RealtimeClient.open(server.port)
    try:
        await c.wait_for("session.created")
        await c.send(message)
        err = (await c.wait_for("error"))["error"]
        assert err["code"] == code, err
        if param is not None:
            assert err["param"] == param
        assert err["message"]
        await _still_alive(c)
    finally:
        await c.close()


async def test_error_echoes_the_event_id(server):
    c = await RealtimeClient.open(server.port)
    try:
        await c.send({"type": "input_audio_buffer.commit", "event_id": "evt_42"})
        err = (await c.wait_for("error"))["error"]
        assert err["event_id"] == "evt_42"
    finally:
        await c.close()


async def test_oversized_message_is_refused_and_a_huge_one_closes(server):
    limit = server.cfg.server.max_event_bytes
    c = await RealtimeClient.open(server.port)
    try:
        audio = base64.b64encode(bytes(limit)).decode()  # 4/3 of the limit once encoded
        await c.send({"type": "input_audio_buffer.append", "audio": audio})
        err = (await c.wait_for("error"))["error"]
        assert err["code"] == "message_too_large" and str(limit) in err["message"]
        await _still_alive(c)
        await c.send("x" * (2 * limit + 10))  # past what the socket layer takes at all
        code, _ = await asyncio.wait_for(c.closed, 10)
        assert code == 1009
    finally:
        await c.close()


async def test_client_that_never_reads_is_closed_not_buffered(server):
    """The server's queue for a client is bounded: past it, close 1008 with the reason."""
    ws = await connect(f"ws://127.0.0.1:{server.port}/v1/realtime", max_queue=1,
                       max_size=None)
    try:
        bad = json.dumps({"type": "x" * 60, "event_id": "e" * 120})
        for _ in range(40):  # each answered by an error of ~1 KB that the client never reads
            await asyncio.gather(*(ws.send(bad) for _ in range(500)))
            if ws.state.name == "CLOSED" or server.metrics.sessions_closed.labels(
                    "1008")._value.get() > 0:
                break
            await asyncio.sleep(0.02)
        for _ in range(100):
            if server.metrics.sessions_closed.labels("1008")._value.get() > 0:
                break
            await asyncio.sleep(0.05)
        assert server.metrics.sessions_closed.labels("1008")._value.get() >= 1
    finally:
        ws.transport.abort()
    assert server.metrics.send_queue_bytes._value.get() < server.cfg.server.max_send_queue_bytes


async def test_audio_faster_than_real_time_is_taken_at_the_servers_pace(server, speech):
    """20 s of audio sent with no pacing: turns are found on the audio clock, memory stays
    bounded (the reader pauses instead of queueing), and a second session is not disturbed."""
    c = await RealtimeClient.open(server.port)
    other = await RealtimeClient.open(server.port)
    try:
        await c.send({"type": "session.update", "session": {"max_output_tokens": 3}})
        audio = (silence(300) + speech + silence(1500)) * 5
        sender = asyncio.get_running_loop().create_task(c.stream(audio, speed=0))
        done = await turn(other, speech, speed=3.0)
        assert done["response"]["status"] in ("completed", "incomplete")
        await sender
        await c.wait_for("input_audio_buffer.committed")
        sess = next(s for s in server.sessions if s.clock.audio_ms > 15000)
        assert sess.turn.ring.size <= 16000 * 16  # the ring never grows
        assert len(c.of("input_audio_buffer.speech_started")) >= 1
        await _still_alive(c)
    finally:
        await c.close()
        await other.close()
