"""``batching`` is plain Python: the standard library only, no framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent

# A fresh interpreter: this test process may already have imported torch.
PROBE = """
import sys
before = set(sys.modules)
import batching
loaded = sorted({name.partition(".")[0] for name in sys.modules} & {"starlette", "torch"})
assert not loaded, f"import batching pulled in {loaded}"
tops = {name.partition(".")[0] for name in set(sys.modules) - before}
foreign = sorted(tops - set(sys.stdlib_module_names) - {"batching"})
assert not foreign, f"import batching pulled in {foreign}, outside the standard library"
"""


def test_importing_batching_pulls_in_neither_starlette_nor_torch() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr


def test_every_import_in_batching_is_the_standard_library_or_batching() -> None:
    """Also the imports that only run on some path (inside a function)."""
    allowed = set(sys.stdlib_module_names) | {"__future__", "batching"}
    foreign: list[str] = []
    sources = sorted((ROOT / "batching").glob("*.py"))
    assert sources
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            foreign += [f"{source.name}: {n}" for n in names if n.partition(".")[0] not in allowed]
    assert not foreign, foreign
