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


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio
    import time

    from transformers.utils import logging as hf_logging

    from .config import load_config
    from .llm.engine import SamplingParams, make_engine
    from .llm.prompt import DEMO_SYSTEM_PROMPT
    from .llm.turn import reply_to_audio
    from .tokenizer import StepAudioTokenizer

    hf_logging.disable_progress_bar()
    cfg = load_config(args.config)
    models = Path(args.models)
    if not models.is_dir():
        raise StepAudioError(f"{models}: model root not found")
    t0 = time.perf_counter()
    tok = StepAudioTokenizer.from_config(models / "Step-Audio-Tokenizer", cfg.tokenizer)
    audio = tok.tokenize_file(args.wav)
    t_tok = time.perf_counter() - t0
    engine = make_engine(cfg.llm, models / "Step-Audio-Chat")
    overrides = {}
    if args.max_new_tokens is not None:
        overrides["max_new_tokens"] = args.max_new_tokens
    if args.seed is not None:
        overrides["seed"] = args.seed
    params = SamplingParams.from_config(cfg.llm, **overrides)
    system = None if args.no_system else (args.system or DEMO_SYSTEM_PROMPT)
    send_text = cfg.llm.engine == "openai" and cfg.llm.dialect == "openai"

    def show(delta) -> None:
        sys.stdout.write(delta.text)
        sys.stdout.flush()

    async def run():
        try:
            return await reply_to_audio(
                engine, audio.ids, system=system, params=params,
                budget=cfg.llm.budget(engine.max_model_len), send_text=send_text, on_delta=show,
            )
        finally:
            await engine.aclose()

    result = asyncio.run(run())
    sys.stdout.write("\n")
    usage = result.usage
    print(
        f"[{cfg.llm.engine}] audio {len(audio.ids)} ids in {t_tok:.2f} s; prompt "
        f"{result.prompt.tokens} tokens; reply {len(result.token_ids)} tokens in "
        f"{result.seconds:.2f} s ({result.tokens_per_s:.0f} tokens/s), finish "
        f"{result.finish_reason.value if result.finish_reason else '?'}"
        + (f", usage {usage.prompt_tokens}+{usage.completion_tokens}" if usage else ""),
        file=sys.stderr,
    )
    if args.output:
        from .pipeline import speak_to_wav

        spoken = speak_to_wav(models, result.text, args.output, speaker=args.speaker,
                              seed=args.seed, device=cfg.tokenizer.device)
        print(f"reply speech: {spoken.path} ({spoken.seconds:.2f} s of audio at "
              f"{spoken.sample_rate} Hz, synthesised in {spoken.wall_s:.2f} s)", file=sys.stderr)
    return 0


def cmd_vllm_command(args: argparse.Namespace) -> int:
    from dataclasses import replace
    from urllib.parse import urlsplit

    from .llm.vllm_args import VLLM_VERSION, chat_spec, tts_spec

    models = Path(args.models)
    tp, max_len, port, name = args.tp, args.max_model_len, args.port, None
    if args.config:  # the server's own config decides whatever the flags leave open
        from .config import endpoint_urls, load_config

        llm = load_config(args.config).llm
        tp = tp or llm.tensor_parallel_size
        max_len = max_len or llm.max_model_len
        port = port or urlsplit(endpoint_urls(llm.base_url)[0]).port
        name = llm.served_model_name
    chat = chat_spec(models, tensor_parallel_size=tp or 4, max_model_len=max_len,
                     port=port or 8000, host=args.host)
    if name:
        chat = replace(chat, served_model_name=name)
    missing = [p for p in [chat.model_dir] if not (p / "config.json").is_file()]
    specs = [chat]
    if args.tts:
        tts = tts_spec(models, gpu=len(chat.gpus), port=args.tts_port, host=args.host)
        specs.append(tts)
        if not (tts.model_dir / "config.json").is_file():
            missing.append(tts.model_dir)
    for folder in missing:
        print(f"warning: {folder} has no config.json (is --models the right root?)",
              file=sys.stderr)
    print(f"# vLLM {VLLM_VERSION} (pip install 'stepaudio-realtime[vllm]'); "
          "see docs/vllm.md for why each flag is there")
    for i, spec in enumerate(specs):
        if i:
            print()
        print(spec.command())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_config
    from .models import check_model_root
    from .tiny import ensure_tiny_models

    cfg = load_config(args.config)
    if args.host:
        cfg.server.host = args.host
    if args.port:
        cfg.server.port = args.port
    if cfg.models.profile == "random":  # built in memory: no folder to check
        print("stepaudio: random profile: speech models at their published shapes with random "
              "weights; the voices are noise", file=sys.stderr)
        root = Path()
    elif cfg.models.profile == "tiny":
        root = ensure_tiny_models(
            cfg.models.resolved_root(), seed=cfg.models.seed, progress=_progress_printer(False)
        )
    else:
        root = cfg.models.resolved_root()
    problems = [] if cfg.models.profile == "random" else check_model_root(root)
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        return 1
    from server.app import run_server

    return run_server(cfg, root)


