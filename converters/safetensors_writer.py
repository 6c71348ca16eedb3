"""A streaming safetensors writer: the header first, then each tensor's bytes as they are produced.

The safetensors layout is: 8-byte little-endian header length N, N bytes of JSON header (tensor
key -> dtype, shape, data_offsets relative to the data start; `__metadata__` -> string map), then the
tensors' bytes. Knowing every (key, shape, dtype) up front fixes the header, so tensors can be
appended one block of rows at a time and memory never holds more than the caller's block.

The file is written under a temporary name in the destination folder and renamed into place by
`close()`; leaving the context manager with an exception deletes it, so a failed write leaves nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterable, Mapping

import torch

from dit8.checkpoint import SAFETENSORS_DTYPES, tensor_nbytes

DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
# The header is padded with spaces (valid JSON whitespace) so the data starts 8-byte aligned, as the
# reference implementation does; readers may then map tensors without copying.
_ALIGN = 8


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the writer will receive: its key, shape and dtype."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return tensor_nbytes(self.shape, self.dtype)


def temp_path_beside(path: Path, suffix: str = ".tmp") -> Path:
    """A fresh hidden name in `path`'s folder for a temporary sibling of `path`."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"


def write_json(path: Path, obj: object) -> None:
    """Write `obj` as JSON to `path` whole or not at all: into a temporary sibling, then renamed (a stop
    part way leaves the previous file, and no temporary one)."""
    temp = temp_path_beside(path)
    try:
        temp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every platform can open a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_header(specs: Iterable[TensorSpec], metadata: Mapping[str, str]) -> bytes:
    """The padded JSON header for tensors stored back to back in the order of `specs`."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.key] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-(len(raw) + 8) % _ALIGN)


def _check_specs(specs: list[TensorSpec], metadata: Mapping[str, str]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen or spec.key == "__metadata__":
            raise ValueError(f"tensor key {spec.key!r} is repeated or reserved")
        if spec.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {spec.key!r}: dtype {spec.dtype} cannot be stored in safetensors")
        seen.add(spec.key)
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"safetensors metadata must map strings to strings; {key!r}: {value!r}")


class SafetensorsWriter:
    """Write tensors to `path` in the order of `specs`, streaming each one's bytes.

    Use as a context manager, `write(key, tensor)` whole tensors or `write_rows(key, rows)` successive
    blocks of a tensor's leading dimension, then leave the block (or call `close()`).
    """

    def __init__(self, path: str | Path, specs: Iterable[TensorSpec], metadata: Mapping[str, str] | None = None):
        if sys.byteorder != "little":
            raise RuntimeError("safetensors stores little-endian data; this writer needs a little-endian host")
        self.path = Path(path)
        self.specs = list(specs)
        self.metadata = dict(metadata or {})
        _check_specs(self.specs, self.metadata)
        self._header = build_header(self.specs, self.metadata)
        self._index = 0  # the tensor being written
        self._done = 0  # bytes of it written so far
        self.temp_path = temp_path_beside(self.path)
        # os.open with 0o666 lets the umask decide the permissions, as for any file the user creates.
        fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self._file: BinaryIO | None = os.fdopen(fd, "wb")
        try:
            self._file.write(struct.pack("<Q", len(self._header)) + self._header)
        except BaseException:
            self.abort()
            raise

    @property
    def data_size(self) -> int:
        """Bytes of all tensors' data (the file's size less its header)."""
        return sum(spec.nbytes for spec in self.specs)

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor `key`, which must be the next one and match its shape and dtype."""
        spec = self._expect(key)
        if tuple(tensor.shape) != spec.shape or self._done:
            raise ValueError(f"{self.path}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {spec.shape} "
                             f"written whole")
        self.write_rows(key, tensor)

    def write_rows(self, key: str, rows: torch.Tensor) -> None:
        """Append the next block of rows (along dim 0) of tensor `key`; a 0-d tensor is written whole."""
        spec = self._expect(key)
        if rows.dtype != spec.dtype:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {rows.dtype}, expected {spec.dtype}")
        if tuple(rows.shape[1:]) != spec.shape[1:] or rows.dim() != len(spec.shape):
            raise ValueError(f"{self.path}: rows of tensor {key!r} have shape {tuple(rows.shape)}, expected "
                             f"(n, {', '.join(map(str, spec.shape[1:]))})")
        data = rows.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._done + data.nbytes > spec.nbytes:
            raise ValueError(f"{self.path}: more data for tensor {key!r} than its shape {spec.shape} holds")
        assert self._file is not None
        self._file.write(memoryview(data))
        self._done += data.nbytes
        if self._done == spec.nbytes:
            self._index, self._done = self._index + 1, 0

    def _expect(self, key: str) -> TensorSpec:
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if self._index >= len(self.specs):
            raise ValueError(f"{self.path}: tensor {key!r} written after the last declared tensor")
        spec = self.specs[self._index]
        if key != spec.key:
            raise ValueError(f"{self.path}: tensor {spec.key!r} comes next, got {key!r}")
        return spec

    def update_metadata(self, key: str, value: str) -> None:
        """Change a metadata value before `close()` (e.g. a digest known only at the end). The header
        is already on disk, so its padded length must not change: use a placeholder of equal length."""
        metadata = {**self.metadata, key: value}
        _check_specs([], metadata)
        header = build_header(self.specs, metadata)
        if len(header) != len(self._header):
            raise ValueError(f"{self.path}: new value of metadata {key!r} changes the header length")
        self.metadata, self._header = metadata, header

    def close(self) -> Path:
        """Check every tensor was written, rewrite the header, sync, and rename into place."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        try:
            if self._index < len(self.specs):
                raise ValueError(f"{self.path}: tensor {self.specs[self._index].key!r} and "
                                 f"{len(self.specs) - self._index - 1} after it were not written")
            expected = 8 + len(self._header) + self.data_size
            if self._file.tell() != expected:
                raise AssertionError(f"{self.path}: wrote {self._file.tell()} bytes, expected {expected}")
            self._file.seek(8)
            self._file.write(self._header)  # picks up update_metadata's changes
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.temp_path, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_folder(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Discard everything written: close and delete the temporary file (safe to call twice)."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # e.g. a full disk failing the final flush: the file is deleted anyway
            self._file = None
        self.temp_path.unlink(missing_ok=True)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file is not None:
            self.close()
