"""What a newcomer's first `stepaudio serve` on the tiny profile costs: a warm-up that removes
first-call costs and nothing more (one chunk of speech per vocoder, not whole sentences), and
replies of a few seconds (babble makes long speech out of few tokens)."""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from realtime_helpers import RATE, RealtimeClient, server_config

from server.app import Server
from server.workers import SpeechStage, warmup_audio
from stepaudio.config import load_config

pytestmark = pytest.mark.asyncio(loop_scope="session")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class CountingSpeech(SpeechStage):
    """The real synthesizer; counts the chunks each stream hands out, by its text."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[tuple[str, int]] = []

    def open(self, speaker: str, seed: int | None = None) -> Any:
        inner = super().open(speaker, seed)
        outer = self

        class Counted:
            def __init__(self) -> None:
                self.text = ""
                self.n = 0

            def push_text(self, delta: str) -> None:
                self.text += delta
                inner.push_text(delta)

            def end_text(self) -> None:
                inner.end_text()

            def cancel(self) -> None:
                inner.cancel()

            async def aclose(self) -> None:
                await inner.aclose()
                outer.chunks.append((self.text, self.n))

            def __aiter__(self) -> Counted:
                return self

            async def __anext__(self) -> Any:
                chunk = await inner.__anext__()
                self.n += 1
                return chunk

        return Counted()


async def test_warm_up_speaks_one_chunk_per_vocoder(server):
    speech = CountingSpeech(server.stages.speech.synth, server.metrics)
    stages = dataclasses.replace(server.stages, speech=speech, warm=False)
    try:
        wav, sr = warmup_audio()
        took = await stages.warmup(wav, sr, "Tingting")
    finally:
        speech._encoder.shutdown(wait=False)  # its own pool; the synthesizer is the server's
    assert [n for _, n in speech.chunks] == [1, 1], speech.chunks
    assert any(text.startswith("(RAP)") for text, _ in speech.chunks)  # the music vocoder too
    assert set(took) == {"vad", "tokenizer", "chat", "tts"}


async def test_the_tiny_profile_answers_in_a_few_seconds_of_speech(server):
    default = load_config(CONFIGS / "default.yaml")
    cfg = server_config()
    cfg.session.max_output_tokens = default.session.max_output_tokens
    srv = Server(cfg, None, stages=server.stages)
    await srv.start()
    await srv.load()
    c = await RealtimeClient.open(srv.port)
    try:
        await c.send({"type": "session.update", "session": {
            "audio": {"input": {"turn_detection": None}}}})
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "你好"}]}})
        seconds = []
        for _ in range(3):
            mark = len(c.events)
            await c.send({"type": "response.create"})
            done = await c.wait_for("response.done", after=mark, timeout=120)
            assert done["response"]["status"] in ("completed", "incomplete")
            seconds.append(sum(len(base64.b64decode(e["delta"])) / 2 / RATE
                               for e in c.events[mark:] if e["type"] == "response.output_audio.delta"))
        assert 0 < max(seconds) <= 10, seconds  # was 25-35 s with the 64-token cap
    finally:
        await c.close()
        await srv.stop(grace_s=0.1)
