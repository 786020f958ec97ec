"""``batching`` is plain Python: importing it pulls in no framework."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# A fresh interpreter: this test process may already have imported torch.
PROBE = """
import sys
import batching
loaded = sorted({name.partition(".")[0] for name in sys.modules} & {"starlette", "torch"})
assert not loaded, f"import batching pulled in {loaded}"
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
