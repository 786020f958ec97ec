"""``python -m tests.fuzz TARGET --seconds N``: fuzz one target with atheris.

server/ and batching/ are imported under atheris' instrumentation (coverage
feedback for libFuzzer); torch and the rest are imported first, plain, since
instrumenting them would only slow every run down.
"""

from __future__ import annotations

import importlib
import sys


def main() -> None:
    import orjson  # noqa: F401
    import torch  # noqa: F401

    atheris = importlib.import_module("atheris")
    with atheris.instrument_imports(include=["server", "batching"]):
        import server.request
        import server.stream  # noqa: F401  (its frames and the infer transaction too)
    from tests.fuzz.targets import run

    run(sys.argv[1:])


if __name__ == "__main__":
    main()
