"""docker-compose.yml for real: a private Docker engine (deploy/compose/),
the base images built from Debian's packages, carpool's image from the
project's Dockerfile, then ``docker compose up`` of the project's compose
file, and (``make compose-test``) the same file under ``docker stack deploy``
on a one-node swarm.

Under steady load through nginx, whose every answer is checked (label 0 for
the digit-zero body): ``docker kill`` of a replica, ``docker stop`` of
another, scaling out and in, a rolling update and a killed swarm task cost no
request. The module's engine, with every container, network, the swarm and
the engine's folder, is gone when the module ends, whatever happened.

``make test`` runs the short path (2 replicas, one kill, one stop,
Prometheus); CARPOOL_COMPOSE_FULL=1 (``make compose-test``) adds the rest.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from deploy.compose.engine import Engine, missing
from deploy.compose.images import build_bases, build_carpool
from deploy.compose.load import CheckedLoad
from deploy.compose.stack import ComposeStack, Stack, SwarmStack, wait_for
from deploy.local.load import BODY, PATH, SteadyLoad

MISSING = missing()
# Read once, at import, like every setting of this module.
FULL = os.environ.get("CARPOOL_COMPOSE_FULL") == "1"
FIGURES_FILE = os.environ.get("CARPOOL_COMPOSE_FIGURES")
REPLICAS = 3 if FULL else 2  # the compose file's own 3 in the long run
CLIENTS = 4
# Requests one load may send: the swarm's steps run for minutes (about 100/s).
LIMIT = 60_000
GRACE_PERIOD = 35  # docker-compose.yml's stop_grace_period
# Skipped on a machine without an engine; in CI (which installs one) a missing one fails.
pytestmark = [
    pytest.mark.skipif(
        bool(MISSING) and not os.environ.get("CI"),
        reason=f"needs {', '.join(MISSING)} (apt-get install docker.io debootstrap)",
    ),
    # The first test builds every image; the swarm's rolling update takes minutes.
    pytest.mark.timeout(3600),
]
T = TypeVar("T")
full_only = pytest.mark.skipif(not FULL, reason="make compose-test (CARPOOL_COMPOSE_FULL=1)")


class Figures:
    """What each step sent and lost, and how long the slow parts took:
    printed when the module ends, and kept as JSON (CARPOOL_COMPOSE_FIGURES)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.started = time.monotonic()

    def load(self, step: str, load: SteadyLoad, **more: Any) -> None:
        failed = len(load.failures)
        self.steps.append({"step": step, "sent": load.sent, "failed": failed, **more})

    async def nginx(self, stack: Stack, since: Counter[str]) -> None:
        """Adds to the last step what nginx's error log said during it."""
        said = await off(stack.nginx_events) - since
        self.steps[-1]["nginx"] = dict(sorted(said.items()))

    def took(self, step: str, seconds: float, **more: Any) -> None:
        self.steps.append({"step": step, "seconds": round(seconds, 1), **more})

    def lines(self) -> list[str]:
        total = round(time.monotonic() - self.started)
        return [json.dumps(step) for step in self.steps] + [f'{{"total_seconds": {total}}}']


@pytest.fixture(scope="module")
def figures(request: pytest.FixtureRequest) -> Iterator[Figures]:
    recorded = Figures()
    yield recorded
    lines = recorded.lines()
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():  # teardown output is captured
            reporter.write_line("")
            for line in ["compose test figures:", *lines]:
                reporter.write_line(line)
    if FIGURES_FILE:
        Path(FIGURES_FILE).write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, figures: Figures) -> Iterator[Engine]:
    with Engine() as running:
        started = time.monotonic()
        built = build_bases(running, tmp_path_factory.mktemp("bases"))
        figures.took("base images (debootstrap + import)", time.monotonic() - started, **built)
        started = time.monotonic()
        build_carpool(running, "1")
        figures.took("carpool image (docker build)", time.monotonic() - started)
        yield running


@pytest.fixture(scope="module")
def compose(engine: Engine, figures: Figures) -> Iterator[ComposeStack]:
    stack = ComposeStack(engine, "carpool-local/carpool:1")
    started = time.monotonic()
    try:
        stack.up(REPLICAS)
        figures.took(f"docker compose up --wait ({REPLICAS} replicas)", time.monotonic() - started)
        yield stack
    finally:
        stack.down()


