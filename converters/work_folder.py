"""The private folder beside DST in which a conversion builds its output.

Everything a conversion writes goes into `.<DST name>.<hash>.dit8-work/` beside DST (the same
filesystem, so the finished output moves into place with a rename), and the folder is removed at the
end, whatever happened. A lock held on a file inside it for the whole conversion refuses a second
conversion to the same DST, and tells leftovers from live work: a folder whose lock is free was left
by a conversion that was killed (SIGKILL, the OOM killer, a power cut), and what it holds, up to a
whole model, is removed before the new conversion starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import ConvertError

WORK_SUFFIX = ".dit8-work"
LOCK_NAME = "lock"
# DST's name is cut to this many characters in the folder's name (a hash of the whole name follows), so
# that names nested in it stay within the 255 bytes a file name may have.
NAME_CHARS = 80


def work_folder_path(dst: Path) -> Path:
    """The work folder of a conversion to `dst`: beside it, named after it (cut to NAME_CHARS) and a hash
    of its whole name."""
    digest = hashlib.sha256(dst.name.encode()).hexdigest()[:8]
    return dst.parent / f".{dst.name[:NAME_CHARS]}.{digest}{WORK_SUFFIX}"


def _remove(path: Path) -> None:
    """Delete a file, a link or a folder with its contents."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def work_folder(dst: Path) -> Iterator[Path]:
    """The locked, empty work folder of a conversion to `dst`; removed on leaving. ConvertError when
    another conversion to `dst` holds it."""
    folder = work_folder_path(dst)
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConvertError(f"{dst}: another conversion to this output is running (its work folder: "
                           f"{folder})") from None
    try:
        for entry in folder.iterdir():
            if entry.name != LOCK_NAME:
                _remove(entry)  # a killed conversion's
        yield folder
    finally:
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            os.close(fd)  # (releases the lock)
