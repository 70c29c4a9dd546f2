"""Model servers in their own processes for the tests: start on a free loopback port, wait until
healthy (bounded), always stop (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

TESTS = Path(__file__).parent
REPO = TESTS.parent
START_TIMEOUT_S = 90


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """One thread per child (2-core hosts) and this checkout first on the path."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def wait_healthy(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not healthy after {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running(argv: list[str], port: int, log: Path) -> Iterator[str]:
    """Run a model server (``argv`` listens on ``port``); yields its API root (…/v1)."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                cwd=REPO)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


def openai_server(chat_dir: Path, log: Path) -> contextlib.AbstractContextManager[str]:
    """``tests/openai_server.py`` (vLLM's request shape, faults on request) on the chat model."""
    port = free_port()
    return running([sys.executable, str(TESTS / "openai_server.py"), str(chat_dir),
                    "--port", str(port)], port, log)
