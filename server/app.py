"""The server process: WebSocket ``/v1/realtime`` plus a few plain HTTP routes, on ``websockets``.

Routes (plain HTTP answers come from ``process_request``, before any WebSocket handshake):

- ``/v1/realtime``: the OpenAI Realtime-compatible WebSocket (``docs/protocol.md``).
- ``/``: the browser demo (``client/web/index.html``); the other files of ``client/web/`` are
  served by name.
- ``/healthz``: 200 while the process runs. ``/readyz``: 200 while the server takes new sessions:
  every model loaded and warmed up (a real short turn went through every stage), not full
  (``max_sessions``), not draining; 503 otherwise, so a load balancer's health check sends new
  sessions elsewhere. Its body says why, and carries warnings (listening beyond loopback without a
  key).
- ``/metrics``: Prometheus text (load signals: active sessions, capacity, draining).

Refusals are plain HTTP, before the upgrade (``server/admission.py``): 400/403 for a foreign Host,
403 for a foreign Origin, 401 for a missing or wrong key, 503 with Retry-After while loading,
draining or full (connections that passed the check but are not sessions yet count against the
cap). Start-up listens first (so ``/healthz`` and ``/readyz`` answer during loading), then loads
and warms the models in a thread.

Draining (SIGTERM/SIGINT, or :meth:`Server.drain`): new sessions are refused with 503 and
``/readyz`` turns 503 while the listener stays open; each session keeps going until its turn in
flight is over (the user speaking, a reply being generated, sent or still playing) for at most
``shutdown_grace_s``, then closes with 1001; a reply still running then is cancelled. A second
signal cuts the grace short.

Close codes: 1001 server shutting down, 1008 the client does not read its events (send queue
full), 1009 a message over twice the event size limit, 1011 internal error, 1013 full (only when
more clients pass the HTTP check at once than there are places left).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.protocol import State

from server.admission import (
    KEY_SUBPROTOCOL,
    Gate,
    http_response,
    offered_subprotocols,
    refusal,
    text_response,
)
from server.instruments import chat_engine, instrument_stages
from server.metrics import CONTENT_TYPE, LoopLagMonitor, Metrics
from server.protocol import default_session_config, dialect_from_handshake
from server.session import Session, SessionEnv
from server.workers import Stages, load_stages, warmup_audio
from stepaudio.config import Config
from stepaudio.systemd import notify

log = logging.getLogger("stepaudio.server")

CLOSE_TRY_LATER = 1013
#: After the grace, how long a session's last events (the cancelled reply's) may take to go out.
FLUSH_S = 1.0
WEB_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wav": "audio/wav",
}
def build_stages(cfg: Config, root: Path, metrics: Metrics) -> Stages:
    """The stages the config asks for: a benchmark instrument's, or the models' (blocking)."""
    stages = instrument_stages(cfg, root, metrics)
    if stages is None:
        stages = load_stages(cfg, root, metrics, chat_engine=chat_engine(cfg))
    return stages


def web_dir() -> Path:
    """Where the browser demo's files are (the ``client`` package's ``web/`` folder)."""
    import client

    return Path(client.__file__).resolve().parent / "web"


class _HandshakeNoise(logging.Filter):
    """A request that is not a WebSocket handshake (a POST, a 10 kB URL, a port scanner) costs
    one line at INFO, not an ERROR with a traceback per request."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "opening handshake failed" or not record.exc_info:
            return True
        exc = record.exc_info[1]
        cause = exc.__cause__ if exc is not None and exc.__cause__ is not None else exc
        log.info("refused a request that is not a WebSocket handshake: %s",
                 str(cause)[:200] or type(cause).__name__)
        return False


#: websockets' own logger for this server's connections (it carries the filter above).
WS_LOG = logging.getLogger("stepaudio.server.websockets")
WS_LOG.setLevel(logging.WARNING)  # not a line per connection opened or refused
WS_LOG.addFilter(_HandshakeNoise())


