"""What the compose test builds and runs, checked offline: the Dockerfile's
build arguments, and an override file that changes image names only."""

from __future__ import annotations

import re
from typing import Any

import yaml

from deploy.compose.images import BASES, NGINX_IMAGE, PROMETHEUS_IMAGE
from deploy.compose.stack import COMPOSE_FILE, OVERRIDE_FILE, SERVICES
from tests.servers import ROOT

DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def stages() -> list[list[str]]:
    found: list[list[str]] = []
    for line in instructions():
        if line.startswith("FROM "):
            found.append([])
        if found:
            found[-1].append(line)
    return found


def test_dockerfile_builds_every_stage_on_the_base_build_argument() -> None:
    assert "ARG BASE=python:${PYTHON}-slim-bookworm" in instructions()
    assert [stage[0].split()[1] for stage in stages()] == ["${BASE}", "${BASE}"]


def test_dockerfile_gives_pip_the_wheel_source_only_when_one_is_named() -> None:
    (build, _) = stages()
    assert "ARG TORCH_FIND_LINKS=" in build
    (install,) = [line for line in build if "${TORCH}" in line]
    assert '${TORCH_FIND_LINKS:+--find-links "${TORCH_FIND_LINKS}"}' in install
    assert '--index-url "${TORCH_INDEX}"' in install


def test_dockerfile_copies_the_venv_last() -> None:
    # Without copy-on-write storage each later step would copy the venv again.
    (_, final) = stages()
    assert final[-1] == "COPY --from=build /opt/venv /opt/venv"


def test_dockerfile_fetches_no_frontend_from_a_registry() -> None:
    assert not re.search(r"^# *syntax=", DOCKERFILE, re.MULTILINE)


def test_the_override_changes_only_image_names_of_services_the_compose_file_has() -> None:
    override: dict[str, Any] = yaml.safe_load(OVERRIDE_FILE.read_text())
    compose: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    assert set(override) == {"version", "services"}
    assert override["version"] == compose["version"]  # stack deploy merges one version only
    assert override["services"] == {
        "nginx": {"image": NGINX_IMAGE},
        "prometheus": {"image": PROMETHEUS_IMAGE},
    }


def test_the_compose_test_runs_every_service_but_grafana() -> None:
    compose: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    assert set(compose["services"]) - set(SERVICES) == {"grafana"}


def test_the_base_images_come_from_debian_suites_with_what_the_configs_need() -> None:
    suites = {base.image: (base.suite, base.packages) for base in BASES}
    # bookworm's python3 is 3.11, the local torch wheel's cp311.
    assert suites["carpool-local/python:3.11-bookworm"][0] == "bookworm"
    # `server ... resolve` needs nginx >= 1.27.3: not in bookworm (1.22) or trixie (1.26).
    assert suites[NGINX_IMAGE] == ("sid", ("nginx",))
    assert suites[PROMETHEUS_IMAGE] == ("sid", ("prometheus",))
