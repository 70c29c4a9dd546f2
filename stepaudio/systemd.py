"""systemd integration: readiness notification and the unit files for this install.

``notify`` speaks the sd_notify datagram protocol directly (one ``AF_UNIX`` datagram to
``$NOTIFY_SOCKET``), so ``Type=notify`` works without libsystemd or a Python binding. vLLM has no
sd_notify, so its unit reaches "started" through ``wait-http`` (``python -m stepaudio.systemd
wait-http URL``), which polls vLLM's ``/health``: units ordered after it then start only once the
model is really served.

The units are rendered from this install (absolute executable paths, the config's ports and GPU
split) by ``stepaudio install-service``; ``configs/systemd/`` holds the same rendering for the
example paths below, which a test keeps in step with this code.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import Config

#: Example paths of configs/systemd/*.service (a venv in /opt, configs and secrets in /etc).
EXAMPLE_EXE = Path("/opt/stepaudio/venv/bin/stepaudio")
EXAMPLE_CONFIG = Path("/etc/stepaudio/step-audio.yaml")
EXAMPLE_MODELS = Path("/srv/step-audio")
DEFAULT_ENV_DIR = Path("/etc/stepaudio")
DEFAULT_CACHE = Path("/var/cache/stepaudio")
#: Paths a systemd ``ProtectHome=yes`` hides; an install living there needs ``read-only``.
HOME_PREFIXES = (Path("/home"), Path("/root"), Path("/run/user"))


def notify(state: str) -> bool:
    """Send an sd_notify state (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to the service
    manager; returns False (and does nothing) when not started by systemd with ``Type=notify``."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr or not (addr.startswith("/") or addr.startswith("@")):
        return False  # unset, or a vsock address (VMs) this minimal sender does not speak
    target = "\0" + addr[1:] if addr.startswith("@") else addr  # '@': abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(target)
            sock.sendall(state.encode("utf-8"))
    except OSError:
        return False
    return True


def wait_http(url: str, timeout_s: float, interval_s: float = 2.0) -> bool:
    """Poll ``url`` until it answers 200 (vLLM's ``/health`` once the model is loaded)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - operator's URL
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(interval_s)
    return False


# -- unit files -----------------------------------------------------------------------------------


def sd_quote(word: str) -> str:
    """One ExecStart word: ``%`` and ``$`` doubled (systemd specifiers and variables), quoted
    when it holds spaces or quotes (the JSON flags of ``vllm serve`` do)."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not any(c in word for c in " \t\"'\\;"):
        return word
    if "'" not in word and "\\" not in word:
        return f"'{word}'"
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def exec_line(argv: list[str]) -> str:
    """A command line for ``ExecStart=``, one flag (with its value) per continued line."""
    lines: list[str] = []
    for raw in argv:
        if raw.startswith("--") or not lines:
            lines.append(sd_quote(raw))
        else:
            lines[-1] += " " + sd_quote(raw)
    return " \\\n    ".join(lines)


def _under_home(paths: list[Path]) -> bool:
    return any(p.is_absolute() and any(p == h or h in p.parents for h in HOME_PREFIXES)
               for p in paths)


@dataclass
class VllmUnit:
    """One `vllm serve` unit: the Chat over its GPUs, or TTS-3B on the GPU after them."""

    name: str  # unit name without .service
    model: str  # what it serves, for the description
    argv: list[str]  # `vllm serve ...` without the executable
    gpus: tuple[int, ...]
    health: str  # vLLM's /health URL, polled for readiness


