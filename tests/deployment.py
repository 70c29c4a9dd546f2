"""A deployment on loopback with real parts, and the scenarios it must survive.

HAProxy (Debian's ``haproxy``) balances WebSocket sessions over two ``stepaudio serve`` processes
(leastconn, health check on ``/readyz``); both servers use a pool of two chat endpoints, each a
``tests/openai_server.py`` process serving the tiny Step-Audio-Chat over the OpenAI completions API
the way ``vllm serve`` does. The scenarios (:func:`run_scenarios`):

1. sessions spread over both servers;
2. a full server stops receiving new sessions (its /readyz turns 503, HAProxy sends them to the
   other; no client sees a refusal);
3. a chat endpoint killed mid-turn: that turn fails with an ``error``, the conversation's next turn
   works on the other endpoint;
4. a server killed: its clients see the close and reconnect through HAProxy to the other server,
   whose sessions notice nothing.

Used by ``tests/test_deployment.py`` and by ``bench/deployment.py`` (which prints the timings).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml
from backend_process import child_env, free_port
from realtime_helpers import RealtimeClient

from stepaudio.llm.pool import EndpointPool

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
HAPROXY = shutil.which("haproxy")
START_TIMEOUT_S = 240.0

HAPROXY_CFG = """\
global
    maxconn 1000
    stats socket {sock} mode 600 level admin

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    # a WebSocket, once upgraded, is a tunnel: idle for as long as a conversation may pause
    timeout tunnel 1h
    # a refused session (503 while full or draining) or a dead server is retried on another one
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response 503

frontend realtime
    bind 127.0.0.1:{port}
    default_backend sessions

