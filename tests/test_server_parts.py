"""The server's small parts in isolation: the turn clock, the audio ring, the send queue, the
tokenizer snapshot the speculation relies on, the turn's one final encode, and the load tool's
arithmetic."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from server.clock import InputClock
from server.conversation import spoken_prefix
from server.instruments.loadtest import build_plan, lag_quantiles
from server.outbox import Outbox, Outgoing, SentAudio, SentDone
from server.turn_input import AudioRing
from stepaudio.vad import FRAME_MS, SpeechSegmenter, VADParams


class FakeWall:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_clock_is_audio_time_until_the_input_stalls():
    wall = FakeWall()
    clock = InputClock(grace_ms=150, wall=wall)
    for _ in range(50):  # 1 s of audio in real time
        wall.t += 0.02
        clock.on_audio(20)
    assert clock.now() == pytest.approx(1000)
    wall.t += 0.1  # jitter under the grace time: the clock waits for audio
    assert clock.now() == pytest.approx(1000)
    wall.t += 0.4  # a stall: the clock runs on wall time past the grace
    assert clock.now() == pytest.approx(1000 + 500 - 150)
    wall.t += 0.02
    clock.on_audio(20)  # audio resumes: the stall stays in the clock
    assert clock.now() == pytest.approx(1000 + 370 + 20)
    # audio positions map to clock times and back, on both sides of the stall
    assert clock.at(500) == pytest.approx(500)
    assert clock.at(1000) == pytest.approx(1000)
    assert clock.at(1010) == pytest.approx(1010 + 370)
    assert clock.audio_at(1010 + 370) == pytest.approx(1010)
    assert clock.audio_at(1200) == pytest.approx(1000)  # inside the stall: where audio stopped


def test_ring_keeps_the_latest_audio_by_absolute_position():
    ring = AudioRing(seconds=0.01)  # 160 samples
    x = np.arange(1000, dtype=np.float32)
    for i in range(0, 1000, 70):
        ring.append(x[i:i + 70])
    assert ring.end == 1000 and ring.start == 840
    assert np.array_equal(ring.read(900, 1000), x[900:1000])
    assert np.array_equal(ring.read(840, 1000), x[840:1000])  # across the wrap
    assert np.array_equal(ring.read(0, 850), x[840:850])  # older audio is gone
    ring.append(np.arange(5000, dtype=np.float32))  # longer than the ring
    assert ring.end == 6000 and np.array_equal(ring.read(5990, 6000), np.arange(4990, 5000))


def test_segmenter_settled_point_stops_at_a_pending_transition():
    seg = SpeechSegmenter(VADParams(min_speech_ms=64, min_silence_ms=96))
    for _ in range(5):
        seg.feed(0.9)
    assert seg.speaking and seg.settled_ms == seg.now_ms
    seg.feed(0.1)
    seg.feed(0.1)  # two quiet frames: maybe the end of speech, not yet decided
    assert seg.settled_ms == 5 * FRAME_MS
    seg.feed(0.9)
    assert seg.settled_ms == seg.now_ms


class FakeSocket:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self.release = asyncio.Event()
        self.closed_with: tuple[int, str] | None = None

    async def send(self, msg: str) -> None:
        await self.release.wait()
        self.sent.append(msg)

    async def close(self, code: int, reason: str) -> None:
        self.closed_with = (code, reason)


async def test_outbox_drops_interrupted_reply_audio_and_closes_when_full():
    ws = FakeSocket()
    sent: list[Outgoing[str]] = []
    box: Outbox[str] = Outbox(ws, max_bytes=100, on_sent=lambda m, t: sent.append(m))
    box.start()
    box.put(Outgoing("a" * 10, 10))  # taken by the writer, blocked in send
    await asyncio.sleep(0)
    box.put(Outgoing("audio1", 10, "reply 7", audio_ms=20, sent=SentAudio(0, "a")))
    box.put(Outgoing("done", 10, "reply 7", sent=SentDone()))
    box.put(Outgoing("audio2", 10, "reply 8", audio_ms=20, sent=SentAudio(0, "b")))
    assert box.purge("reply 7") == 1
    ws.release.set()
    await box.drain(1.0)
    assert ws.sent == ["a" * 10, "done", "audio2"]
    assert [m.wire for m in sent] == ["done", "audio2"]
    ws.release.clear()
    box.put(Outgoing("b" * 10, 10))
    await asyncio.sleep(0)
    for _ in range(20):
        box.put(Outgoing("c" * 10, 10))
    await asyncio.sleep(0.05)
    assert box.closed and ws.closed_with is not None and ws.closed_with[0] == 1008
    assert "not reading" in ws.closed_with[1]
    await box.aclose()


def test_spoken_prefix_follows_the_speaking_rate():
    assert spoken_prefix("你好世界", 10_000) == "你好世界"
    assert spoken_prefix("你好世界", 460) == "你好"
    assert spoken_prefix("hello there", 0) == ""


def test_tokenizer_snapshot_reads_what_the_end_of_the_turn_will(tiny_root, audio_dir):
    """The speculative reply's ids (a snapshot at the pause) equal the committed turn's, and
    both are the offline codes of the turn."""
    from stepaudio.audio import load_audio, resample
    from stepaudio.tokenizer import StepAudioTokenizer

    tok = StepAudioTokenizer(tiny_root / "Step-Audio-Tokenizer")
    wav, sr = load_audio(audio_dir / "multilingual1.wav")
    w = resample(wav, sr, 16000)
    stream = tok.open_stream(provisional=False)
    for i in range(0, 24000, 480):
        stream.feed(w[i:i + 480], 16000)
    speculated = stream.snapshot()
    assert speculated == tok.tokenize(w[:24000], 16000).ids and len(speculated) > 20
    assert stream.finish() == speculated


async def test_the_turn_is_encoded_once_at_the_pause_for_speculation_and_commit(tiny_root, audio_dir):
    """prepare() at the pause, the speculation's snapshot and the commit's finish: one final
    encode, whose ids are the offline codes of the turn from its start to the end of speech."""
    from server.metrics import Metrics
    from server.turn_input import TurnInput
    from server.workers import TokenizerStage
    from stepaudio.audio import load_audio, resample
    from stepaudio.tokenizer import StepAudioTokenizer

    tok = StepAudioTokenizer(tiny_root / "Step-Audio-Tokenizer")
    wav, sr = load_audio(audio_dir / "multilingual1.wav")
    w = resample(wav, sr, 16000)
    encodes = []

    class Counting:
        def __init__(self) -> None:
            self.inner = tok.open_stream(provisional=False)

        def feed(self, pcm, rate):
            return self.inner.feed(pcm, rate)

        def snapshot(self):
            encodes.append("snapshot")
            return self.inner.snapshot()

        def finish(self):
            encodes.append("finish")
            return self.inner.finish()

    turn = TurnInput(TokenizerStage(Counting, Metrics(), threads=1))
    turn.append(w)
    turn.open(100.0)
    turn.set_limit(1800.0)
    prepared = turn.prepare(1800.0)
    assert turn.prepare(1800.0) is prepared  # idempotent for the same end
    spec = await turn.snapshot(1800.0)
    final = await turn.finish(1800.0)
    assert encodes == ["snapshot"]
    assert final.ids == spec.ids == tok.tokenize(w[1600:28800], 16000).ids

    # The user resumed after the pause: the next end of speech is encoded anew.
    encodes.clear()
    turn.open(100.0)
    turn.set_limit(1000.0)
    first = await turn.snapshot(1000.0)
    turn.set_limit(2000.0)
    final = await turn.finish(2000.0)
    assert encodes == ["snapshot", "finish"]
    assert first.ids == tok.tokenize(w[1600:16000], 16000).ids
    assert final.ids == tok.tokenize(w[1600:32000], 16000).ids


def test_load_plan_and_loop_lag_quantiles(audio_dir):
    plan = build_plan(audio_dir / "multilingual1.wav", turns=2, gap_s=1.0, lead_s=0.5)
    assert plan.turns == 2 and len(plan.end_frame) == 2
    assert plan.end_frame[1] - plan.end_frame[0] == 113 + 50  # 113 whole frames of speech + 1 s gap
    assert 2600 <= plan.end_audio_ms[0] <= 2800
    before = {0.001: 10, 0.005: 10, 0.01: 10, float("inf"): 10}
    after = {0.001: 100, 0.005: 108, 0.01: 110, float("inf"): 110}
    q = lag_quantiles(before, after)
    assert q["samples"] == 100 and q["p50_le_ms"] == 1.0 and q["p99_le_ms"] == 10.0
    assert q["max_le_ms"] == 10.0


def test_load_client_hears_gaps_as_a_real_time_player_would():
    import base64
    import json

    from server.instruments.loadtest import _delta_seconds, gaps_heard, underruns

    pcm = bytes(2 * 2400)  # 100 ms of pcm16 at 24 kHz
    raw = json.dumps({"type": "response.output_audio.delta", "response_id": "r",
                      "delta": base64.b64encode(pcm).decode()})
    assert _delta_seconds(raw) == pytest.approx(0.1)
    steady = [(0.0, 0.5), (0.3, 0.5), (0.9, 0.5)]  # each arrives before the last one runs out
    assert underruns(steady) == (0, 0.0)
    late = [(0.0, 0.2), (0.5, 0.2), (0.6, 0.2)]  # 0.3 s of silence after the first 0.2 s
    gaps, silent = underruns(late)
    assert gaps == 1 and silent == pytest.approx(0.3)
    assert underruns(late, prebuffer_s=0.3) == (0, 0.0)  # a 300 ms jitter buffer hides it
    two = [(0.0, 0.2), (0.5, 0.2), (0.6, 0.2), (1.5, 0.3)]  # after 0.2 s and after 0.6 s played
    assert [(round(at, 6), round(s, 6)) for at, s in gaps_heard(two)] == [(0.2, 0.3), (0.6, 0.6)]
