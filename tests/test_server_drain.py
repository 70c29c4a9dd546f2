"""Behaving well behind a load balancer: /readyz says when the server takes no new sessions (full,
draining), connections past the cap are refused over HTTP, and a drain lets the turns in flight
finish before closing with 1001."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from realtime_helpers import RealtimeClient, server_config
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.app import Server, turn_in_flight

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


@contextlib.asynccontextmanager
async def _serving(shared: Server, **server) -> AsyncIterator[Server]:
    """A server of its own on the shared server's models, stopped afterwards."""
    srv = Server(server_config(**server), None, stages=shared.stages)
    await srv.start()
    await srv.load()
    try:
        yield srv
    finally:
        await srv.stop(grace_s=0.1)


async def _busy(srv: Server, tokens: int) -> tuple[RealtimeClient, int]:
    """A session with a reply of up to ``tokens`` tokens in flight; and where its events began."""
    c = await RealtimeClient.open(srv.port)
    await c.wait_for("session.created")
    return c, await _ask(c, tokens)


async def _ask(c: RealtimeClient, tokens: int) -> int:
    """A text turn and a spoken reply to it; returns the event index it started at."""
    mark = len(c.events)
    await c.send({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "你好"}]}})
    await c.send({"type": "response.create", "response": {"max_output_tokens": tokens}})
    await c.wait_for("response.created", after=mark)
    return mark


async def test_readyz_is_503_while_the_server_is_full(server):
    async with _serving(server, max_sessions=1) as srv:
        c = await RealtimeClient.open(srv.port)
        await c.wait_for("session.created")
        r = await _get(srv.port, "/readyz")
        assert r.status_code == 503 and "full" in r.text and "sessions 1/1" in r.text
        metrics = (await _get(srv.port, "/metrics")).text
        assert "stepaudio_sessions_capacity 1.0" in metrics
        assert "stepaudio_sessions_active 1.0" in metrics
        await c.close()
        for _ in range(100):
            if (await _get(srv.port, "/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        assert (await _get(srv.port, "/readyz")).status_code == 200


async def test_connections_arriving_together_past_the_cap_get_http_503(server):
    async def attempt(port: int) -> object:
        try:
            return await connect(f"ws://127.0.0.1:{port}/v1/realtime")
        except InvalidStatus as exc:
            return exc.response.status_code

    async with _serving(server, max_sessions=2) as srv:
        results = await asyncio.gather(*(attempt(srv.port) for _ in range(6)))
        opened = [r for r in results if not isinstance(r, int)]
        assert len(opened) == 2 and sorted(r for r in results if isinstance(r, int)) == [503] * 4
        for ws in opened:  # the two admitted are real sessions, not closed with 1013
            assert '"session.created"' in await asyncio.wait_for(ws.recv(), 10)
            await ws.close()


async def test_a_drain_lets_the_turn_in_flight_finish_then_closes_with_1001(server):
    async with _serving(server) as srv:
        busy = await RealtimeClient.open(srv.port)
        idle = await RealtimeClient.open(srv.port)
        await busy.wait_for("session.created")
        await idle.wait_for("session.created")
        mark = await _ask(busy, 20)
        t0 = time.perf_counter()
        drain = asyncio.create_task(srv.drain(grace_s=30))
        # the idle session goes at once; the listener stays open and says why it refuses
        assert (await asyncio.wait_for(idle.closed, 5))[0] == 1001
        r = await _get(srv.port, "/readyz")
        assert r.status_code == 503 and "shutting down" in r.text
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
        assert info.value.response.status_code == 503
        assert "Retry-After" in info.value.response.headers
        assert "stepaudio_draining 1.0" in (await _get(srv.port, "/metrics")).text
        assert not busy.closed.done()
        # the busy one hears its whole reply, then the server closes it
        code, reason = await asyncio.wait_for(busy.closed, 30)
        assert code == 1001 and "shutting down" in reason
        done = [e for e in busy.events[mark:] if e["type"] == "response.done"]
        assert len(done) == 1 and done[0]["response"]["status"] in ("completed", "incomplete")
        await asyncio.wait_for(drain, 5)
        assert time.perf_counter() - t0 < 30


async def test_the_grace_ends_a_turn_that_runs_too_long(server):
    async with _serving(server) as srv:
        c, mark = await _busy(srv, 200)
        (session,) = srv.sessions
        assert turn_in_flight(session)
        t0 = time.perf_counter()
        await srv.drain(grace_s=0.3)
        code, _ = await asyncio.wait_for(c.closed, 5)
        assert code == 1001 and time.perf_counter() - t0 < 3.0
        done = [e for e in c.events[mark:] if e["type"] == "response.done"]
        assert [d["response"]["status"] for d in done] == ["cancelled"]


async def test_a_second_signal_cuts_the_grace_short(server):
    async with _serving(server) as srv:
        c, _ = await _busy(srv, 200)
        t0 = time.perf_counter()
        drain = asyncio.create_task(srv.drain(grace_s=60))
        await asyncio.sleep(0.2)
        assert not c.closed.done()
        srv.cut_grace()
        await asyncio.wait_for(drain, 5)
        assert (await asyncio.wait_for(c.closed, 5))[0] == 1001
        assert time.perf_counter() - t0 < 5
