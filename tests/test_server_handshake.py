"""The opening handshake: what is refused over plain HTTP before the upgrade (a foreign Host or
Origin, a missing key, no room), what must not break it (headers that appear twice), and what a
request that is not a handshake costs (one log line, no traceback)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
from typing import Any

import httpx
import pytest
from realtime_helpers import RealtimeClient, server_config
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def raw_handshake(port: int, headers: list[tuple[str, str]], path: str = "/v1/realtime",
                        host: str | None = None
                        ) -> tuple[int, dict[str, str], dict[str, Any] | None]:
    """A handshake written by hand (header lines exactly as given, repeats included); returns
    the status, the response headers and, after a 101, the first server event."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}",
                 "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
        lines += [f"{k}: {v}" for k, v in headers]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *rest = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        got = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in rest if ":" in line)}
        if status != 101:
            return status, got, None
        b0, b1 = await asyncio.wait_for(reader.readexactly(2), 10)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await reader.readexactly(8))[0]
        payload = await asyncio.wait_for(reader.readexactly(n), 10)
        return status, got, json.loads(payload) if b0 & 0x0F == 1 else None
    finally:
        writer.close()


@pytest.mark.parametrize("headers", [
    [("Sec-WebSocket-Protocol", "realtime"), ("Sec-WebSocket-Protocol", "openai-beta.realtime-v1")],
    [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")],
    [("Cookie", "a=1"), ("Cookie", "b=2")],
    [("OpenAI-Beta", "realtime=v1"), ("OpenAI-Beta", "assistants=v2")],
    [("Authorization", "Bearer one"), ("Authorization", "Bearer two")],
], ids=["subprotocol", "forwarded-for", "cookie", "openai-beta", "authorization"])
async def test_a_header_that_appears_twice_does_not_break_the_handshake(server, headers):
    status, got, first = await raw_handshake(server.port, headers)
    assert status == 101, got
    assert first is not None and first["type"] == "session.created"
    if headers[0][0] == "Sec-WebSocket-Protocol":
        assert got["sec-websocket-protocol"] == "realtime"
    if headers[0][0] == "OpenAI-Beta":  # the beta SDK's header still means beta
        assert first["session"]["object"] == "realtime.session"
        assert "input_audio_format" in first["session"]


async def _status(port: int, path: str, **headers: str) -> int:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"http://127.0.0.1:{port}{path}", headers=headers)).status_code


async def _ws_status(port: int, **kwargs: Any) -> int:
    """101 if the session opened, else the HTTP status of the refusal."""
    try:
        ws = await connect(f"ws://127.0.0.1:{port}/v1/realtime", **kwargs)
    except InvalidStatus as err:
        return err.response.status_code
    await ws.close()
    return 101


@pytest.mark.parametrize(("origin", "status"), [
    ("https://evil.example", 403),  # any page on the web
    ("null", 403),  # a sandboxed iframe or a file
    ("http://127.0.0.1:9", 101),  # the same host as the request (another port)
    ("http://localhost:3000", 101),  # a local development page
    ("https://app.example.com", 101),  # listed in allowed_origins
    ("https://APP.example.com:443", 101),  # the same origin, written differently
])
async def test_a_page_from_a_foreign_origin_is_refused_before_the_upgrade(server, origin, status):
    srv = Server(server_config(allowed_origins=["https://app.example.com"]), None,
                 stages=server.stages)
    await srv.start()
    await srv.load()
    try:
        assert await _ws_status(srv.port, origin=origin) == status
        assert await _ws_status(srv.port) == 101  # programs send no Origin
    finally:
        await srv.stop(grace_s=0.1)


async def test_a_dns_rebinding_host_is_refused_on_a_keyless_local_server(server, monkeypatch):
    srv = Server(server_config(), None, stages=server.stages)
    await srv.start()
    await srv.load()
    try:
        # attacker.example resolves to 127.0.0.1: the browser sends its name as the Host
        for path in ("/metrics", "/", "/v1/realtime"):
            assert await _status(srv.port, path, host="attacker.example:8700") == 403, path
        name = f"attacker.example:{srv.port}"
        status, _, _ = await raw_handshake(srv.port, [("Origin", f"http://{name}")], host=name)
        assert status == 403
        for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", f"[::1]:{srv.port}",
                     "app.localhost"):
            assert await _status(srv.port, "/metrics", host=host) == 200, host
    finally:
        await srv.stop(grace_s=0.1)
    # a server with a key is reached by name (a TLS proxy passing the Host on): any name
    monkeypatch.setenv("STEPAUDIO_TEST_KEY", "k")
    keyed = Server(server_config(api_key_env="STEPAUDIO_TEST_KEY"), None, stages=server.stages)
    listed = Server(server_config(allowed_hosts=[".example.com"]), None, stages=server.stages)
    for srv in (keyed, listed):
        await srv.start()
        await srv.load()
        try:
            assert await _status(srv.port, "/metrics", host="voice.example.com") == 200
            # the page it serves, through the proxy
            status, _, first = await raw_handshake(
                srv.port, [("Origin", "https://voice.example.com"),
                           ("Authorization", "Bearer k")], host="voice.example.com")
            assert status == 101 and first is not None and first["type"] == "session.created"
        finally:
            await srv.stop(grace_s=0.1)


async def test_listening_beyond_loopback_without_a_key_warns(server, caplog):
    srv = Server(server_config(host="0.0.0.0"), None, stages=server.stages)
    with caplog.at_level(logging.WARNING, logger="stepaudio.server"):
        await srv.start()
    await srv.load()
    try:
        assert any("without an API key" in r.getMessage() for r in caplog.records)
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://127.0.0.1:{srv.port}/readyz")
        assert r.status_code == 200 and "warning:" in r.text and "API key" in r.text
    finally:
        await srv.stop(grace_s=0.1)
    quiet = Server(server_config(), None, stages=server.stages)  # loopback: nothing to say
    assert quiet.warnings == []


@pytest.mark.parametrize("request_line", ["POST /v1/realtime HTTP/1.1",
                                          "GET /" + "a" * 10000 + " HTTP/1.1",
                                          "BREW /pot HTCPCP/1.0"])
async def test_a_request_that_is_not_a_handshake_costs_one_log_line(server, caplog,
                                                                     request_line):
    with caplog.at_level(logging.INFO):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(f"{request_line}\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(), 10)  # the server hangs up
        writer.close()
        await asyncio.sleep(0.1)
    mine = [r for r in caplog.records if "handshake" in r.getMessage()]
    assert len(mine) == 1, [r.getMessage() for r in mine]
    assert mine[0].levelno == logging.INFO and mine[0].exc_info is None
    assert len(mine[0].getMessage()) < 300
    # and the server still serves
    c = await RealtimeClient.open(server.port)
    await c.wait_for("session.created")
    await c.close()
