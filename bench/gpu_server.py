"""The whole server on one GPU under N concurrent spoken sessions (not a test).

One ``stepaudio serve`` (default ``configs/gpu-random.yaml``: the speech models at their
published shapes with random weights, the chat model a stand-in with the 130B's timing) and the
project's load client (``server/instruments/loadtest.py``) over loopback, for each N in
``--sessions``: every session streams real speech in real time (20 ms appends), ``--turns`` times,
with ``--gap-secs`` of silence after each utterance, sessions starting at random offsets. Per N it records what a
user hears (end of speech → first reply audio, commit → first audio, gaps in playback as a
real-time player with no jitter buffer and with a 100 ms one would hear them), what the speech
side costs (TTS request → first audio, GPU busy share, GPU-seconds per second of reply audio,
GPU memory) and the server's CPU. The same server serves every N (a fresh one costs a minute of
graph captures); N grows until ``--stop-share`` of the replies have gaps.

    PYTHONPATH=. python3 bench/gpu_server.py --sessions 1,4,16,32,64 --out DIR
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from server.instruments.loadtest import (  # noqa: E402
    SpawnedServer,
    _cpu_seconds,
    analyse,
    build_plan,
    http_get,
    run_load,
)


class GPUSampler:
    """NVML utilisation (share of time a kernel ran) and memory, sampled every 100 ms."""

    def __init__(self, index: int = 0, period_s: float = 0.1) -> None:
        self.samples: list[tuple[float, float, float]] = []  # (t, util %, used GiB)
        self.ok = False
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
            self.driver = pynvml.nvmlSystemGetDriverVersion()
            self.ok = True
        except Exception as err:  # noqa: BLE001 - the bench runs without a GPU too
            self.name, self.driver = f"no NVML ({err})", ""
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        if self.ok:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        nv = self._nvml
        while not self._stop.wait(self.period_s):
            util = nv.nvmlDeviceGetUtilizationRates(self._handle).gpu
            mem = nv.nvmlDeviceGetMemoryInfo(self._handle).used / 2**30
            self.samples.append((time.time(), float(util), mem))

    def window(self, t0: float, t1: float) -> dict[str, float | None]:
        xs = [(u, m) for t, u, m in self.samples if t0 <= t <= t1]
        if not xs:
            return {"gpu_busy_pct": None, "gpu_mem_gib_max": None}
        return {"gpu_busy_pct": round(sum(u for u, _ in xs) / len(xs), 1),
                "gpu_mem_gib_max": round(max(m for _, m in xs), 2)}


def audio_seconds(logs: list[Any]) -> float:
    return sum(d for lg in logs for arrivals in lg.audio.values() for _, d in arrivals)


def one_n(url: str, base: str, pid: int, plan: Any, n: int, seed: int, gpu: GPUSampler,
          session: dict[str, Any]) -> dict[str, Any]:
    cpu0, t0 = _cpu_seconds(pid), time.time()
    logs = asyncio.run(run_load(url, plan, n, session, seed, {}))
    cpu1, t1 = _cpu_seconds(pid), time.time()
    res = analyse(logs, plan)
    audio = audio_seconds(logs)
    res.update({"sessions": n, "wall_s": round(t1 - t0, 1), "reply_audio_s": round(audio, 1)})
    res.update(gpu.window(t0, t1))
    if res["gpu_busy_pct"] is not None and audio > 0:
        res["gpu_s_per_audio_s"] = round(res["gpu_busy_pct"] / 100 * (t1 - t0) / audio, 4)
    if cpu0 is not None and cpu1 is not None:
        res["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
    res["metrics_tail"] = _vocoder_metrics(http_get(base + "/metrics")[1])
    return res


def start_profile(pid: int, path: Path, seconds: float, delay: float
                  ) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server for ``seconds`` after ``delay`` (the sessions' lead-in), only
    stacks that hold the GIL, per thread: where the one interpreter lock goes under load."""
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: no profile", flush=True)
        return None
    cmd = f"sleep {delay}; exec {spy} record --pid {pid} --duration {int(seconds)} --rate 200 " \
          f"--gil --threads --nonblocking --format raw -o {path}"
    return subprocess.Popen(["sh", "-c", cmd])


def _vocoder_metrics(text: str) -> dict[str, float]:
    """The vocoder batch counters from /metrics (mean rows per flow call)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("stepaudio_vocoder_rows_sum", "stepaudio_vocoder_rows_count",
                            "stepaudio_vocoder_batch_seconds_total",
                            "stepaudio_vocoder_round_seconds_sum",
                            "stepaudio_vocoder_round_seconds_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def vocoder_rounds(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This run's vocoder rounds from two /metrics readings: count, flow rows per round, ms
    per round and of it ms in batched model calls."""
    d = {k: v - before.get(k, 0.0) for k, v in after.items()}
    rounds = d.get("stepaudio_vocoder_round_seconds_count", 0.0)
    if not rounds:
        return {}
    return {"rounds": rounds,
            "rows_per_flow_call": round(d.get("stepaudio_vocoder_rows_sum", 0.0)
                                        / max(1.0, d.get("stepaudio_vocoder_rows_count", 0.0)), 2),
            "round_ms": round(1000 * d.get("stepaudio_vocoder_round_seconds_sum", 0.0) / rounds, 1),
            "batch_ms": round(1000 * d.get("stepaudio_vocoder_batch_seconds_total", 0.0) / rounds,
                              1)}


