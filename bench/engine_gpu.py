"""The in-process engine at the TTS-3B shape, measured through its async ``generate``.

bench/step1_gpu.py times the decoder alone; this times what the server gets: requests submitted
to ``TransformersEngine.generate`` from an asyncio loop, prefill, batched decode steps, sampling
on the device with per-request generators, the one host sync per step, detokenization and the
deltas' trip back to the loop. Random bf16 weights at the real TTS-3B shape (hidden 3072,
intermediate 8192, 48 heads in 4 KV groups, 32 layers, vocab 74752) are built on the device; no
checkpoint. The tokenizer (for the text deltas) comes from ``--tokenizer DIR``, a folder holding a
Step1 tokenizer (e.g. a tiny checkpoint's, or what ``save_pretrained`` wrote from it).

Per configuration: ``n`` requests with ~``--prompt``-token random prompts (lengths spread over
+-8) are submitted at once; each reply runs ``--new`` tokens (no stop id). Reported per stream:
ms per token after the first (median over streams), RTF = ms x 41.67 / 1000, time to first token
(median and worst: the prefills run one after another). Also the decoder's own step time (graph
replay, argmax fed back on the device, no host sync) at the same batch sizes, for the engine's
overhead, the same engine without overlapped steps (each step's ids read before the next step
is launched), and the per-request path (``fast_decode: off``) for scale.

    PYTHONPATH=. python3 bench/engine_gpu.py --tokenizer DIR [--out DIR]
    PYTHONPATH=. python3 bench/engine_gpu.py --device cpu --model TINY_CHAT_DIR   # CPU, tiny
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepaudio.llm.engine import RepetitionRule, SamplingParams  # noqa: E402
from stepaudio.llm.engine_transformers import TransformersEngine  # noqa: E402

TOKENS_PER_AUDIO_SECOND = 41.67
#: Prompt ids are drawn from the text + audio range, as real chat/TTS prompts are.
PROMPT_VOCAB = 65536 + 5120


def log(msg: str) -> None:
    print(msg, flush=True)


def rtf(ms: float) -> float:
    return ms * TOKENS_PER_AUDIO_SECOND / 1000


#: ``--shape small``: a dry run of this script on a CPU, same code, tiny sizes.
SMALL_SHAPE = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
               "num_attention_groups": 2, "num_hidden_layers": 2}


def build_model(device: str, seed: int = 0, small: bool = False) -> Any:
    """TTS-3B-shaped Step1 in bf16, allocated and initialised on the device."""
    from stepaudio.llm import Step1Config, Step1ForCausalLM

    config = Step1Config(**(SMALL_SHAPE if small else {}))  # defaults: the TTS-3B config
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Step1ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # explicit, so no init path can leave zeros or garbage
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(1.0, 0.1, generator=gen)
    return model.eval()


@dataclass
class Stream:
    submitted: float
    first: float | None = None
    last: float | None = None
    tokens: int = 0


def sampling(kind: str, new: int, seed: int) -> SamplingParams:
    if kind == "tts":  # the TTS-3B call: top_p 1, top_k 50, the repetition rule
        return SamplingParams(temperature=0.7, top_p=1.0, top_k=50, max_new_tokens=new,
                              stop_token_ids=(), seed=seed, repetition=RepetitionRule(10, 0.1))
    return SamplingParams(max_new_tokens=new, stop_token_ids=(), seed=seed)  # chat defaults


def prompts(n: int, length: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, PROMPT_VOCAB, (length - 8 + (i * 5) % 17,), generator=gen).tolist()
            for i in range(n)]


async def run_batch(engine: TransformersEngine, n: int, length: int, new: int,
                    kind: str) -> dict[str, Any]:
    """Submit ``n`` requests at once and time every delta's arrival on the loop."""
    batch = prompts(n, length, seed=n)
    streams = [Stream(submitted=0.0) for _ in range(n)]

    async def consume(index: int, gen: Any) -> None:
        s = streams[index]
        async for delta in gen:
            if delta.token_ids:
                now = time.perf_counter()
                s.first = s.first or now
                s.last = now
                s.tokens += len(delta.token_ids)

    start = time.perf_counter()
    gens = []
    for i, ids in enumerate(batch):
        streams[i].submitted = time.perf_counter()
        gens.append(engine.generate(ids, sampling(kind, new, seed=i)))
    await asyncio.gather(*(consume(i, g) for i, g in enumerate(gens)))
    end = max(s.last for s in streams)
    per_token = [(s.last - s.first) * 1e3 / (s.tokens - 1) for s in streams if s.tokens > 1]
    ttft = [(s.first - s.submitted) * 1e3 for s in streams]
    return {
        "streams": n,
        "tokens": [s.tokens for s in streams],
        "ms_per_token": statistics.median(per_token),
        "ms_per_token_max": max(per_token),
        "ttft_ms": statistics.median(ttft),
        "ttft_max_ms": max(ttft),
        "tokens_per_s": sum(s.tokens for s in streams) / (end - start),
    }


async def same_ids(engine: TransformersEngine, n: int = 4, new: int = 48) -> bool:
    """Seeded requests give the same ids with and without overlapped steps (same kernels)."""
    steps = engine._steps
    before = steps.overlap
    runs = []
    for overlap in (True, False):
        steps.overlap = overlap
        batch = prompts(n, 120, seed=7)
        gens = [engine.generate(ids, sampling("chat", new, seed=i)) for i, ids in enumerate(batch)]
        runs.append([ids for _, ids in await asyncio.gather(*(g.collect() for g in gens))])
    steps.overlap = before
    return runs[0] == runs[1]