async def off(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in a thread: the load's tasks run on while it blocks."""
    return await asyncio.to_thread(function, *args)


def every_replica_serving(stack: Stack) -> bool:
    """Each running replica has answered some of the load."""
    replicas = stack.replicas()
    return bool(replicas) and all(stack.served(replica) > 0 for replica in replicas)


def answers_right(url: str) -> bool:
    """One infer through nginx gets the right label (False while none answers)."""
    try:
        response = httpx.post(
            url + PATH, content=BODY, headers={"content-type": "application/json"}
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and response.json()["outputs"][0]["data"] == [0]


def restore(stack: ComposeStack, replicas: int) -> None:
    """Back to ``replicas`` healthy replicas (compose starts what was stopped)."""
    stack.up(replicas)
    wait_for(lambda: len(stack.replicas()) == replicas, f"{replicas} replicas running")


# docker compose


def test_compose_up_starts_every_replica_healthy_behind_nginx(compose: ComposeStack) -> None:
    replicas = compose.replicas()
    assert len(replicas) == REPLICAS
    assert all(compose.healthy(replica) for replica in replicas)
    assert answers_right(compose.url)


async def test_docker_kill_of_a_replica_under_load_fails_no_request(
    compose: ComposeStack, figures: Figures
) -> None:
    victim, *survivors = compose.replicas()
    said = compose.nginx_events()
    try:
        async with CheckedLoad(compose.url, clients=CLIENTS) as load:
            await load.answered(200)
            await off(wait_for, lambda: every_replica_serving(compose), "every replica serving")
            await off(compose.engine.run, "kill", victim.id)  # SIGKILL
            at_kill = {r.id: await off(compose.served, r) for r in survivors}
            await load.answered(600)
            carried = {r.id: await off(compose.served, r) - at_kill[r.id] for r in survivors}
        figures.load("docker kill of 1 replica", load, replicas=REPLICAS)
        await figures.nginx(compose, said)
        assert load.failures == [], await off(compose.nginx_errors)
        assert all(count > 0 for count in carried.values()), carried
    finally:
        restore(compose, REPLICAS)


async def test_docker_stop_of_a_replica_under_load_fails_no_request_and_it_drains_to_exit_0(
    compose: ComposeStack, figures: Figures
) -> None:
    victim = compose.replicas()[-1]
    (config,) = compose.engine.inspect(victim.id)
    # compose gave the container the file's grace period: `docker stop` waits that long.
    assert config["Config"]["StopTimeout"] == GRACE_PERIOD
    said = compose.nginx_events()
    try:
        async with CheckedLoad(compose.url, clients=CLIENTS) as load:
            await load.answered(200)
            await off(wait_for, lambda: compose.served(victim) > 0, "the victim serving")
            started = time.monotonic()
            # SIGTERM, and SIGKILL after the container's StopTimeout
            await off(compose.engine.run, "stop", victim.id)
            stopped_in = time.monotonic() - started
            await load.answered(300)
        (state,) = compose.engine.inspect(victim.id)
        figures.load("docker stop (SIGTERM) of 1 replica", load, exited_in_s=round(stopped_in, 1))
        await figures.nginx(compose, said)
        assert load.failures == [], await off(compose.nginx_errors)
        assert state["State"]["ExitCode"] == 0  # drained and exited itself: no SIGKILL
        logs = compose.engine.run("logs", victim.id).stderr
        assert "Application shutdown complete." in logs
    finally:
        restore(compose, REPLICAS)


async def test_prometheus_reports_the_batch_metrics_of_every_live_replica(
    compose: ComposeStack,
) -> None:
    # The earlier tests replaced containers: every one alive now, none gone.
    live = {replica.address for replica in await off(compose.replicas)}
    async with CheckedLoad(compose.url, clients=CLIENTS) as load:
        await load.answered(200)  # batches on every replica, the restarted ones too
        for query in (
            'carpool_batch_size_count{job="carpool", model="digits"} > 0',
            'carpool_queue_depth{job="carpool", model="digits"}',
            'up{job="carpool"} == 1',
        ):

            def found(query: str = query) -> bool:
                return compose.instances(query) == live

            assert await off(wait_for, found, query, 60) is True
    assert load.failures == [], await off(compose.nginx_errors)


@full_only
async def test_scaling_to_4_replicas_and_back_to_2_under_load_fails_no_request(
    compose: ComposeStack, figures: Figures
) -> None:
    before = {replica.id for replica in compose.replicas()}
    said = compose.nginx_events()
    async with CheckedLoad(compose.url, clients=CLIENTS) as load:
        await load.answered(200)
        await off(compose.up, 4)
        added = [r for r in await off(compose.replicas) if r.id not in before]
        assert len(added) == 4 - len(before)
        await off(wait_for, lambda: all(compose.served(r) > 0 for r in added), "the new serving")
        figures.load("docker compose up --scale carpool=4", load)
        await figures.nginx(compose, said)
        said = await off(compose.nginx_events)
        sent, failed = load.sent, len(load.failures)
        await off(compose.up, 2)
        await load.answered(300)
        assert len(await off(compose.replicas)) == 2
    figures.steps.append(
        {
            "step": "--scale carpool=2",
            "sent": load.sent - sent,
            "failed": len(load.failures) - failed,
        }
    )
    await figures.nginx(compose, said)
    assert load.failures == [], await off(compose.nginx_errors)
    live = {replica.address for replica in compose.replicas()}
    query = 'carpool_batch_size_count{job="carpool", model="digits"} and on (instance) up == 1'
    assert wait_for(lambda: compose.instances(query) == live, "Prometheus: the 2 left", 60) is True


# docker stack deploy


@pytest.fixture(scope="module")
def swarm(engine: Engine, compose: ComposeStack, figures: Figures) -> SwarmStack:
    compose.down()  # one stack at a time on this machine's 2 cores
    engine.swarm_init()
    stack = SwarmStack(engine, "carpool-local/carpool:1")
    started = time.monotonic()
    stack.deploy()
    converged = wait_for(stack.converged, "the stack's services converged", timeout=600)
    figures.took("docker stack deploy, converged", time.monotonic() - started, **converged)
    wait_for(lambda: answers_right(stack.url), "nginx answering on its published port")
    return stack  # the engine's close() leaves the swarm


@full_only
def test_stack_deploy_runs_every_replica_of_the_file(swarm: SwarmStack) -> None:
    assert len(swarm.replicas()) == 3  # docker-compose.yml's deploy.replicas
    assert answers_right(swarm.url)


@full_only
async def test_a_rolling_update_under_load_fails_no_request(
    swarm: SwarmStack, engine: Engine, figures: Figures
) -> None:
    # The Dockerfile again, from the build cache: the same layers under a new tag,
    # which the service spec names, so swarm replaces every task.
    image = await off(build_carpool, engine, "2")
    said = await off(swarm.nginx_events)
    async with CheckedLoad(swarm.url, clients=CLIENTS, limit=LIMIT) as load:
        await load.answered(200)
        started = time.monotonic()
        await off(
            engine.run,
            *("service", "update", "--detach=false", "--no-resolve-image"),
            *("--image", image),
            swarm.service("carpool"),
        )
        updated_in = time.monotonic() - started
        await load.answered(300)
    figures.load("docker service update --image (rolling)", load, took_s=round(updated_in, 1))
    await figures.nginx(swarm, said)
    assert load.failures == [], await off(swarm.nginx_errors)
    images = {c["Config"]["Image"] for c in swarm.containers("carpool") if c["State"]["Running"]}
    assert images == {image}


@full_only
async def test_a_killed_task_is_replaced_and_no_request_fails(
    swarm: SwarmStack, engine: Engine, figures: Figures
) -> None:
    victim = swarm.replicas()[0]
    said = swarm.nginx_events()
    async with CheckedLoad(swarm.url, clients=CLIENTS, limit=LIMIT) as load:
        await load.answered(200)
        await off(engine.run, "kill", victim.id)
        await load.answered(300)

        def replaced() -> set[str]:
            ids = {replica.id for replica in swarm.replicas()}
            return ids if len(ids) == 3 and victim.id not in ids and swarm.converged() else set()

        await off(wait_for, replaced, "a new task in the killed one's place", 300)
        await load.answered(200)
    figures.load("docker kill of a swarm task", load)
    await figures.nginx(swarm, said)
    assert load.failures == [], await off(swarm.nginx_errors)
