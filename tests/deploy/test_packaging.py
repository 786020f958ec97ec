"""What ``pip install .`` puts in the image: every package of the project.

setuptools installs only the packages ``pyproject.toml`` lists, so a new
package folder left off the list works from the checkout (and in every test
that imports from it) but is missing from the Docker image, whose replicas
then fail at import (caught once by the compose test, minutes into CI)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("batching", "client", "server")


def test_every_package_folder_of_the_project_is_installed() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in SHIPPED
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found, "no packages found"
    assert found <= listed, f"not installed by pip install .: {sorted(found - listed)}"
