"""The batched vocoder at CosyVoice-300M sizes on a GPU: what one batched call costs for 1-16
sessions' windows (not a test).

Random weights at the published shapes (``stepaudio.random_models``), the packaged Tingting
voice's prompt length. For each row count: the flow's 10 guided Euler steps over the steady
window (prompt + 152 frames), replayed from a CUDA graph, unpadded (every row the same length) and
padded (masked estimator, lengths bucketed); HiFT's decode of the steady 120-frame window; the
encoder and regulator eagerly. Also: graph capture times, the batched result against the same
windows alone (bf16), and TTS-3B's prompt prefill with and without a kept voice prefix.

    PYTHONPATH=. python3 bench/vocoder_gpu.py [--out DIR] [--small --device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from tts_gpu import sync, timed  # noqa: E402 - the same timing as the flow/HiFT bench

from stepaudio.random_models import build_cosyvoice, build_tts_lm  # noqa: E402
from stepaudio.tts.cuda_graphs import GraphedBatchDecode, GraphedBatchSolver  # noqa: E402
from stepaudio.tts.streaming import StreamOptions  # noqa: E402
from stepaudio.tts.vocoder_batch import BatchRunner  # noqa: E402
from stepaudio.tts.vocoder_work import Encode, Regulate, Solve, run_one  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


def timed_ms(fn, device: torch.device, repeats: int = 7, warmup: int = 1) -> float:
    return timed(fn, device, repeats, warmup)


def solve_requests(n: int, lengths: list[int], dev, dtype, g) -> list[Solve]:
    reqs = []
    for i in range(n):
        length = lengths[i % len(lengths)]
        def r(*shape):  # noqa: ANN001, ANN202, E306
            return torch.randn(*shape, generator=g).to(dev, dtype)
        reqs.append(Solve(r(80, length), r(80, length), r(80), r(80, length)))
    return reqs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--prompt-frames", type=int, default=371)  # Tingting: 4.3 s of prompt
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = torch.device(args.device)
    sizes = "small" if args.small else "published"
    rows = [int(x) for x in args.rows.split(",")]
    prompt = args.prompt_frames
    steady = prompt + StreamOptions().window_frames
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "sizes": sizes, "prompt_frames": prompt,
            "steady_window": steady}
    log(json.dumps(info))
    results: dict[str, object] = {"info": info}
    vocoder(dev, sizes, rows, prompt, results)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    prefill(dev, sizes, results)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vocoder_gpu.json").write_text(json.dumps(results, indent=1))


def vocoder(dev: torch.device, sizes: str, rows: list[int], prompt: int,
            results: dict[str, object]) -> None:
    from stepaudio.tts.vocoder_work import Decode, PredictF0

    opt = StreamOptions()
    steady = prompt + opt.window_frames
    cv = build_cosyvoice(dev, sizes=sizes)
    runner = BatchRunner(cv.flow, cv.hift)
    solver = GraphedBatchSolver(runner, max(rows))
    decoder = GraphedBatchDecode(cv.hift, max(rows))
    runner.solver, runner.decoder = solver, decoder
    g = torch.Generator().manual_seed(0)
    dtype = cv.flow.dtype

    # capture times (what the server pays at start-up per shape)
    t0 = time.perf_counter()
    n_plain = solver.warm(rows, [steady], padded=False)
    sync(dev)
    t1 = time.perf_counter()
    bucketed = runner.bucket(steady)
    n_masked = solver.warm(rows, [bucketed], padded=True)
    sync(dev)
    t2 = time.perf_counter()
    n_hift = decoder.warm(rows, [opt.hift_window_frames])
    sync(dev)
    t3 = time.perf_counter()
    results["capture_s"] = {"solver_unpadded_per_graph": (t1 - t0) / max(1, n_plain),
                            "solver_padded_per_graph": (t2 - t1) / max(1, n_masked),
                            "hift_per_graph": (t3 - t2) / max(1, n_hift)}
    log(f"capture: {results['capture_s']}")

    table = []
    for n in rows:
        equal = solve_requests(n, [steady], dev, dtype, g)
        mixed = solve_requests(n, [steady, steady - 40, prompt + 24], dev, dtype, g)
        plain_ms = timed_ms(lambda: runner.run(equal), dev)  # noqa: B023
        masked_ms = timed_ms(lambda: runner.run(mixed), dev)  # noqa: B023
        mels = [torch.randn(80, opt.hift_window_frames, generator=g).to(dev) for _ in range(n)]
        srcs = [0.1 * torch.randn(opt.hift_window_frames * 256, generator=g).to(dev)
                for _ in range(n)]
        hift_ms = timed_ms(lambda: runner.run(  # noqa: B023
            [Decode(m, s) for m, s in zip(mels, srcs, strict=True)]), dev)  # noqa: B023
        f0_ms = timed_ms(lambda: runner.run([PredictF0(m) for m in mels]), dev)  # noqa: B023
        ids = [torch.randint(0, 5120, (180 + 60,), generator=g).to(dev) for _ in range(n)]
        enc_ms = timed_ms(lambda: runner.run([Encode(i) for i in ids]), dev)  # noqa: B023
        xs = [torch.randn(80, steady, generator=g).to(dev, dtype) for _ in range(n)]
        reg_ms = timed_ms(lambda: runner.run([Regulate(x) for x in xs]), dev)  # noqa: B023
        row = {"rows": n, "solve_unpadded_ms": plain_ms, "solve_padded_ms": masked_ms,
               "hift_decode_ms": hift_ms, "f0_ms": f0_ms, "encode_ms": enc_ms,
               "regulate_ms": reg_ms,
               "chunk_ms_per_row": (plain_ms + hift_ms + f0_ms + enc_ms + reg_ms) / n}
        table.append(row)
        log(json.dumps(row))
    results["table"] = table

    # batched vs alone (bf16): the same windows, padded among others
    cases = {"padded": [steady, steady - 40, prompt + 24, steady - 7],
             "equal": [steady] * 3,
             "uncaptured length": [steady - 13] * 2}  # padded to the bucket's masked graph
    for name, lengths in cases.items():
        reqs = solve_requests(len(lengths), lengths, dev, dtype, g)
        batched = runner.run(reqs)
        alone = [run_one(cv, r) for r in reqs]
        rel = max(float((a.float() - b.float()).norm() / a.float().norm())
                  for a, b in zip(alone, batched, strict=True))
        results[f"batched_vs_alone_rel_l2 ({name})"] = rel
        log(f"batched vs alone, {name} (bf16, relative L2): {rel:.2e}")


def prefill(dev: torch.device, sizes: str, results: dict[str, object]) -> None:
    """TTS-3B: a ~900-token voice prompt computed, or copied from a kept prefix + 20 tokens."""
    from stepaudio.llm.fast_decode import Step1FastDecoder

    g = torch.Generator().manual_seed(1)
    lm = build_tts_lm(dev, sizes=sizes)
    dec = Step1FastDecoder(lm, max_batch=4, max_len=2048, prefix_slots=2)
    voice = torch.randint(0, 65536, (880,), generator=g).tolist()
    prompt_ids = voice + torch.randint(0, 65536, (20,), generator=g).tolist()

    def full() -> None:
        s = dec.allocate()
        dec.prefill(s, prompt_ids)
        dec.release(s)

    def reused() -> None:
        s = dec.allocate()
        n = dec.reuse_prefix(s, prompt_ids)
        dec.prefill(s, prompt_ids[n:])
        dec.release(s)

    s = dec.allocate()
    dec.prefill(s, prompt_ids)
    dec.keep_prefix(s, prompt_ids)
    dec.release(s)
    results["tts_prefill_ms"] = {"full_900": timed_ms(full, dev, 5),
                                 "kept_prefix_plus_20": timed_ms(reused, dev, 5)}
    log(f"TTS-3B prompt prefill: {results['tts_prefill_ms']}")


if __name__ == "__main__":
    main()
