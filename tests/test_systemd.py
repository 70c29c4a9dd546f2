"""systemd: the generated units pass `systemd-analyze verify`, the examples in configs/systemd/
match the generator, and `stepaudio serve` speaks the sd_notify protocol and stops gracefully on
SIGTERM."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

import pytest
from serve_process import API_KEY, ServerProcess, stepaudio_argv, write_config
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stepaudio.systemd import (
    UnitSettings,
    example_units,
    exec_line,
    notify,
    render_server_unit,
    sd_quote,
)

REPO = Path(__file__).resolve().parent.parent
VERIFY = shutil.which("systemd-analyze")


def _fake_vllm(folder: Path) -> Path:
    """`systemd-analyze verify` checks that ExecStart's binary exists; vLLM is not installed in
    CI, so a stand-in takes its place."""
    exe = folder / "vllm"
    exe.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
    exe.chmod(0o755)
    return exe


@pytest.mark.skipif(VERIFY is None, reason="systemd-analyze not installed (apt-get install systemd)")
def test_install_service_units_pass_systemd_analyze_verify(tmp_path):
    out = tmp_path / "units"
    r = subprocess.run(
        [*stepaudio_argv(), "install-service", "--config", str(REPO / "configs" / "step-audio.yaml"),
         "--models", str(tmp_path / "models"), "--out", str(out),
         "--vllm-bin", str(_fake_vllm(tmp_path))],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    units = sorted(out.glob("*.service"))
    # configs/step-audio.yaml serves the Chat and TTS-3B on `vllm serve` (llm/tts engine openai)
    assert [u.name for u in units] == ["stepaudio-vllm-tts.service", "stepaudio-vllm.service",
                                       "stepaudio.service"]
    server = (out / "stepaudio.service").read_text()
    assert "Type=notify" in server and "Restart=on-failure" in server
    assert "After=network-online.target stepaudio-vllm.service stepaudio-vllm-tts.service" \
        in server
    exe = server.split("ExecStart=")[1].split()[0]
    assert Path(exe).is_absolute() and Path(exe).exists() and Path(exe).name == "stepaudio"
    vllm = (out / "stepaudio-vllm.service").read_text()
    assert "--tensor-parallel-size 4" in vllm and "CUDA_VISIBLE_DEVICES=0,1,2,3" in vllm
    tts = (out / "stepaudio-vllm-tts.service").read_text()
    assert "Step-Audio-TTS-3B" in tts and "CUDA_VISIBLE_DEVICES=4" in tts
    v = subprocess.run([VERIFY, "verify", *map(str, units)], capture_output=True, text=True,
                       timeout=120)
    report = (v.stdout + v.stderr).strip()
    ours = [line for line in report.splitlines()
            if any(u.name in line or str(u) in line for u in units)]
    assert v.returncode == 0 and not ours, report


def test_tiny_profile_gets_no_vllm_unit(tmp_path):
    r = subprocess.run([*stepaudio_argv(), "install-service", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.glob("*.service")] == ["stepaudio.service"]
    text = (tmp_path / "stepaudio.service").read_text()
    assert "stepaudio-vllm" not in text and "--config" not in text


def test_example_units_match_the_generator():
    for name, text in example_units().items():
        path = REPO / "configs" / "systemd" / name
        assert path.read_text(encoding="utf-8") == text, (
            f"{path} is out of date: python -m stepaudio.systemd examples configs/systemd")


def test_protect_home_relaxes_only_for_installs_under_home():
    opt = UnitSettings(exe=Path("/opt/stepaudio/venv/bin/stepaudio"))
    home = UnitSettings(exe=Path("/home/ada/venv/bin/stepaudio"))
    assert "ProtectHome=yes" in render_server_unit(opt)
    assert "ProtectHome=read-only" in render_server_unit(home)


def test_exec_words_are_quoted_for_systemd():
    assert sd_quote("plain") == "plain"
    assert sd_quote('{"a": false}') == """'{"a": false}'"""
    assert sd_quote("50%") == "50%%" and sd_quote("$HOME") == "$$HOME"
    assert exec_line(["/x/vllm", "serve", "/m", "--port", "8000"]) == \
        "/x/vllm serve /m \\\n    --port 8000"


def test_notify_is_a_no_op_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify("READY=1") is False


def test_serve_notifies_systemd_and_stops_gracefully_on_sigterm(tiny_root, tmp_path):
    name = f"stepaudio-test-{uuid.uuid4().hex[:12]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # abstract namespace: what '@' in NOTIFY_SOCKET means
    sock.settimeout(30)
    srv = ServerProcess(write_config(tmp_path / "server.yaml", tiny_root), tmp_path / "log",
                        env={"NOTIFY_SOCKET": "@" + name})
    try:
        srv.start()
        assert sock.recv(4096) == b"READY=1"
        with connect(srv.url, additional_headers={"Authorization": f"Bearer {API_KEY}"},
                     open_timeout=10) as ws:
            assert json.loads(ws.recv(10))["type"] == "session.created"
            srv.proc.send_signal(signal.SIGTERM)
            assert sock.recv(4096) == b"STOPPING=1"
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    ws.recv(20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert srv.proc.wait(30) == 0, srv.log()[-2000:]
    finally:
        srv.stop()
        sock.close()


def test_units_per_role_of_a_scaled_out_deployment(tmp_path):
    """session: the dialogue server alone (its pools are elsewhere, it waits for no local vLLM);
    chat / tts: that vLLM replica alone, reachable from the session tier."""
    cfg = REPO / "configs" / "step-audio.yaml"
    vllm = _fake_vllm(tmp_path)
    written = {}
    for role in ("session", "chat", "tts"):
        out = tmp_path / role
        r = subprocess.run([*stepaudio_argv(), "install-service", "--config", str(cfg),
                            "--models", str(tmp_path / "models"), "--out", str(out),
                            "--vllm-bin", str(vllm), "--role", role],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        written[role] = {p.name: p.read_text() for p in out.glob("*.service")}
    assert list(written["session"]) == ["stepaudio.service"]
    assert "stepaudio-vllm" not in written["session"]["stepaudio.service"]
    assert list(written["chat"]) == ["stepaudio-vllm.service"]
    chat = written["chat"]["stepaudio-vllm.service"]
    assert "--host 0.0.0.0" in chat and "CUDA_VISIBLE_DEVICES=0,1,2,3" in chat
    assert "VLLM_API_KEY" in chat and "http://127.0.0.1:8000/health" in chat
    assert list(written["tts"]) == ["stepaudio-vllm-tts.service"]
    tts = written["tts"]["stepaudio-vllm-tts.service"]
    assert "CUDA_VISIBLE_DEVICES=0 " in tts and "--gpu-memory-utilization 0.9" in tts
    if VERIFY is not None:
        units = [tmp_path / role / name for role in written for name in written[role]]
        v = subprocess.run([VERIFY, "verify", *map(str, units)], capture_output=True, text=True,
                           timeout=120)
        ours = [line for line in (v.stdout + v.stderr).splitlines()
                if any(u.name in line for u in units)]
        assert v.returncode == 0 and not ours, v.stdout + v.stderr


def test_the_stop_timeout_covers_the_drain_grace():
    for grace in (0.0, 2.5, 30.0, 600.0):
        unit = render_server_unit(UnitSettings(exe=Path("/opt/x/bin/stepaudio"),
                                               shutdown_grace_s=grace))
        stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
        assert stop >= grace + 10