backend sessions
    balance leastconn
    # websockets answers HTTP/1.1 only (HAProxy's default check is HTTP/1.0 without a Host)
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server inter {inter_ms}ms fall 1 rise 1
{servers}
"""


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


def _spawn(name: str, argv: list[str], port: int, folder: Path) -> Proc:
    log = folder / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                 cwd=REPO)
    return Proc(name, popen, log, port)


async def _wait_http(proc: Proc, url: str, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as http:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(url, timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.25)
    raise RuntimeError(f"{proc.name} not ready within {timeout_s:g} s:\n{proc.tail()}")


def server_config(tiny_root: Path, port: int, endpoints: list[str], max_sessions: int) -> dict:
    """A tiny-profile server whose chat model is the endpoint pool."""
    return {
        "models": {"profile": "tiny", "root": str(tiny_root)},
        "llm": {"engine": "openai", "base_url": endpoints, "dialect": "vllm",
                "read_timeout_s": 10, "connect_retries": 1, "health_check_interval_s": 0.5,
                "seed": 1},
        "session": {"max_transcript_tokens": 8, "max_output_tokens": 8},
        "server": {"host": "127.0.0.1", "port": port, "api_key_env": None,
                   "max_sessions": max_sessions, "warmup": False, "shutdown_grace_s": 2,
                   "stall_grace_ms": 1000},
    }


@dataclass
class Deployment:
    """Two chat endpoints, two servers, HAProxy in front (see the module docstring)."""

    tiny_root: Path
    folder: Path
    max_sessions: tuple[int, int] = (2, 6)
    check_inter_ms: int = 300
    endpoints: list[Proc] = field(default_factory=list)
    servers: list[Proc] = field(default_factory=list)
    haproxy: Proc | None = None
    port: int = 0  # HAProxy's

    @property
    def endpoint_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p.port}/v1" for p in self.endpoints]

    async def start(self) -> None:
        if HAPROXY is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        chat_dir = self.tiny_root / "Step-Audio-Chat"
        for i in (1, 2):
            port = free_port()
            self.endpoints.append(_spawn(f"chat{i}", [
                sys.executable, str(TESTS / "openai_server.py"), str(chat_dir), "--port",
                str(port)], port, self.folder))
        for i, cap in zip((1, 2), self.max_sessions, strict=True):
            port = free_port()
            cfg = self.folder / f"server{i}.yaml"
            cfg.write_text(yaml.safe_dump(server_config(self.tiny_root, port, self.endpoint_urls,
                                                        cap)), encoding="utf-8")
            self.servers.append(_spawn(f"server{i}", [
                sys.executable, "-m", "stepaudio", "serve", "--config", str(cfg)], port,
                self.folder))
        await asyncio.gather(
            *(_wait_http(p, f"http://127.0.0.1:{p.port}/health") for p in self.endpoints),
            *(_wait_http(p, f"http://127.0.0.1:{p.port}/readyz") for p in self.servers))
        self.port = free_port()
        servers = "\n".join(f"    server s{i} 127.0.0.1:{p.port} check"
                            for i, p in enumerate(self.servers, 1))
        cfg = self.folder / "haproxy.cfg"
        cfg.write_text(HAPROXY_CFG.format(sock=self.folder / "haproxy.sock", port=self.port,
                                          inter_ms=self.check_inter_ms, servers=servers),
                       encoding="utf-8")
        check = await asyncio.to_thread(subprocess.run, [HAPROXY, "-c", "-f", str(cfg)],
                                        capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its config:\n{check.stdout}{check.stderr}")
        self.haproxy = _spawn("haproxy", [HAPROXY, "-db", "-f", str(cfg)], self.port, self.folder)
        deadline = time.monotonic() + 10
        while self.status() != {"s1": "UP", "s2": "UP"}:
            if time.monotonic() > deadline:
                raise RuntimeError(f"haproxy: servers not up: {self.status()}\n"
                                   f"{self.haproxy.tail()}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        for p in [*self.servers, *([self.haproxy] if self.haproxy else []), *self.endpoints]:
            p.stop()

    # -- looking at it --------------------------------------------------------------------------

    def status(self) -> dict[str, str]:
        """HAProxy's view of the servers (UP, DOWN...), from its stats socket."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.folder / "haproxy.sock"))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            lines = data.decode().splitlines()
            head = lines[0].lstrip("# ").split(",")
            out = {}
            for line in lines[1:]:
                row = dict(zip(head, line.split(","), strict=False))
                if row.get("pxname") == "sessions" and row.get("svname", "").startswith("s"):
                    out[row["svname"]] = row.get("status", "")
            return out
        return {}

    async def sessions(self) -> list[int]:
        """Active sessions per server (0 for a dead one), from their /metrics."""
        out = []
        async with httpx.AsyncClient() as http:
            for p in self.servers:
                try:
                    text = (await http.get(f"http://127.0.0.1:{p.port}/metrics", timeout=3)).text
                except httpx.HTTPError:
                    out.append(0)
                    continue
                m = re.search(r"^stepaudio_sessions_active (\S+)$", text, re.M)
                out.append(int(float(m.group(1))) if m else 0)
        return out

    async def in_flight(self, server: int, endpoint: str) -> int:
        """Requests server ``server`` has streaming from chat endpoint ``endpoint`` now."""
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{self.servers[server].port}/metrics",
                                   timeout=3)).text
        pattern = ('^stepaudio_backend_in_flight\\{endpoint="' + re.escape(endpoint)
                   + '",pool="chat"\\} (\\S+)$')
        m = re.search(pattern, text, re.M)
        return int(float(m.group(1))) if m else 0

    async def endpoint_requests(self) -> list[int]:
        """Completions each chat endpoint finished (0 for a dead one)."""
        out = []
        async with httpx.AsyncClient() as http:
            for p in self.endpoints:
                try:
                    stats = (await http.get(f"http://127.0.0.1:{p.port}/stats", timeout=3)).json()
                    out.append(len(stats["requests"]))
                except httpx.HTTPError:
                    out.append(0)
        return out

    async def open(self) -> tuple[RealtimeClient, int, str]:
        """A session through HAProxy: the client, the server index it landed on, its id."""
        before = await self.sessions()
        c = await RealtimeClient.open(self.port)
        created = await c.wait_for("session.created")
        await c.send({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"]}})
        await c.wait_for("session.updated")
        for _ in range(50):
            after = await self.sessions()
            gained = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a > b]
            if gained:
                return c, gained[0], created["session"]["id"]
            await asyncio.sleep(0.05)
        raise AssertionError(f"no server counts the new session: {before} -> {after}")


async def text_turn(c: RealtimeClient, text: str = "你好", timeout: float = 30.0
                    ) -> dict[str, Any]:
    """A user text item and a reply; returns the reply's response.done."""
    mark = len(c.events)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await c.send({"type": "response.create"})
    return await c.wait_for("response.done", after=mark, timeout=timeout)


def _completed(done: dict[str, Any]) -> bool:
    return done["response"]["status"] in ("completed", "incomplete")


async def run_scenarios(dep: Deployment) -> dict[str, Any]:
    """The four scenarios of the module docstring; returns what was seen (asserting as it goes)
    and how long each step took."""
    seen: dict[str, Any] = {"timings_s": {}}
    t = seen["timings_s"]

    # 1. sessions spread over both servers (leastconn)
    t0 = time.perf_counter()
    clients: list[tuple[RealtimeClient, int, str]] = []
    for _ in range(4):
        clients.append(await dep.open())
    landed = [srv for _, srv, _ in clients]
    seen["first_four_landed_on"] = landed
    assert sorted(landed) == [0, 0, 1, 1], landed
    dones = await asyncio.gather(*(text_turn(c) for c, _, _ in clients))
    assert all(_completed(d) for d in dones), dones
    t["spread"] = time.perf_counter() - t0

    # 2. server 1 is full (max_sessions 2): /readyz 503, HAProxy marks it down, new sessions go
    # to server 2 and no client sees a refusal
    t0 = time.perf_counter()
    async with httpx.AsyncClient() as http:
        r = await http.get(f"http://127.0.0.1:{dep.servers[0].port}/readyz")
    assert r.status_code == 503 and "full" in r.text, r.text
    for _ in range(100):
        if dep.status().get("s1") == "DOWN":
            break
        await asyncio.sleep(0.05)
    seen["full_server_status"] = dep.status()
    assert seen["full_server_status"] == {"s1": "DOWN", "s2": "UP"}, seen["full_server_status"]
    for _ in range(2):
        clients.append(await dep.open())
    seen["after_full_landed_on"] = [srv for _, srv, _ in clients[4:]]
    assert seen["after_full_landed_on"] == [1, 1]
    assert await dep.sessions() == [2, 4]
    t["full"] = time.perf_counter() - t0

    # 3. a chat endpoint killed mid-turn: the turn fails with an error, the next one works on
    # the other endpoint
    t0 = time.perf_counter()
    pool = EndpointPool(dep.endpoint_urls)
    c, srv, sid = clients[0]
    victim = dep.endpoint_urls.index(pool.home(sid).url)
    other = 1 - victim
    async with httpx.AsyncClient() as http:
        base = f"http://127.0.0.1:{dep.endpoints[victim].port}"
        (await http.post(f"{base}/fault", json={"mode": "hang", "after": 1, "hold": True,
                                                "requests": 1000})).raise_for_status()
        mark = len(c.events)
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": "你好"}]}})
        await c.send({"type": "response.create"})
        for _ in range(200):  # the reply's request is streaming from the victim
            if await dep.in_flight(srv, dep.endpoint_urls[victim]) >= 1:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the reply never reached its endpoint")
    served_before = await dep.endpoint_requests()
    dep.endpoints[victim].kill()
    done = await c.wait_for("response.done", after=mark, timeout=20)
    errors = [e for e in c.events[mark:] if e["type"] == "error"]
    seen["killed_endpoint_turn"] = {"status": done["response"]["status"],
                                    "error": errors[0]["error"]["message"] if errors else None}
    assert done["response"]["status"] == "failed" and errors, seen["killed_endpoint_turn"]
    nxt = await text_turn(c)
    assert _completed(nxt), nxt
    served_after = await dep.endpoint_requests()
    assert served_after[other] > served_before[other]  # the other endpoint served the next turn
    seen["next_turn_after_endpoint_kill"] = nxt["response"]["status"]
    t["endpoint_killed"] = time.perf_counter() - t0

    # 4. a server killed: its clients see the close and reconnect to the other server, whose
    # sessions notice nothing
    t0 = time.perf_counter()
    on_s1 = [x for x in clients if x[1] == 0]
    on_s2 = [x for x in clients if x[1] == 1]
    marks = {id(c): len(c.events) for c, _, _ in on_s2}
    dep.servers[0].kill()
    codes = [(await asyncio.wait_for(c.closed, 10))[0] for c, _, _ in on_s1]
    seen["killed_server_clients_closed_with"] = codes
    for _ in range(100):
        if dep.status().get("s1") == "DOWN":
            break
        await asyncio.sleep(0.05)
    reconnected = [await dep.open() for _ in on_s1]
    seen["reconnects_landed_on"] = [srv for _, srv, _ in reconnected]
    assert seen["reconnects_landed_on"] == [1] * len(on_s1)
    assert all(not c.closed.done() for c, _, _ in on_s2)
    quiet = all(not [e for e in c.events[marks[id(c)]:] if e["type"] == "error"]
                for c, _, _ in on_s2)
    assert quiet
    dones = await asyncio.gather(*(text_turn(c) for c, _, _ in [on_s2[0], reconnected[0]]))
    assert all(_completed(d) for d in dones), dones
    t["server_killed"] = time.perf_counter() - t0
    for c, _, _ in clients + reconnected:
        with contextlib.suppress(Exception):
            await c.close()
    return seen
