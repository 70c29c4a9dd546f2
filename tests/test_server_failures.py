"""A stage that fails mid-reply ends that reply, never the session, and never hangs it.

The chat model is a real OpenAI-compatible server in its own process (``tests/openai_server.py``)
that breaks its stream on request the ways a real backend does: it hangs, closes, resets, sends
garbage, sends vLLM's mid-stream error object, or answers HTTP 500. The TTS and the audio
tokenizer are the real ones behind stage wrappers that raise on request. Every failure must end
the reply with ``response.done`` (status ``failed``, the reason in ``status_details``) and an
``error`` event, keep the history true to the audio that was sent, and leave the session able to
answer the next turn.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from backend_process import openai_server
from realtime_helpers import RATE, RealtimeClient, server_config, turn

from server.app import Server
from server.workers import ChatStage, SpeechStage, TokenizerStage
from stepaudio.config import LLMConfig
from stepaudio.errors import StepAudioError
from stepaudio.llm.engine import SamplingParams
from stepaudio.llm.engine_openai import OpenAIEngine

pytestmark = pytest.mark.asyncio(loop_scope="session")

#: The backend's read timeout here: a hung stream must fail within about this long.
READ_TIMEOUT_S = 2.0
#: Scripted reply whose first clause ("你好。") is spoken before the fault.
SCRIPT = "你好。今天天气很好，我们一起去公园散步吧。然后去吃饭，好不好？"


class FlakySpeechStream:
    """A real speech stream that raises after ``after`` chunks (what a TTS failure looks like
    to the server: the stream's iterator raises)."""

    def __init__(self, inner: Any, after: int) -> None:
        self.inner = inner
        self.after = after
        self.chunks = 0

    def push_text(self, delta: str) -> None:
        self.inner.push_text(delta)

    def end_text(self) -> None:
        self.inner.end_text()

    def cancel(self) -> None:
        self.inner.cancel()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self.chunks >= self.after:
            raise StepAudioError("speech synthesis failed: the vocoder crashed (injected)")
        chunk = await self.inner.__anext__()
        self.chunks += 1
        return chunk


class FlakySpeech(SpeechStage):
    """The real synthesizer; while ``fail_after`` is set, streams fail after that many chunks."""

    fail_after: int | None = None

    def open(self, speaker: str, seed: int | None = None) -> Any:
        stream = super().open(speaker, seed)
        return stream if self.fail_after is None else FlakySpeechStream(stream, self.fail_after)


class FlakyTokenizer(TokenizerStage):
    """The real streaming tokenizer; while ``failing`` is set, every call raises."""

    failing = False

    async def feed(self, stream: Any, pcm16k: Any) -> Any:
        if self.failing:
            raise RuntimeError("the audio tokenizer crashed (injected)")
        return await super().feed(stream, pcm16k)

    async def finish(self, stream: Any) -> Any:
        if self.failing:
            raise RuntimeError("the audio tokenizer crashed (injected)")
        return await super().finish(stream)


@dataclasses.dataclass
class Fragile:
    server: Server
    backend: str  # the chat backend's root URL (its /fault endpoint is here)
    speech: FlakySpeech
    tokenizer: FlakyTokenizer

    async def fault(self, **fault: Any) -> None:
        async with httpx.AsyncClient() as http:
            r = await http.post(f"{self.backend}/fault", json=fault)
            r.raise_for_status()

    async def release(self) -> None:
        async with httpx.AsyncClient() as http:
            (await http.post(f"{self.backend}/fault/release")).raise_for_status()

    def session(self) -> Any:
        (only,) = self.server.sessions
        return only


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def fragile(server, tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """A server whose chat model is a remote backend process, with breakable TTS and
    tokenizer (it borrows the shared server's VAD and models)."""
    chat_dir = tiny_root / "Step-Audio-Chat"
    with openai_server(chat_dir, tmp_path_factory.mktemp("backend") / "backend.log") as url:
        cfg = server_config()
        llm = LLMConfig(engine="openai", base_url=url, read_timeout_s=READ_TIMEOUT_S,
                        connect_retries=0, seed=1)
        engine = OpenAIEngine.from_config(llm, chat_dir)
        chat = ChatStage(engine, server.metrics, budget=cfg.llm.budget(engine.max_model_len),
                         send_text=False, base_params=SamplingParams.from_config(cfg.llm),
                         max_transcript_tokens=8)
        st = server.stages
        speech = FlakySpeech(st.speech.synth, server.metrics)
        tokenizer = FlakyTokenizer(st.tokenizer._open, server.metrics)
        stages = dataclasses.replace(st, chat=chat, speech=speech, tokenizer=tokenizer)
        srv = Server(cfg, None, stages=stages)
        await srv.start()
        await srv.load()
        try:
            yield Fragile(srv, url.removesuffix("/v1"), speech, tokenizer)
        finally:
            await srv.stop(grace_s=0.1)
            await chat.aclose()
            speech._encoder.shutdown(wait=False)  # not aclose(): the synthesizer is the server's
            tokenizer.close()


def _audio_ms(client: RealtimeClient, response_id: str) -> float:
    return sum(1000.0 * len(base64.b64decode(e["delta"])) / 2 / RATE
               for e in client.of("response.output_audio.delta")
               if e["response_id"] == response_id)


def _assert_failed_truthfully(fragile: Fragile, client: RealtimeClient, done: dict[str, Any],
                              mark: int, why: str) -> None:
    """``response.done`` failed with the reason, one ``error`` about it, and a history that
    holds no more than what was sent."""
    response = done["response"]
    assert response["status"] == "failed", response
    details = response["status_details"]
    assert details["type"] == "failed" and details["error"]["code"], details
    assert why in details["error"]["message"], details
    errors = [e for e in client.events[mark:] if e["type"] == "error"]
    assert len(errors) == 1, errors
    assert errors[0]["error"]["type"] == "server_error"
    assert errors[0]["error"]["code"] == details["error"]["code"]
    assert why in errors[0]["error"]["message"]
    if not response["output"]:  # failed before it said anything
        return
    item_id = response["output"][0]["id"]
    sent_text = "".join(e["delta"] for e in client.of("response.output_audio_transcript.delta")
                        if e["item_id"] == item_id)
    assert response["output"][0]["content"][0]["transcript"] == sent_text
    turn_ = fragile.session().conversation.context.get(item_id)
    assert not turn_.in_progress  # the reply is over and joins the prompts as what was heard
    assert sent_text.startswith(turn_.spoken_text)
    assert turn_.audio_ms == pytest.approx(_audio_ms(client, response["id"]), abs=1.0)


async def _text_turn(c: RealtimeClient, text: str = "你好") -> None:
    mark = len(c.events)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await c.wait_for("conversation.item.added", after=mark)


async def _next_turn_works(c: RealtimeClient) -> None:
    mark = len(c.events)
    await c.send({"type": "response.create", "response": {"max_output_tokens": 6}})
    done = await c.wait_for("response.done", after=mark, timeout=60)
    assert done["response"]["status"] in ("completed", "incomplete"), done
    assert not [e for e in c.events[mark:] if e["type"] == "error"]


@pytest.mark.parametrize("mode", ["hang", "close", "reset", "garbage", "error500", "http500"])
async def test_a_backend_failing_mid_reply_ends_the_spoken_reply(fragile, mode):
    """The chat backend breaks after the first clause was spoken: the reply fails within the
    engine's timeouts, the partial audio stays truthful in the history, the next turn works."""
    c = await RealtimeClient.open(fragile.server.port)
    try:
        await c.send({"type": "session.update", "session": {
            "audio": {"input": {"turn_detection": None}}, "max_output_tokens": 300}})
        await c.wait_for("session.updated")
        await _text_turn(c)
        midway = mode != "http500"
        await fragile.fault(mode=mode, after=8, hold=midway, text=SCRIPT)
        mark = len(c.events)
        await c.send({"type": "response.create"})
        if midway:  # let the backend fail once the first clause is being heard
            await c.wait_for("response.output_audio.delta", after=mark, timeout=60)
            await fragile.release()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        done = await c.wait_for("response.done", after=mark, timeout=30)
        assert loop.time() - t0 < READ_TIMEOUT_S + 8
        why = {"hang": "sent nothing for", "close": "without a finish reason",
               "reset": "dropped the stream", "garbage": "non-SSE line",
               "error500": "EngineDeadError", "http500": "HTTP 500"}[mode]
        _assert_failed_truthfully(fragile, c, done, mark, why)
        if midway:
            assert _audio_ms(c, done["response"]["id"]) > 0
        await _next_turn_works(c)
    finally:
        await c.close()


@pytest.mark.parametrize("stage", ["backend", "tokenizer"])
async def test_a_failure_during_a_spoken_turn_ends_it_and_the_next_turn_works(fragile, speech,
                                                                              stage):
    """The chat backend resets mid-reply, or the audio tokenizer fails on the user's speech."""
    c = await RealtimeClient.open(fragile.server.port)
    try:
        await c.send({"type": "session.update", "session": {
            "max_output_tokens": 6, "stepaudio": {"speculative": False}}})
        await c.wait_for("session.updated")
        if stage == "backend":
            await fragile.fault(mode="reset", after=2, requests=1)
        fragile.tokenizer.failing = stage == "tokenizer"
        mark = len(c.events)
        try:
            done = await turn(c, speech)
        finally:
            fragile.tokenizer.failing = False
        why = "dropped the stream" if stage == "backend" else "audio tokenizer crashed"
        _assert_failed_truthfully(fragile, c, done, mark, why)
        done = await turn(c, speech)
        assert done["response"]["status"] in ("completed", "incomplete"), done
    finally:
        await c.close()


async def test_a_tts_failure_mid_reply_ends_it_and_the_next_turn_works(fragile):
    c = await RealtimeClient.open(fragile.server.port)
    try:
        await c.send({"type": "session.update", "session": {
            "audio": {"input": {"turn_detection": None}}, "max_output_tokens": 300}})
        await _text_turn(c)
        await fragile.fault(mode="none", text=SCRIPT)  # a reply of several clauses
        fragile.speech.fail_after = 1
        mark = len(c.events)
        try:
            await c.send({"type": "response.create"})
            done = await c.wait_for("response.done", after=mark, timeout=60)
        finally:
            fragile.speech.fail_after = None
        _assert_failed_truthfully(fragile, c, done, mark, "vocoder crashed")
        assert _audio_ms(c, done["response"]["id"]) > 0
        await _next_turn_works(c)
    finally:
        await c.close()
