"""Step1 decode on one GPU at the TTS-3B shape (benchmark, not a test).

Random bf16 weights at the real TTS-3B shape (hidden 3072, 32 layers, 48 heads in 4 KV groups,
vocab 74752, separate lm_head: 3.53 B parameters), built directly on the GPU: no checkpoint.
Measured, each after warm-up, with CUDA events, as the median of several repeats:

- the serving path (``stepaudio.llm.fast_decode``: static cache, Triton kernels, CUDA graph per
  batch bucket) at batch 1, 8 and 32, every row with ~500 tokens of context prefilled (rows at
  different lengths), feeding the argmax back on the GPU (no host sync per step); also with a
  host sync per step (what a naive engine loop does), with torch-op kernels in the graph, and
  without the graph;
- prefill of 500 tokens into a slot (the model's own forward writing the static cache);
- the naive loop: the model's normal forward with a growing ``DynamicCache``, batch 1;
- the bandwidth floor: parameter bytes / measured device-to-device copy bandwidth (bytes read +
  written), i.e. the time to stream the weights once.

RTF per stream = ms per step x 41.67 / 1000 (41.67 audio tokens per second of speech): each stream
gets one token per step. Before timing, the fast path's logits are checked against the model's
normal forward (bf16) so a fast wrong kernel cannot slip through.

    PYTHONPATH=. python3 bench/step1_gpu.py [--out DIR] [--context 500] [--steps 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepaudio.llm import Step1Config, Step1ForCausalLM  # noqa: E402
from stepaudio.llm.compat import CACHE_FIELD  # noqa: E402
from stepaudio.llm.fast_decode import Step1FastDecoder, parameter_bytes  # noqa: E402

TOKENS_PER_AUDIO_SECOND = 41.67
DEVICE = "cuda"
#: Config overrides (a dry run on CPU uses a tiny model); empty = the TTS-3B shape.
CONFIG_OVERRIDES: dict[str, int] = {}


def log(msg: str) -> None:
    print(msg, flush=True)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    """Median device time of ``fn`` in ms, by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(gib: float = 1.0, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = int(gib * (1 << 30)) // 2
    src = torch.randn(n, device=DEVICE, dtype=torch.bfloat16)  # random, never zeros
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), repeats, warmup=3)
    assert torch.equal(dst[:1024], src[:1024])
    return 2 * n * 2 / (ms / 1e3)


def build_model(seed: int = 0) -> Step1ForCausalLM:
    """TTS-3B-shaped Step1 in bf16, allocated and initialised on the GPU."""
    config = Step1Config(**CONFIG_OVERRIDES)  # the defaults are the TTS-3B config
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEVICE):
            model = Step1ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # explicit, so no init path can leave zeros or garbage
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(1.0, 0.1, generator=gen)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def reference_logits(model, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """The model's normal forward with a growing cache, one row alone."""
    ids = torch.tensor([tokens], device=DEVICE)
    out = model(ids[:, :prompt_len], use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_FIELD)
    rows = [out.logits[0, -1]]
    for t in range(prompt_len, len(tokens)):
        out = model(ids[:, t : t + 1], use_cache=True, **{CACHE_FIELD: cache})
        rows.append(out.logits[0, -1])
    return torch.stack(rows).float()


def fast_logits(model, prompts: list[list[int]], steps: list[list[int]], max_len: int,
                kernels: str, graphs: bool) -> tuple[str, torch.Tensor]:
    """Prefill the rows, decode them together; ``[rows, 1 + steps, vocab]`` fp32 logits."""
    dec = Step1FastDecoder(model, max_batch=4, max_len=max_len, buckets=(1, 4),
                           kernels=kernels, use_cuda_graphs=graphs)
    slots = [dec.allocate() for _ in prompts]
    rows = [[dec.prefill(s, p).float()] for s, p in zip(slots, prompts, strict=True)]
    for toks in steps:
        out = dec.decode(slots, toks).float()
        for i in range(len(prompts)):
            rows[i].append(out[i].clone())
    return dec.kernels, torch.stack([torch.stack(r) for r in rows])


def check_correctness(model, max_len: int) -> dict[str, Any]:
    """Fast path vs the model's normal forward, in bf16 and in fp32 (a float32 copy).

    bf16 runs of 32 random layers differ from each other by a few percent whatever the order
    of the sums, so the decisive check is fp32 (Triton kernels and graph included), and bf16
    is judged against the fp32 reference next to the model's own bf16 error.
    """
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    lengths = [37, 300, 129]
    prompts = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]
    steps = [torch.randint(0, vocab, (3,), generator=gen).tolist() for _ in range(4)]

    def refs(m) -> torch.Tensor:
        return torch.stack([
            reference_logits(m, p + [s[i] for s in steps], len(p)) for i, p in enumerate(prompts)
        ])

    with torch.device(DEVICE):
        model32 = Step1ForCausalLM(model.config)
    model32.load_state_dict(model.state_dict())
    model32.eval()
    ref32, ref16 = refs(model32), refs(model)
    result: dict[str, Any] = {"model bf16 vs fp32: rel err": rel_err(ref16, ref32)}
    for label, m in (("bf16", model), ("fp32", model32)):
        for name, kernels, graphs in (("graph", "auto", True), ("torch-ops eager", "torch", False)):
            used, got = fast_logits(m, prompts, steps, max_len, kernels, graphs)
            key = f"fast {label} {used} {name}"
            result[f"{key} vs fp32 model: rel err"] = rel_err(got, ref32)
            result[f"{key} vs fp32 model: max abs"] = (got - ref32).abs().max().item()
            result[f"{key}: argmax = fp32 model's"] = (
                (got.argmax(-1) == ref32.argmax(-1)).float().mean().item()
            )
            torch.cuda.empty_cache()
    result["fp32 logits rms"] = ref32.pow(2).mean().sqrt().item()
    del model32
    torch.cuda.empty_cache()
    return result


