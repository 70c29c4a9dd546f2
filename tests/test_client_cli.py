"""`stepaudio client` against a real `stepaudio serve` (tiny checkpoints), as a user runs it."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from backend_process import free_port
from serve_process import API_KEY, served, stepaudio_argv  # noqa: F401 - the fixture
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from client.playback import Player
from client.realtime import (
    EXIT_AUTH,
    EXIT_FORBIDDEN,
    EXIT_NOT_READY,
    EXIT_UNREACHABLE,
    SAMPLE_RATE,
    SessionOptions,
    refused_error,
)

SPEECH = Path(__file__).parent / "fixtures" / "audio" / "multilingual1.wav"


def run_client(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*stepaudio_argv(), "client", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_client_holds_a_voice_turn(served, tmp_path):  # noqa: F811
    out = tmp_path / "reply.wav"
    r = run_client(str(SPEECH), "--url", served.url, "--api-key", API_KEY, "-o", str(out),
                   "--max-output-tokens", "12", "--speed", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "tiny random-weight checkpoints" in text and "babble" in text
    assert "[state] silence -> user_speaking (speech_started)" in text
    assert "-> bot_replying" in text
    assert "[latency] turn 1: first audio" in text and "after the end of speech" in text
    assert "[reply] resp_" in text
    assert "[done] 1 reply" in text
    wav, sr = sf.read(str(out), dtype="float32")
    assert sr == SAMPLE_RATE and wav.size > SAMPLE_RATE // 2  # the reply as heard
    assert np.abs(wav).max() > 0.01


def test_client_barge_in_truncates_to_what_was_played(served, tmp_path):  # noqa: F811
    # The second file starts 300 ms into the first reply: the user talks over the bot. The tiny
    # TTS-3B ends a clause after a random number of tokens (its seed is new for every reply),
    # so the reply gets enough text that its audio outlasts the 300 ms + the barge-in minimum.
    r = run_client(str(SPEECH), str(SPEECH), "--url", served.url, "--api-key", API_KEY,
                   "--interrupt-after", "300", "--max-output-tokens", "48", "--speed", "2")
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    assert "[barge-in] playback flushed after" in text
    assert "(barge_in)" in text
    played = int(text.split("[barge-in] playback flushed after ")[1].split(" ms")[0])
    assert f"at {played} ms" in text, "the truncate with the ms played was not acknowledged"
    assert "1 barge-in" in text and "[done] 2 replies" in text


def test_unreachable_server_exits_3():
    r = run_client(str(SPEECH), "--port", str(free_port()), timeout=60)
    assert r.returncode == EXIT_UNREACHABLE == 3
    assert "server unreachable" in r.stderr and "Traceback" not in r.stderr


def test_not_a_realtime_endpoint_exits_3(served):  # noqa: F811
    r = run_client(str(SPEECH), "--url", f"ws://127.0.0.1:{served.port}/nope", timeout=60)
    assert r.returncode == EXIT_UNREACHABLE
    assert "HTTP 404" in r.stderr


@pytest.mark.parametrize("key", ["wrong-key", None])
def test_refused_api_key_exits_4(served, key, monkeypatch):  # noqa: F811
    monkeypatch.delenv("STEPAUDIO_API_KEY", raising=False)
    args = ["--api-key", key] if key else []
    r = run_client(str(SPEECH), "--url", served.url, *args, timeout=60)
    assert r.returncode == EXIT_AUTH == 4, r.stdout + r.stderr
    assert "refused the API key" in r.stderr


@pytest.mark.parametrize(("status", "body", "headers", "code", "says"), [
    (401, b"missing or wrong API key\n", [], EXIT_AUTH, "refused the API key"),
    (403, b"pages from 'https://x' may not open sessions here\n", [], EXIT_FORBIDDEN,
     "may not open sessions"),
    (503, b"server full (8 sessions); try again later\n", [("Retry-After", "5")],
     EXIT_NOT_READY, "try again in 5 s"),
    (404, b"no such page\n", [], EXIT_UNREACHABLE, "not a realtime endpoint"),
])
def test_http_refusals_map_to_documented_exit_statuses(status, body, headers, code, says):
    err = InvalidStatus(Response(status, "", Headers(headers), body))
    out = refused_error(err, "ws://h/v1/realtime")
    assert out.code == code and says in str(out)
    if status != 404:
        assert body.decode().strip()[:20] in str(out)  # the server's reason is shown


def test_missing_input_file_is_one_line():
    r = run_client("no-such-file.wav", "--port", str(free_port()), timeout=60)
    assert r.returncode == 1
    assert "no-such-file.wav" in r.stderr and "Traceback" not in r.stderr


def test_microphone_without_sounddevice_says_what_to_install():
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        pass
    else:
        pytest.skip("sounddevice is installed here")
    r = run_client("--mic", "--port", str(free_port()), timeout=60)
    assert r.returncode == 1
    assert "pip install sounddevice" in r.stderr


def test_session_options_become_one_ga_session_update():
    ev = SessionOptions(voice="Tingting", instruction_tags="(高兴1)", vad_threshold=0.6,
                        silence_ms=900, pause_ms=200, speculative=False,
                        max_output_tokens=64).update_event()
    assert ev == {"type": "session.update", "session": {
        "type": "realtime", "max_output_tokens": 64,
        "audio": {"output": {"voice": "Tingting"},
                  "input": {"turn_detection": {"threshold": 0.6, "silence_duration_ms": 900}}},
        "stepaudio": {"instruction": "(高兴1)", "pause_ms": 200, "speculative": False}}}
    assert SessionOptions().update_event() is None


def test_virtual_player_counts_what_was_played():
    player = Player()
    player.add("item_a", np.zeros(SAMPLE_RATE, dtype=np.float32))  # 1 s
    time.sleep(0.2)
    assert player.playing() == "item_a" and not player.idle()
    cut = player.flush()
    assert cut is not None and cut[0] == "item_a"
    assert 150 <= cut[1] <= 900  # about 200 ms, with slack for a loaded machine
    assert player.idle() and player.playing() is None and player.flush() is None


class _FakeStream:
    """A stand-in for sounddevice's streams: a thread calls the callback at the stream's rate."""

    def __init__(self, samplerate, channels, dtype, callback, blocksize=480, **_):
        self.rate, self.callback, self.block = samplerate, callback, blocksize or 480
        self.output: list[np.ndarray] = []
        self.running = False

    def start(self):
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        t = 0
        while self.running:
            data = np.zeros((self.block, 1), dtype=np.float32)
            if self.is_input:
                data[:, 0] = 0.5 * np.sin(2 * np.pi * 440 * (t + np.arange(self.block)) / self.rate)
                t += self.block
            self.callback(data, self.block, None, None)
            if not self.is_input:
                self.output.append(data.copy())
            time.sleep(self.block / self.rate)

    def stop(self):
        self.running = False
        self.thread.join(5)

    def close(self):
        pass

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()


def _fake_sounddevice(device_rate: int):
    """A device that cannot do 24 kHz, so the client must resample both ways."""
    streams: list[_FakeStream] = []

    def refuse(**_):
        raise ValueError("Invalid sample rate")

    def stream(is_input):
        def make(*args, **kwargs):
            s = _FakeStream(*args, **kwargs)
            s.is_input = is_input
            streams.append(s)
            return s
        return make

    module = types.SimpleNamespace(
        OutputStream=stream(False), InputStream=stream(True), check_output_settings=refuse,
        check_input_settings=refuse,
        query_devices=lambda kind=None: {"default_samplerate": device_rate})
    return module, streams


def test_speaker_player_counts_what_the_device_consumed(monkeypatch):
    from client.playback import SpeakerPlayer

    fake, streams = _fake_sounddevice(48000)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    player = SpeakerPlayer()
    assert player.rate == 48000
    tone = 0.3 * np.sin(2 * np.pi * 300 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    player.add("item_a", tone)  # 1 s
    time.sleep(0.3)
    cut = player.flush()
    assert cut is not None and cut[0] == "item_a" and 100 <= cut[1] <= 900
    assert player.idle()
    player.close()
    played = np.concatenate([o[:, 0] for o in streams[0].output])
    assert np.abs(played).max() > 0.1  # the device really got the reply


async def test_microphone_resamples_the_device_rate_to_24khz(monkeypatch):
    from client.sources import microphone

    fake, _ = _fake_sounddevice(48000)
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    got = []
    async for block in microphone(40):
        got.append(block)
        if len(got) == 6:
            break
    total = sum(b.size for b in got)
    assert 5 * 960 <= total <= 6 * 960 + 200  # 40 ms blocks at 24 kHz (resampler latency aside)
    assert max(float(np.abs(b).max()) for b in got) > 0.2
