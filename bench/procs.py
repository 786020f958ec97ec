"""CPU time of a process tree, read from /proc (Linux).

A server is whatever its root process started: gunicorn's worker, mosec's
Rust front and Python workers. The suite measures each point's server CPU as
the tree's CPU seconds over the point's wall time (1.0 = one core busy).
"""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name sits in parentheses and may hold spaces
    return raw[raw.rfind(")") + 2 :].split()


def tree(root: int) -> list[int]:
    """``root`` and all of its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def cpu_seconds(root: int) -> float:
    """User + system CPU seconds of the tree under ``root`` so far (threads
    included, reaped children included)."""
    total = 0
    for pid in tree(root):
        fields = _stat(pid)
        if fields is not None:
            # utime, stime, cutime, cstime: fields 14-17 of /proc/PID/stat
            total += sum(int(v) for v in fields[11:15])
    return total / _TICKS
