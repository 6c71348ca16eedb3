"""Work on a helper thread, one step behind the computation that produces it.

A conversion alternates CPU work (quantizing a block of rows) with work on the bytes: hashing the
source block just read and writing the converted block out. sha256 and file writes release the GIL,
so running them on helper threads while the main thread quantizes hides most of their time. Only one
call per worker is ever in flight: memory holds at most one block more than a sequential conversion,
and the calls keep the order they were submitted in (a file's bytes are hashed and written in order).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any, Callable


class InOrderWorker:
    """Run `submit`ted calls in order on one helper thread, at most one at a time in flight.

    An error raised by a call reaches the caller at the next `submit`, `wait` or `close`.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"dit8-{name}")
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

    def __enter__(self) -> "InOrderWorker":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
            return
        # Already failing: let the call in flight finish (its output is about to be discarded) and
        # keep the original error rather than a secondary one.
        try:
            self.close()
        except Exception:
            pass
