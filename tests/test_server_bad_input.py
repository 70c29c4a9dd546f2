"""Bad input over a real socket: an ``error`` naming the problem and the session lives on, or a
clear close code for what cannot go on; bounded memory; other sessions unaffected."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from realtime_helpers import RealtimeClient, server_config, silence, turn
from websockets.asyncio.client import connect

from server.app import Server

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


@pytest.mark.parametrize("event", [
    '{"type": "input_audio_buffer.commit", "event_id": "evt_\\ud800"}',
    '{"type": "session.update", "session": {"instructions": "be \\udfff brief"}}',
    '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
    '"content": [{"type": "input_text", "text": "hi \\ud83d"}]}}',
    '{"type": "response.create", "response": {"metadata": {"k": "\\udc00"}}}',
    '{"type": "session.update", "session": {"voice": "\\ud800"}}',
    '{"type": "conversation.item.create", "item": {"id": "item_\\ud800", "type": "message", '
    '"role": "user", "content": [{"type": "input_text", "text": "hi"}]}}',
    '{"type": "session.update", "session": {"\\ud800": 1}}',
], ids=["event_id", "instructions", "item-text", "metadata", "voice", "item-id", "field-name"])
async def test_a_lone_surrogate_gets_an_error_and_the_session_lives_on(server, event):
    """JSON can escape half of a UTF-16 pair; such a string is not text and cannot be echoed."""
    c = await RealtimeClient.open(server.port)
    try:
        await c.wait_for("session.created")
        await c.send(event)
        err = (await c.wait_for("error"))["error"]
        assert err["code"] == "invalid_value" and "surrogate" in err["message"], err
        await _still_alive(c)
        # a well-formed pair (an emoji written as two escapes) is ordinary text
        mark = len(c.events)
        await c.send('{"type": "session.update", "session": {"instructions": "ok \\ud83d\\ude00"}}')
        upd = await c.wait_for("session.updated", after=mark)
        assert upd["session"]["instructions"] == "ok \U0001F600"
    finally:
        await c.close()


LONG = "x" * 20000


@pytest.mark.parametrize("event", [
    {"type": "session.update", "session": {LONG: 1}},  # an unknown field name
    {"type": "no.such.type", "event_id": LONG},
    {"type": "input_audio_buffer.commit", "event_id": LONG},
    {"type": "conversation.item.truncate", "item_id": LONG, "audio_end_ms": 0},
    {"type": "conversation.item.delete", "item_id": LONG},
    {"type": "conversation.item.retrieve", "item_id": LONG},
    {"type": "response.cancel", "response_id": LONG},
    {"type": "session.update", "session": {"voice": LONG}},
    {"type": "response.create", "response": {"voice": LONG}},
    {"type": "session.update", "session": {"instructions": LONG * 2}},
    {"type": "response.create", "response": {"metadata": {LONG: "v"}}},
    {"type": "response.create", "response": {"metadata": {"k": LONG}}},
    {"type": "response.create", "response": {"metadata": {f"k{i}": "v" for i in range(17)}}},
    {"type": "conversation.item.create", "previous_item_id": LONG, "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}},
    {"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
        "transcription": {"prompt": LONG}}}}},
], ids=["field-name", "unknown-type-event-id", "event-id", "truncate-id", "delete-id",
        "retrieve-id", "cancel-id", "voice", "response-voice", "instructions", "metadata-key",
        "metadata-value", "metadata-count", "previous-item-id", "transcription-prompt"])
async def test_client_strings_are_echoed_within_documented_bounds(server, event):
    c = await RealtimeClient.open(server.port)
    try:
        await c.wait_for("session.created")
        await c.send(event)
        err = await c.wait_for("error")
        wire = json.dumps(err, ensure_ascii=False)
        assert len(wire) < 1500, wire[:300]
        e = err["error"]
        assert len(e["message"]) <= 512 and len(e.get("param") or "") <= 128
        assert len(e.get("event_id") or "") <= 128
        await _still_alive(c)
    finally:
        await c.close()


async def test_an_item_over_the_size_limit_is_refused_not_a_reason_to_close(server):
    """A valid event whose item is too big gets a clear error (before: the echo overflowed the
    send queue and the session was closed as 'client is not reading')."""
    srv = Server(server_config(max_event_bytes=4 * 1024 * 1024,
                               max_send_queue_bytes=4 * 1024 * 1024), None, stages=server.stages)
    await srv.start()
    await srv.load()
    c = await RealtimeClient.open(srv.port)
    try:
        await c.wait_for("session.created")
        text = "x" * int(2.1 * 1024 * 1024)
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        err = (await c.wait_for("error", timeout=30))["error"]
        assert err["code"] == "item_too_large" and "max_item_bytes" in err["message"], err
        await _still_alive(c)
        # an item within the limit is taken and echoed, even past a small send queue
        mark = len(c.events)
        big = "好" * (300 * 1024)  # 900 KiB of UTF-8
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": big}]}})
        done = await c.wait_for("conversation.item.done", after=mark, timeout=30)
        assert done["item"]["content"][0]["text"] == big
    finally:
        await c.close()
        await srv.stop(grace_s=0.1)


async def test_a_full_history_is_refused_with_a_clear_error(server):
    srv = Server(server_config(max_event_bytes=1024 * 1024, max_history_bytes=1024 * 1024,
                               max_send_queue_bytes=4 * 1024 * 1024),
                 None, stages=server.stages)
    await srv.start()
    await srv.load()
    c = await RealtimeClient.open(srv.port)
    try:
        await c.wait_for("session.created")
        ids = []
        for i in range(6):  # 6 x 200 KB: the fifth or sixth is over 1 MiB
            mark = len(c.events)
            await c.send({"type": "conversation.item.create", "item": {
                "id": f"big_{i}", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "x" * 200_000}]}})
            got = await c.wait_for("conversation.item.done", after=mark, timeout=20) \
                if i < 5 else await c.wait_for("error", after=mark, timeout=20)
            ids.append(got)
        err = ids[-1]["error"]
        assert err["code"] == "conversation_full" and "max_history_bytes" in err["message"]
        # deleting makes room again
        await c.send({"type": "conversation.item.delete", "item_id": "big_0"})
        mark = len(c.events)
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "x" * 200_000}]}})
        await c.wait_for("conversation.item.done", after=mark, timeout=20)
    finally:
        await c.close()
        await srv.stop(grace_s=0.1)