@dataclass
class UnitSettings:
    """What the rendered units depend on."""

    exe: Path  # the `stepaudio` executable
    user: str = "stepaudio"
    config: Path | None = None  # the server's YAML; None: the packaged default (tiny profile)
    env_dir: Path = DEFAULT_ENV_DIR
    cache: Path = DEFAULT_CACHE
    python: Path | None = None  # for the vLLM units' readiness probe; default: next to exe
    vllm_exe: Path | None = None
    vllm: list[VllmUnit] = field(default_factory=list)
    wants: list[str] = field(default_factory=list)  # vLLM units the server talks to
    shutdown_grace_s: float = 30.0
    extra_paths: tuple[Path, ...] = ()  # models, source tree: decides ProtectHome
    server: bool = True  # write stepaudio.service (not on a machine of a model pool only)

    def protect_home(self) -> str:
        paths = [self.exe, self.cache, *self.extra_paths]
        paths += [p for p in (self.config, self.python, self.vllm_exe) if p is not None]
        return "read-only" if _under_home(paths) else "yes"

    def cache_lines(self, unit: str) -> list[str]:
        """Writable cache: ``CacheDirectory=`` when it is systemd's own place (created and
        owned for the service user, writable under ProtectSystem=strict), else an explicit
        ``ReadWritePaths=``."""
        if self.cache.parent == Path("/var/cache"):
            suffix = unit.removeprefix("stepaudio")
            return [f"CacheDirectory={self.cache.name}{suffix}"]
        sub = self.cache if unit == "stepaudio" else self.cache / unit
        return [f"ReadWritePaths={sub}"]


def stop_timeout_s(grace_s: float) -> int:
    """systemd's TimeoutStopSec for a server draining for ``grace_s``: the grace, the last
    events' flush and unloading (20 s), before systemd resorts to SIGKILL."""
    return math.ceil(grace_s) + 20


HARDENING = """\
# Hardening: nothing here needs privileges, devices beyond the GPUs, or to write outside its
# cache and state folders. PrivateDevices= stays off so /dev/nvidia* remain reachable, and
# MemoryDenyWriteExecute= too: PyTorch, Triton and ONNX Runtime generate machine code at run time.
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome={protect_home}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
CapabilityBoundingSet=
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
UMask=0027
LimitNOFILE=65536
"""