def _f(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


HEAD = ("| N | turns answered | end of speech → first audio p50 / p90 / p99 ms | commit → first "
        "audio p50 / p90 / p99 ms | TTS request → first audio p50 / p90 ms | replies with a gap "
        "(no buffer) | gaps / silent ms (no buffer) | replies with a gap (100 ms buffer) | GPU "
        "busy % | GPU-s per audio-s | GPU mem GiB | server CPU % | client late frames |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict[str, Any]) -> str:
    lat, com, tts = (r["latency_ms"], r["commit_to_first_audio_ms"],
                     r["tts_request_to_first_audio_ms"])
    p0, p1 = r["playback"]["prebuffer_0ms"], r["playback"]["prebuffer_100ms"]
    return (f"| {r['sessions']} | {r['turns_answered']}/{r['turns_total']} | "
            f"{_f(lat['p50'])} / {_f(lat['p90'])} / {_f(lat['p99'])} | "
            f"{_f(com['p50'])} / {_f(com['p90'])} / {_f(com['p99'])} | "
            f"{_f(tts['p50'])} / {_f(tts['p90'])} | "
            f"{p0['replies_with_underrun']}/{p0['replies']} | {p0['underruns']} / "
            f"{_f(p0['underrun_ms'])} | {p1['replies_with_underrun']}/{p1['replies']} | "
            f"{_f(r.get('gpu_busy_pct'))} | {_f(r.get('gpu_s_per_audio_s'), 3)} | "
            f"{_f(r.get('gpu_mem_gib_max'), 1)} | {_f(r.get('server_cpu_pct'))} | "
            f"{r['client_late_frames']} |")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(REPO / "configs" / "gpu-random.yaml"))
    ap.add_argument("--sessions", default="1,4,16,32,64")
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--gap-secs", type=float, default=6.0)
    ap.add_argument("--lead-secs", type=float, default=1.0)
    ap.add_argument("--wav", default=str(REPO / "tests" / "fixtures" / "audio" /
                                        "multilingual1.wav"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--stop-share", type=float, default=0.5,
                    help="stop once this share of replies has a gap (no buffer)")
    ap.add_argument("--set", action="append", default=[],
                    help="config override SECTION.KEY=VALUE (YAML value), repeatable")
    ap.add_argument("--profile-n", type=int, default=0,
                    help="at this N, sample the server with py-spy (if installed): which "
                    "threads hold the GIL, in what code (collapsed stacks in OUT/pyspy_N.txt)")
    ap.add_argument("--profile-secs", type=float, default=20.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    overrides: dict[str, dict[str, Any]] = {"server": {"max_sessions": 1024}}
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        overrides.setdefault(section, {})[name] = yaml.safe_load(value)
    gpu = GPUSampler()
    gpu.start()
    t0 = time.time()
    server = SpawnedServer(Path(args.config), overrides, out / "server.log")
    try:
        server.wait_ready(timeout=900)
        ready_s = time.time() - t0
        print(f"server ready in {ready_s:.1f} s on {gpu.name} (driver {gpu.driver})", flush=True)
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        plan = build_plan(Path(args.wav), args.turns, args.gap_secs, args.lead_secs)
        session = {"stepaudio": {"speculative": True}}
        info = {"gpu": gpu.name, "driver": gpu.driver, "ready_s": round(ready_s, 1),
                "overrides": overrides, "config": Path(args.config).name,
                "turns": args.turns, "gap_s": args.gap_secs, "wav": Path(args.wav).name}
        (out / "info.json").write_text(json.dumps(info, indent=1))
        print(HEAD, flush=True)
        before: dict[str, float] = {}
        for n in [int(x) for x in args.sessions.split(",")]:
            spy = start_profile(server.proc.pid, out / f"pyspy_{n}.txt", args.profile_secs,
                                delay=args.lead_secs + 1.0) if n == args.profile_n else None
            r = one_n(url, server.base, server.proc.pid, plan, n, args.seed, gpu, session)
            if spy is not None:
                spy.wait()
            r["vocoder"] = vocoder_rounds(before, r["metrics_tail"])
            before = r["metrics_tail"]
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(row(r), flush=True)
            print(f"  vocoder: {r['vocoder']}", flush=True)
            print(f"  gaps (s of reply played, ms silent): {r['gaps_at_s_and_ms']}", flush=True)
            p0 = r["playback"]["prebuffer_0ms"]
            if p0["replies"] and p0["replies_with_underrun"] / p0["replies"] >= args.stop_share:
                print(f"stopping: {p0['replies_with_underrun']}/{p0['replies']} replies had a "
                      "gap", flush=True)
                break
    finally:
        server.stop()
        gpu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