def decoder_step_ms(engine: TransformersEngine, batch: int, length: int, steps: int = 32) -> float:
    """The decoder alone (graph replay, argmax fed back, no host sync): the engine's floor."""
    dec = engine.decoder
    vocab = dec.config.vocab_size
    slots = [dec.allocate() for _ in range(batch)]
    try:
        for slot, ids in zip(slots, prompts(batch, length, seed=99), strict=True):
            dec.prefill(slot, ids)
        lengths = [dec.length(s) for s in slots]
        ids = torch.randint(0, vocab, (batch,), device=dec.device)
        times = []
        for _ in range(4):
            for slot, n in zip(slots, lengths, strict=True):
                dec.truncate(slot, n)
            sync(dec.device)
            t0 = time.perf_counter()
            nxt = ids
            for _ in range(steps):
                nxt = dec.decode(slots, nxt).argmax(-1)
            sync(dec.device)
            times.append((time.perf_counter() - t0) * 1e3 / steps)
        return statistics.median(times[1:])
    finally:
        for slot in slots:
            dec.release(slot)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", type=Path, default=None,
                        help="a Step1 checkpoint folder (e.g. tiny, for CPU); default: random "
                        "TTS-3B-shaped bf16 weights built on the device")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="folder with the Step1 tokenizer (default: --model)")
    parser.add_argument("--shape", choices=["tts-3b", "small"], default="tts-3b",
                        help="random model's shape (small: a dry run on CPU)")
    parser.add_argument("--prompt", type=int, default=500)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--concurrency", default="1,8,16")
    parser.add_argument("--kinds", default="chat,tts", help="sampling settings to run")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=2048)
    parser.add_argument("--off-new", type=int, default=16,
                        help="tokens per reply on the per-request path (0: skip it)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    from stepaudio.llm.tokenizer import load_text_tokenizer

    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    info: dict[str, Any] = {"device": str(device), "date": dt.date.today().isoformat(),
                            "torch": torch.__version__, "prompt": args.prompt, "new": args.new}
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    log(f"# {info}")
    t0 = time.perf_counter()
    if args.model is not None:
        loaded = TransformersEngine.from_pretrained(args.model, device=str(device),
                                                    fast_decode="off")
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model = build_model(str(device), small=args.shape == "small")
        tokenizer = load_text_tokenizer(args.tokenizer)
    log(f"[{time.perf_counter() - t0:6.1f}s] model ready")
    concurrency = [int(c) for c in args.concurrency.split(",")]
    kinds = args.kinds.split(",")
    rows: list[dict[str, Any]] = []

    async def measure(engine: TransformersEngine, path: str, new: int, sizes: list[int],
                      kinds: list[str]) -> None:
        await run_batch(engine, max(sizes), args.prompt, 8, kinds[0])  # warm-up
        for kind in kinds:
            for n in sizes:
                t = time.perf_counter()
                try:
                    row = await run_batch(engine, n, args.prompt, new, kind)
                except Exception:
                    log(f"{path} {kind} n={n}: FAILED\n{traceback.format_exc()}")
                    continue
                row.update(path=path, kind=kind)
                if engine.decoder is not None and kind == kinds[0]:
                    row["decoder_step_ms"] = decoder_step_ms(engine, n, args.prompt)
                rows.append(row)
                log(f"[{time.perf_counter() - t:6.1f}s] {json.dumps(row)}")

    async def run_all() -> None:
        t = time.perf_counter()
        fast = TransformersEngine(model, tokenizer, fast_decode="on", max_batch=args.max_batch,
                                  max_len=args.max_len)
        overlap = fast._steps.overlap
        log(f"[{time.perf_counter() - t:6.1f}s] fast engine ready (graphs captured: "
            f"{fast.decoder.use_cuda_graphs}, kernels {fast.decoder.kernels}, overlapped "
            f"steps: {overlap})")
        try:
            info["same ids overlapped vs synced"] = await same_ids(fast)
            await measure(fast, "fast, overlapped steps" if overlap else "fast", args.new,
                          concurrency, kinds)
            if overlap:  # the same engine reading each step's ids before launching the next
                fast._steps.overlap = False
                await measure(fast, "fast, one sync per step", args.new, concurrency, kinds[:1])
        finally:
            await fast.aclose()
        if args.off_new:
            slow = TransformersEngine(model, tokenizer, fast_decode="off")
            try:
                await measure(slow, "per-request", args.off_new, concurrency[:2], kinds[:1])
            finally:
                await slow.aclose()

    asyncio.run(run_all())
    table = markdown(info, rows)
    log("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_gpu.md").write_text(table + "\n", encoding="utf-8")
        (args.out / "engine_gpu.json").write_text(
            json.dumps({"info": info, "rows": rows}, indent=2), encoding="utf-8")


def markdown(info: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{info.get('card', info['device'])}, torch {info['torch']}, {info['date']}; prompts "
        f"~{info['prompt']} tokens; same ids overlapped vs synced: "
        f"{info.get('same ids overlapped vs synced')}",
        "",
        "| path | sampling | concurrent | ms / token per stream | RTF per stream | decoder "
        "alone ms / step | tokens/s (all) | TTFT median / worst ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dec = f"{r['decoder_step_ms']:.2f}" if "decoder_step_ms" in r else "-"
        lines.append(
            f"| {r['path']} | {r['kind']} | {r['streams']} | {r['ms_per_token']:.2f} | "
            f"{rtf(r['ms_per_token']):.3f} | {dec} | {r['tokens_per_s']:.0f} | "
            f"{r['ttft_ms']:.1f} / {r['ttft_max_ms']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
