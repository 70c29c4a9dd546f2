"""Who may talk to the server, decided over plain HTTP before any WebSocket upgrade.

Why before the upgrade: proxies, load balancers and health checkers read HTTP statuses, not
WebSocket close codes, and a refused client should not cost a session. The refusals, in the order
they are checked:

- **400 / 403 Host** (every route): a keyless server on loopback answers only to IP addresses,
  ``localhost`` and the names in ``server.allowed_hosts``, so a DNS-rebinding page (a foreign name
  that resolves to 127.0.0.1) can neither open sessions nor read ``/metrics``. A server with a key,
  or one listening beyond loopback, is meant to be reached by name (through a proxy, by DNS) and
  takes any Host unless ``allowed_hosts`` is set.
- **403 Origin** (``/v1/realtime``): a browser page may open a session only if it comes from the
  host it addresses, from localhost, or from ``server.allowed_origins``. Programs send no Origin and
  are not checked; WebSockets have no CORS, so this is the only thing stopping any web page from
  using a local server.
- **401 key** (``/v1/realtime``): ``Authorization: Bearer KEY`` or the browser's
  ``openai-insecure-api-key.KEY`` subprotocol, compared in constant time.
- **503 + Retry-After** (``/v1/realtime``): not ready (loading, warming up), draining (shutting
  down), or full. The server decides these (:meth:`server.app.Server.capacity_refusal`); this
  module only shapes them.

Headers are read with ``get_all``: a header may legitimately appear more than once (RFC 6455
allows repeated ``Sec-WebSocket-Protocol`` lines; proxies chain ``X-Forwarded-For``).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

KEY_SUBPROTOCOL = "openai-insecure-api-key."
#: Seconds a refused client is told to wait (loading, draining, full).
RETRY_AFTER_S = 5


def http_response(status: HTTPStatus, body: bytes, content_type: str,
                  extra: list[tuple[str, str]] | None = None) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store"), *(extra or [])])
    return Response(status.value, status.phrase, headers, body)


def text_response(status: HTTPStatus, text: str,
                  extra: list[tuple[str, str]] | None = None) -> Response:
    return http_response(status, text.encode("utf-8"), "text/plain; charset=utf-8", extra)


def refusal(status: HTTPStatus, reason: str) -> Response:
    """A plain-text refusal; 503s say when to come back, 401s how to authenticate."""
    extra: list[tuple[str, str]] = []
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        extra.append(("Retry-After", str(RETRY_AFTER_S)))
    elif status == HTTPStatus.UNAUTHORIZED:
        extra.append(("WWW-Authenticate", 'Bearer realm="stepaudio"'))
    return text_response(status, reason.rstrip("\n") + "\n", extra)


def offered_subprotocols(headers: Headers) -> list[str]:
    out: list[str] = []
    for value in headers.get_all("Sec-WebSocket-Protocol"):
        out += [p.strip() for p in value.split(",") if p.strip()]
    return out


def is_loopback_name(host: str) -> bool:
    """``localhost``, ``*.localhost`` or a loopback IP address."""
    host = host.lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def listens_on_loopback(host: str) -> bool:
    """Whether every address ``host`` binds to is a loopback one."""
    if host in ("", "0.0.0.0", "::", "*"):
        return False
    if is_loopback_name(host):
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(str(i[4][0]).split("%")[0]).is_loopback for i in infos)


def _hostname(value: str) -> str | None:
    """The host name of a Host header value or an origin (no port, lower case), or None."""
    try:
        parts = urlsplit(value if "://" in value else f"//{value}")
        return parts.hostname
    except ValueError:
        return None


def _origin_key(origin: str) -> str:
    """``scheme://host[:port]`` in lower case, default ports left out (for list matching)."""
    try:
        parts = urlsplit(origin.strip())
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return origin.strip().lower()
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    tail = f":{port}" if port is not None and port != default else ""
    return f"{parts.scheme.lower()}://{host}{tail}"


