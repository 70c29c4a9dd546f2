"""The session in virtual time with scripted stand-in stages (``tests/session_harness.py``): a
turn, speculation kept and dropped, barge-in truncated to what was played, manual turns, and a
client that disconnects mid-reply. Each runs in well under a second and sees exactly the events a
client would, in order."""

from __future__ import annotations

import base64
import logging
import math

from session_harness import STEP_MS, SessionHarness

LONG_REPLY = "好的，我明白你的意思了。我们明天上午十点见面吧。今天天气不错，适合出去散散步。"


def wire(h: SessionHarness, after: int = 0) -> list[str]:
    """The event types sent, a run of audio deltas as one ``audio×N``, state changes and
    speculation events with what they say."""
    out: list[str] = []
    for e in h.events[after:]:
        t = e["type"]
        if t in ("response.output_audio.delta", "response.audio.delta"):
            if out and out[-1].startswith("audio×"):
                out[-1] = f"audio×{int(out[-1][6:]) + 1}"
                continue
            out.append("audio×1")
            continue
        if t == "stepaudio.state":
            t = f"state:{e['state']}/{e['reason']}"
        elif t == "stepaudio.speculation":
            t = f"speculation:{e['action']}" + (f"/{e['reason']}" if e.get("reason") else "")
        elif t == "response.done":
            t = f"response.done:{e['response']['status']}"
        out.append(t)
    return out


async def long_reply_playing(h: SessionHarness) -> dict:
    """A spoken turn answered by a long reply, up to its first audio delta (returned)."""
    h.chat.reply = LONG_REPLY
    await h.silence(300)
    await h.speak(1000)
    return await h.until("response.output_audio.delta")


def audio_ms(event: dict) -> float:
    return len(base64.b64decode(event["delta"])) / 2 / 24.0  # pcm16 at 24 kHz


def played_ms(h: SessionHarness, response_id: str, at_ms: float) -> float:
    """The playback model: audio plays in real time from the moment the socket took it."""
    queue_end, sent = -math.inf, 0.0
    for t, e in h.ws.sent:
        if e["type"] == "response.output_audio.delta" and e["response_id"] == response_id \
                and t <= at_ms:
            queue_end = max(queue_end, t) + audio_ms(e)
            sent += audio_ms(e)
    return max(0.0, sent - max(0.0, queue_end - at_ms))


TURN_START = [
    "session.created", "stepaudio.profile",
    "input_audio_buffer.speech_started", "state:user_speaking/speech_started",
    "state:user_paused/speech_stopped", "speculation:started",
    "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
    "conversation.item.added", "conversation.item.done",
    "state:bot_replying/response_started", "speculation:committed", "response.created",
    "response.output_item.added", "conversation.item.added", "response.content_part.added",
]
REPLY_END = [
    "response.output_audio.done", "response.output_audio_transcript.done",
    "response.content_part.done", "response.output_item.done", "conversation.item.done",
]


async def test_a_spoken_turn_is_answered_by_its_committed_speculation_in_wire_order():
    async with SessionHarness() as h:
        await h.silence(300)
        await h.speak(1000)
        await h.until("stepaudio.timings")
        await h.silence(3000)  # the reply (3 s of audio) plays out: the bot falls silent
        assert wire(h) == TURN_START + [
            "response.output_audio_transcript.delta", "audio×3",
            "response.output_audio_transcript.delta", "audio×4",
            "conversation.item.input_audio_transcription.completed", "audio×1",
            "response.output_audio_transcript.delta", "audio×6",
            *REPLY_END, "response.done:completed", "stepaudio.timings",
            "state:silence/response_finished",
        ], wire(h)
        started = h.of("input_audio_buffer.speech_started")[0]
        stopped = h.of("input_audio_buffer.speech_stopped")[0]
        spec = h.of("stepaudio.speculation")
        created = h.of("response.created")[0]
        assert started["item_id"] == stopped["item_id"] == h.of("input_audio_buffer.committed")[
            0]["item_id"]
        assert started["audio_start_ms"] == 0  # 300 ms of prefix padding reach the start
        assert 1300 <= stopped["audio_end_ms"] <= 1340  # the speech ended at 1300 ms
        assert spec[0]["speculation_id"] == spec[1]["speculation_id"] == created["response"]["id"]
        done = h.of("response.done")[0]["response"]
        assert done["output"][0]["content"][0]["transcript"] == h.chat.reply
        timings = h.of("stepaudio.timings")[0]["timings_ms"]
        assert timings["silence_wait"] == 2080 - stopped["audio_end_ms"]
        # in virtual time: the speculation had its first audio ready 500 ms before the end of the
        # turn (its first clause: 3 tokens from 100 ms on, then a 60 ms chunk of synthesis), so
        # all of that time was saved and the audio went out at once
        assert timings["end_of_turn_to_first_audio"] == 0
        assert timings["speculation_saved"] == 100 + 2 * 20 + 60
        # the history: the user's turn as its transcript, the reply as spoken
        assert [(t.role, t.text) for t in h.session.conversation.context] == [
            ("user", "你好"), ("assistant", h.chat.reply)]


