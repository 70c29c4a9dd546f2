"""``stepaudio bench load``: N simulated users talking to the server at once, in real time.

Each session streams, in 20 ms appends paced by the wall clock: a lead-in of silence, then
``turns`` × [the speech wav + ``gap`` seconds of silence], like a microphone that never stops.
Sessions start at random offsets within one turn period (seeded), so turns do not all end
together. Per turn the client measures

- ``latency`` = first reply audio received − last speech frame sent (what the user waits),

and splits it with the server's own ``stepaudio.timings`` and ``speech_stopped`` events:

- ``silence wait`` = the end-of-turn decision point on the audio clock (the VAD's end of speech +
  the silence it waited) − the client's end of speech. Deliberate: the VAD's tail plus
  ``silence_duration_ms``, quantised to the 20 ms appends.
- ``model`` = model compute on the path from the end of the turn to the first audio
  (``model_critical_path``; zero with a committed speculation that was ready in time).
- ``overhead`` = latency − silence wait − model: the server's own cost (event loop, thread hops,
  JSON, encoding, the socket) plus loopback transport and the client's receive.

and plays each reply as a player with no jitter buffer would: playback starts when the first
audio arrives and runs at real time; an audio delta that arrives after everything before it has
been played is an *underrun* (the listener hears a gap of that length). Replies interrupted by
the next turn stop counting at the interruption. ``commit → first audio`` is the time from the
server's ``input_audio_buffer.committed`` to the first audio of the reply.

The server's event-loop lag comes from its ``/metrics`` (histogram difference over the run), its
CPU from ``/proc``. With ``--spawn`` (the default when no ``--url`` is given) a fresh server is
started per run from ``--config``, optionally with the ``zero-cost stages`` instrument (stand-ins
for the tokenizer, chat model and TTS; the VAD stays real), which isolates the server's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FRAME_MS = 20
RATE = 24000


# --------------------------------------------------------------------------------------------------
# The audio plan


@dataclass
class Plan:
    """Pre-encoded append messages for one session, and where each turn's speech ends."""

    messages: list[str]
    end_frame: dict[int, int]  # turn -> index of its last speech frame
    end_audio_ms: dict[int, float]  # turn -> audio position (ms) at the end of that frame
    turns: int

    @property
    def seconds(self) -> float:
        return len(self.messages) * FRAME_MS / 1000.0


def build_plan(wav_path: Path, turns: int, gap_s: float, lead_s: float,
               speech_db: float = 35.0) -> Plan:
    """The end of speech is the last 20 ms frame within ``speech_db`` of the loudest one."""
    from stepaudio.audio import load_audio, resample

    wav, sr = load_audio(wav_path)
    x = resample(wav, sr, RATE)
    fl = RATE * FRAME_MS // 1000
    n = len(x) // fl
    frames = (np.clip(x[: n * fl], -1, 1) * 32767).astype("<i2").reshape(n, fl)
    db = 20 * np.log10(np.sqrt((frames.astype(np.float64) ** 2).mean(axis=1)) + 1e-9)
    last = int(np.nonzero(db > db.max() - speech_db)[0][-1])
    silence = bytes(2 * fl)
    pcm: list[bytes] = [silence] * int(round(lead_s * 1000 / FRAME_MS))
    end_frame: dict[int, int] = {}
    for k in range(turns):
        start = len(pcm)
        pcm += [f.tobytes() for f in frames]
        end_frame[k] = start + last
        pcm += [silence] * int(round(gap_s * 1000 / FRAME_MS))

    def msg(b: bytes) -> str:
        return json.dumps({"type": "input_audio_buffer.append",
                           "audio": base64.b64encode(b).decode("ascii")})

    cache: dict[bytes, str] = {}
    messages = [cache.setdefault(b, msg(b)) for b in pcm]
    return Plan(messages, end_frame, {k: (i + 1) * FRAME_MS for k, i in end_frame.items()}, turns)


# --------------------------------------------------------------------------------------------------
# One simulated user


@dataclass
class SessionLog:
    t_end: dict[int, float] = field(default_factory=dict)  # turn -> wall time last speech sent
    first_audio: list[tuple[float, str]] = field(default_factory=list)  # (t, response id)
    #: response id -> [(arrival time, seconds of audio)] until the reply ended or was interrupted
    audio: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)  # replies done or interrupted
    committed: list[float] = field(default_factory=list)
    stopped: list[tuple[float, int]] = field(default_factory=list)  # (t, audio_end_ms)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    speculative: dict[str, bool] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    late_frames: int = 0
    max_send_lag: float = 0.0
    seen: set[str] = field(default_factory=set)


