"""A one-line progress bar for long work (loading, converting) on a terminal; silent otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_bytes(n: float) -> str:
    """A byte count for people: "512 B", "3.4 MiB", "26.1 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Counts bytes done out of `total` and redraws at most ten times a second with the rate.

    Draws only when `stream` is a terminal (or `enabled=True`), so logs and pipes stay clean.
    """

    def __init__(self, total: int, desc: str, *, stream: TextIO | None = None, enabled: bool | None = None):
        self.total, self.desc, self.done = total, desc, 0
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._start = self._last_draw = time.monotonic()

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.done >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        fraction = self.done / self.total if self.total else 1.0
        rate = self.done / max(now - self._start, 1e-9)
        bar = "#" * int(24 * fraction)
        self.stream.write(f"\r{self.desc} [{bar:<24}] {100 * fraction:5.1f}% "
                          f"{format_bytes(self.done)}/{format_bytes(self.total)} {format_bytes(rate)}/s")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
