"""The compose topology without Docker, on loopback: carpool replicas, nginx
in front of them and Prometheus scraping them.

The configuration is not written twice: nginx runs deploy/nginx/nginx.conf
and Prometheus deploy/prometheus/prometheus.yml, each rendered for loopback
ports by ``render_nginx`` and ``render_prometheus``, which change only what
Docker's network provides (addresses, discovery) and where files go. Each
rewrite checks that the part it rewrites is there, so the template and this
harness cannot drift apart silently.

Everything binds 127.0.0.1 and lives in one work folder; ``close()`` stops
every process it started, by PID. By hand, from the repository root::

    python -m deploy.local.topology --models weights     # Ctrl-C stops it all
"""

from __future__ import annotations

import argparse
import getpass
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
STARTUP_SECONDS = 120.0
STOP_SECONDS = 30.0

_UPSTREAM = re.compile(r"(upstream carpool \{\n)(.*?)(\n    \})", re.DOTALL)
_SERVER = re.compile(r"^(\s*)server\s+\S+((?:\s+[^;\s]+)*);$", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*)listen\s+80;$", re.MULTILINE)
_USER = re.compile(r"^user\s+[^;]+;\n", re.MULTILINE)
_HTTP = re.compile(r"^http \{\n", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_nginx(template: str, upstreams: list[str], listen: str, workdir: Path) -> str:
    """deploy/nginx/nginx.conf for replicas at ``upstreams`` (host:port),
    listening on ``listen`` (host:port), with every file under ``workdir``."""
    upstream = _UPSTREAM.search(template)
    servers = list(_SERVER.finditer(upstream.group(2))) if upstream else []
    if upstream is None or len(servers) != 1:
        raise ValueError("nginx.conf must have `upstream carpool { ... }` with one server line")
    indent, parameters = servers[0].group(1), servers[0].group(2)
    parameters = " ".join(p for p in parameters.split() if p != "resolve")
    lines = "\n".join(f"{indent}server {address} {parameters};" for address in upstreams)
    body = upstream.group(2)
    body = body[: servers[0].start()] + lines + body[servers[0].end() :]
    config = template[: upstream.start(2)] + body + template[upstream.end(2) :]

    config, listens = _LISTEN.subn(rf"\g<1>listen {listen};", config)
    config, users = _USER.subn(_user_line(), config)
    temp = "".join(f"    {name}_temp_path {workdir / name};\n" for name in _TEMP_PATHS)
    config, https = _HTTP.subn(lambda match: match.group(0) + temp, config)
    if (listens, users, https) != (1, 1, 1) or "/var/log/nginx/" not in config:
        raise ValueError("nginx.conf must have one `user`, `http {`, `listen 80;` and logs")
    return config.replace("/var/log/nginx/", f"{workdir}/")


def _user_line() -> str:
    # As root, nginx's workers would run as `nobody`, who cannot reach a
    # private work folder: run them as the user who runs this. Otherwise the
    # directive means nothing, and nginx warns about it.
    return f"user {getpass.getuser()};\n" if os.geteuid() == 0 else ""


def render_prometheus(template: str, targets: list[str], scrape_interval: str) -> str:
    """deploy/prometheus/prometheus.yml scraping ``targets`` (host:port)
    every ``scrape_interval``, in place of DNS discovery."""
    config: dict[str, Any] = yaml.safe_load(template)
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "carpool"]
    if len(jobs) != 1 or "dns_sd_configs" not in jobs[0]:
        raise ValueError("prometheus.yml must have a `carpool` job with dns_sd_configs")
    job = jobs[0]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": targets}]
    job["scrape_interval"] = job["scrape_timeout"] = scrape_interval
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = scrape_interval
    return yaml.safe_dump(config, sort_keys=False)


