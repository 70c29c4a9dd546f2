"""The server process: HTTP routes, readiness, API keys, graceful shutdown, the configs, and the
official ``openai`` package's realtime client holding a turn."""

from __future__ import annotations

import asyncio
import base64

import httpx
import pytest
from realtime_helpers import (
    RealtimeClient,
    server_config,
    silence,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")

async def _get(port: int, path: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(f"http://127.0.0.1:{port}{path}")


async def test_http_routes(server):
    assert (await _get(server.port, "/healthz")).status_code == 200
    assert (await _get(server.port, "/readyz")).status_code == 200
    page = await _get(server.port, "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (await _get(server.port, "/no-such-page")).status_code == 404
    assert (await _get(server.port, "/../pyproject.toml")).status_code == 404
    metrics = await _get(server.port, "/metrics")
    assert metrics.status_code == 200
    for name in ("stepaudio_sessions_active", "stepaudio_stage_seconds_bucket",
                 "stepaudio_event_loop_lag_seconds_bucket", "stepaudio_ready 1.0",
                 "stepaudio_end_of_speech_to_first_audio_seconds"):
        assert name in metrics.text


async def test_readyz_is_503_until_models_are_warm(server):
    srv = Server(server_config(), None, stages=server.stages)
    await srv.start()
    try:
        r = await _get(srv.port, "/readyz")
        assert r.status_code == 503 and "not ready" in r.text
        # a session asked for too early is refused over HTTP, before the upgrade
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
        response = info.value.response
        assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
        assert b"not ready" in response.body
        await srv.load()
        assert (await _get(srv.port, "/readyz")).status_code == 200
    finally:
        await srv.stop(grace_s=0.1)


async def test_api_key_header_or_subprotocol(server, monkeypatch):
    monkeypatch.setenv("STEPAUDIO_TEST_KEY", "s3cret")
    cfg = server_config(api_key_env="STEPAUDIO_TEST_KEY")
    srv = Server(cfg, None, stages=server.stages)
    await srv.start()
    await srv.load()
    url = f"ws://127.0.0.1:{srv.port}/v1/realtime"
    try:
        for kwargs in ({}, {"additional_headers": {"Authorization": "Bearer wrong"}},
                       {"subprotocols": ["realtime", "openai-insecure-api-key.wrong"]}):
            with pytest.raises(InvalidStatus) as info:
                await connect(url, **kwargs)
            response = info.value.response
            assert response.status_code == 401 and b"API key" in response.body
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert not srv.sessions
        ws = await connect(url, additional_headers={"Authorization": "Bearer s3cret"})
        assert '"session.created"' in await ws.recv()
        await ws.close()
        # what browsers do (they cannot set headers): the key rides in a subprotocol
        ws = await connect(url, subprotocols=["realtime", "openai-insecure-api-key.s3cret",
                                              "openai-beta.realtime-v1"])
        assert ws.subprotocol == "realtime"
        assert '"session.created"' in await ws.recv()
        await ws.close()
    finally:
        await srv.stop(grace_s=0.1)


async def test_a_full_server_refuses_with_503_and_retry_after(server):
    srv = Server(server_config(max_sessions=1), None, stages=server.stages)
    await srv.start()
    await srv.load()
    try:
        first = await RealtimeClient.open(srv.port)
        await first.wait_for("session.created")
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
        response = info.value.response
        assert response.status_code == 503 and b"full" in response.body
        assert int(response.headers["Retry-After"]) > 0
        await first.close()
        for _ in range(100):  # the place is free again once the first session has closed
            if not srv.sessions:
                break
            await asyncio.sleep(0.02)
        second = await RealtimeClient.open(srv.port)
        await second.wait_for("session.created")
        await second.close()
        srv.state = "shutting down"  # draining: what #13's drain and SIGTERM look like
        refused = srv.capacity_refusal()
        assert refused is not None and refused.status_code == 503
        assert "Retry-After" in refused.headers and b"shutting down" in refused.body
        srv.state = "ready"
    finally:
        await srv.stop(grace_s=0.1)


async def test_shutdown_closes_sessions_with_1001(server):
    srv = Server(server_config(), None, stages=server.stages)
    await srv.start()
    await srv.load()
    c = await RealtimeClient.open(srv.port)
    await c.wait_for("session.created")
    await srv.stop(grace_s=0.2)
    code, reason = await asyncio.wait_for(c.closed, 5)
    assert code == 1001 and "shutting down" in reason
    with pytest.raises(OSError):
        await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")


async def test_openai_package_realtime_client_holds_a_turn(server, speech):
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="anything")
    connect_ = client.realtime  # the GA client (openai >= 2)
    types: list[str] = []
    audio = 0
    async with connect_.connect(model="step-audio-chat") as conn:
        await conn.session.update(session={"type": "realtime", "instructions": "Answer briefly.",
                                           "output_modalities": ["audio"]})
        pcm = silence(300) + speech + silence(1200)
        for i in range(0, len(pcm), 4800):  # 100 ms appends, three times real time
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 4800]).decode())
            await asyncio.sleep(0.033)
        async with asyncio.timeout(30):
            async for event in conn:
                types.append(event.type)
                if event.type == "response.output_audio.delta":
                    audio += len(base64.b64decode(event.delta))
                if event.type == "response.done":
                    assert event.response.status in ("completed", "incomplete")
                    break
    assert "session.updated" in types and "input_audio_buffer.speech_started" in types
    assert "response.created" in types and audio > 0
