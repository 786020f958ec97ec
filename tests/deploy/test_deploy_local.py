"""The compose topology, proven on loopback (deploy/local/topology.py): three
carpool replicas behind Debian's nginx running deploy/nginx/nginx.conf, and
Debian's Prometheus running deploy/prometheus/prometheus.yml.

Under steady load through nginx, a replica killed with SIGKILL, one stopped
with SIGTERM and one restarted cost no client a failed request. Each test
that stops a replica starts it again before it ends.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from deploy.local.load import BODY, PATH, SteadyLoad
from deploy.local.topology import Topology, find
from tests.servers import ROOT

MISSING = [binary for binary in ("nginx", "prometheus") if find(binary) is None]
# Skipped on a machine without them; in CI (which installs them) a missing one fails.
pytestmark = pytest.mark.skipif(
    bool(MISSING) and not os.environ.get("CI"),
    reason=f"{' and '.join(MISSING)} not installed (apt-get install nginx prometheus)",
)

DRAIN_TIMEOUT = 10.0
GRACE_PERIOD = DRAIN_TIMEOUT + 5  # what compose's stop_grace_period gives on top of the drain
CLIENTS = 4  # the load's clients, so at most 4 answers in flight at any snapshot


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    models = tmp_path_factory.mktemp("models")
    (models / "digits").symlink_to(ROOT / "weights" / "digits")  # fast to load
    workdir = tmp_path_factory.mktemp("topology")
    with Topology(workdir, models, replicas=3, drain_timeout=DRAIN_TIMEOUT) as running:
        yield running


async def eventually(check: Any, what: str, timeout: float = 30.0) -> Any:
    """Polls ``check()`` (run in a thread) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(check)
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.2)


def served(topology: Topology, index: int) -> float:
    return topology.requests_answered(index, "digits")


async def restore(topology: Topology, index: int) -> None:
    process = topology.replicas[index].process
    if process is not None and process.poll() is None:
        return
    await asyncio.to_thread(topology.start_replica, index)


def access_lines(topology: Topology, request_id: str) -> list[dict[str, Any]]:
    lines = []
    for replica in topology.replicas:
        for line in replica.access_log.read_bytes().splitlines():
            record = orjson.loads(line)
            if record["request_id"] == request_id:
                lines.append(record)
    return lines


async def test_prometheus_scrapes_batch_size_and_queue_depth_of_every_replica(
    topology: Topology,
) -> None:
    replicas = {replica.address for replica in topology.replicas}

    def instances(query: str) -> set[str]:
        response = httpx.get(f"{topology.prometheus_url}/api/v1/query", params={"query": query})
        return {series["metric"]["instance"] for series in response.json()["data"]["result"]}

    for query in (
        'carpool_batch_size_count{job="carpool", model="digits"}',
        'carpool_batch_size_bucket{job="carpool", model="digits", le="+Inf"}',
        'carpool_queue_depth{job="carpool", model="digits"}',
        'carpool_queue_seconds_count{job="carpool", model="digits"}',
        'up{job="carpool"} == 1',
    ):
        assert await eventually(lambda q=query: instances(q) == replicas, query) is True


async def test_nginx_passes_the_client_request_id_to_the_replica_and_back(
    topology: Topology,
) -> None:
    sent = f"deploy-{uuid.uuid4()}"
    async with httpx.AsyncClient(base_url=topology.url) as http:
        response = await http.post(PATH, content=BODY, headers={"x-request-id": sent})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == sent
    (line,) = await eventually(lambda: access_lines(topology, sent), "the replica's log line")
    assert line["model"] == "digits"
    assert line["status"] == 200
    assert line["batch_size"] >= 1


async def test_nginx_makes_up_a_request_id_that_the_replica_logs(topology: Topology) -> None:
    async with httpx.AsyncClient(base_url=topology.url) as http:
        response = await http.post(PATH, content=BODY)
    made_up = response.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made_up)
    (line,) = await eventually(lambda: access_lines(topology, made_up), "the replica's log line")
    assert line["path"] == PATH


async def test_kill_9_of_a_replica_under_load_fails_no_request_and_the_survivors_carry_it(
    topology: Topology,
) -> None:
    victim, survivors = 0, (1, 2)
    try:
        async with SteadyLoad(topology.url, clients=CLIENTS) as load:
            await load.answered(200)
            before = {i: served(topology, i) for i in range(3)}
            await eventually(
                lambda: all(served(topology, i) > before[i] for i in range(3)),
                "every replica serving",
            )
            topology.signal(victim, signal.SIGKILL)
            assert await asyncio.to_thread(topology.wait_exit, victim, 10) == -signal.SIGKILL
            at_kill = {i: served(topology, i) for i in survivors}
            done_at_kill = load.done
            await load.answered(600)
            answered_since = load.done - done_at_kill
            carried = {i: served(topology, i) - at_kill[i] for i in survivors}
        assert load.failures == []
        assert all(count > 0 for count in carried.values()), carried
        assert sum(carried.values()) >= answered_since - 2 * CLIENTS, (carried, answered_since)
    finally:
        await restore(topology, victim)


async def test_sigterm_of_a_replica_under_load_fails_no_request_and_it_exits_within_its_grace_period(
    topology: Topology,
) -> None:
    victim = 1
    try:
        async with SteadyLoad(topology.url, clients=CLIENTS) as load:
            await load.answered(200)
            await eventually(lambda: served(topology, victim) > 0, "the victim serving")
            topology.signal(victim, signal.SIGTERM)
            code = await asyncio.to_thread(topology.wait_exit, victim, GRACE_PERIOD)
            await load.answered(300)
        assert load.failures == []
        assert code == 0  # drained and exited by itself, not killed
        assert "Application shutdown complete." in topology.log_tail(victim)
    finally:
        await restore(topology, victim)


async def test_a_restarted_replica_rejoins_and_receives_traffic(topology: Topology) -> None:
    victim = 2
    try:
        async with SteadyLoad(topology.url, clients=CLIENTS) as load:
            await load.answered(100)
            topology.signal(victim, signal.SIGTERM)
            await asyncio.to_thread(topology.wait_exit, victim, GRACE_PERIOD)
            await load.answered(100)
            await asyncio.to_thread(topology.start_replica, victim)
            # A new process: all it has counted, it served since it rejoined.
            await eventually(lambda: served(topology, victim) >= 50, "the restarted replica")
        assert load.failures == []
    finally:
        await restore(topology, victim)