def find(binary: str) -> str | None:
    """Where ``binary`` is: on PATH, else in the sbin folders Debian puts
    nginx in (a user's PATH may lack them)."""
    return shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/sbin")


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a replica
    restarts on its port, and an outgoing connection may take any port of
    that range in between (then the restart could not bind)."""
    low = 32768
    with suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = list(range(max(1024, low - 20_000), low))
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as probe:  # no luck below the range: let the kernel pick
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET ``url``: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except OSError:
        return 0, b""


@dataclass
class Replica:
    """One carpool process on a fixed loopback port (the same across restarts,
    as nginx's upstream lists it)."""

    index: int
    port: int
    log: Path  # stderr: uvicorn's and carpool's log
    access_log: Path  # stdout: the JSON access lines
    process: subprocess.Popen[bytes] | None = None
    files: list[IO[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


class Topology:
    """``replicas`` carpool processes, nginx and Prometheus, all on loopback."""

    def __init__(
        self,
        workdir: Path,
        models_dir: Path,
        replicas: int = 3,
        drain_timeout: float = 10.0,
        scrape_interval: str = "1s",
    ) -> None:
        self.workdir = workdir
        self.models_dir = models_dir
        self.drain_timeout = drain_timeout
        self.scrape_interval = scrape_interval
        ports: list[int] = []
        while len(ports) < replicas + 2:
            if (port := free_port()) not in ports:
                ports.append(port)
        self.replicas = [
            Replica(i, ports[i], workdir / f"replica-{i}.log", workdir / f"access-{i}.log")
            for i in range(replicas)
        ]
        self.nginx_port, self.prometheus_port = ports[replicas:]
        self._others: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        """nginx: where clients go."""
        return f"http://127.0.0.1:{self.nginx_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    def start(self) -> None:
        """Starts the replicas, then nginx and Prometheus; returns when all answer."""
        for binary in ("nginx", "prometheus"):
            if find(binary) is None:
                raise FileNotFoundError(f"{binary} is not installed (apt-get install {binary})")
        for replica in self.replicas:
            self.start_replica(replica.index, wait=False)
        for replica in self.replicas:
            self.wait_ready(replica.index)
        self._start_nginx()
        self._start_prometheus()

    def close(self) -> None:
        """Stops everything started, by PID: SIGTERM, then SIGKILL if need be."""
        processes = [r.process for r in self.replicas if r.process is not None] + self._others
        for process in processes:
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_SECONDS)
        for replica in self.replicas:
            self._close_files(replica)

    def __enter__(self) -> Topology:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # replicas

    def start_replica(self, index: int, wait: bool = True) -> None:
        """Starts replica ``index`` (again) on its port; by default waits until ready."""
        replica = self.replicas[index]
        if replica.process is not None and replica.process.poll() is None:
            raise RuntimeError(f"replica {index} is still running")
        self._close_files(replica)
        stdout, stderr = replica.access_log.open("ab"), replica.log.open("ab")
        replica.files = [stdout, stderr]
        environment = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "CARPOOL_DRAIN_TIMEOUT": str(self.drain_timeout),
            "CARPOOL_ACCESS_LOG": "1",
        }
        replica.process = subprocess.Popen(
            [
                sys.executable,
                *("-m", "server", "serve", "--host", "127.0.0.1", "--port", str(replica.port)),
                *("--models", str(self.models_dir), "--torch-threads", "1"),
            ],
            cwd=ROOT,
            env=environment,
            stdout=stdout,
            stderr=stderr,
        )
        if wait:
            self.wait_ready(index)

    def wait_ready(self, index: int, timeout: float = STARTUP_SECONDS) -> None:
        replica = self.replicas[index]
        deadline = time.monotonic() + timeout
        while get(f"{replica.url}/v2/health/ready")[0] != 200:
            if replica.process is None or replica.process.poll() is not None:
                raise RuntimeError(f"replica {index} exited:\n{self.log_tail(index)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"replica {index} not ready:\n{self.log_tail(index)}")
            time.sleep(0.1)

    def signal(self, index: int, signum: int) -> None:
        process = self.replicas[index].process
        assert process is not None, f"replica {index} was never started"
        process.send_signal(signum)

    def wait_exit(self, index: int, timeout: float) -> int:
        """Waits for replica ``index`` to exit; its return code (-N: signal N)."""
        process = self.replicas[index].process
        assert process is not None, f"replica {index} was never started"
        code = process.wait(timeout)
        self._close_files(self.replicas[index])
        return code

    def requests_answered(self, index: int, model: str, outcome: str = "ok") -> float:
        """carpool_requests_total{model, outcome} as replica ``index`` counts it."""
        status, body = get(f"{self.replicas[index].url}/metrics")
        if status != 200:
            raise RuntimeError(f"replica {index} /metrics answered {status}")
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                if sample.name == "carpool_requests_total" and sample.labels == {
                    "model": model,
                    "outcome": outcome,
                }:
                    return sample.value
        return 0.0

    def log_tail(self, index: int, lines: int = 30) -> str:
        with suppress(OSError):
            return "".join(self.replicas[index].log.read_text().splitlines(True)[-lines:])
        return ""

    def _close_files(self, replica: Replica) -> None:
        for file in replica.files:
            file.close()
        replica.files = []

    # nginx and Prometheus

    def _start_nginx(self) -> None:
        config = self.workdir / "nginx.conf"
        config.write_text(
            render_nginx(
                NGINX_CONF.read_text(),
                [replica.address for replica in self.replicas],
                f"127.0.0.1:{self.nginx_port}",
                self.workdir,
            )
        )
        self._others.append(
            self._spawn(
                [
                    *(str(find("nginx")), "-p", f"{self.workdir}/", "-c", str(config)),
                    *("-e", str(self.workdir / "nginx-error.log")),
                    *("-g", f"daemon off; pid {self.workdir / 'nginx.pid'};"),
                ],
                "nginx",
            )
        )
        self._wait_answers(f"{self.url}/v2/health/live", "nginx")

    def _start_prometheus(self) -> None:
        config = self.workdir / "prometheus.yml"
        config.write_text(
            render_prometheus(
                PROMETHEUS_YML.read_text(),
                [replica.address for replica in self.replicas],
                self.scrape_interval,
            )
        )
        self._others.append(
            self._spawn(
                [
                    str(find("prometheus")),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
                ],
                "prometheus",
            )
        )
        self._wait_answers(f"{self.prometheus_url}/-/ready", "prometheus")

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.workdir / f"{name}.log").open("ab") as log:
            return subprocess.Popen(command, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT)

    def _wait_answers(self, url: str, name: str) -> None:
        process = self._others[-1]
        deadline = time.monotonic() + STARTUP_SECONDS
        while get(url)[0] != 200:
            if process.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / f"{name}.log").read_text()
                raise RuntimeError(f"{name} did not start:\n{log}")
            time.sleep(0.1)


@contextmanager
def running(models_dir: Path, workdir: Path | None = None, replicas: int = 3) -> Iterator[Topology]:
    """A started topology in ``workdir`` (else a new temporary folder)."""
    with (
        tempfile.TemporaryDirectory(prefix="carpool-topology-") as scratch,
        Topology(workdir or Path(scratch), models_dir.resolve(), replicas) as topology,
    ):
        yield topology


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "weights")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--workdir", type=Path, help="keep configs and logs here")
    args = parser.parse_args()
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with running(args.models, args.workdir, args.replicas) as topology:
        print(f"nginx       {topology.url}")
        print(f"prometheus  {topology.prometheus_url}")
        for replica in topology.replicas:
            print(f"replica {replica.index}   {replica.url}  (log {replica.log})")
        print("Ctrl-C stops everything.", flush=True)
        while not stop:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