async def test_a_speculation_is_dropped_when_the_user_resumes():
    async with SessionHarness() as h:
        await h.silence(300)
        await h.speak(1000)
        await h.silence(460)  # past the 250 ms pause, short of the 750 ms end of turn
        await h.speak(800)
        await h.until("response.done")
        assert wire(h)[:16] == [
            "session.created", "stepaudio.profile",
            "input_audio_buffer.speech_started", "state:user_speaking/speech_started",
            "state:user_paused/speech_stopped", "speculation:started",
            "speculation:cancelled/user_resumed", "state:user_speaking/user_resumed",
            "state:user_paused/speech_stopped", "speculation:started",
            "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
            "conversation.item.added", "conversation.item.done",
            "state:bot_replying/response_started", "speculation:committed",
        ], wire(h)
        spec = h.of("stepaudio.speculation")
        assert spec[0]["speculation_id"] != spec[2]["speculation_id"]
        assert h.of("response.created")[0]["response"]["id"] == spec[2]["speculation_id"]
        assert len(h.of("input_audio_buffer.committed")) == 1  # one turn, not two
        assert h.of("input_audio_buffer.speech_stopped")[0]["audio_end_ms"] >= 2560
        # the dropped speculation stopped generating: only one reply prompt went on to speak
        assert len(h.synth.streams) <= 2 and h.synth.streams[0].cancelled


async def test_barge_in_truncates_the_reply_to_the_audio_played():
    async with SessionHarness() as h:
        first = await long_reply_playing(h)
        reply_id, item_id = first["response_id"], first["item_id"]
        await h.silence(400)
        mark = len(h.events)
        await h.speak(600)  # the user talks over the reply
        await h.silence(100)
        barge = h.find("stepaudio.state", lambda e: e["reason"] == "barge_in")
        i = h.events.index(barge) - 1
        assert wire(h, mark)[0].startswith("audio×")  # the reply went on until then
        assert wire(h, i)[:9] == [
            "input_audio_buffer.speech_started", "state:user_speaking/barge_in",
            *REPLY_END, "response.done:cancelled", "conversation.item.truncated",
        ], wire(h, i)
        truncated = h.of("conversation.item.truncated")[0]
        done = h.of("response.done")[0]["response"]
        assert done["status_details"]["reason"] == "turn_detected"
        assert truncated["item_id"] == item_id
        sent = sum(audio_ms(e) for e in h.of("response.output_audio.delta"))
        played = played_ms(h, reply_id, barge["at_ms"])
        assert abs(truncated["audio_end_ms"] - played) <= STEP_MS, (truncated, played, sent)
        assert sent - truncated["audio_end_ms"] > 1000  # sent far ahead, not all heard
        # nothing of that reply after the flush signal
        assert not [e for e in h.events[i:] if e["type"] == "response.output_audio.delta"]
        # the history keeps what was heard: 3 characters of 200 ms each, and no more
        heard = h.session.conversation.context.get(item_id).spoken_text
        assert heard == LONG_REPLY[: int(truncated["audio_end_ms"] // 200)][:len(heard)]
        assert heard.startswith("好的，") and "明天" not in heard
        # the client says it played less: that wins, for the history and for retrieval
        mark = len(h.events)
        h.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                "audio_end_ms": 300})
        await h.until("conversation.item.truncated", after=mark)
        h.send({"type": "conversation.item.retrieve", "item_id": item_id})
        item = (await h.until("conversation.item.retrieved", after=mark))["item"]
        assert item["content"][0]["transcript"] == "好"
        # the next reply's prompt carries only that
        await h.until("response.done", after=mark)
        prompt = h.chat.reply_prompts()[-1]
        assert "assistant\n好<|EOT|>" in prompt and "我明白" not in prompt