def context_lengths(batch: int, context: int) -> list[int]:
    """~context tokens per row, spread over +-8 so rows sit at different positions."""
    return [context - 8 + (i * 5) % 17 for i in range(batch)]


def time_decode(dec: Step1FastDecoder, batch: int, context: int, steps: int, repeats: int,
                synced: bool = False) -> float:
    """Median ms per decode step for ``batch`` rows, argmax fed back each step."""
    vocab = dec.config.vocab_size
    lengths = context_lengths(batch, context)
    slots = [dec.allocate() for _ in range(batch)]
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    for slot, n in zip(slots, lengths, strict=True):
        dec.prefill(slot, torch.randint(0, vocab, (n,), device=DEVICE, generator=gen))
    first = torch.randint(0, vocab, (batch,), device=DEVICE, generator=gen)

    def run(n_steps: int) -> None:
        ids: Any = first
        for _ in range(n_steps):
            logits = dec.decode(slots, ids)
            ids = logits.argmax(-1)
            if synced:
                ids = ids.tolist()  # a host round trip per step, as a naive engine loop does

    run(3)  # warm-up: captures this bucket's graph, compiles kernels
    times = []
    for _ in range(repeats):
        for slot, n in zip(slots, lengths, strict=True):
            dec.truncate(slot, n)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        run(steps)
        end.record()
        end.synchronize()
        wall = (time.perf_counter() - t0) * 1e3
        times.append(max(start.elapsed_time(end), wall if synced else 0.0) / steps)
    for slot in slots:
        dec.release(slot)
    return statistics.median(times)


def time_prefill(model, context: int, repeats: int, max_len: int) -> float:
    dec = Step1FastDecoder(model, max_batch=1, max_len=max_len, buckets=(1,))
    slot = dec.allocate()
    ids = torch.randint(0, model.config.vocab_size, (context,), device=DEVICE)

    def run() -> None:
        dec.truncate(slot, 0)
        dec.prefill(slot, ids)

    return median_ms(run, repeats)


