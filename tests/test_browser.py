"""The browser demo in real headless Chromium, against `stepaudio serve` on the tiny checkpoints.

Debian's /usr/bin/chromium is driven by Playwright (never a downloaded browser). Its fake
microphone plays a real speech recording in a loop (speech, then 4.5 s of silence): the first
loop is a turn the bot answers; the next one starts while the reply is still playing, which is a
barge-in. The page's own counters (`window.stepaudio.stats`) say what the audio graph saw. The
screenshot lands in artifacts/ for a person to look at.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from serve_process import API_KEY, served  # noqa: F401 - the fixture

from stepaudio.audio import load_audio, resample

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
AUDIO = Path(__file__).parent / "fixtures" / "audio"
LAUNCH_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="browser test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)")


def fake_microphone(path: Path) -> Path:
    """Chromium's fake capture wants 16-bit PCM; it loops the file, so the silence after the
    speech decides when the user speaks again (here: while the reply still plays)."""
    wav, sr = load_audio(AUDIO / "multilingual1.wav")
    speech = resample(wav, sr, 48000)
    pad = lambda s: np.zeros(int(s * 48000), dtype=np.float32)  # noqa: E731
    sf.write(str(path), np.concatenate([pad(0.5), speech, pad(4.5)]), 48000, subtype="PCM_16")
    return path


async def _stats(page) -> dict:
    return json.loads(await page.evaluate("JSON.stringify(window.stepaudio)"))


async def _wait(page, condition: str, timeout_s: float, what: str) -> dict:
    try:
        await page.wait_for_function(condition, timeout=timeout_s * 1000, polling=200)
    except Exception as err:  # playwright's TimeoutError: report what the page saw
        state = await _stats(page)
        state.pop("events", None)
        raise AssertionError(f"{what}: not within {timeout_s:g} s; page state: "
                             f"{json.dumps(state)[:2000]}") from err
    return await _stats(page)


async def test_browser_demo_turn_playback_and_barge_in(served, tmp_path):  # noqa: F811
    pw = pytest.importorskip("playwright.async_api", reason="browser test needs playwright "
                             "(pip install -e '.[dev]')")
    mic = fake_microphone(tmp_path / "mic.wav")
    ARTIFACTS.mkdir(exist_ok=True)
    async with pw.async_playwright() as p:
        browser = await p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=str(CHROMIUM), headless=True,
            args=[*LAUNCH_ARGS, f"--use-file-for-fake-audio-capture={mic}"],
            viewport={"width": 1400, "height": 900},
        )
        try:
            page = browser.pages[0] if browser.pages else await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(served.http + "/")
            assert await page.title() == "Step-Audio realtime"
            # Settings before connecting: the key (sent as a subprotocol, as browsers must) and
            # short replies, so one reply is a few seconds of tiny-model babble.
            await page.fill("input[name=api_key]", API_KEY)
            await page.fill("input[name=max_output_tokens]", "24")
            await page.click("#settings button[type=submit]")
            await page.click("#start")

            s = await _wait(page, "window.stepaudio.connected && window.stepaudio.profile",
                            30, "connected and told the profile")
            assert s["profile"] == "tiny"
            notice = await page.inner_text("#notice")
            assert "babble" in notice and "expected" in notice

            s = await _wait(
                page, "(() => { const s = window.stepaudio.stats;"
                " return s.completed >= 1 && s.nonSilentPlayed > 4800"
                " && s.analyserNonSilent > 0; })()", 120,
                "a reply completed and its audio played")
            st = s["stats"]
            assert st["appendsSent"] > 20 and st["audioDeltas"] >= 1
            assert st["latencies"], "no end-of-speech -> first-audio latency measured"
            assert 0 < st["latencies"][0] < 10000
            assert "stepaudio.state" in s["events"]
            assert "conversation.item.input_audio_transcription.completed" in s["events"]

            s = await _wait(
                page, "(() => { const s = window.stepaudio.stats;"
                " return s.bargeIns >= 1 && s.truncated.length >= 1 && s.truncates.length >= 1; })()",
                90, "a barge-in flushed playback and the truncate was acknowledged")
            st = s["stats"]
            assert st["flushes"] >= 1 and st["droppedSamples"] > 0, "nothing was dropped"
            sent = {(t["item"], t["audio_end_ms"]) for t in st["truncates"]}
            acked = {(t["item"], t["audio_end_ms"]) for t in st["truncated"]}
            assert sent & acked, f"truncate {sent} not acknowledged as sent: {acked}"

            # What a person sees: state, transcripts, latency.
            await page.wait_for_timeout(1500)
            assert await page.locator("#states span.active").count() == 1
            assert await page.locator(".msg.user").count() >= 1
            assert await page.locator(".msg.bot").count() >= 1
            assert (await page.inner_text("#lat-last")).strip().isdigit()
            assert await page.locator(".msg.bot .lat").first.inner_text()
            await page.screenshot(path=str(ARTIFACTS / "browser-demo.png"), full_page=True)
            assert not errors, f"page errors: {errors}"
        finally:
            await browser.close()