async def _receive(ws: Any, log: SessionLog) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
        async for raw in ws:
            t = time.perf_counter()
            # Audio deltas are big: find the type without parsing the whole message.
            head = raw[:200] if isinstance(raw, str) else ""
            m = re.search(r'"type":"([^"]+)"', head)
            etype = m.group(1) if m else ""
            if etype.endswith("audio.delta"):
                rid = re.search(r'"response_id":"([^"]+)"', head)
                resp = rid.group(1) if rid else ""
                if resp not in log.seen:
                    log.seen.add(resp)
                    log.first_audio.append((t, resp))
                if resp not in log.closed:
                    log.audio.setdefault(resp, []).append((t, _delta_seconds(raw)))
                continue
            if etype == "input_audio_buffer.committed":
                log.committed.append(t)
                continue
            if etype == "input_audio_buffer.speech_started":  # a barge-in ends the playback
                log.closed.update(log.audio)
                continue
            if etype == "response.done":
                rid = re.search(r'"id":"([^"]+)"', raw[raw.find('"response"'):][:300])
                if rid:
                    log.closed.add(rid.group(1))
                continue
            if etype in ("stepaudio.timings", "input_audio_buffer.speech_stopped", "error"):
                ev = json.loads(raw)
                if etype == "stepaudio.timings":
                    log.timings[ev["response_id"]] = ev["timings_ms"]
                    log.speculative[ev["response_id"]] = ev["speculative"]
                elif etype == "error":
                    log.errors.append(ev["error"]["code"])
                else:
                    log.stopped.append((t, int(ev["audio_end_ms"])))
    except ConnectionClosed:
        pass


_DELTA = re.compile(r'"delta":\s*"')


def _delta_seconds(raw: str) -> float:
    """Seconds of pcm16 24 kHz audio in an audio delta, from its base64 length alone."""
    m = _DELTA.search(raw)
    if m is None:
        return 0.0
    i = m.end()
    j = raw.find('"', i)
    pad = raw.count("=", max(i, j - 2), j)
    return ((j - i) * 3 // 4 - pad) / 2 / RATE


def gaps_heard(arrivals: list[tuple[float, float]], prebuffer_s: float = 0.0
               ) -> list[tuple[float, float]]:
    """(seconds of reply audio played before it, seconds of silence) of each gap a real-time
    player hears in one reply's audio deltas, playback starting ``prebuffer_s`` after the first
    one arrives. Where in the reply gaps fall says which chunk came late (the second, a clause's
    first, a steady one)."""
    if not arrivals:
        return []
    end = arrivals[0][0] + prebuffer_s
    played, out = 0.0, []
    for t, dur in arrivals:
        if t > end + 1e-4:
            out.append((played, t - end))
            end = t
        end += dur
        played += dur
    return out


def underruns(arrivals: list[tuple[float, float]], prebuffer_s: float = 0.0
              ) -> tuple[int, float]:
    """(gaps, seconds of silence) a real-time player hears for one reply's audio deltas."""
    gaps = gaps_heard(arrivals, prebuffer_s)
    return len(gaps), sum(s for _, s in gaps)


async def run_session(url: str, plan: Plan, delay: float, session: dict[str, Any],
                      log: SessionLog, headers: dict[str, str]) -> None:
    from websockets.asyncio.client import connect

    await asyncio.sleep(delay)
    try:
        ws = await connect(url, compression=None, max_size=None, ping_interval=None,
                           additional_headers=headers, open_timeout=20)
    except Exception as err:  # noqa: BLE001 - recorded, the run goes on
        log.errors.append(f"connect: {err!r}")
        return
    reader = asyncio.get_running_loop().create_task(_receive(ws, log))
    try:
        if session:
            await ws.send(json.dumps({"type": "session.update", "session": session}))
        ends = {i: k for k, i in plan.end_frame.items()}
        t0 = time.perf_counter() + 0.02
        step = FRAME_MS / 1000.0
        for i, msg in enumerate(plan.messages):
            target = t0 + i * step
            wait = target - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await ws.send(msg)
            now = time.perf_counter()
            if i in ends:
                log.t_end[ends[i]] = now
            lag = now - target
            log.max_send_lag = max(log.max_send_lag, lag)
            if lag > 0.04:
                log.late_frames += 1
        await asyncio.sleep(1.5)  # the last turn's reply and timings
    except Exception as err:  # noqa: BLE001
        log.errors.append(f"send: {err!r}")
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 3)
        reader.cancel()
        with contextlib.suppress(BaseException):
            await reader


