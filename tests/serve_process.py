"""`stepaudio serve` as a child process, for the tests that drive the server from outside the way
a user does (the CLI client, the browser demo, systemd's readiness protocol).

The server runs the tiny checkpoints on an ephemeral port; start-up is bounded (the port line,
then /readyz) and the process is always stopped (SIGTERM, then SIGKILL), so a failing test never
leaves a server behind.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

API_KEY = "test-key-2f9c"
PORT_LINE = re.compile(r"listening on http://[^:]+:(\d+)")


def write_config(path: Path, models_root: Path) -> Path:
    """The tiny profile on an ephemeral port, with short background transcriptions."""
    path.write_text(
        "models:\n"
        "  profile: tiny\n"
        f"  root: {models_root}\n"
        "server:\n"
        "  host: 127.0.0.1\n"
        "  port: 0\n"
        "  api_key_env: STEPAUDIO_API_KEY\n"
        "  shutdown_grace_s: 1\n"
        "llm:\n"
        "  seed: 1\n"
        "session:\n"
        "  max_transcript_tokens: 16\n",
        encoding="utf-8",
    )
    return path


def stepaudio_argv() -> list[str]:
    """The installed console script when there is one, else the module (same code)."""
    exe = shutil.which("stepaudio")
    return [exe] if exe else [sys.executable, "-m", "stepaudio"]


class ServerProcess:
    """One `stepaudio serve` child; ``port`` is known once :meth:`start` returns."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "STEPAUDIO_API_KEY": API_KEY,
                    **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def start(self, *, listen_timeout_s: float = 90, ready_timeout_s: float = 180) -> None:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*stepaudio_argv(), "serve", "--config", str(self.config)],
            stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
        )
        deadline = time.monotonic() + listen_timeout_s
        while not self.port:
            self._check_alive()
            m = PORT_LINE.search(self.log())
            if m:
                self.port = int(m.group(1))
            elif time.monotonic() > deadline:
                raise TimeoutError(f"server did not listen within {listen_timeout_s} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.2)
        deadline = time.monotonic() + ready_timeout_s
        while not self.ready():
            self._check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready within {ready_timeout_s} s:\n"
                                   f"{self.log()[-3000:]}")
            time.sleep(0.3)

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.http + "/readyz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                               f"{self.log()[-3000:]}")

    def stop(self, timeout_s: float = 20) -> int | None:
        """SIGTERM (graceful), SIGKILL if it does not exit in time; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def served(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """One `stepaudio serve` (tiny, API key ``API_KEY``) shared by the client and browser tests."""
    folder = tmp_path_factory.mktemp("served")
    srv = ServerProcess(write_config(folder / "server.yaml", tiny_root), folder / "server.log")
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