def cmd_bench_load(args: argparse.Namespace) -> int:
    from server.instruments.loadtest import main as load_main

    return load_main(args)


def cmd_tts(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    from .pipeline import speak_to_wav

    hf_logging.disable_progress_bar()
    result = speak_to_wav(
        args.models, args.text, args.output, speaker=args.speaker, prompt_wav=args.prompt_wav,
        prompt_text=args.prompt_text, seed=args.seed, device=args.device,
    )
    rep = result.report
    first = f"{rep.first_chunk_s:.2f} s" if rep.first_chunk_s is not None else "-"
    print(
        f"{result.path}: {result.seconds:.2f} s at {result.sample_rate} Hz from "
        f"{len(rep.clauses)} clause(s), {rep.flow_tokens} audio tokens in {result.wall_s:.2f} s "
        f"(first audio after {first})",
        file=sys.stderr,
    )
    for warning in rep.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    # The client package is imported only here: stepaudio/ never depends on client/ otherwise.
    from client.cli import standalone

    return standalone(args.client_args)


def _client_argv(argv: list[str] | None) -> list[str] | None:
    """``stepaudio client ...``: everything after the word belongs to the client's own parser
    (argparse's REMAINDER would refuse options that come first)."""
    argv = sys.argv[1:] if argv is None else argv
    return argv[1:] if argv[:1] == ["client"] else None


def cmd_install_service(args: argparse.Namespace) -> int:
    from .systemd import install_service

    written = install_service(
        out=Path(args.out), user=args.user, config=Path(args.config) if args.config else None,
        models=Path(args.models) if args.models else None,
        vllm_bin=Path(args.vllm_bin) if args.vllm_bin else None, tp=args.tp,
        cache=Path(args.cache), env_dir=Path(args.env_dir), role=args.role,
    )
    for path in written:
        print(path)
    names = " ".join(p.name for p in written)
    print(
        f"\nnext (as root): useradd --system --home-dir /var/lib/stepaudio --shell "
        f"/usr/sbin/nologin {args.user}; install -m 0644 {' '.join(str(p) for p in written)} "
        f"/etc/systemd/system/; systemctl daemon-reload; systemctl enable --now {names}\n"
        f"secrets go in {args.env_dir}/stepaudio.env (STEPAUDIO_API_KEY=...), mode 0640",
        file=sys.stderr,
    )
    return 0


def cmd_config_doc(args: argparse.Namespace) -> int:
    from .configdoc import render

    text = render()
    if args.check:
        current = Path(args.output).read_text(encoding="utf-8") if args.output and \
            Path(args.output).is_file() else ""
        if current != text:
            print(f"{args.output}: out of date; run `stepaudio config-doc -o {args.output}`",
                  file=sys.stderr)
            return 1
        return 0
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


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

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser("load", help="N simulated users talking to the server at once "
                        "(latency, server overhead, event-loop lag)")
    from server.instruments.loadtest import add_arguments as load_arguments  # a server instrument

    load_arguments(s)
    s.set_defaults(func=cmd_bench_load)

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

    s = sub.add_parser("chat", help="answer one spoken turn (wav) in text, offline")
    s.add_argument("--models", required=True, help="model root with Step-Audio-Tokenizer/ and "
                   "Step-Audio-Chat/")
    s.add_argument("wav")
    s.add_argument("--config", help="YAML config file (default: configs/default.yaml)")
    s.add_argument("--system", help="system prompt (default: the reference demo's)")
    s.add_argument("--no-system", action="store_true", help="send no system prompt")
    s.add_argument("--max-new-tokens", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("-o", "--output", help="also speak the reply (Step-Audio-TTS-3B) into this wav")
    s.add_argument("--speaker", help="TTS speaker for -o (default Tingting)")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("vllm-command", help="print the `vllm serve` command(s) for the checkpoints")
    s.add_argument("--models", required=True, help="model root with Step-Audio-Chat/")
    s.add_argument("--tp", type=int, help="tensor parallel size (GPUs 0..tp-1) for the Chat; "
                   "default 4, or llm.tensor_parallel_size with --config")
    s.add_argument("--tts", action="store_true",
                   help="also print the TTS-3B command, on the GPU after the Chat's")
    s.add_argument("--config", help="take tp, max model len, served name and port from this "
                   "server config's llm section")
    s.add_argument("--port", type=int, help="default 8000, or the port of llm.base_url")
    s.add_argument("--tts-port", type=int, default=8001)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--max-model-len", type=int, help="default: the checkpoint's max_seq_len")
    s.set_defaults(func=cmd_vllm_command)
    s = sub.add_parser("tts", help="speak a text with Step-Audio-TTS-3B into a wav file")
    s.add_argument("--models", required=True, help="model root with Step-Audio-TTS-3B/ (and "
                   "Step-Audio-Tokenizer/ to describe voices)")
    s.add_argument("--text", required=True, help="text to speak; may start with tags such as "
                   "(高兴1)(粤语) or (RAP)")
    s.add_argument("--speaker", help="registered speaker id (default Tingting)")
    s.add_argument("--prompt-wav", help="clone the voice of this wav (1-30 s) ...")
    s.add_argument("--prompt-text", help="... whose transcript this is")
    s.add_argument("--seed", type=int, help="sampling and noise seed (reproducible output)")
    s.add_argument("--device", default="cpu", help="torch device (cpu, cuda:0)")
    s.add_argument("-o", "--output", required=True, help="output wav (22.05 kHz, 16-bit)")
    s.set_defaults(func=cmd_tts)

    s = sub.add_parser("client", add_help=False, help="talk to a running server: sound files or "
                       "the microphone in, replies to a file or the speaker (--help for more)")
    s.add_argument("client_args", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_client)

    s = sub.add_parser("install-service", help="write systemd units (stepaudio.service and the "
                       "stepaudio-vllm*.service its config needs) for this install")
    s.add_argument("--user", default="stepaudio", help="dedicated system user (default stepaudio)")
    s.add_argument("--config", help="server YAML the service runs (default: the packaged "
                   "tiny profile)")
    s.add_argument("--models", help="model root for the vLLM units (default: models.root of a "
                   "real-profile config; without one only stepaudio.service is written)")
    s.add_argument("--out", default=".", help="folder to write the units to (default: here)")
    s.add_argument("--vllm-bin", help="the `vllm` executable (default: next to this Python)")
    s.add_argument("--tp", type=int, help="GPUs for the Chat (default llm.tensor_parallel_size)")
    s.add_argument("--cache", default="/var/cache/stepaudio", help="writable cache folder")
    s.add_argument("--env-dir", default="/etc/stepaudio", help="folder of the secrets files")
    s.add_argument("--role", choices=["all", "session", "chat", "tts"], default="all",
                   help="all: what the config names, on this machine; session: the dialogue "
                   "server only (its model pools elsewhere); chat / tts: that vLLM replica only, "
                   "listening on every address (docs/scaling.md)")
    s.set_defaults(func=cmd_install_service)

    s = sub.add_parser("config-doc", help="render the configuration reference (docs/config.md)")
    s.add_argument("-o", "--output", help="write here instead of stdout")
    s.add_argument("--check", action="store_true", help="exit 1 if --output is out of date")
    s.set_defaults(func=cmd_config_doc)
    return p


def main(argv: list[str] | None = None) -> int:
    _set_threads()
    client_argv = _client_argv(argv)
    if client_argv is not None:
        args = argparse.Namespace(func=cmd_client, client_args=client_argv)
    else:
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
