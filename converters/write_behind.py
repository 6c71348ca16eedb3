"""Writes on a background thread, one block behind the computation that produces them.

A conversion alternates CPU work (reading, quantizing a block of rows) with writing the block out.
File writes release the GIL, so running each write on a helper thread while the next block is being
quantized hides most of the write time. Only one write is ever in flight: memory holds at most one
block more than a sequential conversion, and the writes keep the order they were submitted in.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class WriteBehind:
    """Run `submit`ted calls in order on one helper thread, at most one at a time in flight.

    An error raised by a call reaches the caller at the next `submit`, `wait` or `close`.
    """

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dit8-write")
        self._pending: Future | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous call, then start fn(*args) on the helper thread."""
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        """Block until the call in flight has finished; re-raise its error."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        """Wait for the call in flight (its error propagates) and stop the helper thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: let the write in flight finish (its file is about to be discarded) and
        # keep the original error rather than a secondary one.
        try:
            self.close()
        except Exception:
            pass
