"""The images the compose test runs, built here with no registry in reach.

Base images come from Debian's packages: ``debootstrap --variant=minbase``
roots, trimmed (no package cache, lists, docs, man pages or locales) and
loaded with ``docker import``:

- carpool's base: bookworm's python3 (3.11, as the local torch wheel needs),
  its venv module and ``python``; it trusts the CA certificates this machine
  trusts, for pip inside the build;
- nginx: sid's nginx (1.30: ``server ... resolve`` needs 1.27.3 or newer,
  which bookworm's and trixie's lack), with the ``nginx`` user the config
  names and its logs on the container's stdout and stderr;
- Prometheus: sid's prometheus (3.5, as the compose file's ``v3.5.0``).

The carpool image is the project's own Dockerfile on that base. Its torch is
the local CPU wheel (``/opt/wheels``), served to the build on a loopback port
(``TORCH_FIND_LINKS``) and pinned with its ``+cpu`` label, so that PyPI's
CUDA build of the same version can never be chosen.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from deploy.compose.engine import Engine, EngineError

ROOT = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("CARPOOL_DEBIAN_MIRROR", "http://deb.debian.org/debian")
WHEELS = Path(os.environ.get("CARPOOL_TORCH_WHEELS", "/opt/wheels"))
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"

PYTHON_IMAGE = "carpool-local/python:3.11-bookworm"
NGINX_IMAGE = "carpool-local/nginx:sid"
PROMETHEUS_IMAGE = "carpool-local/prometheus:sid"
CARPOOL_IMAGE = "carpool-local/carpool"


@dataclass(frozen=True)
class Base:
    """One base image: a Debian suite, the packages on top of minbase, what
    ``docker import`` sets, and commands run in the root before it."""

    image: str
    suite: str
    packages: tuple[str, ...]
    changes: tuple[str, ...]
    prepare: tuple[tuple[str, ...], ...] = ()


BASES = (
    Base(
        PYTHON_IMAGE,
        "bookworm",
        ("python3", "python3-venv", "python-is-python3", "ca-certificates"),
        ('CMD ["python3"]', "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt"),
        (("update-ca-certificates",),),
    ),
    Base(
        NGINX_IMAGE,
        "sid",
        ("nginx",),
        ('CMD ["nginx", "-g", "daemon off;"]',),
        (
            ("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "nginx"),
            ("ln", "-sf", "/dev/stdout", "/var/log/nginx/access.log"),
            ("ln", "-sf", "/dev/stderr", "/var/log/nginx/error.log"),
        ),
    ),
    Base(
        PROMETHEUS_IMAGE,
        "sid",
        ("prometheus",),
        (
            'ENTRYPOINT ["/usr/bin/prometheus"]',
            'CMD ["--config.file=/etc/prometheus/prometheus.yml"]',
        ),
    ),
)
_TRIM: tuple[str, ...] = ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc")
_TRIM += ("usr/share/man", "usr/share/locale")


def build_bases(engine: Engine, workdir: Path) -> dict[str, float]:
    """Builds every base image (the debootstraps in parallel); seconds each took."""
    started = time.monotonic()
    roots = {base.image: workdir / base.image.replace("/", "-").replace(":", "-") for base in BASES}
    runs: dict[str, subprocess.Popen[bytes]] = {}
    for base in BASES:
        with (workdir / f"{roots[base.image].name}.log").open("wb") as log:
            runs[base.image] = subprocess.Popen(
                [
                    *("nice", "-n", "19", "debootstrap", "--variant=minbase"),
                    f"--include={','.join(base.packages)}",
                    *(base.suite, str(roots[base.image]), MIRROR),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    seconds: dict[str, float] = {}
    try:
        for base in BASES:
            root = roots[base.image]
            if runs[base.image].wait(900) != 0:
                said = (workdir / f"{root.name}.log").read_text(errors="replace")[-3000:]
                raise EngineError(f"debootstrap of {base.image} failed:\n{said}")
            _prepare(base, root)
            _import(engine, base, root)
            seconds[base.image] = round(time.monotonic() - started, 1)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
                run.wait()
    return seconds


def _prepare(base: Base, root: Path) -> None:
    for path in _TRIM:
        shutil.rmtree(root / path, ignore_errors=True)
    (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    if base.image == PYTHON_IMAGE:
        # The machine's own CAs (a TLS-inspecting egress proxy's among them).
        for certificate in Path("/usr/local/share/ca-certificates").glob("*.crt"):
            shutil.copy(certificate, root / "usr/local/share/ca-certificates" / certificate.name)
    for command in base.prepare:
        subprocess.run(["chroot", str(root), *command], check=True, capture_output=True)


def _import(engine: Engine, base: Base, root: Path) -> None:
    changes = [item for change in base.changes for item in ("--change", change)]
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    imported = subprocess.run(
        ["docker", "import", *changes, "-", base.image],
        env=engine.env,
        stdin=tar.stdout,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise EngineError(f"docker import {base.image} failed:\n{imported.stderr}")


_ports: list[int] = []


@contextmanager
def wheel_server(folder: Path) -> Iterator[str]:
    """``folder`` served read-only on a loopback port: its URL, for pip's
    --find-links. The same port each time in one process: the URL is a build
    argument, part of the build cache's key, so a rebuild stays cached."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", _ports[-1] if _ports else 0), handler)
    _ports.append(server.server_address[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def build_carpool(engine: Engine, tag: str) -> str:
    """Builds the project's Dockerfile on the local base as CARPOOL_IMAGE:tag.
    A second build in one process takes every layer from the build cache.
    (No --label: the legacy builder applies it from the first step of each
    stage, which would rebuild everything.)"""
    image = f"{CARPOOL_IMAGE}:{tag}"
    arguments = ["--build-arg", f"BASE={PYTHON_IMAGE}"]
    if (WHEELS / TORCH_WHEEL).is_file():
        with wheel_server(WHEELS) as url:
            arguments += ["--build-arg", "TORCH=torch==2.13.0+cpu"]
            arguments += ["--build-arg", "TORCH_INDEX=https://pypi.org/simple"]
            arguments += ["--build-arg", f"TORCH_FIND_LINKS={url}"]
            engine.run("build", "--network", "host", *arguments, "-t", image, str(ROOT))
    else:  # elsewhere: the Dockerfile's default, PyTorch's CPU index
        engine.run("build", "--network", "host", *arguments, "-t", image, str(ROOT))
    return image
