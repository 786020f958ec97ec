"""The project's docker-compose.yml, run for real on a private engine:
``ComposeStack`` with ``docker compose``, ``SwarmStack`` with ``docker stack
deploy`` on a one-node swarm. Both read the same two files: the project's
compose file and deploy/compose/docker-compose.local.yml, which swaps the
nginx and Prometheus image names for the ones built here.

Clients reach nginx on its published port on 127.0.0.1. The replicas and
Prometheus publish nothing, as in production: the harness reads their HTTP
APIs from inside their own containers (``docker exec``): each replica's
``/metrics`` with its Python, Prometheus's query API with its ``promtool``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client.parser import text_string_to_metric_families

from deploy.compose.engine import Engine
from deploy.local.topology import free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
OVERRIDE_FILE = Path(__file__).resolve().parent / "docker-compose.local.yml"
# Grafana has no image here; everything else of the file runs.
SERVICES = ("carpool", "nginx", "prometheus")
T = TypeVar("T")
# What nginx's error log says about its tries of the replicas, by kind.
NGINX_EVENTS = {
    "(111: Connection refused)": "refused",
    "(104: Connection reset by peer)": "reset",
    "prematurely closed connection": "closed",
    "(110: Connection timed out)": "timed out",
    "no live upstreams": "no live upstreams",
}
_READ_METRICS = (
    "import sys, urllib.request as u; "
    "sys.stdout.write(u.urlopen('http://127.0.0.1:8000/metrics', timeout=5).read().decode())"
)


@dataclass(frozen=True)
class Replica:
    """One running carpool container."""

    id: str
    name: str
    address: str  # ip:8000 on the stack's network, as Prometheus names it


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 180.0) -> T:
    """Polls ``check()`` until it returns something truthy, which it returns."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.5)


class Stack:
    """What both ways of running the file share: the engine, the variables
    the compose file reads, the published nginx port, Prometheus's API."""

    def __init__(self, engine: Engine, image: str, project: str) -> None:
        self.engine = engine
        self.project = project
        self.http_port = free_port()
        engine.variables.update(
            {
                "CARPOOL_IMAGE": image,
                "CARPOOL_HTTP_PORT": str(self.http_port),
                # Several replicas share this machine's 2 cores.
                "CARPOOL_TORCH_THREADS": "1",
            }
        )

    @property
    def url(self) -> str:
        """nginx, where clients go."""
        return f"http://127.0.0.1:{self.http_port}"

    def containers(self, service: str) -> list[dict[str, Any]]:
        raise NotImplementedError

    def replicas(self) -> list[Replica]:
        """The running carpool containers."""
        network = f"{self.project}_backend"
        found = []
        for container in self.containers("carpool"):
            backend = container["NetworkSettings"]["Networks"].get(network)
            if container["State"]["Running"] and backend is not None:
                name = container["Name"].lstrip("/")
                found.append(Replica(container["Id"], name, f"{backend['IPAddress']}:8000"))
        return found

    def healthy(self, replica: Replica) -> bool:
        (container,) = self.engine.inspect(replica.id)
        return bool(container["State"].get("Health", {}).get("Status") == "healthy")

    def served(self, replica: Replica, model: str = "digits") -> float:
        """carpool_requests_total{model, outcome="ok"} as ``replica`` counts it
        (-1 when it does not answer)."""
        done = self.engine.run("exec", replica.id, "python", "-c", _READ_METRICS, check=False)
        if done.returncode != 0:
            return -1.0
        for family in text_string_to_metric_families(done.stdout):
            for sample in family.samples:
                if sample.name == "carpool_requests_total" and sample.labels == {
                    "model": model,
                    "outcome": "ok",
                }:
                    return sample.value
        return 0.0

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        """An instant query's result, through Prometheus's HTTP API."""
        (container,) = [c for c in self.containers("prometheus") if c["State"]["Running"]]
        done = self.engine.run(
            *("exec", container["Id"], "promtool", "query", "instant", "-o", "json"),
            *("http://127.0.0.1:9090", query),
            check=False,
        )
        if done.returncode != 0:
            return []
        result: list[dict[str, Any]] = json.loads(done.stdout)
        return result

    def nginx_errors(self, lines: int = 30) -> str:
        """nginx's last error-log lines about the replicas and their names
        (why a request failed)."""
        said = self._nginx_log()
        return "\n".join(
            [line for line in said if "upstream" in line or "resolve" in line][-lines:]
        )

    def nginx_events(self) -> Counter[str]:
        """How many times nginx's error log has said each of NGINX_EVENTS."""
        said = self._nginx_log()
        return Counter(
            {kind: sum(text in line for line in said) for text, kind in NGINX_EVENTS.items()}
        )

    def _nginx_log(self) -> list[str]:
        # nginx's error log is the container's stderr.
        (nginx,) = [c for c in self.containers("nginx") if c["State"]["Running"]]
        return self.engine.run("logs", nginx["Id"], check=False).stderr.splitlines()

    def instances(self, query: str) -> set[str]:
        """The ``instance`` labels of the series ``query`` finds."""
        return {series["metric"]["instance"] for series in self.prometheus(query)}


