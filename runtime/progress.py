"""A one-line progress bar for long work (loading, converting, generating), and byte counts for people."""

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


# Seconds between the lines a bar writes to a log (a stream that is not a terminal): a long conversion
# or generation shows that it moves, without a line for every update.
LOG_INTERVAL = 30.0


class Progress:
    """A one-line progress bar of `done` out of `total`: on a terminal redrawn in place at most ten times
    a second; elsewhere (logs, pipes), when enabled, a line every LOG_INTERVAL seconds of work and one
    as it closes.

    unit "bytes": sizes, the percentage and the rate; "count": done/total and the seconds since it
    began. enabled: default, only on a terminal. `close` ends the line once; later calls do nothing.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "bytes", stream: TextIO | None = None,
                 enabled: bool | None = None):
        if unit not in ("bytes", "count"):
            raise ValueError(f"unit must be 'bytes' or 'count', got {unit!r}")
        self.total, self.desc, self.unit, self.done = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = self.tty if enabled is None else enabled
        self._start = self._last_draw = time.monotonic()
        self.closed = False
        self._drawn = 0  # length of the line last drawn on the terminal

    def update(self, n: int) -> None:
        """`n` more done."""
        self.advance_to(self.done + n)

    def advance_to(self, done: int) -> None:
        """`done` done in all."""
        self.done = done
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty and (now - self._last_draw >= 0.1 or self.done >= self.total):
            self._last_draw = now
            self._write("\r" + self._redraw(self._line(now)))
        elif not self.tty and now - self._last_draw >= LOG_INTERVAL and self.done < self.total:
            self._last_draw = now
            self._write(self._line(now) + "\n")

    def _write(self, text: str) -> None:
        # The bar only shows how the work moves: a stream that cannot take it (the reader of a pipe gone,
        # `dit8 convert ... 2>&1 | head`, or a terminal closed) turns the bar off, not the work, which an
        # OSError raised from here stopped (a finished conversion thrown away at its last line).
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.enabled = False

    def _redraw(self, line: str) -> str:
        # A line shorter than the last one drawn (1023.9 KiB -> 1.0 MiB) is padded with spaces to cover
        # the end of the old one, which "\r" alone leaves on the screen.
        padded, self._drawn = line.ljust(self._drawn), len(line)
        return padded

    def _line(self, now: float) -> str:
        fraction = min(self.done / self.total, 1.0) if self.total else 1.0
        bar = "#" * int(24 * fraction)
        if self.unit == "count":
            return f"{self.desc:<8} [{bar:<24}] {self.done}/{self.total}  {now - self._start:6.1f} s"
        rate = self.done / max(now - self._start, 1e-9)
        return (f"{self.desc} [{bar:<24}] {100 * fraction:5.1f}% "
                f"{format_bytes(self.done)}/{format_bytes(self.total)} {format_bytes(rate)}/s")

    def close(self) -> None:
        # Once only: a stage that stops early closes its bar where it stops and again on its way out.
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            line = self._line(time.monotonic())
            self._write(("\r" + self._redraw(line) if self.tty else line) + "\n")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
