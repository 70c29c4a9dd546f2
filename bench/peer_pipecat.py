"""Our server against the pipecat peer, on the same load, in the same run.

For each session count N, three runs back to back, each on a fresh server process:

1. pipecat: the peer's ``server.py`` (pipecat 1.14, zero-cost stages, its own venv) driven by the
   peer's ``loadclient.py`` over its protobuf protocol;
2. ours (zero-cost stages) driven by the same ``loadclient.py`` over the OpenAI Realtime protocol,
   with the same wav, frame plan, turns, seed and end-of-speech silence (``--stop-secs``);
3. ours again with our own load client (``stepaudio bench load``), which splits each turn's latency
   with the server's own timings.

The peer client's figure for both servers is "beyond VAD floor": latency minus the time the
server's VAD needs, offline, to decide the turn ended (pipecat's floor from the peer's
``vad_floor.py``; ours from our VAD on the exact audio our server receives). What is left is what
the framework adds. Run from the repository root:

    python bench/peer_pipecat.py --peer ../shared/bench/peer-pipecat \\
        --peer-python PIPECAT_VENV/bin/python --sessions 1,8,16,24,32
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from server.instruments.loadtest import (  # noqa: E402
    SpawnedServer,
    build_plan,
    http_get,
    lag_quantiles,
    loop_lag_buckets,
    one_run,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peer_module(peer: Path) -> Any:
    sys.path.insert(0, str(peer))
    sys.dont_write_bytecode = True  # leave the peer's folder as it is
    import loadclient  # the peer's own client: its plan and its audio adapter

    return loadclient


def our_floors(peer: Path, wav: Path, turns: int, gap_s: float, lead_s: float,
               silence_ms: int) -> list[float]:
    """Per turn: ms from the peer client's last speech frame to our end-of-turn decision, with
    our VAD on exactly what our server receives (the peer's 24 kHz frames, resampled by us)."""
    from stepaudio.audio import StreamingResampler
    from stepaudio.vad import SileroVAD, StreamingVAD, VADParams

    lc = peer_module(peer)
    x = lc.load_wav_16k(str(wav), 16000)
    frames, _, last_idx = lc.speech_frames(x, 16000, 35.0)
    plan = lc.build_plan(frames, last_idx, 16000, turns, lead_s, gap_s)
    adapter = lc.OpenAIRealtimeAdapter(silence_ms / 1000.0)
    rs = StreamingResampler(24000, 16000)
    vad = StreamingVAD(SileroVAD(), VADParams(), 16000)
    ends: dict[int, int] = {}
    stops: list[float] = []
    for i, (pcm, mark) in enumerate(plan):
        if mark and mark[0] == "end":
            ends[mark[1]] = i
        audio = json.loads(adapter.encode_audio(pcm, 16000))["audio"]
        y = np.frombuffer(base64.b64decode(audio), "<i2").astype(np.float32) / 32768.0
        for ev in vad.process(rs.process(y)):
            if ev.kind == "speech_end":
                stops.append(ev.at_ms)
    floors = []
    for k in range(turns):
        e = ends[k]
        at = next(s for s in stops if s >= (e - 30) * 20)
        c = math.ceil((at + silence_ms) / 20.0) - 1  # the append that reaches the end of turn
        floors.append(float((c - e) * 20))
    return floors


def pipecat_floors(peer: Path, python: str, wav: Path, turns: int, stop_s: float) -> list[float]:
    out = subprocess.run([python, "-B", str(peer / "vad_floor.py"), "--wav", str(wav), "--stop-secs",
                          str(stop_s), "--turns", str(turns)], capture_output=True, text=True,
                         cwd=peer, check=True, timeout=300)
    return [float(v) for v in json.loads(out.stdout)["floor_ms_per_turn"]]


def wait_http(url: str, timeout: float = 120.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer")


def peer_client(peer: Path, python: str, url: str, protocol: str, args: argparse.Namespace,
                n: int, floors: list[float], pid: int, label: str, stats: str | None) -> dict:
    out = Path(args.out) / f"{label}.json"
    cmd = [python, "-B", str(peer / "loadclient.py"), "--url", url, "--protocol", protocol,
           "--wav", str(args.wav), "-n", str(n), "--turns", str(args.turns),
           "--stop-secs", str(args.stop_secs), "--floor-ms", ",".join(f"{f:.0f}" for f in floors),
           "--server-pid", str(pid), "--seed", str(args.seed), "--label", label,
           "--out", str(out)]
    if stats:
        cmd += ["--stats-url", stats]
    subprocess.run(cmd, cwd=peer, check=True, timeout=600, capture_output=True)
    return json.loads(out.read_text())


def run_pipecat(args: argparse.Namespace, n: int, floors: list[float]) -> dict:
    peer = Path(args.peer)
    port = free_port()
    log = open(Path(args.out) / f"pipecat-n{n}.log", "w")  # noqa: SIM115
    proc = subprocess.Popen([args.peer_python, "-B", str(peer / "server.py"), "--port", str(port),
                             "--stop-secs", str(args.stop_secs)], cwd=peer, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/stats")
        return peer_client(peer, args.peer_python, f"ws://127.0.0.1:{port}/ws",
                           "pipecat-protobuf", args, n, floors, proc.pid, f"pipecat-n{n}",
                           f"http://127.0.0.1:{port}/stats")
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()


def run_ours_peer_client(args: argparse.Namespace, n: int, floors: list[float]) -> dict:
    srv = SpawnedServer(Path(args.config) if args.config else None,
                        {"server": {"instrument": "zero-cost stages", "max_sessions": 512}},
                        Path(args.out) / f"ours-n{n}.log")
    try:
        srv.wait_ready()
        before = loop_lag_buckets(http_get(srv.base + "/metrics")[1])
        res = peer_client(Path(args.peer), args.peer_python,
                          f"ws://127.0.0.1:{srv.port}/v1/realtime", "openai-realtime", args, n,
                          floors, srv.proc.pid, f"ours-n{n}", None)
        res["loop_lag"] = lag_quantiles(before, loop_lag_buckets(http_get(srv.base + "/metrics")[1]))
        return res
    finally:
        srv.stop()


def fmt(v: Any, d: int = 0) -> str:
    return "-" if v is None else f"{v:.{d}f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, help="the peer-pipecat folder")
    p.add_argument("--peer-python", required=True, help="python of a venv with pipecat-ai 1.14")
    p.add_argument("--sessions", default="1,8,16,24,32")
    p.add_argument("--turns", type=int, default=7)
    p.add_argument("--stop-secs", type=float, default=0.5)
    p.add_argument("--wav", help="default: the peer's multilingual1.wav")
    p.add_argument("--config", help="our server's config (default: the tiny one)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default="bench/out/peer")
    args = p.parse_args()
    peer = Path(args.peer).resolve()
    args.peer = str(peer)
    args.wav = str(Path(args.wav).resolve() if args.wav else
                   (peer / ".." / ".." / "audio" / "examples" / "multilingual1.wav").resolve())
    args.out = str(Path(args.out).resolve())  # the peer's tools run in the peer's folder
    Path(args.out).mkdir(parents=True, exist_ok=True)
    silence_ms = int(round(args.stop_secs * 1000))
    f_pc = pipecat_floors(peer, args.peer_python, Path(args.wav), args.turns, args.stop_secs)
    f_us = our_floors(peer, Path(args.wav), args.turns, 3.0, 1.0, silence_ms)
    print(f"VAD floors (ms after the last speech frame): pipecat {f_pc}, ours {f_us}")
    own_args = argparse.Namespace(
        url=None, config=args.config, instrument=True, instrument_latency_ms=0,
        server_pid=None, metrics_url=None, silence_ms=silence_ms, api_key_env=None,
        seed=args.seed, out=str(Path(args.out) / "own.jsonl"))
    plan = build_plan(Path(args.wav), args.turns, 3.0, 1.0)
    print("| N | pipecat: answered | pipecat: beyond VAD floor p50 / p99 ms | ours: answered | "
          "ours: beyond VAD floor p50 / p99 ms (peer client) | ours: overhead p50 / p99 ms "
          "(own client, server timings) | p99 ratio pipecat / ours | server CPU % pipecat / ours "
          "| loop lag p99 ms pipecat / ours |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for n in [int(x) for x in args.sessions.split(",")]:
        pc = run_pipecat(args, n, f_pc)
        us = run_ours_peer_client(args, n, f_us)
        own = one_run(own_args, n, True, plan, f"own-n{n}")
        b1, b2 = pc.get("beyond_floor_ms") or {}, us.get("beyond_floor_ms") or {}
        ratio = (b1.get("p99") / max(b2.get("p99"), 1.0)) if b1.get("p99") and b2.get(
            "p99") is not None else None
        pc_lag = None
        for s in pc.get("server", []):
            lag = s.get("loop_lag_ms") or {}
            pc_lag = lag.get("p99") if isinstance(lag, dict) else None
        row = (f"| {n} | {pc['turns_answered']}/{pc['turns_total']} | {fmt(b1.get('p50'))} / "
               f"{fmt(b1.get('p99'))} | {us['turns_answered']}/{us['turns_total']} | "
               f"{fmt(b2.get('p50'))} / {fmt(b2.get('p99'))} | "
               f"{fmt(own['overhead_ms']['p50'], 1)} / {fmt(own['overhead_ms']['p99'], 1)} | "
               f"{fmt(ratio, 1)} | {fmt(pc['cpu'].get('server_total_avg_pct'))} / "
               f"{fmt(us['cpu'].get('server_total_avg_pct'))} | {fmt(pc_lag)} / "
               f"{fmt(us['loop_lag'].get('p99_le_ms'))} |")
        rows.append({"n": n, "pipecat": pc, "ours_peer_client": us, "ours_own_client": own})
        print(row, flush=True)
        with open(Path(args.out) / "compare.jsonl", "a") as f:
            f.write(json.dumps({"n": n, "pipecat": {k: pc[k] for k in pc if k != "per_turn"},
                                "ours": {k: us[k] for k in us if k != "per_turn"},
                                "own": own}) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    raise SystemExit(main())
