"""A pool of OpenAI-compatible endpoints: conversations stick to one replica, a failed replica is
taken out (the request that saw the failure fails cleanly, the next one goes elsewhere) and comes
back once its health check passes.

The endpoints are small scripted HTTP servers on loopback (real sockets, real connection refusals
and resets), so the pool's behaviour is seen through the real HTTP client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator

import pytest
from openai_server import _read_request as read_request

from server.metrics import Metrics
from stepaudio.config import config_from_dict, endpoint_urls
from stepaudio.errors import ConfigError
from stepaudio.llm.engine import EngineUnavailable, SamplingParams
from stepaudio.llm.engine_openai import OpenAIEngine
from stepaudio.llm.pool import CONVERSATION, EndpointPool

PARAMS = SamplingParams(max_new_tokens=4, temperature=0.0)


class ScriptedEndpoint:
    """Streams three text chunks per completion; ``healthy`` decides /health; ``reset_after``
    breaks the next stream with a TCP reset after that many chunks."""

    def __init__(self) -> None:
        self.healthy = True
        self.reset_after: int | None = None
        self.completions = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, port: int = 0) -> ScriptedEndpoint:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, path, body = await read_request(reader)
            if path == "/health":
                status = "200 OK" if self.healthy else "503 Service Unavailable"
                writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n"
                             "Connection: close\r\n\r\n".encode())
            elif method == "POST" and path == "/v1/completions":
                json.loads(body)
                self.completions += 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Connection: close\r\n\r\n")
                for i in range(3):
                    if self.reset_after is not None and i >= self.reset_after:
                        self.reset_after = None
                        await writer.drain()
                        sock = writer.get_extra_info("socket")
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                        writer.transport.abort()
                        return
                    chunk = {"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}]}
                    writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.01)
                done = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 3,
                                  "prompt_tokens_details": {"cached_tokens": 4}}}
                writer.write(f"data: {json.dumps(done)}\n\ndata: [DONE]\n\n".encode())
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(urls: list[str], **kw) -> OpenAIEngine:
    kw.setdefault("connect_retries", 0)
    kw.setdefault("health_check_interval_s", 0.1)
    return OpenAIEngine(urls, "m", dialect="openai", read_timeout_s=5, **kw)


async def _ask(engine: OpenAIEngine, conversation: str | None) -> str:
    """One request as a reply of ``conversation`` makes it; returns the endpoint it went to."""
    token = CONVERSATION.set(conversation)
    try:
        gen = engine.generate("hello", PARAMS)
    finally:
        CONVERSATION.reset(token)
    text, _ = await gen.collect()
    assert text == "t0 t1 t2 "
    return gen.endpoint.url  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def _pair(**kw) -> AsyncIterator[tuple[OpenAIEngine, ScriptedEndpoint, ScriptedEndpoint]]:
    """Two live endpoints and an engine whose pool is them; all closed afterwards."""
    a, b = await ScriptedEndpoint().start(), await ScriptedEndpoint().start()
    engine = _engine([a.url, b.url], **kw)
    try:
        yield engine, a, b
    finally:
        await engine.aclose()
        await a.stop()
        await b.stop()


def _key_homed_at(pool: EndpointPool, url: str) -> str:
    return next(k for k in (f"sess_{i}" for i in range(1000)) if pool.home(k).url == url)


async def test_a_conversation_sticks_to_one_endpoint_and_conversations_spread():
    async with _pair() as (engine, a, b):
        homes = {}
        for i in range(12):
            key = f"sess_{i}"
            seen = {await _ask(engine, key) for _ in range(3)}
            assert len(seen) == 1, f"{key} moved between endpoints: {seen}"
            homes[key] = seen.pop()
            assert homes[key] == engine.pool.home(key).url
        assert set(homes.values()) == {a.url, b.url}  # both carry conversations
        assert a.completions + b.completions == 36


async def test_a_refused_connection_moves_the_request_to_the_next_endpoint_at_once():
    live = await ScriptedEndpoint().start()
    dead = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    engine = _engine([dead, live.url], connect_retries=3)
    try:
        key = _key_homed_at(engine.pool, dead)
        t0 = time.perf_counter()
        assert await _ask(engine, key) == live.url
        assert time.perf_counter() - t0 < 1.0  # no backoff: the request never reached the dead one
        down = next(e for e in engine.pool if e.url == dead)
        assert not down.up and down.failures == 1
        assert await _ask(engine, key) == live.url  # and it stays out of the way
    finally:
        await engine.aclose()
        await live.stop()


async def test_a_stream_dropped_mid_reply_fails_that_request_and_the_next_goes_elsewhere():
    async with _pair(health_check_interval_s=60) as (engine, a, b):  # no probe puts it back here
        key = _key_homed_at(engine.pool, a.url)
        assert await _ask(engine, key) == a.url
        a.reset_after = 1
        with pytest.raises(EngineUnavailable, match="dropped the stream"):
            await _ask(engine, key)
        assert not next(e for e in engine.pool if e.url == a.url).up
        assert await _ask(engine, key) == b.url  # the conversation continues on the other one
        other = _key_homed_at(engine.pool, b.url)
        assert await _ask(engine, other) == b.url  # b's own conversations did not move


async def test_an_endpoint_failing_its_health_check_is_taken_out_and_comes_back():
    async with _pair(health_check_interval_s=0.05) as (engine, a, b):
        ep_a = next(e for e in engine.pool if e.url == a.url)
        key = _key_homed_at(engine.pool, a.url)
        assert await _ask(engine, key) == a.url  # starts the probe in this loop
        a.healthy = False
        for _ in range(100):
            if not ep_a.up:
                break
            await asyncio.sleep(0.02)
        assert not ep_a.up and "HTTP 503" in ep_a.reason
        assert await _ask(engine, key) == b.url
        a.healthy = True
        for _ in range(100):
            if ep_a.up:
                break
            await asyncio.sleep(0.02)
        assert ep_a.up
        assert await _ask(engine, key) == a.url  # home again (its prefix cache is there)


async def test_with_every_endpoint_out_requests_still_try_them():
    a = await ScriptedEndpoint().start()
    b_port = _free_port()
    engine = _engine([a.url, f"http://127.0.0.1:{b_port}/v1"], health_check_interval_s=60)
    try:
        for ep in engine.pool:
            engine.pool.mark_down(ep, "stale verdict")
        assert await _ask(engine, "sess_x") == a.url
        assert next(e for e in engine.pool if e.url == a.url).up
    finally:
        await engine.aclose()
        await a.stop()


async def test_every_endpoint_refusing_fails_cleanly_after_the_retries():
    urls = [f"http://127.0.0.1:{_free_port()}/v1" for _ in range(2)]
    engine = _engine(urls, connect_retries=1)
    engine.retry_backoff_s = 0.01
    try:
        with pytest.raises(EngineUnavailable, match="any of 2 endpoints"):
            await _ask(engine, "sess_y")
    finally:
        await engine.aclose()


async def test_requests_of_no_conversation_go_to_the_least_busy_endpoint():
    async with _pair() as (engine, a, b):
        await asyncio.gather(*(_ask(engine, None) for _ in range(8)))
        assert a.completions >= 2 and b.completions >= 2


async def test_metrics_show_each_endpoint_and_its_cache_hits():
    async with _pair() as (engine, a, b):
        metrics = Metrics()
        metrics.backends.pools = {"chat": engine.pool}
        await _ask(engine, _key_homed_at(engine.pool, a.url))
        engine.pool.mark_down(next(e for e in engine.pool if e.url == b.url), "test")
        text = metrics.render().decode()
        assert f'stepaudio_backend_up{{endpoint="{a.url}",pool="chat"}} 1.0' in text
        assert f'stepaudio_backend_up{{endpoint="{b.url}",pool="chat"}} 0.0' in text
        assert f'stepaudio_backend_requests_total{{endpoint="{a.url}",pool="chat"}} 1.0' in text
        assert (f'stepaudio_backend_cached_prompt_tokens_total{{endpoint="{a.url}",pool="chat"}}'
                ' 4.0') in text


def test_endpoint_lists_in_the_config():
    cfg = config_from_dict({"llm": {"base_url": ["http://a:8000/v1", "http://b:8000/v1/"]},
                            "tts": {"base_url": "http://a:8001/v1, http://b:8001/v1"}})
    assert endpoint_urls(cfg.llm.base_url) == ["http://a:8000/v1", "http://b:8000/v1"]
    assert endpoint_urls(cfg.tts.base_url) == ["http://a:8001/v1", "http://b:8001/v1"]
    for bad, why in ((["http://a/v1", "http://a/v1/"], "listed twice"), ("a:8000", "not an http"),
                     ([], "no endpoint")):
        with pytest.raises(ConfigError, match=why):
            config_from_dict({"llm": {"base_url": bad}})
