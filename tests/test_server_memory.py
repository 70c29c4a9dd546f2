"""A closed session's memory is given back when it closes, not when the cycle collector next
runs (a session's objects point at each other, so reference counting alone cannot free them
unless the session lets go of its history itself)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from realtime_helpers import RealtimeClient, server_config

from server.app import Server

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_a_closed_sessions_history_is_freed_at_close(server):
    srv = Server(server_config(max_event_bytes=4 * 1024 * 1024,
                               max_send_queue_bytes=8 * 1024 * 1024), None, stages=server.stages)
    await srv.start()
    await srv.load()
    gc.disable()  # only reference counting may free it
    try:
        c = await RealtimeClient.open(srv.port)
        await c.wait_for("session.created")
        for i in range(3):
            mark = len(c.events)
            await c.send({"type": "conversation.item.create", "item": {
                "id": f"big_{i}", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": f"{i}" * 1_000_000}]}})
            await c.wait_for("conversation.item.done", after=mark)
        await c.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "你好"}]}})
        mark = len(c.events)
        await c.send({"type": "response.create", "response": {"max_output_tokens": 4}})
        await c.wait_for("response.done", after=mark, timeout=60)
        (session,) = srv.sessions
        held = [weakref.ref(t) for t in session.conversation.context]
        held += [weakref.ref(r) for r in session.conversation.replies.values()]
        assert len(held) == 6  # 4 items, the reply and its history turn
        await c.close()
        for _ in range(200):
            if not srv.sessions:
                break
            await asyncio.sleep(0.02)
        del session
        assert not srv.sessions
        alive = [r() for r in held if r() is not None]
        assert not alive, f"{len(alive)} of the closed session's items/replies still in memory"
    finally:
        gc.enable()
        await srv.stop(grace_s=0.1)
