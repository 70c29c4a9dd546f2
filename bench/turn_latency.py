"""What the tokenizer adds between the end of speech and the first reply audio (not a test).

The real audio tokenizer (tiny checkpoints) with the zero-cost chat and TTS stand-ins, in process,
one session streaming real speech in real time: every millisecond beyond the deliberate silence
wait is then the tokenizer's share of the critical path plus the server's own overhead, without
the tiny models' babble competing for the CPU (which makes full tiny runs too noisy on a shared
machine to see a few milliseconds). Per turn it reads ``stepaudio.timings``:
``end_of_speech_to_first_audio - silence_wait``, ``tokenizer`` (compute of the turn's final codes)
and ``model_critical_path`` (the part of that compute, and of the stand-ins, after the end of the
turn).

    python bench/turn_latency.py --wav tests/fixtures/audio/multilingual1.wav --turns 8 --speculative off
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import server.app as app  # noqa: E402
from server.instruments.zero_cost import zero_cost_stages  # noqa: E402
from server.workers import TokenizerStage  # noqa: E402
from stepaudio.audio import load_audio, resample  # noqa: E402
from stepaudio.config import Config  # noqa: E402
from stepaudio.tiny import ensure_tiny_models  # noqa: E402
from stepaudio.tokenizer import StepAudioTokenizer  # noqa: E402

RATE = 24000
CHUNK_MS = 20


def real_tokenizer_stages(cfg, root, metrics):  # type: ignore[no-untyped-def]
    stages = zero_cost_stages(cfg, root, metrics)
    tok = StepAudioTokenizer(root / "Step-Audio-Tokenizer")
    # The server's own choice where the checkout has one (final codes only).
    kw = {"provisional": False} if "provisional" in inspect.signature(tok.open_stream).parameters \
        else {}
    stages.tokenizer = TokenizerStage(lambda: tok.open_stream(**kw), metrics,
                                      cfg.server.tokenizer_threads)
    stages.note = "the real tokenizer, zero-cost chat and TTS"
    return stages


def pcm16(path: Path) -> bytes:
    wav, sr = load_audio(path)
    return (np.clip(resample(wav, sr, RATE), -1, 1) * 32767).astype("<i2").tobytes()


async def stream(ws, pcm: bytes) -> None:  # type: ignore[no-untyped-def]
    step = 2 * RATE * CHUNK_MS // 1000
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for k, i in enumerate(range(0, len(pcm), step)):
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(pcm[i:i + step]).decode("ascii")}))
        delay = t0 + (k + 1) * CHUNK_MS / 1000 - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)


async def run(wav: Path, turns: int, speculative: bool) -> list[dict[str, float]]:
    app.build_stages = real_tokenizer_stages
    cfg = Config()
    root = ensure_tiny_models(cfg.models.resolved_root(), seed=cfg.models.seed)
    cfg.server.port = 0
    cfg.server.api_key_env = None
    cfg.server.instrument = "zero-cost stages"
    cfg.session.speculative = speculative
    srv = app.Server(cfg, root)
    await srv.start()
    await srv.load()
    timings: list[dict[str, float]] = []
    arrived = asyncio.Event()
    speech = pcm16(wav)
    silence = lambda ms: bytes(2 * int(RATE * ms / 1000))  # noqa: E731
    async with connect(f"ws://127.0.0.1:{srv.port}/v1/realtime", max_size=None) as ws:

        async def reader() -> None:
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "stepaudio.timings":
                    timings.append(event["timings_ms"])
                    arrived.set()

        task = asyncio.create_task(reader())
        for _ in range(turns):
            arrived.clear()
            await stream(ws, silence(300) + speech + silence(1500))
            await arrived.wait()
            await asyncio.sleep(1.2)  # the stand-in's 1 s reply plays out
        task.cancel()
    await srv.stop(1)
    return timings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wav", default=str(REPO / "tests" / "fixtures" / "audio" / "multilingual1.wav"))
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--speculative", choices=["on", "off"], default="on")
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    rows = asyncio.run(run(Path(args.wav), args.turns, args.speculative == "on"))
    beyond = [t["end_of_speech_to_first_audio"] - t["silence_wait"] for t in rows]
    tok = [t["tokenizer"] for t in rows if t.get("tokenizer") is not None]
    crit = [t["model_critical_path"] for t in rows if t.get("model_critical_path") is not None]
    print(f"| {args.label} | {Path(args.wav).name} | {args.speculative} | {len(rows)} "
          f"| {statistics.median(beyond):.1f} / {max(beyond):.1f} | {statistics.median(tok):.1f} "
          f"| {statistics.median(crit):.1f} |")


if __name__ == "__main__":
    main()