# --------------------------------------------------------------------------------------------------
# Analysis


def _pct(xs: list[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if xs else None


def summary(xs: list[float]) -> dict[str, float | int | None]:
    return {"n": len(xs), "p50": _pct(xs, 50), "p90": _pct(xs, 90), "p99": _pct(xs, 99),
            "max": max(xs) if xs else None}


def analyse(logs: list[SessionLog], plan: Plan) -> dict[str, Any]:
    lat, wait, model, over, srv_over, saved = [], [], [], [], [], []
    commit_first, tts_first, gaps_ms = [], [], []
    gap_at: list[list[float]] = []
    answered = committed = 0
    playback: dict[str, Any] = {}
    for prebuffer in (0.0, 0.1):
        n_gaps, silent, replies, hit = 0, 0.0, 0, 0
        for log in logs:
            for arrivals in log.audio.values():
                heard = gaps_heard(arrivals, prebuffer)
                g, sec = len(heard), sum(s for _, s in heard)
                n_gaps, silent, replies, hit = n_gaps + g, silent + sec, replies + 1, hit + (g > 0)
                if prebuffer == 0.0 and g:
                    gaps_ms.append(1000.0 * sec)
                    gap_at += [[round(at, 2), round(1000.0 * s)] for at, s in heard]
        playback[f"prebuffer_{int(prebuffer * 1000)}ms"] = {
            "replies": replies, "replies_with_underrun": hit, "underruns": n_gaps,
            "underrun_ms": round(1000.0 * silent, 1)}
    for log in logs:
        for t, _ in log.first_audio:
            before = [c for c in log.committed if c <= t]
            if before:
                commit_first.append((t - before[-1]) * 1000.0)
        for reply_tm in log.timings.values():
            if reply_tm.get("tts_request_to_first_audio") is not None:
                tts_first.append(reply_tm["tts_request_to_first_audio"])
    for log in logs:
        ends = [log.t_end.get(k) for k in range(plan.turns)]
        for k in range(plan.turns):
            te = ends[k]
            if te is None:
                continue
            nxt = next((e for e in ends[k + 1:] if e is not None), math.inf)
            first = next(((t, r) for t, r in log.first_audio if te <= t < nxt), None)
            if first is None:
                continue
            answered += 1
            latency = (first[0] - te) * 1000.0
            lat.append(latency)
            tm = log.timings.get(first[1])
            stop = [a for t, a in log.stopped if te - 1.0 <= t <= first[0]]
            if tm is None or not stop or "silence_wait" not in tm:
                continue
            w = stop[-1] + tm["silence_wait"] - plan.end_audio_ms[k]
            m = tm.get("model_critical_path", 0.0)
            wait.append(w)
            model.append(m)
            over.append(latency - w - m)
            srv_over.append(tm.get("server_overhead", 0.0))
            if log.speculative.get(first[1]):
                committed += 1
                saved.append(tm.get("speculation_saved", 0.0))
    return {
        "turns_total": plan.turns * len(logs),
        "turns_answered": answered,
        "speculations_committed": committed,
        "latency_ms": summary(lat),
        "silence_wait_ms": summary(wait),
        "model_ms": summary(model),
        "overhead_ms": summary(over),
        "server_overhead_ms": summary(srv_over),
        "speculation_saved_ms": summary(saved),
        "commit_to_first_audio_ms": summary(commit_first),
        "tts_request_to_first_audio_ms": summary(tts_first),
        "playback": playback,
        "underrun_ms_per_affected_reply": summary(gaps_ms),
        "gaps_at_s_and_ms": sorted(gap_at),
        "client_late_frames": sum(lg.late_frames for lg in logs),
        "client_send_lag_max_ms": 1000.0 * max((lg.max_send_lag for lg in logs), default=0.0),
        "errors": sorted({e for lg in logs for e in lg.errors}),
    }


# --------------------------------------------------------------------------------------------------
# Server side: spawning, /metrics, CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


class SpawnedServer:
    """``stepaudio serve`` in a child process with a config written for this run."""

    def __init__(self, config: Path | None, overrides: dict[str, dict[str, Any]],
                 log_path: Path) -> None:
        import yaml

        from stepaudio.config import load_config

        cfg = load_config(config).model_dump(mode="json")
        for section, values in overrides.items():
            cfg.setdefault(section, {}).update(values)
        self.port = _free_port()
        cfg["server"].update({"host": "127.0.0.1", "port": self.port, "api_key_env": None})
        self._cfg_file = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
        yaml.safe_dump(cfg, self._cfg_file)
        self._cfg_file.close()
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stepaudio", "serve", "--config", self._cfg_file.name],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}); see its log")
            if http_get(self.base + "/readyz", 2)[0] == 200:
                return
            time.sleep(0.3)
        raise RuntimeError("the server did not become ready in time")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        os.unlink(self._cfg_file.name)


def loop_lag_buckets(metrics_text: str) -> dict[float, float]:
    out = {}
    for m in re.finditer(r'^stepaudio_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)$',
                         metrics_text, re.M):
        out[math.inf if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    return out


def lag_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, Any]:
    """p50/p99 (upper bucket bounds, ms) of the loop lag observed between two scrapes."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0

    def q(p: float) -> float | None:
        if total <= 0:
            return None
        for b, c in zip(bounds, counts, strict=True):
            if c >= p * total:
                return b * 1000.0
        return None

    top = next((b for b, c in zip(bounds, counts, strict=True) if c >= total), None)
    return {"samples": int(total), "p50_le_ms": q(0.5), "p99_le_ms": q(0.99),
            "p999_le_ms": q(0.999), "max_le_ms": None if top is None else top * 1000.0}


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------
# A run


async def run_load(url: str, plan: Plan, sessions: int, session: dict[str, Any], seed: int,
                   headers: dict[str, str]) -> list[SessionLog]:
    period = plan.seconds / max(plan.turns, 1)
    rng = random.Random(seed)
    delays = [0.0] + [rng.uniform(0, period) for _ in range(sessions - 1)]
    logs = [SessionLog() for _ in range(sessions)]
    await asyncio.gather(*(run_session(url, plan, d, session, lg, headers)
                           for d, lg in zip(delays, logs, strict=True)))
    return logs


def one_run(args: argparse.Namespace, n: int, speculative: bool, plan: Plan,
            label: str) -> dict[str, Any]:
    spawned = None
    url = args.url
    base = None
    pid = args.server_pid
    if url is None:
        overrides: dict[str, dict[str, Any]] = {"server": {}}
        if args.instrument:
            overrides["server"]["instrument"] = "zero-cost stages"
            overrides["server"]["instrument_latency_ms"] = args.instrument_latency_ms
        overrides["server"]["max_sessions"] = max(256, n)
        out_dir = Path(args.out).parent if args.out else Path(tempfile.gettempdir())
        spawned = SpawnedServer(Path(args.config) if args.config else None, overrides,
                                out_dir / f"server-{label}.log")
        spawned.wait_ready()
        url = f"ws://127.0.0.1:{spawned.port}/v1/realtime"
        base = spawned.base
        pid = spawned.proc.pid
    elif args.metrics_url:
        base = args.metrics_url.rstrip("/")
    session: dict[str, Any] = {"stepaudio": {"speculative": speculative}}
    if args.silence_ms:
        session["turn_detection"] = {"type": "server_vad", "silence_duration_ms": args.silence_ms}
    headers = {"Authorization": f"Bearer {os.environ[args.api_key_env]}"} if (
        args.api_key_env and os.environ.get(args.api_key_env)) else {}
    try:
        before = loop_lag_buckets(http_get(base + "/metrics")[1]) if base else {}
        cpu0, me0, t0 = (_cpu_seconds(pid) if pid else None), time.process_time(), time.time()
        logs = asyncio.run(run_load(url, plan, n, session, args.seed, headers))
        cpu1, me1, t1 = (_cpu_seconds(pid) if pid else None), time.process_time(), time.time()
        after_text = http_get(base + "/metrics")[1] if base else ""
    finally:
        if spawned is not None:
            spawned.stop()
    res = analyse(logs, plan)
    res.update({"label": label, "sessions": n, "speculative": speculative,
                "instrument": "zero-cost stages" if args.instrument else None,
                "instrument_latency_ms": args.instrument_latency_ms if args.instrument else None,
                "wall_s": round(t1 - t0, 1),
                "client_cpu_pct": round(100 * (me1 - me0) / (t1 - t0), 1)})
    if cpu0 is not None and cpu1 is not None:
        res["server_cpu_pct"] = round(100 * (cpu1 - cpu0) / (t1 - t0), 1)
    if base:
        res["loop_lag"] = lag_quantiles(before, loop_lag_buckets(after_text))
    return res


def _f(v: Any, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def table_row(r: dict[str, Any]) -> str:
    lat, wait, model, over = (r["latency_ms"], r["silence_wait_ms"], r["model_ms"],
                              r["overhead_ms"])
    lag = r.get("loop_lag", {})
    return (f"| {r['label']} | {r['sessions']} | {'on' if r['speculative'] else 'off'} | "
            f"{r['turns_answered']}/{r['turns_total']} | {_f(lat['p50'])} / {_f(lat['p99'])} | "
            f"{_f(wait['p50'])} | {_f(model['p50'], 1)} | {_f(over['p50'], 1)} / "
            f"{_f(over['p99'], 1)} | "
            f"{_f(r['server_overhead_ms']['p99'], 1)} | {_f(lag.get('p99_le_ms'), 1)} / "
            f"{_f(lag.get('max_le_ms'), 1)} | {_f(r.get('server_cpu_pct'))} | "
            f"{_f(r['client_cpu_pct'])} | {r['client_late_frames']} |")


TABLE_HEAD = (
    "| run | N | spec | turns answered | latency p50 / p99 ms | silence wait p50 ms | "
    "model p50 ms | overhead p50 / p99 ms | server-reported overhead p99 ms | "
    "loop lag p99 / max ms (bucket bound) | server CPU % | client CPU % | late frames |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sessions", default="8",
                   help="concurrent sessions; a comma list runs each (fresh server per run)")
    p.add_argument("--url", help="an already running server's ws://…/v1/realtime (loopback); "
                   "default: spawn `stepaudio serve` per run")
    p.add_argument("--metrics-url", help="with --url: the server's http://host:port for /metrics")
    p.add_argument("--server-pid", type=int, help="with --url: the server's PID for CPU")
    p.add_argument("--config", help="server config for spawned servers (default: the tiny one)")
    p.add_argument("--instrument", action="store_true",
                   help="spawned servers run the `zero-cost stages` instrument")
    p.add_argument("--instrument-latency-ms", type=int, default=0,
                   help="with --instrument: the chat stand-in's fixed latency")
    p.add_argument("--speculative", choices=["on", "off", "both"], default="on")
    p.add_argument("--wav", help="speech to stream (default: the packaged speaker prompt)")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--gap-secs", type=float, default=3.0, help="silence after each utterance")
    p.add_argument("--lead-secs", type=float, default=1.0)
    p.add_argument("--silence-ms", type=int, help="turn_detection.silence_duration_ms to set")
    p.add_argument("--api-key-env", default="STEPAUDIO_API_KEY")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--label", default="")
    p.add_argument("--out", help="write the results as JSON lines to this file")


def main(args: argparse.Namespace) -> int:
    if args.url and not re.match(r"wss?://(127\.0\.0\.1|localhost|\[::1\])[:/]", args.url):
        raise SystemExit("bench load: only loopback targets")
    wav = Path(args.wav) if args.wav else None
    if wav is None:
        from stepaudio.tts.prompt import default_speakers_dir

        wav = Path(default_speakers_dir()) / "Tingting_prompt.wav"
    plan = build_plan(wav, args.turns, args.gap_secs, args.lead_secs)
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.speculative]
    print(TABLE_HEAD)
    results = []
    for n in [int(x) for x in str(args.sessions).split(",") if x.strip()]:
        for spec in modes:
            label = args.label or ("zero-cost" if args.instrument else "models")
            label = f"{label}-n{n}-{'spec' if spec else 'nospec'}"
            r = one_run(args, n, spec, plan, label)
            results.append(r)
            print(table_row(r), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if args.speculative == "both":
        for n in sorted({r["sessions"] for r in results}):
            on = next(r for r in results if r["sessions"] == n and r["speculative"])
            off = next(r for r in results if r["sessions"] == n and not r["speculative"])
            a, b = on["latency_ms"]["p50"], off["latency_ms"]["p50"]
            if a and b:
                print(f"N={n}: latency p50 speculative on/off = {a:.0f}/{b:.0f} ms, ratio "
                      f"{a / b:.2f}, saved {b - a:.0f} ms", flush=True)
    return 0