@dataclass
class Gate:
    """The Host, Origin and key checks of one server (see the module docstring)."""

    api_key: str
    listen_host: str
    allowed_hosts: list[str] | None = None
    allowed_origins: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.open_to_network = not listens_on_loopback(self.listen_host)
        if self.allowed_hosts is None:  # auto: only a keyless loopback server checks the Host
            self.check_host_names = not self.api_key and not self.open_to_network
            self._hosts: set[str] = set()
        else:
            self.check_host_names = "*" not in self.allowed_hosts
            self._hosts = {h.lower().rstrip(".") for h in self.allowed_hosts}
        self._any_origin = "*" in self.allowed_origins
        self._origins = {_origin_key(o) for o in self.allowed_origins if o != "*"}

    @property
    def warning(self) -> str | None:
        """What a listener beyond loopback without a key should be told (log and /readyz)."""
        if self.open_to_network and not self.api_key:
            return (f"listening on {self.listen_host or 'every address'} without an API key: "
                    "anyone who can reach this port can use the server; set the variable named "
                    "by server.api_key_env (STEPAUDIO_API_KEY)")
        return None

    # -- Host ---------------------------------------------------------------------------------------

    def host_allowed(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if not self.check_host_names or _is_ip(name) or is_loopback_name(name):
            return True
        return name in self._hosts or any(
            h.startswith(".") and (name.endswith(h) or name == h[1:]) for h in self._hosts)

    def check_host(self, request: Request) -> Response | None:
        values = request.headers.get_all("Host")
        if len(values) > 1:
            return refusal(HTTPStatus.BAD_REQUEST, "more than one Host header")
        if not values:
            return None
        name = _hostname(values[0])
        if name is None:
            return refusal(HTTPStatus.BAD_REQUEST, f"unreadable Host header {values[0][:100]!r}")
        if self.host_allowed(name):
            return None
        return refusal(HTTPStatus.FORBIDDEN,
                       f"this server does not answer to the name {name[:100]!r}; list it in "
                       "server.allowed_hosts (this check stops DNS-rebinding pages)")

    # -- Origin -------------------------------------------------------------------------------------

    def origin_allowed(self, origin: str, host_name: str | None) -> bool:
        if self._any_origin or _origin_key(origin) in self._origins:
            return True
        name = _hostname(origin) if origin.strip().lower() != "null" else None
        if name is None:
            return False
        return is_loopback_name(name) or (host_name is not None and name == host_name)

    def check_origin(self, request: Request) -> Response | None:
        origins = request.headers.get_all("Origin")
        if not origins:
            return None  # not a browser: nothing to check
        hosts = request.headers.get_all("Host")
        host_name = _hostname(hosts[0]) if hosts else None
        for origin in origins:
            if not self.origin_allowed(origin, host_name):
                return refusal(HTTPStatus.FORBIDDEN,
                               f"pages from {origin[:100]!r} may not open sessions here; list "
                               "the origin in server.allowed_origins")
        return None

    # -- key ----------------------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given: list[str] = []
        for auth in request.headers.get_all("Authorization"):
            if auth.lower().startswith("bearer "):
                given.append(auth[7:].strip())
        given += [p[len(KEY_SUBPROTOCOL):] for p in offered_subprotocols(request.headers)
                  if p.startswith(KEY_SUBPROTOCOL)]
        want = self.api_key.encode()
        # compare_digest on bytes: a key with characters outside ASCII must not raise
        return any(hmac.compare_digest(g.encode("utf-8", "surrogateescape"), want)
                   for g in given)

    def check_key(self, request: Request) -> Response | None:
        if self.authorized(request):
            return None
        return refusal(HTTPStatus.UNAUTHORIZED,
                       "missing or wrong API key: send 'Authorization: Bearer KEY' or the "
                       "subprotocol 'openai-insecure-api-key.KEY'")
