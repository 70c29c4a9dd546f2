"""The server inside a real deployment on loopback: HAProxy (leastconn, health check on /readyz) in
front of two `stepaudio serve` processes sharing two chat endpoints (real processes serving the
tiny checkpoint over the OpenAI API). The scenarios are in ``tests/deployment.py``: sessions spread,
a full server receives no new sessions, a chat endpoint killed mid-turn fails that turn only, a
server killed sends its clients to the other one while the other's sessions notice nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from deployment import HAPROXY, Deployment, run_scenarios

pytestmark = [
    pytest.mark.asyncio(loop_scope="function"),
    pytest.mark.skipif(HAPROXY is None, reason="haproxy not installed (apt-get install haproxy)"),
]


async def test_deployment_behind_haproxy_survives_full_and_killed_parts(tiny_root: Path,
                                                                         tmp_path: Path):
    logging.getLogger("httpx").setLevel(logging.WARNING)
    dep = Deployment(tiny_root, tmp_path)
    try:
        await dep.start()
        seen = await run_scenarios(dep)
    finally:
        dep.stop()
    assert seen["killed_server_clients_closed_with"]  # the killed server had clients
    assert seen["next_turn_after_endpoint_kill"] in ("completed", "incomplete")