async def test_manual_turns_commit_and_reply_on_request():
    async with SessionHarness(dialect="beta") as h:
        h.send({"type": "session.update", "session": {"turn_detection": None}})
        await h.idle(40)
        await h.speak(800)
        h.send({"type": "input_audio_buffer.commit"})
        await h.idle(40)
        assert not h.of("response.created")  # no reply until asked
        h.send({"type": "response.create", "response": {"metadata": {"k": "v"}}})
        await h.until("response.done", audio=False)
        await h.idle(3000)
        assert wire(h) == [
            "session.created", "stepaudio.profile", "session.updated",
            "input_audio_buffer.committed", "conversation.item.created",
            "state:bot_replying/response_started", "response.created",
            "response.output_item.added", "conversation.item.created",
            "response.content_part.added",
            "conversation.item.input_audio_transcription.completed",
            "response.audio_transcript.delta", "audio×3",
            "response.audio_transcript.delta", "audio×5",
            "response.audio_transcript.delta", "audio×6",
            "response.audio.done", "response.audio_transcript.done", "response.content_part.done",
            "response.output_item.done", "response.done:completed", "stepaudio.timings",
            "state:silence/response_finished",
        ], wire(h)
        committed = h.of("input_audio_buffer.committed")[0]
        assert h.of("response.created")[0]["response"]["metadata"] == {"k": "v"}
        assert [t.role for t in h.session.conversation.context] == ["user", "assistant"]
        assert h.session.conversation.context.get(committed["item_id"]).text == "你好"


async def test_a_client_that_disconnects_mid_reply_leaves_nothing_running(caplog):
    caplog.set_level(logging.WARNING)
    async with SessionHarness() as h:
        await long_reply_playing(h)
        h.ws.disconnect()
        await h.idle(100)
        session = h.session
        assert h.task.done() and h.task.exception() is None
        assert session.closing
        assert all(s.closed for s in h.synth.streams)
        assert h.chat.cancelled >= 1
        assert not h.pump.clients and not h.pump.tickers
        assert not [t for t in session.tasks.tasks if not t.done()]
        assert len(session.conversation.context) == 0  # the history is let go at once
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.records


async def test_response_cancel_stops_the_reply_and_truncates_it():
    async with SessionHarness() as h:
        first = await long_reply_playing(h)
        await h.silence(200)
        h.send({"type": "response.cancel", "event_id": "c1"})
        await h.silence(100)
        cancel = h.find("stepaudio.state", lambda e: e["reason"] == "client_cancelled")
        i = h.events.index(cancel)
        j = h.events.index(h.of("response.output_audio.done")[0])
        assert wire(h, j) == [
            *REPLY_END, "response.done:cancelled", "conversation.item.truncated",
            "state:silence/client_cancelled"], wire(h, j)
        assert i > j
        assert h.of("response.done")[0]["response"]["status_details"]["reason"] == (
            "client_cancelled")
        h.send({"type": "response.cancel", "event_id": "c2"})
        err = await h.until("error")
        assert err["error"]["event_id"] == "c2" and err["error"]["code"] == "response_cancel_not_active"
        assert h.of("conversation.item.truncated")[0]["item_id"] == first["item_id"]


async def test_a_chat_model_failing_mid_reply_ends_it_and_keeps_what_was_said():
    async with SessionHarness() as h:
        h.chat.reply = LONG_REPLY
        h.chat.fail_after = 12  # two clauses, then the backend goes away
        await h.silence(300)
        await h.speak(1000)
        done = (await h.until("response.done"))["response"]
        assert done["status"] == "failed"
        assert "chat model" in done["status_details"]["error"]["message"]
        errors = h.of("error")
        assert len(errors) == 1 and errors[0]["error"]["code"] == "response_failed"
        i = h.events.index(errors[0])
        assert wire(h, i) == ["error", *REPLY_END, "response.done:failed", "stepaudio.timings"
                              ], wire(h, i)
        await h.silence(400)
        heard = h.session.conversation.context.get(done["output"][0]["id"]).spoken_text
        sent = sum(audio_ms(e) for e in h.of("response.output_audio.delta"))
        assert heard and LONG_REPLY.startswith(heard) and len(heard) <= sent / 200  # 200 ms a char
        h.chat.fail_after = None  # the next turn works
        mark = len(h.events)
        await h.speak(800)
        assert (await h.until("response.done", after=mark))["response"]["status"] == "completed"


async def test_text_only_reply_to_a_text_item():
    async with SessionHarness() as h:
        h.send({"type": "session.update", "session": {
            "output_modalities": ["text"], "audio": {"input": {"turn_detection": None}}}})
        h.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text",
                                                            "text": "今天天气怎么样"}]}})
        h.send({"type": "response.create"})
        await h.until("response.done", audio=False)
        await h.idle(200)
        assert wire(h) == [
            "session.created", "stepaudio.profile", "session.updated", "conversation.item.added",
            "conversation.item.done", "state:bot_replying/response_started", "response.created",
            "response.output_item.added", "conversation.item.added", "response.content_part.added",
            *["response.output_text.delta"] * len(h.chat.reply),
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "conversation.item.done", "response.done:completed",
            "state:silence/response_finished", "stepaudio.timings"], wire(h)
        prompt = h.chat.reply_prompts()[-1]
        assert prompt.endswith("human\n今天天气怎么样<|EOT|><|BOT|>assistant\n")
        reply = h.of("response.done")[0]["response"]["output"][0]
        assert h.session.conversation.context.get(reply["id"]).spoken_text == h.chat.reply
