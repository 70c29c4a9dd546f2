"""Several OpenAI-compatible endpoints serving one model, and which one gets each request.

Why sticky: vLLM keeps the keys and values of recent prompts (its prefix cache), and the prompt of
a conversation's next turn starts with what the previous one held. Sending every request of one
conversation to the same replica lets that replica skip the prefill of the history; spreading
them would make each replica compute it again. The conversation is named by a context variable,
:data:`CONVERSATION`, which the server sets for each reply (the reply's requests, chat and TTS,
run in its task and see it). Rendezvous hashing of that name over the endpoints that are up picks
one, so an endpoint going down moves only its own conversations, and its return moves them home.

Why health: an endpoint that refuses connections, cuts a stream short or fails its health check
is taken out at once: its conversations go elsewhere from their next request, and the request
that saw the failure fails cleanly, as it would with one endpoint. A background probe (``GET`` of
the health path, vLLM's ``/health``) puts it back when it answers 200 again, and takes out an idle
one that stopped answering. With every endpoint out, requests still try them all (a stale
verdict must not refuse service). Requests of no conversation (background transcriptions, the
warm-up) go to the endpoint with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import httpx

log = logging.getLogger(__name__)

#: The conversation the current task works for (a session id), or None.
CONVERSATION: ContextVar[str | None] = ContextVar("stepaudio_conversation", default=None)


def health_url(api_root: str, path: str) -> str:
    """The health URL of an endpoint: ``path`` on the API root's host (vLLM: ``/health``)."""
    parts = urlsplit(api_root)
    return urlunsplit((parts.scheme, parts.netloc, "/" + path.lstrip("/"), "", ""))


def _score(key: str, url: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{url}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass
class Endpoint:
    """One replica: where it is, whether it is in service, what it carries."""

    url: str  # API root, without a trailing slash
    health_url: str
    up: bool = True
    reason: str = ""  # why it was taken out
    since: float = field(default_factory=time.monotonic)  # when ``up`` last changed
    in_flight: int = 0
    requests: int = 0  # requests sent (connected)
    failures: int = 0  # times taken out
    prompt_tokens: int = 0  # of the requests that finished
    cached_tokens: int = 0  # of those, served by its prefix cache (as it reported)


class EndpointPool:
    """The endpoints of one model (see the module docstring)."""

    def __init__(self, urls: Sequence[str], *, health_path: str = "/health",
                 check_interval_s: float = 2.0, check_timeout_s: float = 2.0) -> None:
        if not urls:
            raise ValueError("an endpoint pool needs at least one URL")
        self.endpoints = [Endpoint(u, health_url(u, health_path)) for u in urls]
        self.check_interval_s = check_interval_s
        self.check_timeout_s = check_timeout_s

    def __len__(self) -> int:
        return len(self.endpoints)

    def __iter__(self) -> Iterator[Endpoint]:
        return iter(self.endpoints)

    def home(self, key: str) -> Endpoint:
        """Where ``key``'s conversation goes while every endpoint is up."""
        return max(self.endpoints, key=lambda e: _score(key, e.url))

    def choose(self, key: str | None, exclude: Collection[str] = ()) -> Endpoint:
        """The endpoint for the next request of conversation ``key`` (None: no conversation),
        leaving out the URLs in ``exclude`` (those this request already failed on)."""
        candidates = [e for e in self.endpoints if e.url not in exclude] or self.endpoints
        live = [e for e in candidates if e.up] or candidates
        if key is None:
            return min(live, key=lambda e: (e.in_flight, e.requests))
        return max(live, key=lambda e: _score(key, e.url))

    def mark_down(self, ep: Endpoint, reason: str) -> None:
        ep.reason = reason[:200]
        if ep.up:
            ep.up = False
            ep.since = time.monotonic()
            ep.failures += 1
            if len(self.endpoints) > 1:
                log.warning("endpoint %s taken out: %s", ep.url, ep.reason)

    def mark_up(self, ep: Endpoint) -> None:
        if not ep.up:
            ep.up = True
            ep.since = time.monotonic()
            ep.reason = ""
            if len(self.endpoints) > 1:
                log.info("endpoint %s back in service", ep.url)

    # -- health checks ----------------------------------------------------------------------------

    async def check(self, client: httpx.AsyncClient) -> None:
        """Probe every endpoint once (concurrently): 2xx puts it in service, anything else
        (refused, timed out, 5xx) takes it out."""

        async def probe(ep: Endpoint) -> None:
            try:
                r = await client.get(ep.health_url, timeout=self.check_timeout_s)
            except httpx.HTTPError as exc:
                self.mark_down(ep, f"health check failed: {type(exc).__name__}: {exc}")
                return
            if 200 <= r.status_code < 300:
                self.mark_up(ep)
            else:
                self.mark_down(ep, f"health check answered HTTP {r.status_code}")

        await asyncio.gather(*(probe(ep) for ep in self.endpoints))

    async def run_checks(self, client: httpx.AsyncClient) -> None:
        """Probe every ``check_interval_s`` until cancelled."""
        while True:
            try:
                await self.check(client)
            except Exception:  # a bug here must not stop the probing
                log.exception("endpoint health check failed")
            await asyncio.sleep(self.check_interval_s)