class ComposeStack(Stack):
    """``docker compose -p PROJECT`` with the project's file and the override."""

    def __init__(self, engine: Engine, image: str, project: str = "carpool-test") -> None:
        super().__init__(engine, image, project)
        self.files = ["-f", str(COMPOSE_FILE), "-f", str(OVERRIDE_FILE)]
        self.files += ["--project-directory", str(ROOT), "-p", project]

    def compose(self, *args: str, timeout: float = 600) -> str:
        return self.engine.compose(self.files, *args, timeout=timeout)

    def up(self, replicas: int) -> None:
        """``docker compose up -d --wait`` with ``replicas`` carpool replicas:
        returns when every container with a health check is healthy."""
        self.compose(
            *("up", "-d", "--wait", "--no-recreate", "--scale", f"carpool={replicas}"),
            *SERVICES,
        )

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "30")

    def containers(self, service: str) -> list[dict[str, Any]]:
        ids = self.compose("ps", "-a", "-q", service).split()
        return self.engine.inspect(*ids) if ids else []


class SwarmStack(Stack):
    """``docker stack deploy`` of the same files on a one-node swarm.

    Swarm publishes nginx's port through its ingress routing mesh, which
    needs the iptables rules this engine does not write: nothing listens on
    the published port here. Clients go to nginx at its address on
    docker_gwbridge, the bridge on this machine that every swarm task is
    attached to (``url``)."""

    def __init__(self, engine: Engine, image: str, project: str = "carpool") -> None:
        super().__init__(engine, image, project)

    def deploy(self) -> None:
        self.engine.run(
            *("stack", "deploy", "--resolve-image", "never", "--prune"),
            *("-c", str(COMPOSE_FILE), "-c", str(OVERRIDE_FILE), self.project),
        )
        # No Grafana image here: its tasks could never start.
        self.engine.run("service", "rm", self.service("grafana"))

    def service(self, name: str) -> str:
        return f"{self.project}_{name}"

    @property
    def url(self) -> str:
        (nginx,) = [c for c in self.containers("nginx") if c["State"]["Running"]]
        (bridge,) = self.engine.inspect("docker_gwbridge")
        address = bridge["Containers"][nginx["Id"]]["IPv4Address"].partition("/")[0]
        return f"http://{address}:80"

    def converged(self) -> dict[str, str]:
        """Service -> "running/desired" once every service of SERVICES runs
        all its replicas; an empty dict before."""
        lines = self.engine.out("service", "ls", "--format", "{{.Name}} {{.Replicas}}")
        counts = dict(line.split(" ", 1) for line in lines.splitlines())
        found = {name: counts.get(self.service(name), "0/1") for name in SERVICES}
        for replicas in found.values():
            running, _, desired = replicas.partition(" ")[0].partition("/")
            if running != desired:
                return {}
        return found

    def containers(self, service: str) -> list[dict[str, Any]]:
        label = f"label=com.docker.swarm.service.name={self.service(service)}"
        ids = self.engine.out("ps", "-q", "--filter", label).split()
        return self.engine.inspect(*ids) if ids else []