def render_server_unit(s: UnitSettings) -> str:
    argv = [str(s.exe), "serve"] + (["--config", str(s.config)] if s.config else [])
    state = "stepaudio"
    after = " ".join(["network-online.target", *(f"{w}.service" for w in s.wants)])
    lines = [
        "# The Step-Audio real-time dialogue server (written by `stepaudio install-service`).",
        "# Create the user first: useradd --system --home-dir /var/lib/stepaudio "
        f"--shell /usr/sbin/nologin {s.user}",
        "[Unit]",
        "Description=Step-Audio real-time dialogue server",
        f"After={after}",
        f"Wants={after}",
        "",
        "[Service]",
        "# Ready (READY=1 on $NOTIFY_SOCKET) once every model is loaded and warmed up, the moment",
        "# /readyz turns 200. SIGTERM drains: new sessions get HTTP 503 (and /readyz 503, so a",
        "# balancer sends them elsewhere), each session may finish its turn in flight for up to",
        f"# server.shutdown_grace_s ({s.shutdown_grace_s:g} s), then closes with 1001. The stop "
        "timeout covers",
        "# that grace plus 20 s for the last events and unloading; a second SIGTERM skips the wait.",
        "Type=notify",
        "NotifyAccess=main",
        f"User={s.user}",
        f"Group={s.user}",
        "# Secrets (STEPAUDIO_API_KEY=..., and the vLLM key if llm.api_key_env names one).",
        f"EnvironmentFile=-{s.env_dir / 'stepaudio.env'}",
        f"Environment=STEPAUDIO_CACHE={s.cache} HOME=/var/lib/{state} OMP_NUM_THREADS=1",
        f"ExecStart={exec_line(argv)}",
        f"StateDirectory={state}",
        f"WorkingDirectory=/var/lib/{state}",
        *s.cache_lines("stepaudio"),
        "Restart=on-failure",
        "RestartSec=5",
        "# Loading and warming up the real checkpoints takes minutes; the tiny ones seconds.",
        "TimeoutStartSec=900",
        f"TimeoutStopSec={stop_timeout_s(s.shutdown_grace_s)}",
        "KillMode=mixed",
        HARDENING.format(protect_home=s.protect_home()).rstrip("\n"),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


def render_vllm_unit(s: UnitSettings, u: VllmUnit) -> str:
    assert s.vllm_exe is not None
    python = s.python or s.exe.parent / "python"
    gpus = ",".join(str(g) for g in u.gpus)
    probe = [str(python), "-m", "stepaudio.systemd", "wait-http", u.health, "--timeout", "1800"]
    lines = [
        f"# vLLM serving {u.model} for the dialogue server (written by `stepaudio "
        "install-service`;",
        "# the command is `stepaudio vllm-command`'s, docs/vllm.md says why each flag is there).",
        "[Unit]",
        f"Description=vLLM serving {u.model} for stepaudio",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "# vLLM has no sd_notify: the unit counts as started once /health answers 200",
        "# (ExecStartPost polls it), so units ordered after it start with the model served.",
        "Type=exec",
        f"User={s.user}",
        f"Group={s.user}",
        "# Secrets: VLLM_API_KEY=... makes vLLM require that key (set the server's",
        "# llm.api_key_env / tts.api_key_env to the name of a variable holding the same key).",
        *(["# This replica listens on every address for the session tier: set that key, and keep",
           "# the port to the session machines (firewall)."]
          if "0.0.0.0" in u.argv else []),
        f"EnvironmentFile=-{s.env_dir / 'vllm.env'}",
        f"Environment=CUDA_VISIBLE_DEVICES={gpus} HOME=/var/lib/{u.name}",
        f"ExecStart={exec_line([str(s.vllm_exe), *u.argv])}",
        f"ExecStartPost={exec_line(probe)}",
        f"StateDirectory={u.name}",
        f"WorkingDirectory=/var/lib/{u.name}",
        *s.cache_lines(u.name),
        "Restart=on-failure",
        "RestartSec=10",
        "# Loading the weights (264 GB for the Chat) and compiling takes a while.",
        "TimeoutStartSec=1800",
        "TimeoutStopSec=60",
        "# vLLM starts worker processes: SIGTERM goes to the main process, which stops them;",
        "# whatever is left at the timeout is killed with it.",
        "KillMode=mixed",
        "# NCCL pins memory for its GPU-to-GPU buffers.",
        "LimitMEMLOCK=infinity",
        HARDENING.format(protect_home=s.protect_home()).rstrip("\n"),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return "\n".join(lines)


# -- settings from a server config ----------------------------------------------------------------


#: What one machine runs (``stepaudio install-service --role``): everything the config names
#: (one box), or one tier of a scaled-out deployment (docs/scaling.md).
ROLES = ("all", "session", "chat", "tts")


def settings_for(cfg: Config, *, exe: Path, config: Path | None, models: Path | None,
                 user: str = "stepaudio", python: Path | None = None, vllm_exe: Path | None = None,
                 tp: int | None = None, cache: Path = DEFAULT_CACHE,
                 env_dir: Path = DEFAULT_ENV_DIR, extra_paths: tuple[Path, ...] = (),
                 role: str = "all") -> UnitSettings:
    """Units for a server config. The vLLM units run what ``stepaudio vllm-command --config
    [--tts]`` prints (same GPUs, ports, context length): the Chat always once a model root is
    known (the tiny profile needs no vLLM), TTS-3B when the config serves it remotely
    (``tts.engine: openai``). Ports come from the first URL of ``llm.base_url`` /
    ``tts.base_url``.

    ``role``: ``all`` (one machine runs everything above), ``session`` (only the dialogue server:
    its model pools live elsewhere), ``chat`` or ``tts`` (only that vLLM replica, listening on
    every address for the session tier, TTS-3B on GPU 0 with the whole GPU to itself)."""
    from dataclasses import replace
    from urllib.parse import urlsplit

    from .config import endpoint_urls
    from .llm.vllm_args import chat_spec, tts_spec

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    s = UnitSettings(exe=exe, user=user, config=config, env_dir=env_dir, cache=cache,
                     python=python, shutdown_grace_s=cfg.server.shutdown_grace_s,
                     extra_paths=extra_paths + ((models,) if models else ()),
                     server=role in ("all", "session"))
    if models is None or role == "session":
        return s
    s.vllm_exe = vllm_exe or exe.parent / "vllm"
    llm, tts = cfg.llm, cfg.tts
    pool_node = role != "all"
    host = "0.0.0.0" if pool_node else "127.0.0.1"

    def port(urls: str | list[str], default: int) -> int:
        return urlsplit(endpoint_urls(urls)[0]).port or default

    specs = []
    chat = chat_spec(models, tensor_parallel_size=tp or llm.tensor_parallel_size,
                     max_model_len=llm.max_model_len, port=port(llm.base_url, 8000), host=host)
    chat = replace(chat, served_model_name=llm.served_model_name)
    if role in ("all", "chat"):
        specs.append(("stepaudio-vllm", "Step-Audio-Chat", chat, llm.engine == "openai"))
    if (role == "all" and tts.engine == "openai") or role == "tts":
        speech = tts_spec(models, gpu=0 if pool_node else len(chat.gpus),
                          port=port(tts.base_url, 8001), host=host,
                          gpu_memory_utilization=0.9 if pool_node else 0.5)
        speech = replace(speech, served_model_name=tts.served_model_name)
        specs.append(("stepaudio-vllm-tts", "Step-Audio-TTS-3B", speech, True))
    for name, model, spec, used in specs:
        s.vllm.append(VllmUnit(name, model, spec.argv()[1:], spec.gpus,
                               f"http://127.0.0.1:{spec.port}/health"))
        if used and s.server:
            s.wants.append(name)
    return s


def render_units(s: UnitSettings) -> dict[str, str]:
    """File name → unit text."""
    units = {"stepaudio.service": render_server_unit(s)} if s.server else {}
    for u in s.vllm:
        units[f"{u.name}.service"] = render_vllm_unit(s, u)
    return units


def example_units() -> dict[str, str]:
    """configs/systemd/: the units for a venv in /opt and the real-checkpoint config in /etc."""
    from .config import DEFAULT_CONFIG, load_config

    cfg = load_config(DEFAULT_CONFIG.parent / "step-audio.yaml")
    venv = EXAMPLE_EXE.parent
    return render_units(settings_for(cfg, exe=EXAMPLE_EXE, config=EXAMPLE_CONFIG,
                                     models=EXAMPLE_MODELS, python=venv / "python",
                                     vllm_exe=venv / "vllm"))


def install_service(*, out: Path, user: str = "stepaudio", config: Path | None = None,
                    models: Path | None = None, vllm_bin: Path | None = None,
                    tp: int | None = None, cache: Path = DEFAULT_CACHE,
                    env_dir: Path = DEFAULT_ENV_DIR, role: str = "all") -> list[Path]:
    """Write the units for this install (``stepaudio install-service``); returns their paths."""
    from .config import load_config

    config = config.absolute() if config is not None else None
    cfg = load_config(config)
    if models is None and cfg.models.profile == "real" and cfg.models.root is not None:
        models = cfg.models.root
    models = models.expanduser().absolute() if models is not None else None
    python = Path(sys.executable).absolute()
    vllm_exe = vllm_bin.absolute() if vllm_bin is not None else None
    if models is not None and vllm_exe is None:
        sibling = python.parent / "vllm"
        found = shutil.which("vllm")
        vllm_exe = sibling if sibling.exists() else Path(found) if found else sibling
        if not vllm_exe.exists():
            print(f"warning: {vllm_exe} does not exist yet: pip install "
                  "'stepaudio-realtime[vllm]' in this environment, or pass --vllm-bin",
                  file=sys.stderr)
    package = Path(__file__).resolve().parent
    settings = settings_for(cfg, exe=current_executable(), config=config, models=models,
                            user=user, python=python, vllm_exe=vllm_exe, tp=tp, cache=cache,
                            env_dir=env_dir, extra_paths=(package,), role=role)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_units(settings).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# -- `python -m stepaudio.systemd wait-http URL` --------------------------------------------------


def current_executable() -> Path:
    """The absolute path of the `stepaudio` console script of this install."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "stepaudio" and argv0.exists():
        return argv0.resolve() if not argv0.is_absolute() else argv0
    found = shutil.which("stepaudio") or str(Path(sys.executable).parent / "stepaudio")
    return Path(found).absolute()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stepaudio.systemd")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait-http", help="wait until URL answers 200 (a unit's readiness probe)")
    w.add_argument("url")
    w.add_argument("--timeout", type=float, default=1800.0)
    e = sub.add_parser("examples", help="rewrite configs/systemd/ (the example units)")
    e.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "examples":
        for name, text in example_units().items():
            (args.out / name).write_text(text, encoding="utf-8")
            print(args.out / name)
        return 0
    if wait_http(args.url, args.timeout):
        return 0
    print(f"{args.url}: not healthy after {args.timeout:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
