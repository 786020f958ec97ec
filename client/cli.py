"""``carpool predict MODEL --input ...``: one request to a running server.

Each ``--input`` is ``NAME=VALUE``, or just ``VALUE`` for a model with one
input. ``VALUE`` is a JSON literal, ``@file`` (a JSON file, or a ``.npy``
file with numpy), or else taken as a string (for text inputs). The outputs
are printed as one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson

from client.errors import InferenceError
from client.http import DEFAULT_URL, Client

try:
    import numpy as np
except ImportError:  # lists work without it
    np = None  # type: ignore[assignment]

_NAMED = re.compile(r"([A-Za-z_][\w.-]*)=(.*)", re.DOTALL)


def add_parser(commands: Any) -> None:
    """Add ``predict`` to the ``carpool`` command's subparsers."""
    predict = commands.add_parser(
        "predict",
        help="send one infer request to a running server and print the outputs",
        description=__doc__.split("\n\n", 1)[1].replace("``", "") if __doc__ else None,
    )
    predict.add_argument("model", help="the model's name")
    predict.add_argument(
        "-i",
        "--input",
        action="append",
        required=True,
        dest="inputs",
        metavar="[NAME=]VALUE",
        help="a JSON literal or @file; repeat for each input",
    )
    predict.add_argument(
        "-o", "--output", action="append", dest="outputs", metavar="NAME", help="only this output"
    )
    predict.add_argument(
        "--url",
        default=os.environ.get("CARPOOL_URL", DEFAULT_URL),
        help=f"the server (default {DEFAULT_URL}; env CARPOOL_URL)",
    )
    predict.add_argument(
        "--token",
        default=os.environ.get("CARPOOL_TOKEN"),
        help="bearer token, when the server wants one (env CARPOOL_TOKEN)",
    )


def predict(args: argparse.Namespace) -> int:
    """Run ``carpool predict``; returns the exit status."""
    try:
        inputs = parse_inputs(args.inputs)
        with Client(args.url, token=args.token) as client:
            outputs = client.infer(args.model, inputs, args.outputs)
    except (InferenceError, ValueError, OSError) as exc:
        print(f"carpool predict: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"carpool predict: cannot reach {args.url}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(outputs, default=_plain).decode() + "\n")
    return 0


def parse_inputs(values: list[str]) -> Any:
    """``NAME=VALUE`` arguments as a dict; a lone unnamed value as itself."""
    named: dict[str, Any] = {}
    for value in values:
        match = _NAMED.fullmatch(value)
        if match is None:
            if len(values) > 1:
                raise ValueError(f"name each input when there are several: NAME={value}")
            return _value(value)
        named[match.group(1)] = _value(match.group(2))
    return named


def _value(text: str) -> Any:
    if text.startswith("@"):
        path = Path(text[1:])
        if path.suffix == ".npy":
            if np is None:
                raise ValueError(f"{path}: reading .npy files needs numpy")
            return np.load(path, allow_pickle=False)
        return orjson.loads(path.read_bytes())
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text  # a bare string, for text inputs


def _plain(value: Any) -> Any:
    if np is not None and isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"cannot print a {type(value).__name__}")