def prefill_by_backend(model, context: int, repeats: int, max_len: int) -> dict[str, Any]:
    """Prefill ms with SDPA limited to one backend each (which one serves an explicit bias)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    out: dict[str, Any] = {}
    for name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            with sdpa_kernel([backend]):
                out[name] = time_prefill(model, context, repeats, max_len)
        except Exception as exc:  # a backend that refuses these inputs
            out[name] = f"refused: {str(exc).splitlines()[0][:120]}"
    return out


def time_naive(model, context: int, tokens: int) -> float:
    """ms per token of the model's normal forward with a growing DynamicCache (batch 1)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=DEVICE)
    out = model(ids, use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_FIELD)
    nxt = out.logits[:, -1:].argmax(-1)
    times = []
    for i in range(tokens + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model(nxt, use_cache=True, **{CACHE_FIELD: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
        if i >= 2:  # two warm-up tokens
            times.append((time.perf_counter() - t0) * 1e3)
    del cache, out
    torch.cuda.empty_cache()
    return statistics.median(times)


def profile_kernels(fn: Callable[[], Any], iters: int = 3, top: int = 10) -> dict[str, Any]:
    """Device ms per call of ``fn``, by kernel family and for the top kernels by name."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels = []
    for evt in prof.key_averages():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side ops would count their kernels twice
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us:
            kernels.append((evt.key, us / iters / 1e3, evt.count // iters))
    families: dict[str, float] = {}
    for name, ms, _ in kernels:
        low = name.lower()
        if "decode_attn" in low or "combine" in low:
            fam = "attention (triton)"
        elif "rmsnorm" in low:
            fam = "rmsnorm (triton)"
        elif "silu" in low:
            fam = "silu*up (triton)"
        elif any(k in low for k in ("gemm", "gemv", "nvjet", "sm90", "cutlass", "xmma")):
            fam = "matmul (cuBLAS)"
        elif any(k in low for k in ("fmha", "attention", "flash", "cudnn")):
            fam = "sdpa"
        else:
            fam = "other"
        families[fam] = families.get(fam, 0.0) + ms
    kernels.sort(key=lambda k: -k[1])
    return {
        "total ms": sum(k[1] for k in kernels),
        "families": dict(sorted(families.items(), key=lambda kv: -kv[1])),
        "top": [f"{ms:.3f} ms x{count}: {name[:90]}" for name, ms, count in kernels[:top]],
    }


def decode_profile(model, batch: int, context: int, max_len: int) -> dict[str, Any]:
    """Kernels of one eager Triton decode step (a graph replay hides them from the profiler)."""
    dec = Step1FastDecoder(model, max_batch=batch, max_len=max_len, buckets=(batch,),
                           use_cuda_graphs=False)
    slots = [dec.allocate() for _ in range(batch)]
    for slot, n in zip(slots, context_lengths(batch, context), strict=True):
        dec.prefill(slot, torch.randint(0, model.config.vocab_size, (n,), device=DEVICE))
    ids = torch.zeros(batch, dtype=torch.long, device=DEVICE) + 7
    lengths = [dec.length(s) for s in slots]

    def step() -> None:
        for slot, n in zip(slots, lengths, strict=True):
            dec.truncate(slot, n)
        dec.decode(slots, ids)

    return profile_kernels(step)


def prefill_profile(model, context: int, max_len: int) -> dict[str, Any]:
    dec = Step1FastDecoder(model, max_batch=1, max_len=max_len, buckets=(1,),
                           use_cuda_graphs=False)
    slot = dec.allocate()
    ids = torch.randint(0, model.config.vocab_size, (context,), device=DEVICE)

    def run() -> None:
        dec.truncate(slot, 0)
        dec.prefill(slot, ids)

    return profile_kernels(run, top=12)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rtf(ms: float) -> float:
    return ms * TOKENS_PER_AUDIO_SECOND / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json/.md")
    parser.add_argument("--context", type=int, default=500)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--naive-tokens", type=int, default=6)
    parser.add_argument("--block-n", default="64", help="comma list: attention key block sizes")
    parser.add_argument("--long-context", type=int, default=2000,
                        help="also time batch 1 and the largest batch at this context (0: skip)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    torch.set_grad_enabled(False)
    batches = [int(b) for b in args.batches.split(",")]
    block_ns = [int(b) for b in args.block_n.split(",")]
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "card": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / (1 << 30), 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "date": dt.date.today().isoformat(),
        "context": args.context,
        "steps": args.steps,
        "repeats": args.repeats,
    }
    try:
        import transformers
        import triton

        info["triton"] = triton.__version__
        info["transformers"] = transformers.__version__
    except Exception:
        pass
    log(f"# {info}")
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}

    def guarded(label: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            value = fn()
            shown = value if isinstance(value, (int, float, str)) else type(value).__name__
            if isinstance(value, dict):
                shown = json.dumps(value, indent=1, default=str)
            log(f"[{time.perf_counter() - t0:6.1f}s] {label}: {shown}")
            return value
        except Exception:
            log(f"[{time.perf_counter() - t0:6.1f}s] {label}: FAILED\n{traceback.format_exc()}")
            extra[f"{label} error"] = traceback.format_exc(limit=3)
            return None

    bw = guarded("copy bandwidth (B/s)", copy_bandwidth)
    model = guarded("build model", build_model)
    if model is None:
        sys.exit(1)
    pbytes = parameter_bytes(model)
    embed_bytes = model.model.embed_tokens.weight.numel() * 2
    floor_ms = pbytes / bw * 1e3 if bw else float("nan")
    info.update(parameter_bytes=pbytes, copy_bandwidth_tb_s=(bw or 0) / 1e12, floor_ms=floor_ms)
    log(f"# parameters {pbytes / 1e9:.2f} GB, floor {floor_ms:.3f} ms "
        f"(weights read per step without the embedding: {(pbytes - embed_bytes) / 1e9:.2f} GB)")

    extra["correctness"] = guarded("correctness (bf16 and fp32)",
                                   lambda: check_correctness(model, 512))
    prefill_ms = guarded("prefill 500 ms",
                         lambda: time_prefill(model, args.context, args.repeats, args.max_len))

    extra["prefill ms by SDPA backend"] = guarded(
        "prefill by SDPA backend",
        lambda: prefill_by_backend(model, args.context, args.repeats, args.max_len))

    variants = [(f"graph + triton (block_n {bn})", "auto", True, bn, batches) for bn in block_ns]
    variants += [("graph + torch ops", "torch", True, block_ns[0], batches),
                 ("eager + triton (no graph)", "auto", False, block_ns[0], [1])]
    for name, kernels, graphs, block_n, sizes in variants:
        dec = guarded(f"{name}: decoder", lambda k=kernels, g=graphs, bn=block_n: Step1FastDecoder(
            model, max_batch=max(batches), max_len=args.max_len, kernels=k,
            use_cuda_graphs=g, block_n=bn))
        if dec is None:
            continue
        for b in sizes:
            ms = guarded(f"{name}: batch {b} ms/step", lambda d=dec, b=b: time_decode(
                d, b, args.context, args.steps, args.repeats))
            if ms is not None:
                rows.append({"path": name, "batch": b, "ms_step": ms})
        if name.startswith("graph + triton") and block_n == block_ns[0]:
            for b in (1, max(batches)):
                ms = guarded(f"{name}: batch {b} synced ms/step", lambda d=dec, b=b: time_decode(
                    d, b, args.context, args.steps, args.repeats, synced=True))
                if ms is not None:
                    rows.append({"path": f"{name}, host sync per step", "batch": b, "ms_step": ms})
        del dec
        torch.cuda.empty_cache()

    naive = guarded("naive eager ms/token",
                    lambda: time_naive(model, args.context, args.naive_tokens))
    if naive is not None:
        rows.append({"path": "naive: model forward, DynamicCache", "batch": 1, "ms_step": naive})
    if args.long_context:
        long_len = _next_pow2(args.long_context + args.steps + 64)
        dec = guarded("long context: decoder", lambda: Step1FastDecoder(
            model, max_batch=max(batches), max_len=long_len))
        for b in (1, max(batches)) if dec is not None else ():
            ms = guarded(f"context {args.long_context}: batch {b} ms/step",
                         lambda d=dec, b=b: time_decode(d, b, args.long_context, args.steps,
                                                        args.repeats))
            if ms is not None:
                rows.append({"path": f"graph + triton, context ~{args.long_context}",
                             "batch": b, "ms_step": ms})
        del dec
        torch.cuda.empty_cache()
    for b in (1, max(batches)):
        extra[f"kernels, eager triton decode step, batch {b}"] = guarded(
            f"kernel profile batch {b}",
            lambda b=b: decode_profile(model, b, args.context, args.max_len))
    extra[f"kernels, prefill {args.context}"] = guarded(
        "kernel profile prefill", lambda: prefill_profile(model, args.context, args.max_len))

    table = markdown(info, rows, prefill_ms, floor_ms)
    log("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "step1_gpu.md").write_text(table + "\n", encoding="utf-8")
        payload = {"info": info, "rows": rows, "prefill_ms": prefill_ms, "extra": extra}
        (args.out / "step1_gpu.json").write_text(json.dumps(payload, indent=2, default=str),
                                                 encoding="utf-8")


def markdown(info: dict[str, Any], rows: list[dict[str, Any]], prefill_ms: float | None,
             floor_ms: float) -> str:
    lines = [
        f"card: {info['card']} ({info['sms']} SMs), torch {info['torch']}, "
        f"triton {info.get('triton', '?')}, {info['date']}; context ~{info['context']} tokens "
        f"per row, {info['steps']} steps x {info['repeats']} repeats (median)",
        f"copy bandwidth {info['copy_bandwidth_tb_s']:.2f} TB/s (read + write), parameters "
        f"{info['parameter_bytes'] / 1e9:.2f} GB -> floor {floor_ms:.2f} ms/step "
        f"(RTF {rtf(floor_ms):.3f})",
        "",
        "| path | batch | ms / step | tokens/s (all streams) | RTF per stream | x floor |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        ms, b = row["ms_step"], row["batch"]
        lines.append(f"| {row['path']} | {b} | {ms:.2f} | {b * 1000 / ms:.0f} | {rtf(ms):.3f} "
                     f"| {ms / floor_ms:.2f} |")
    lines.append(f"| bandwidth floor | - | {floor_ms:.2f} | - | {rtf(floor_ms):.3f} | 1.00 |")
    if prefill_ms is not None:
        lines.append(f"\nprefill of {info['context']} tokens: {prefill_ms:.1f} ms "
                     f"({info['context'] / prefill_ms * 1000:.0f} tokens/s)")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
