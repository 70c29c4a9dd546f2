"""The `stepaudio` command line.

Each subcommand imports its heavy modules lazily so `stepaudio --help` stays instant, and every
expected failure (`StepAudioError`) is printed as one line with exit status 1 or 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .errors import StepAudioError


def _set_threads() -> None:
    # More than one intra-op thread per process hurts on small hosts where several stages compete.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def _progress_printer(quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def progress(step: str, done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="tiny checkpoints", unit="part", file=sys.stderr)
        b = bar["bar"]
        b.set_postfix_str(step)
        b.update(done - b.n)
        if done >= total:
            b.close()

    return progress


def cmd_tiny(args: argparse.Namespace) -> int:
    from .tiny import write_tiny_models

    root = write_tiny_models(
        Path(args.dir), seed=args.seed, force=args.force, progress=_progress_printer(args.quiet)
    )
    print(root)
    return 0


def cmd_models_check(args: argparse.Namespace) -> int:
    from .models import check_model_root

    problems = check_model_root(Path(args.dir))
    for p in problems:
        print(p)
    if problems:
        return 1
    print(f"ok: {args.dir} is a usable Step-Audio model root")
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from .audio import load_audio
    from .tokenizer import StepAudioTokenizer

    tok = StepAudioTokenizer(Path(args.tokenizer))
    wav, sr = load_audio(args.wav)
    if args.stream:
        result = tok.tokenize_streaming(wav, sr, chunk_ms=args.chunk_ms)
    else:
        result = tok.tokenize(wav, sr, trim=args.trim)
    out = {
        "vq02": result.vq02,
        "vq06": result.vq06,
        "ids": result.ids,
        "text": result.text,
    }
    if args.json:
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(f"vq02: {len(result.vq02)} codes, vq06: {len(result.vq06)} codes, "
              f"{len(result.ids)} ids")
        print(result.text)
    return 0


def cmd_conformance(args: argparse.Namespace) -> int:
    from .conformance import run_conformance

    failed = 0
    ran = 0
    for line in run_conformance(Path(args.golden_dir)):
        ran += 1
        failed += 0 if line.get("pass") else 1
        if args.json:
            print(json.dumps(line, ensure_ascii=False), flush=True)
        else:
            status = "PASS" if line.get("pass") else "FAIL"
            print(f"{status} {line['case']}: {line.get('summary', '')}", flush=True)
    if ran == 0:
        print(f"no golden cases recognised under {args.golden_dir}", file=sys.stderr)
        return 1
    return 1 if failed else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models import check_model_root
    from .tiny import ensure_tiny_models

    cfg = load_config(args.config)
    if args.host:
        cfg.server.host = args.host
    if args.port:
        cfg.server.port = args.port
    if cfg.models.profile == "tiny":
        root = ensure_tiny_models(
            cfg.models.resolved_root(), seed=cfg.models.seed, progress=_progress_printer(False)
        )
    else:
        root = cfg.models.resolved_root()
    problems = check_model_root(root)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    try:
        from server.app import run_server  # type: ignore[import-not-found]
    except ImportError:
        print(
            f"models ready ({cfg.models.profile} profile) at {root}\n"
            "stepaudio serve: the real-time server (server/app.py) is not built yet; "
            "what works today: `stepaudio tiny`, `stepaudio models check`, `stepaudio tokenize`, "
            "`stepaudio conformance`.",
            file=sys.stderr,
        )
        return 2
    return run_server(cfg, root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stepaudio", description="Real-time speech dialogue server for the Step-Audio models."
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="start the real-time server (default: tiny CPU profile)")
    s.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("tiny", help="write tiny random-weight checkpoints in the real layouts")
    s.add_argument("dir", help="model root to create")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--force", action="store_true", help="overwrite an existing root")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_tiny)

    m = sub.add_parser("models", help="model folder tools")
    msub = m.add_subparsers(dest="models_command", required=True)
    s = msub.add_parser("check", help="validate a model root without loading weights")
    s.add_argument("dir")
    s.set_defaults(func=cmd_models_check)

    s = sub.add_parser("tokenize", help="audio file -> dual-codebook ids")
    s.add_argument("--tokenizer", required=True, help="the Step-Audio-Tokenizer folder")
    s.add_argument("wav")
    s.add_argument("--stream", action="store_true", help="feed the file in chunks, as live audio")
    s.add_argument("--chunk-ms", type=int, default=100, help="chunk size with --stream")
    s.add_argument("--trim", action="store_true", help="trim silence (the TTS-prompt path)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_tokenize)

    s = sub.add_parser("conformance", help="check this implementation against golden vectors")
    s.add_argument("golden_dir")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_conformance)
    return p


def main(argv: list[str] | None = None) -> int:
    _set_threads()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except StepAudioError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
