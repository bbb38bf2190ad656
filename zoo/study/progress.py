"""A one-line progress bar with an ETA, on stderr (one line per update when not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Work counted in units (tokens through a model); `total` may grow as work is discovered."""

    def __init__(self, total: int = 0, *, enabled: bool = True, stream: TextIO = sys.stderr,
                 every: float = 0.5):
        self.total, self.done = total, 0
        self.enabled, self.stream = enabled, stream
        self.tty = stream.isatty()
        if not self.tty:
            every = max(every, 10.0)  # a log file gets a line every 10 s, not a flood
        self.every = every
        self.start = time.perf_counter()
        self._shown = 0.0
        self.label = ""

    def add(self, units: int) -> None:
        """More work to do (the total grows)."""
        self.total += units

    def step(self, units: int, label: str = "") -> None:
        self.done += units
        self.label = label or self.label
        now = time.perf_counter()
        if self.enabled and (now - self._shown >= self.every or self.done >= self.total):
            self._shown = now
            self._show(now)

    def eta(self) -> float:
        """Seconds left at the rate so far (inf before any progress)."""
        elapsed = time.perf_counter() - self.start
        if self.done <= 0:
            return float("inf")
        return max(self.total - self.done, 0) * elapsed / self.done

    def _show(self, now: float) -> None:
        total = max(self.total, self.done, 1)
        width = 28
        filled = int(width * self.done / total)
        eta = self.eta()
        left = "?" if eta == float("inf") else f"{eta:4.0f}s"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {100 * self.done / total:3.0f}% "
                f"{now - self.start:5.0f}s elapsed, ETA {left}  {self.label}")
        if self.tty:
            self.stream.write("\r" + line[:110].ljust(110))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Show the final state (the total is what was done) and end the line."""
        self.total = self.done
        if self.enabled:
            self._show(time.perf_counter())
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
