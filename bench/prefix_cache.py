"""Prefix-cache hits over a spoken conversation against a real remote engine process (not a test).

The chat model runs in its own process (``tests/openai_server.py``: the tiny Step-Audio-Chat on our
transformers engine, whose prefix slots keep recent prompts and copy the keys of the longest shared
prefix, shaped like ``vllm serve``); the dialogue server (tiny checkpoints, in this process) reaches
it as ``llm.engine: openai``. A client speaks ``--turns`` turns (the fixture recordings in turn,
each reply heard to its end, the turn's transcript awaited before the next). Then every request the
engine served is read back and the share of prompt tokens that were a cache hit is reported three
ways:

- engine: what the engine's prefix slots actually served (its counters, all requests);
- vLLM model: what an unbounded vLLM prefix cache would serve, computed from the exact prompts and
  outputs: the longest prefix shared with any earlier request's prompt + output, in whole 16-token
  blocks, at most all but one token of the prompt;
- per turn: the committed reply's prompt, how much of it extends the previous reply's prompt.

    PYTHONPATH=. python bench/prefix_cache.py [--turns 10] [--budget TOKENS] [--minimal-cuts]

``--minimal-cuts`` cuts the history by as little as fits, one exchange a turn once the window is
full (what the server did before the cuts went in fixed steps), for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from backend_process import openai_server  # noqa: E402
from realtime_helpers import RATE, RealtimeClient, server_config, silence  # noqa: E402

from server.app import Server  # noqa: E402
from stepaudio.audio import load_audio, resample  # noqa: E402
from stepaudio.llm import budget as budget_module  # noqa: E402
from stepaudio.llm.prompt import ASR_SYSTEM_PROMPT  # noqa: E402
from stepaudio.llm.tokenizer import load_text_tokenizer  # noqa: E402
from stepaudio.tiny import ensure_tiny_models  # noqa: E402

AUDIO = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "audio"
UTTERANCES = ["multilingual1.wav", "prompt_wav_yuqian.wav", "prompt_wav_lixueqin.wav",
              "clone_wav_lixueqin.wav", "Tingting_prompt.wav"]
BLOCK = 16  # vLLM's default KV block: its prefix cache hits whole blocks


def speech(name: str, max_s: float = 3.0) -> bytes:
    wav, sr = load_audio(AUDIO / name)
    w = resample(wav, sr, RATE)[: int(max_s * RATE)]
    return (np.clip(w, -1, 1) * 32767).astype("<i2").tobytes()


def _common(a: list[int], b: list[int]) -> int:
    return len(os.path.commonprefix([a, b]))


def vllm_hits(requests: list[dict[str, Any]]) -> list[int]:
    """Per request: tokens an unbounded vLLM prefix cache would serve (whole blocks, never the
    whole prompt: the last token is always computed)."""
    seen: list[list[int]] = []
    out = []
    for r in requests:
        prompt = r["prompt"]
        best = max((_common(prompt, s) for s in seen), default=0)
        out.append(min(best, len(prompt) - 1) // BLOCK * BLOCK)
        seen.append(prompt + r["output"])
    return out


async def converse(url: str, root: Path, turns: int, budget: int | None) -> None:
    cfg = server_config()
    cfg.server.warmup = False
    cfg.llm.engine = "openai"
    cfg.llm.base_url = url
    cfg.llm.dialect = "vllm"
    cfg.llm.context_budget_tokens = budget
    cfg.session.max_output_tokens = 48
    cfg.session.max_transcript_tokens = 24
    srv = Server(cfg, root)
    await srv.start()
    await srv.load()
    try:
        c = await RealtimeClient.open(srv.port)
        await c.wait_for("session.created")
        for k in range(turns):
            mark = len(c.events)
            await c.stream(silence(300) + speech(UTTERANCES[k % len(UTTERANCES)]) +
                           silence(1300), 3.0)
            done = await c.wait_for("response.done", after=mark, timeout=120)
            await c.wait_for("conversation.item.input_audio_transcription.completed",
                             after=mark, timeout=60)
            print(f"turn {k + 1}: {done['response']['status']}", file=sys.stderr, flush=True)
            await asyncio.sleep(0.3)
        await c.close()
    finally:
        await srv.stop(grace_s=0.5)


def report(stats: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    requests = [r for r in stats["requests"] if isinstance(r["prompt"], list)]
    def is_asr(r: dict[str, Any]) -> bool:
        return ASR_SYSTEM_PROMPT in tokenizer.decode(r["prompt"][:40])

    hits = vllm_hits(requests)
    rows = []
    prev_reply: list[int] | None = None
    for r, h in zip(requests, hits, strict=True):
        kind = "asr" if is_asr(r) else "reply"
        extends = None
        if kind == "reply":
            extends = _common(r["prompt"], prev_reply) if prev_reply is not None else 0
            prev_reply = r["prompt"]
        rows.append({"kind": kind, "prompt": len(r["prompt"]), "engine": r["cached_tokens"],
                     "vllm": h, "extends_previous_reply": extends})
    replies = [x for x in rows if x["kind"] == "reply"]

    def share(xs: list[dict[str, Any]], key: str) -> float:
        total = sum(x["prompt"] for x in xs)
        return sum(x[key] or 0 for x in xs) / total if total else 0.0

    return {
        "rows": rows,
        "engine_counters": (stats.get("prefix_hits"), stats.get("prefix_misses")),
        "share_engine_all": stats["prefix_hits"] / max(1, stats["prefix_hits"]
                                                       + stats["prefix_misses"]),
        "share_engine_replies": share(replies, "engine"),
        "share_vllm_all": share(rows, "vllm"),
        "share_vllm_replies": share(replies, "vllm"),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--budget", type=int, default=None,
                    help="llm.context_budget_tokens (small: the history must be cut to fit)")
    ap.add_argument("--minimal-cuts", action="store_true",
                    help="cut the history by as little as fits (the old way), for comparison")
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.minimal_cuts:
        budget_module.CUT_STEPS = 10**9  # a step of one token: every exchange is a cut point
    with tempfile.TemporaryDirectory() as tmp:
        root = ensure_tiny_models(Path(tmp) / "tiny")
        t0 = time.perf_counter()
        with openai_server(root / "Step-Audio-Chat", Path(tmp) / "engine.log") as url:
            asyncio.run(converse(url, root, args.turns, args.budget))
            stats = httpx.get(url.removesuffix("/v1") + "/stats", timeout=10).json()
        out = report(stats, load_text_tokenizer(root / "Step-Audio-Chat"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    cuts = "minimal cuts" if args.minimal_cuts else f"cuts in steps of budget/{budget_module.CUT_STEPS}"
    print(f"machine: {platform.node()}, commit {commit}, {args.turns} turns, budget "
          f"{args.budget or 'default'} ({cuts}), {time.perf_counter() - t0:.0f} s")
    print("| # | request | prompt tokens | engine cache hit | vLLM-model hit | "
          "shared with the previous reply's prompt |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(out["rows"], 1):
        ext = "" if r["extends_previous_reply"] is None else r["extends_previous_reply"]
        engine = "cancelled" if r["engine"] is None else r["engine"]
        print(f"| {i} | {r['kind']} | {r['prompt']} | {engine} | {r['vllm']} | {ext} |")
    print(f"\nengine counters (hits, computed): {out['engine_counters']}")
    print(f"cache-hit share of prompt tokens: engine, all requests {out['share_engine_all']:.1%}; "
          f"engine, replies {out['share_engine_replies']:.1%}; vLLM model, all requests "
          f"{out['share_vllm_all']:.1%}; vLLM model, replies {out['share_vllm_replies']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
