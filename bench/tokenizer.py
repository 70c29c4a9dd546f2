"""Tokenizer benchmark (not a test): end of speech -> the final (reference-exact) ids.

For utterances of 2, 5, 10, 20 and 35 s of real speech (the Apache-2.0 recordings in
tests/fixtures, concatenated), and for one recording whose loudest sample comes at 94 % of its
length (the worst case for the incremental work), sent as 24 kHz int16 in 100 ms chunks as a client
would:
- offline lag: the whole utterance tokenized after its last chunk (the reference's way);
- pause lag: the last chunk plus ``snapshot()``, every earlier chunk having been fed as it arrived
  (what the server's speculative reply waits for at the user's pause);
- commit lag: ``finish()`` after that snapshot (the end of the turn; the codes are cached);
- compute per audio second, and the share of the audio re-encoded because the peak rose;
  times are this thread's CPU time (all the work runs in the calling thread with one intra-op
  thread), so other load on a shared machine does not inflate them;
- final ids = offline: the share of final ids equal to the offline ids (must be 100 %).

    python bench/tokenizer.py [--models DIR] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepaudio.audio import load_audio, resample  # noqa: E402
from stepaudio.tokenizer import StepAudioTokenizer  # noqa: E402

SR = 24000
CHUNK = SR // 10
RECORDINGS = ["Tingting_prompt.wav", "multilingual1.wav", "prompt_wav_lixueqin.wav",
              "prompt_wav_yuqian.wav", "clone_wav_lixueqin.wav"]


def speech(seconds: float) -> np.ndarray:
    parts = []
    for name in RECORDINGS:
        wav, sr = load_audio(REPO / "tests" / "fixtures" / "audio" / name)
        parts.append(resample(wav, sr, SR))
    sig = np.concatenate(parts)
    while len(sig) < seconds * SR:
        sig = np.concatenate([sig, sig])
    return np.round(sig[: int(seconds * SR)] * 32767).astype(np.int16)


def offline_lag(tok: StepAudioTokenizer, pcm: np.ndarray) -> float:
    t = time.thread_time()
    tok.tokenize(pcm, SR)
    return time.thread_time() - t


def late_peak() -> np.ndarray:
    """speed_control2.wav: its loudest sample comes at 94 % of its length."""
    wav, sr = load_audio(REPO / "tests" / "fixtures" / "audio" / "speed_control2.wav")
    return np.round(resample(wav, sr, SR) * 32767).astype(np.int16)


def stream_run(tok: StepAudioTokenizer, pcm: np.ndarray) -> dict[str, float]:
    stream = tok.open_stream(provisional=False)
    chunks = [pcm[i : i + CHUNK] for i in range(0, len(pcm), CHUNK)]
    t0 = time.thread_time()
    for c in chunks[:-1]:
        stream.feed(c, SR)
    busy = time.thread_time() - t0
    t = time.thread_time()
    stream.feed(chunks[-1], SR)
    snap = stream.snapshot()
    pause = time.thread_time() - t
    t = time.thread_time()
    final = stream.finish()
    commit = time.thread_time() - t
    assert final == snap
    off = tok.tokenize(pcm, SR).ids
    same = sum(a == b for a, b in zip(final, off, strict=False)) / max(len(off), 1)
    if len(final) != len(off):
        same = 0.0
    return {"pause": pause, "commit": commit, "rtf": (busy + pause + commit) / (len(pcm) / SR),
            "reencoded": stream.exact.reencoded / max(stream.samples_16k, 1),
            "restarts": stream.exact.restarts, "same": same}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", help="model root (default: the tiny checkpoints in the cache)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.models:
        root = Path(args.models)
    else:
        from stepaudio.config import load_config
        from stepaudio.tiny import ensure_tiny_models

        cfg = load_config(None)
        root = ensure_tiny_models(cfg.models.resolved_root(), seed=cfg.models.seed)
    tok = StepAudioTokenizer(root / "Step-Audio-Tokenizer")
    tok.tokenize(speech(1.0), SR)  # warm-up
    print(f"# tokenizer lag, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}, median of {args.repeats}")
    print("| utterance | offline lag (ms) | pause lag (ms) | commit lag (ms) | compute / audio s "
          "| peak rises (re-encoded audio) | final ids = offline |")
    print("|---|---|---|---|---|---|---|")
    cases = [(f"{s} s", speech(s)) for s in (2, 5, 10, 20, 35)]
    cases.append(("6 s, peak at 94 %", late_peak()))
    for name, pcm in cases:
        off = [offline_lag(tok, pcm) for _ in range(args.repeats)]
        runs = [stream_run(tok, pcm) for _ in range(args.repeats)]
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        print(f"| {name} | {statistics.median(off) * 1000:.1f} | {med['pause'] * 1000:.1f} "
              f"| {med['commit'] * 1000:.2f} | {med['rtf']:.3f} "
              f"| {med['restarts']:.0f} ({med['reencoded']:.0%}) | {min(r['same'] for r in runs):.1%} |")


if __name__ == "__main__":
    main()
