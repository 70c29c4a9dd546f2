"""Flow + HiFT on a GPU at CosyVoice-300M sizes, random weights (not a test).

Sizes: FunAudioLLM/CosyVoice's examples/libritts/cosyvoice/conf/cosyvoice.yaml (the published
CosyVoice-300M recipe), with Step-Audio's two changes that the checkpoints imply: flow vocabulary
5120 (1024 + 4096 dual codes) and input_frame_rate 125/3. Flow: 512-d conformer encoder, 6 blocks,
8 heads, 2048 units; length regulator 80 channels, 4 conv stages; estimator channels [256, 256],
4 transformer blocks per stage, 12 mid stages, 8 heads × 64, GELU; CFG 0.7, 10 Euler steps.
HiFT: base 512 channels, upsample [8, 8] / kernels [16, 16], iSTFT 16 / 4, 8 harmonics, F0
predictor 512 channels. Flow in bf16 (as the reference runs it), HiFT in float32. Speaker prompt:
3 s (125 tokens, 258 mel frames), as in the issue's reference measurement.

Measured (CUDA events / synchronised host clocks, median of --repeats after warm-up):
1. the reference's way: one flow call (eager) and one HiFT call on a whole utterance;
2. streaming windows: flow (encoder eager + estimator as a captured CUDA graph) and HiFT (graph)
   per chunk size, against the same windows run eagerly;
3. a 10 s utterance through StreamingToken2Wav with graphs: first chunk, ms per audio second.

    PYTHONPATH=. python3 bench/tts_gpu.py [--repeats 5] [--small --device cpu]   (smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from stepaudio.random_models import COSYVOICE_SIZES, COSYVOICE_YAML  # noqa: E402
from stepaudio.tts.cuda_graphs import GraphedDecode, GraphedEncoder, GraphedSolver  # noqa: E402
from stepaudio.tts.speakers import SpeakerFeatures  # noqa: E402
from stepaudio.tts.streaming import StreamingToken2Wav, StreamOptions  # noqa: E402
from stepaudio.tts.yaml_config import load_cosyvoice_yaml  # noqa: E402

REAL = COSYVOICE_SIZES["published"]
SMALL = COSYVOICE_SIZES["small"]
YAML = COSYVOICE_YAML

FPS = 22050 / 256  # mel frames per second


def build(sizes: dict, device: torch.device) -> SimpleNamespace:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cosyvoice.yaml"
        path.write_text(YAML.format(**sizes), encoding="utf-8")
        torch.manual_seed(0)
        cfg = load_cosyvoice_yaml(path)
    flow, hift = cfg.flow, cfg.hift
    # Random weights that keep activations finite through 64 bf16 transformer blocks.
    with torch.no_grad():
        for p in flow.parameters():
            if p.dim() > 1:
                p.mul_(0.5)
    flow_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    flow.to(device, flow_dtype).eval()
    hift.to(device).eval()
    return SimpleNamespace(flow=flow, hift=hift, device=device, sample_rate=22050)


def params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall milliseconds of fn() with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t) * 1e3)
    return statistics.median(out)


def speaker(device: torch.device, prompt_s: float = 3.0) -> SpeakerFeatures:
    g = torch.Generator().manual_seed(1)
    n_tok = int(prompt_s * 125 / 3)
    frames = int(prompt_s * FPS)
    return SpeakerFeatures("bench", "", "", (), torch.randint(0, 5120, (1, n_tok), generator=g),
                           torch.randn(1, frames, 80, generator=g), torch.randn(1, 192, generator=g),
                           prompt_s)


@torch.inference_mode()
def reference_calls(m, spk: SpeakerFeatures, repeats: int) -> list[dict]:
    """Whole-utterance flow.inference (eager) and HiFT, as the reference's offline path."""
    rows = []
    dev = m.device
    for seconds in (0.5, 1, 2, 4, 8):
        n = int(seconds * 125 / 3)
        tok = torch.randint(0, 5120, (1, n), device=dev)
        pt, pf = spk.prompt_token.to(dev), spk.prompt_feat.to(dev, m.flow.dtype)
        emb = spk.embedding.to(dev, m.flow.dtype)
        flow_ms = timed(lambda: m.flow.inference(tok, pt, pf, emb), dev, repeats)  # noqa: B023
        mel = torch.randn(1, 80, m.flow.mel_frames(n), device=dev)
        hift_ms = timed(lambda: m.hift.inference(mel), dev, repeats)  # noqa: B023
        rows.append({"audio_s": seconds, "flow_eager_ms": flow_ms, "hift_eager_ms": hift_ms})
    return rows


VARIANTS = {  # name: GraphedSolver keywords
    "graph": {"fast": False},
    "graph+qkv": {"fast": True, "fused_norm": False},
    "graph+qkv+addnorm": {"fast": True, "fused_norm": True},
    "graph+qkv+addnorm+compile": {"fast": True, "compile": True},  # only when asked for
}


