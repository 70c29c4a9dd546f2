"""Tokenizer lag benchmark (not a test): end of speech -> final ids, streaming vs offline.

For utterances of 2, 5, 10 and 20 s of real speech (the Apache-2.0 recordings in tests/fixtures,
concatenated), sent as 24 kHz int16 in 100 ms chunks as a client would:
- offline lag: the whole utterance is tokenized after its last chunk arrives (the reference's way);
- streaming lag: chunks are tokenized as they arrive; the lag is the time to take the last chunk
  and `finish()` the stream.
Also reported: the streaming compute per second of audio (must stay well under 1 to keep up).

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
    t = time.perf_counter()
    tok.tokenize(pcm, SR)
    return time.perf_counter() - t


def agreement(tok: StepAudioTokenizer, pcm: np.ndarray) -> float:
    """Share of final streaming ids equal to the offline ids (running-peak normalisation)."""
    off = tok.tokenize(pcm, SR).ids
    stream = tok.open_stream()
    ids: list[int] = []
    for i in range(0, len(pcm), CHUNK):
        ids += stream.feed(pcm[i : i + CHUNK], SR)
    ids += stream.finish()
    n = min(len(ids), len(off))
    return sum(a == b for a, b in zip(ids[:n], off[:n], strict=True)) / max(len(off), 1)


def streaming_lag(tok: StepAudioTokenizer, pcm: np.ndarray) -> tuple[float, float]:
    stream = tok.open_stream()
    chunks = [pcm[i : i + CHUNK] for i in range(0, len(pcm), CHUNK)]
    t0 = time.perf_counter()
    for c in chunks[:-1]:
        stream.feed(c, SR)
    busy = time.perf_counter() - t0
    t = time.perf_counter()
    stream.feed(chunks[-1], SR)
    stream.finish()
    lag = time.perf_counter() - t
    return lag, (busy + lag) / (len(pcm) / SR)


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
    print("| utterance | offline lag (ms) | streaming lag (ms) | ratio | streaming compute / audio s "
          "| streaming ids = offline |")
    print("|---|---|---|---|---|---|")
    for seconds in (2, 5, 10, 20):
        pcm = speech(seconds)
        off = [offline_lag(tok, pcm) for _ in range(args.repeats)]
        st = [streaming_lag(tok, pcm) for _ in range(args.repeats)]
        o = statistics.median(off)
        s = statistics.median(x[0] for x in st)
        rtf = statistics.median(x[1] for x in st)
        agree = agreement(tok, pcm)
        print(f"| {seconds} s | {o * 1000:.1f} | {s * 1000:.1f} | {s / o:.3f} | {rtf:.3f} "
              f"| {agree:.1%} |")


if __name__ == "__main__":
    main()