class Server:
    """One server instance (tests run several in one process, each with its own metrics)."""

    def __init__(self, cfg: Config, models_root: Path | None, *, stages: Stages | None = None
                 ) -> None:
        self.cfg = cfg
        self.root = Path(models_root) if models_root is not None else None
        self.metrics = Metrics()
        self.stages = stages
        self._owns_stages = stages is None  # stages lent by another server are not unloaded
        self.env: SessionEnv | None = None
        self.ready = False
        self.state = "starting"
        self.sessions: set[Session] = set()
        #: Connections that passed the HTTP checks and are not sessions yet (they hold a place).
        self._admitted: set[ServerConnection] = set()
        self._cut_grace = asyncio.Event()
        self.lag = LoopLagMonitor(self.metrics)
        self._ws_server: Any = None
        self.port = 0
        self.warmup_ms: dict[str, float] = {}
        self.metrics.sessions_capacity.set(cfg.server.max_sessions)
        key_env = cfg.server.api_key_env
        self.api_key = os.environ.get(key_env, "") if key_env else ""
        self.gate = Gate(self.api_key, cfg.server.host, cfg.server.allowed_hosts,
                         list(cfg.server.allowed_origins))
        self.warnings: list[str] = [w for w in (self.gate.warning,) if w]

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen (HTTP routes answer from now on); call :meth:`load` to become ready."""
        s = self.cfg.server
        self._ws_server = await serve(
            self._handler, s.host, s.port,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            compression=None,  # base64 audio barely compresses; deflate would cost CPU per frame
            max_size=2 * s.max_event_bytes,
            max_queue=64,
            ping_interval=20,
            ping_timeout=20,
            close_timeout=5,
            logger=WS_LOG,
        )
        self.port = self._ws_server.sockets[0].getsockname()[1]
        for warning in self.warnings:
            log.warning("%s", warning)
        self.lag.start()

    async def load(self) -> None:
        """Load every stage (in a thread), start the VAD pump, warm up; then ready."""
        if self.stages is None:
            self.state = "loading models"
            assert self.root is not None
            self.stages = await asyncio.to_thread(build_stages, self.cfg, self.root, self.metrics)
        self.stages.pump.start()
        self.env = SessionEnv(self.cfg, self.stages, self.metrics,
                              default_session_config(self.cfg.session))
        if self.cfg.server.warmup and not self.stages.warm:
            self.state = "warming up"
            wav, sr = warmup_audio()
            self.warmup_ms = await self.stages.warmup(wav, sr, self.cfg.session.voice)
            log.info("warm-up: %s", ", ".join(f"{k} {v:.0f} ms" for k, v in
                                              self.warmup_ms.items()))
        # The models are millions of long-lived objects: moving them out of the collector's
        # reach keeps full collections (which stop the event loop) at a few milliseconds.
        gc.collect()
        gc.freeze()
        self.metrics.backends.pools = model_pools(self.stages)
        if self.draining:  # a signal came while loading: stay out of service
            return
        self.ready = True
        self.state = "ready"
        self.metrics.ready.set(1)

    async def drain(self, grace_s: float | None = None) -> None:
        """Take no new sessions, let each one finish its turn in flight (at most ``grace_s``,
        default ``server.shutdown_grace_s``), then close it with 1001. The listener stays open:
        ``/readyz`` answers 503 and new sessions are refused over HTTP meanwhile."""
        grace = self.cfg.server.shutdown_grace_s if grace_s is None else grace_s
        self.ready = False
        if self.state != "shutting down":
            self.state = "draining"
        self.metrics.ready.set(0)
        self.metrics.draining.set(1)
        busy = sum(turn_in_flight(s) for s in self.sessions)
        log.info("draining: %d session(s), %d with a turn in flight, up to %.1f s",
                 len(self.sessions), busy, grace)
        deadline = asyncio.get_running_loop().time() + grace
        await asyncio.gather(*(self._drain_session(s, deadline) for s in list(self.sessions)),
                             return_exceptions=True)

    def cut_grace(self) -> None:
        """End the drain's waiting now (a second SIGTERM): sessions close at once."""
        self._cut_grace.set()

    async def _drain_session(self, session: Session, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while turn_in_flight(session) and not self._cut_grace.is_set():
            left = deadline - loop.time()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._cut_grace.wait(), min(0.05, left))
        await session.shutdown(FLUSH_S)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain (see :meth:`drain`), stop listening, unload."""
        await self.drain(grace_s)
        self.state = "shutting down"
        if self._ws_server is not None:
            self._ws_server.close(close_connections=False)
        if self._ws_server is not None:  # the handlers end once their sessions have closed
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws_server.wait_closed(), FLUSH_S + 5)
        await self.lag.aclose()
        if self.stages is not None and self._owns_stages:
            await self.stages.aclose()

    # -- HTTP -------------------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self.state in ("draining", "shutting down")

    def occupied(self) -> int:
        """Sessions, plus connections admitted over HTTP whose session has not started yet."""
        self._admitted = {c for c in self._admitted if c.state is not State.CLOSED}
        return len(self.sessions) + len(self._admitted)

    def unavailable(self) -> str | None:
        """Why this server takes no new session now (draining, not ready, full), or None."""
        if self.draining:
            return "shutting down; try another server or come back in a moment"
        if not self.ready or self.env is None:
            return f"not ready ({self.state}); try again in a moment"
        if self.occupied() >= self.cfg.server.max_sessions:
            return f"server full ({self.cfg.server.max_sessions} sessions); try again later"
        return None

    def capacity_refusal(self) -> Response | None:
        """503 (with Retry-After) while this server cannot take a new session."""
        reason = self.unavailable()
        return None if reason is None else refusal(HTTPStatus.SERVICE_UNAVAILABLE, reason)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        refused = self.gate.check_host(request)
        if refused is not None:
            return refused
        if path == "/v1/realtime":
            refused = (self.gate.check_origin(request) or self.gate.check_key(request)
                       or self.capacity_refusal())
            if refused is None:  # the WebSocket handshake goes on, holding a place
                self._admitted.add(connection)
            return refused
        if path == "/healthz":
            return text_response(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            notes = f"sessions {len(self.sessions)}/{self.cfg.server.max_sessions}\n"
            notes += "".join(f"warning: {w}\n" for w in self.warnings)
            reason = self.unavailable()
            if reason is None:
                return text_response(HTTPStatus.OK, "ready\n" + notes)
            if not self.ready and not self.draining:
                reason = f"not ready: {self.state}"
            return text_response(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason}\n" + notes)
        if path == "/metrics":
            return http_response(HTTPStatus.OK, self.metrics.render(), CONTENT_TYPE)
        return self._static(path)

    def _static(self, path: str) -> Response:
        folder = web_dir()
        name = "index.html" if path in ("/", "/index.html") else path.lstrip("/")
        if name.startswith("web/"):
            name = name[4:]
        try:
            target = (folder / name).resolve() if name and ".." not in name else None
            if target is not None and target.is_file() and folder.resolve() in target.parents \
                    and target.suffix in WEB_TYPES:
                return http_response(HTTPStatus.OK, target.read_bytes(),
                                     WEB_TYPES[target.suffix])
        except (OSError, ValueError):  # a path no file can have (a NUL, too long): not found
            pass
        return text_response(HTTPStatus.NOT_FOUND, f"no such page: {path[:200]}\n")

    # -- WebSocket --------------------------------------------------------------------------------

    @staticmethod
    def _select_subprotocol(connection: ServerConnection, subprotocols: Any) -> Any:
        """Answer with one of the offered subprotocols: browsers fail the connection otherwise.
        ``realtime`` is what OpenAI clients expect; never echo the one carrying the API key."""
        offered = list(subprotocols)
        for preferred in ("realtime", "openai-beta.realtime-v1"):
            if preferred in offered:
                return preferred
        rest = [p for p in offered if not p.startswith(KEY_SUBPROTOCOL)]
        return (rest or offered or [None])[0]

    async def _handler(self, ws: ServerConnection) -> None:
        request = ws.request
        self._admitted.discard(ws)
        # Checked over HTTP already (places were held); a drain may have begun since.
        refused = self.capacity_refusal()
        if refused is not None or request is None or self.env is None:
            reason = refused.body.decode() if refused is not None and refused.body else "refused"
            await ws.close(CLOSE_TRY_LATER, reason.strip()[:120])
            return
        assert request is not None
        query = dict(parse_qsl(urlsplit(request.path).query))
        dialect = dialect_from_handshake(request.headers, offered_subprotocols(request.headers),
                                         query)
        session = Session(ws, self.env, dialect)
        self.sessions.add(session)
        self.metrics.sessions.inc()
        self.metrics.sessions_active.inc()
        try:
            await session.run()
        except Exception:
            log.exception("session failed")
            with contextlib.suppress(Exception):
                await ws.close(1011, "internal error")
        finally:
            self.sessions.discard(session)
            self.metrics.sessions_active.dec()
            code = session.outbox.close_code or ws.close_code or 1006
            self.metrics.sessions_closed.labels(str(code)).inc()


def turn_in_flight(session: Session) -> bool:
    """Whether a drain should wait for this session: the user is mid-turn, or a reply the client
    knows of is still being generated, queued for sending, or still playing at the client (by
    wall time since its first audio went out: the client plays on as the server sends)."""
    if session.closing or session.outbox.closed:
        return False
    if session.controller.state in ("user_speaking", "user_paused") or session.outbox.bytes:
        return True
    now = session.wall()
    conv = session.conversation
    for r in conv.replies.values():
        if not r.committed or r.status == "cancelled":
            continue
        if not r.finished:
            return True
        if r.t.first_sent is not None and now < r.t.first_sent + conv.audio_sent_ms(r) / 1000.0:
            return True
    return False


def model_pools(stages: Stages | None) -> dict[str, Any]:
    """The endpoint pools of the remote engines (chat, tts), for ``/metrics``."""
    if stages is None:
        return {}
    engines = {"chat": getattr(stages.chat, "engine", None),
               "tts": getattr(getattr(stages.speech, "synth", None), "engine", None)}
    return {name: engine.pool for name, engine in engines.items()
            if engine is not None and hasattr(engine, "pool")}


# --------------------------------------------------------------------------------------------------
# The `stepaudio serve` entry point


def _use_uvloop(choice: str) -> str:
    """uvloop when asked for or installed (a faster event loop; the server works without it)."""
    if choice == "asyncio":
        return "asyncio"
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise RuntimeError("server.event_loop: uvloop is not installed (pip install uvloop)"
                               ) from None
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(cfg: Config, root: Path) -> int:
    server = Server(cfg, root)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await server.start()
    host = cfg.server.host
    print(f"stepaudio: listening on http://{host}:{server.port} (WebSocket "
          f"ws://{host}:{server.port}/v1/realtime); loading models ({cfg.models.profile})...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    loading = asyncio.create_task(server.load())
    stopper = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loading, stopper}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if loading in done:
        if loading.exception() is not None:
            print(f"error: loading the models failed: {loading.exception()}", file=sys.stderr)
            stop.set()
            code = 1
        else:
            print(f"stepaudio: ready in {time.perf_counter() - t0:.1f} s "
                  f"(profile: {server.stages.profile if server.stages else '?'})",
                  file=sys.stderr, flush=True)
            notify("READY=1")  # systemd Type=notify: ready exactly when /readyz turns 200
        await stopper
    else:
        loading.cancel()
    notify("STOPPING=1")
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: do not wait for the turns
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, server.cut_grace)
    print(f"stepaudio: draining ({len(server.sessions)} sessions, up to "
          f"{cfg.server.shutdown_grace_s:g} s; signal again to close them now)",
          file=sys.stderr, flush=True)
    await server.stop()
    print("stepaudio: stopped", file=sys.stderr, flush=True)
    return code


def run_server(cfg: Config, models_root: Path) -> int:
    """Serve until SIGTERM/SIGINT (what ``stepaudio serve`` calls); returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per model request
    loop = _use_uvloop(cfg.server.event_loop)
    log.info("event loop: %s", loop)
    # The model threads (TTS-3B's decode loop, the vocoder, the VAD pump) each give up the GIL
    # around every device wait and must then win it back from the others; at the default 5 ms
    # switch interval each such wait cost a busy server up to 5 ms more per thread in line.
    sys.setswitchinterval(GIL_SWITCH_S)
    return asyncio.run(_serve(cfg, Path(models_root)))


#: Python's thread switch interval in the server (default 5 ms).
GIL_SWITCH_S = 0.0005