def chunk_configs(opt: StreamOptions) -> list[tuple[str, int, int, int]]:
    """(label, committed frames, flow window, HiFT window) of a first and steady chunks."""
    out = [("first chunk", opt.first_frames, opt.first_frames + opt.lookahead_frames,
            opt.first_frames + opt.lookahead_frames)]
    for hop in (48, 96, 192):
        out.append((f"{hop / FPS:.2f} s chunk", hop, opt.left_frames + hop + opt.lookahead_frames,
                    opt.hift_left_frames + hop + opt.lookahead_frames))
    return out


@torch.inference_mode()
def solver_variants(m, spk: SpeakerFeatures, repeats: int, names: list[str]) -> tuple[list, dict]:
    """The estimator's 10 guided Euler steps alone, per variant and window length."""
    dev, flow = m.device, m.flow
    prompt = spk.prompt_feat.shape[1]
    lengths = [prompt + f for _, _, f, _ in chunk_configs(StreamOptions())]
    rows: list[dict] = []
    solvers: dict = {}
    ref_out = {}
    for name in ["eager"] + names:
        row: dict = {"variant": name}
        solver = None
        if name != "eager":
            t = time.perf_counter()
            try:
                solver = GraphedSolver(flow, **VARIANTS[name])
                solver.warm(prompt, [n - prompt for n in lengths])
                sync(dev)
            except Exception as err:  # a variant that cannot run is reported, not fatal
                print(f"# {name}: failed ({type(err).__name__}: {err})", flush=True)
                continue
            row["setup_s"] = time.perf_counter() - t
            solvers[name] = solver
        for n in lengths:
            g = torch.Generator(device=dev).manual_seed(n)
            c = flow.output_size
            mu = torch.randn(1, c, n, device=dev, generator=g).to(flow.dtype)
            args = (mu, torch.ones(1, 1, n, device=dev, dtype=flow.dtype),
                    torch.randn(1, c, device=dev, generator=g).to(flow.dtype),
                    torch.randn(1, c, n, device=dev, generator=g).to(flow.dtype),
                    torch.randn(1, c, n, device=dev, generator=g).to(flow.dtype))
            fn = (lambda a=args: flow.decoder(a[0], a[1], 10, 1.0, spks=a[2], cond=a[3], noise=a[4])
                  ) if solver is None else (lambda a=args, s=solver: s(*a))
            row[n] = timed(fn, dev, repeats)
            out = fn().float()
            if solver is None:
                ref_out[n] = out.clone()
            else:
                err = (out - ref_out[n]).norm() / ref_out[n].norm()
                row[f"relerr_{n}"] = float(err)
        rows.append(row)
    return rows, solvers


@torch.inference_mode()
def window_costs(m, spk: SpeakerFeatures, repeats: int, solver, decode, encode) -> list[dict]:
    """One streaming chunk of each size: flow window (encoder + solver) and HiFT (F0 on the
    host for the phase bookkeeping, then decode), as StreamingToken2Wav runs them."""
    dev = m.device
    opt = StreamOptions()
    prompt = spk.prompt_feat.shape[1]
    rows = []
    for label, hop, flow_len, hift_len in chunk_configs(opt):
        if decode is not None:
            decode.warm([hift_len])
        if solver is not None:
            solver.warm(prompt, [flow_len])
        n_tok = int(np.ceil((flow_len + 4) / FPS * 125 / 3)) + 8
        st = StreamingToken2Wav(m, spk, opt, seed=0, solver=solver, decode=decode, encode=encode)
        st.push(np.random.default_rng(0).integers(0, 5120, n_tok).tolist())
        enc_ms = timed(lambda: st._window_mu(0, n_tok, 0, flow_len), dev, repeats)  # noqa: B023
        flow_ms = timed(lambda: st._flow_window(0, flow_len, False), dev, repeats)  # noqa: B023
        mel = torch.randn(1, 80, hift_len, device=dev)
        src = 0.1 * torch.randn(1, 1, hift_len * 256, device=dev)
        dec = decode if decode is not None else m.hift.decode

        def vocode() -> None:
            m.hift.f0(mel).cpu()  # noqa: B023
            dec(mel, src)  # noqa: B023

        hift_ms = timed(vocode, dev, repeats)
        rows.append({"chunk": label, "audio_s": hop / FPS, "flow_frames": prompt + flow_len,
                     "encoder_ms": enc_ms, "flow_ms": flow_ms, "hift_frames": hift_len,
                     "hift_ms": hift_ms, "ms_per_audio_s": (flow_ms + hift_ms) / (hop / FPS)})
    return rows


