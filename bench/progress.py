"""A progress bar on stderr: how far the run is, what it is doing, and about
how long it has left (from the planned seconds of each step)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 28


class Progress:
    def __init__(self, planned_seconds: float, stream: TextIO = sys.stderr) -> None:
        self.planned = max(planned_seconds, 1e-9)
        self.stream = stream
        self.done = 0.0
        self.began = time.monotonic()
        self.tty = stream.isatty()
        self._last_line = ""

    def show(self, what: str) -> None:
        """Say what starts now, without moving the bar."""
        self._draw(what)

    def advance(self, planned_seconds: float, what: str = "") -> None:
        """A step that was planned to take ``planned_seconds`` is over."""
        self.done = min(self.planned, self.done + planned_seconds)
        self._draw(what)

    def note(self, message: str) -> None:
        """A line that stays (a warning, a finished section)."""
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(message + "\n")
        if self.tty and self._last_line:
            self.stream.write(self._last_line)
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _draw(self, what: str) -> None:
        share = self.done / self.planned
        filled = int(share * _WIDTH)
        elapsed = time.monotonic() - self.began
        left = elapsed / share - elapsed if share > 0.02 else self.planned - elapsed
        line = (
            f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {share:4.0%} "
            f"{_clock(elapsed)} elapsed, ~{_clock(max(left, 0))} left  {what}"
        )
        self._last_line = line
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
