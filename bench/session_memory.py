"""Memory of closed sessions (not a test): does the server give a session's history back when
the session closes?

Starts `stepaudio serve` (tiny profile, no warm-up) as a child process, then opens sessions one
after another; each creates ``--mb`` MB of text items (``--item-kb`` each, every echo read), then
closes. The server's resident memory (VmRSS of its process) is printed after every
``--every`` sessions, with its peak (VmHWM) at the end.

    PYTHONPATH=. python bench/session_memory.py [--sessions 300] [--mb 100] [--item-kb 1024]

Run against another checkout by pointing PYTHONPATH there (the caps below are set only where the
server has them).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from server.instruments.loadtest import SpawnedServer
from stepaudio.config import ServerConfig


def rss_mb(pid: int, key: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"no {key} for process {pid}")


async def one_session(url: str, items: int, item_bytes: int, tag: int) -> None:
    async with connect(url, max_size=None, compression=None) as ws:
        assert json.loads(await ws.recv())["type"] == "session.created"
        for k in range(items):
            text = chr(0x61 + (tag + k) % 26) * item_bytes
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": text}]}}))
            while True:
                event = json.loads(await ws.recv())
                if event["type"] == "conversation.item.created":
                    break
                if event["type"] == "error":
                    raise RuntimeError(f"session {tag}: {event['error']}")


async def run(args: argparse.Namespace, pid: int, url: str) -> list[tuple[int, float]]:
    rows = [(0, rss_mb(pid))]
    item_bytes = args.item_kb * 1024
    items = max(1, args.mb * 1000 * 1000 // item_bytes)
    t0 = time.perf_counter()
    for i in range(1, args.sessions + 1):
        await one_session(url, items, item_bytes, i)
        if i % args.every == 0 or i == args.sessions:
            await asyncio.sleep(0.5)  # the server finishes closing the last one
            rows.append((i, rss_mb(pid)))
            print(f"  {i:4d} sessions: RSS {rows[-1][1]:8.1f} MB "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=300)
    p.add_argument("--mb", type=int, default=100, help="MB of items each session holds")
    p.add_argument("--item-kb", type=int, default=1024)
    p.add_argument("--every", type=int, default=25)
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    server: dict[str, object] = {"warmup": False, "max_event_bytes": 8 * 1024 * 1024,
                                 "max_send_queue_bytes": 64 * 1024 * 1024}
    caps = {"max_item_bytes": 2 * 1024 * 1024, "max_history_bytes": 256 * 1024 * 1024}
    server.update({k: v for k, v in caps.items() if k in ServerConfig.model_fields})
    log = Path(tempfile.mkdtemp(prefix="session-memory-")) / "server.log"
    srv = SpawnedServer(None, {"server": server}, log)
    try:
        srv.wait_ready()
        url = f"ws://127.0.0.1:{srv.port}/v1/realtime?dialect=beta"
        print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
              f"; {args.sessions} sessions x {args.mb} MB of {args.item_kb} KiB items; "
              f"server caps: {', '.join(k for k in caps if k in server) or 'none'}")
        rows = asyncio.run(run(args, srv.proc.pid, url))
        peak = rss_mb(srv.proc.pid, "VmHWM")
    finally:
        srv.stop()
    print("\n| sessions closed | server RSS (MB) |\n|---|---|")
    for n, mb in rows:
        print(f"| {n} | {mb:.0f} |")
    print(f"\npeak RSS {peak:.0f} MB; growth after the first {args.every} sessions: "
          f"{rows[-1][1] - rows[1][1]:+.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