@torch.inference_mode()
def utterance(m, spk: SpeakerFeatures, seconds: float, solver, decode, encode) -> dict:
    """All tokens present (TTS-3B ahead of the vocoder): every chunk of a whole utterance."""
    dev = m.device
    opt = StreamOptions()
    if solver is not None:
        shapes = opt.schedule()
        solver.warm(spk.prompt_feat.shape[1], [f for f, _ in shapes] + [opt.window_frames])
        decode.warm([h for _, h in shapes])
    tokens = np.random.default_rng(3).integers(0, 5120, int(seconds * 125 / 3)).tolist()
    first_ms = rest_ms = 0.0
    audio = 0
    for attempt in range(2):  # the first pass warms kernels and the allocator
        st = StreamingToken2Wav(m, spk, opt, seed=attempt, solver=solver, decode=decode,
                                encode=encode)
        st.push(tokens[:14])
        sync(dev)
        t = time.perf_counter()
        audio = len(st.next_chunk())
        sync(dev)
        first_ms = (time.perf_counter() - t) * 1e3
        st.push(tokens[14:])
        st.finish()
        t = time.perf_counter()
        for wav in st.drain():
            audio += len(wav)
        sync(dev)
        rest_ms = (time.perf_counter() - t) * 1e3
    audio_s = audio / 22050
    steady = [c.flow_ms + c.hift_ms for c in st.stats[2:-1]]
    return {"audio_s": audio_s, "chunks": len(st.stats), "first_chunk_ms": first_ms,
            "total_ms": first_ms + rest_ms, "ms_per_audio_s": (first_ms + rest_ms) / audio_s,
            "steady_chunk_ms": statistics.median(steady) if steady else float("nan"),
            "solver_replays": solver.cache.replays if solver else 0,
            "solver_eager": solver.cache.eager_calls if solver else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (smoke test on a CPU)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--variants", help="comma-separated solver variants (default: all on CUDA)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    m = build(SMALL if args.small else REAL, dev)
    spk = speaker(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# device {name}, torch {torch.__version__}, flow {params_m(m.flow):.1f} M params "
          f"({m.flow.dtype}), HiFT {params_m(m.hift):.1f} M (float32), prompt 3 s "
          f"({spk.prompt_feat.shape[1]} frames), {time.strftime('%Y-%m-%d')}", flush=True)
    results: dict = {"device": name, "torch": torch.__version__,
                     "flow_params_m": params_m(m.flow), "hift_params_m": params_m(m.hift)}
    if not args.skip_reference:
        ref = reference_calls(m, spk, args.repeats)
        results["reference"] = ref
        print("\n| whole utterance (reference way) | flow eager (ms) | HiFT eager (ms) |")
        print("|---|---|---|")
        for r in ref:
            print(f"| {r['audio_s']:g} s | {r['flow_eager_ms']:.1f} | {r['hift_eager_ms']:.1f} |",
                  flush=True)
    names = [n for n in VARIANTS if "compile" not in n] if dev.type == "cuda" else []
    if args.variants:
        names = [n for n in args.variants.split(",") if n]
    rows, solvers = solver_variants(m, spk, args.repeats, names)
    results["solver"] = [{str(k): v for k, v in r.items()} for r in rows]
    lengths = [k for k in rows[0] if isinstance(k, int)]
    print("\n| estimator, 10 guided Euler steps (ms) | " + " | ".join(
        f"{n} frames" for n in lengths) + " | setup (s) | rel. error vs eager |")
    print("|---|" + "---|" * (len(lengths) + 2))
    for r in rows:
        err = max((v for k, v in r.items() if str(k).startswith("relerr")), default=0.0)
        print(f"| {r['variant']} | " + " | ".join(f"{r[n]:.1f}" for n in lengths)
              + f" | {r.get('setup_s', 0):.1f} | {err:.1e} |", flush=True)
    best = min((r for r in rows if r["variant"] in solvers), key=lambda r: r[lengths[2]],
               default=None)
    choices = [("eager", None, None, None)]
    if best is not None:
        choices.append((best["variant"], solvers[best["variant"]], GraphedDecode(m.hift),
                        GraphedEncoder(m.flow)))
    for label, solver, decode, encode in choices:
        wrows = window_costs(m, spk, args.repeats, solver, decode, encode)
        results[f"windows_{label}"] = wrows
        print(f"\n| streaming chunk, {label} | flow frames (prompt + window) | encoder (ms) "
              "| flow (ms) | HiFT frames | HiFT (ms) | flow + HiFT per audio s (ms) |")
        print("|---|---|---|---|---|---|---|")
        for r in wrows:
            print(f"| {r['chunk']} ({r['audio_s']:.2f} s) | {r['flow_frames']} | "
                  f"{r['encoder_ms']:.1f} | {r['flow_ms']:.1f} | {r['hift_frames']} | "
                  f"{r['hift_ms']:.1f} | {r['ms_per_audio_s']:.1f} |", flush=True)
    print("\n| 10 s utterance | chunks | first chunk (ms) | steady chunk (ms, 1.11 s of audio) "
          "| total (ms) | ms per audio s |")
    print("|---|---|---|---|---|---|")
    for label, solver, decode, encode in choices:
        u = utterance(m, spk, 10.0, solver, decode, encode)
        results[f"utterance_{label}"] = u
        print(f"| {label} | {u['chunks']} | {u['first_chunk_ms']:.1f} | {u['steady_chunk_ms']:.1f} "
              f"| {u['total_ms']:.0f} | {u['ms_per_audio_s']:.1f} |", flush=True)
    out = os.environ.get("OUT")
    if out:
        Path(out, "tts_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
