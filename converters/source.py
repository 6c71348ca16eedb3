"""Reading a validated source checkpoint block by block, in file order, while digesting its files.

Why not Checkpoint.read: it memory-maps safetensors files, and every page a map touches stays in the
process's resident set until the kernel needs it back, so converting a 33 GB model would show a
33 GB RSS (measured: reading a 400 MB file through safe_open raised the peak RSS by 400 MB). Plain
positioned reads into a small buffer keep the resident memory at one block, whatever the model size.
`.pth` sources are read with Checkpoint.read (torch.load maps them; they cannot be streamed).

The digest is over the source files' exact bytes, at no extra I/O: tensors are read in increasing
file offset, so the bytes read are the file itself in order (the header and any gaps are read to fill
in). Each block is hashed on a helper thread while the caller converts it. A single file's digest is
its sha256 (`sha256sum FILE`); a folder's is the sha256 of the `sha256sum` manifest of its tensor
files, sorted by name ("<hex>  <name>\n" lines, as `sha256sum $(ls) | sha256sum` prints from inside
the folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Iterator

import torch

from dit8.checkpoint import SAFETENSORS_SUFFIX, TensorInfo
from dit8.errors import CheckpointError

from .in_order import InOrderWorker

if TYPE_CHECKING:
    from dit8.loader import DitCheckpoint

DIGEST_PREFIX = "sha256:"
DIGEST_PLACEHOLDER = DIGEST_PREFIX + "0" * 64  # same length as a real digest (see SafetensorsWriter.update_metadata)
_GAP_READ = 16 << 20


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of the source: its official name, name in the file, and where its bytes start
    (absolute offset in a safetensors file; None in a pickle)."""

    official: str
    file_key: str
    info: TensorInfo
    offset: int | None


def _read_error(file: Path, err: OSError) -> CheckpointError:
    # The conversion reports OSErrors as failures to write its output; one of the source's is the source's.
    return CheckpointError(f"{file}: cannot read: {err.strerror or err}")


def read_at(f: io.BufferedIOBase, offset: int, nbytes: int, file: Path, key: str) -> torch.Tensor:
    """`nbytes` bytes of `f` from `offset` into a fresh uint8 tensor (a plain read, no memory map)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    try:
        f.seek(offset)
        read = f.readinto(memoryview(buf.numpy()))
    except OSError as err:
        raise _read_error(file, err) from err
    if read != nbytes:
        raise CheckpointError(f"{file}: truncated inside tensor {key!r}")
    return buf


def safetensors_offsets(path: Path) -> tuple[dict[str, int], dict[str, str]]:
    """Absolute byte offset of every tensor in a safetensors file whose header is already validated
    (read_safetensors_header, which open_checkpoint runs, checks sizes and bounds), and the file's own
    header metadata."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    metadata = header.pop("__metadata__", None) or {}
    return {key: 8 + n + int(entry["data_offsets"][0]) for key, entry in header.items()}, metadata


class _FileDigest:
    """sha256 of one file fed with its bytes in increasing offset; reads what is not fed (the header,
    gaps, the end) through a handle of its own, as it runs beside the reads that feed it."""

    def __init__(self, path: Path):
        self.path, self.pos, self.sha = path, 0, hashlib.sha256()

    def _fill(self, end: int) -> None:
        if self.pos >= end:
            return
        try:
            with self.path.open("rb") as f:
                f.seek(self.pos)
                while self.pos < end:
                    chunk = f.read(min(_GAP_READ, end - self.pos))
                    if not chunk:
                        raise CheckpointError(f"{self.path}: truncated at byte {self.pos}")
                    self.sha.update(chunk)
                    self.pos += len(chunk)
        except OSError as err:
            raise _read_error(self.path, err) from err

    def feed(self, offset: int, data: memoryview) -> None:
        if offset < self.pos:
            raise CheckpointError(f"{self.path}: tensors overlap at byte {offset}")
        self._fill(offset)
        self.sha.update(data)
        self.pos += len(data)

    def finish(self) -> str:
        try:
            size = self.path.stat().st_size
        except OSError as err:
            raise _read_error(self.path, err) from err
        self._fill(size)
        return self.sha.hexdigest()


class SourceReader:
    """Reads a DitCheckpoint's tensors as blocks of rows in file order, digesting the files on the way.

    Iterate `tensors` in order and call `blocks(tensor, max_bytes)` for each; `digest()` at the end.
    """

    def __init__(self, dit: DitCheckpoint):
        self.dit = dit
        self.files = dit.checkpoint.files
        official_of = {file_key: official for official, file_key in dit.names.items()}
        tensors: list[SourceTensor] = []
        for file in self.files:
            keys = [k for k, info in dit.checkpoint.infos.items() if info.file == file]
            offsets = safetensors_offsets(file)[0] if file.suffix == SAFETENSORS_SUFFIX else {}
            keys.sort(key=lambda k: offsets.get(k, 0))  # stable: pickles keep their own order
            tensors += [SourceTensor(official_of[k], k, dit.checkpoint.infos[k], offsets.get(k)) for k in keys]
        self.tensors = tensors
        self._digests = {file: _FileDigest(file) for file in self.files}
        self._hashing = InOrderWorker("hash")
        self._handles: dict[Path, io.BufferedReader] = {}

    @property
    def total_bytes(self) -> int:
        """Bytes of every tensor's data (what the progress bar counts)."""
        return sum(t.info.nbytes for t in self.tensors)

    def blocks(self, tensor: SourceTensor, max_bytes: int) -> Iterator[torch.Tensor]:
        """The tensor in its stored dtype, as successive blocks of whole rows of about `max_bytes`
        (at least one row; a 0-d tensor is one block)."""
        shape, info = tensor.info.shape, tensor.info
        if not shape:
            yield self._read(tensor, 0, info.nbytes).reshape(())
            return
        row_bytes = info.nbytes // shape[0] if shape[0] else 0
        step = max(1, max_bytes // row_bytes) if row_bytes else max(1, shape[0])
        for start in range(0, max(shape[0], 1), step):
            rows = min(step, shape[0] - start)
            yield self._read(tensor, start * row_bytes, rows * row_bytes).reshape(rows, *shape[1:])

    def _read(self, tensor: SourceTensor, begin: int, nbytes: int) -> torch.Tensor:
        """`nbytes` bytes of `tensor` from byte `begin` of its data, as a flat tensor of its dtype."""
        info, itemsize = tensor.info, tensor.info.dtype.itemsize
        if tensor.offset is None:  # pickle: already mapped by torch
            flat = self.dit.checkpoint.read(tensor.file_key).reshape(-1)
            return flat[begin // itemsize:(begin + nbytes) // itemsize]
        f = self._handles.get(info.file)
        if f is None:
            try:
                f = self._handles[info.file] = info.file.open("rb")
            except OSError as err:  # removed or its permissions changed since it was validated
                raise _read_error(info.file, err) from err
        buf = read_at(f, tensor.offset + begin, nbytes, info.file, tensor.file_key)
        # Hashed while the caller converts it; buf is fresh and never written to again.
        self._hashing.submit(self._digests[info.file].feed, tensor.offset + begin, memoryview(buf.numpy()))
        return buf.view(info.dtype)

    def digest(self) -> str:
        """The source digest (see the module docstring); call after reading every tensor."""
        self._hashing.wait()
        hexes = {file: d.finish() for file, d in self._digests.items()}
        if len(hexes) == 1 and self.dit.checkpoint.path.is_file():
            (only,) = hexes.values()
            return DIGEST_PREFIX + only
        root = self.dit.checkpoint.path
        manifest = "".join(f"{hexes[f]}  {f.relative_to(root).as_posix()}\n"
                           for f in sorted(hexes, key=lambda p: p.relative_to(root).as_posix()))
        return DIGEST_PREFIX + hashlib.sha256(manifest.encode()).hexdigest()

    def close(self) -> None:
        """Stop the hashing thread and close the source's files."""
        try:
            self._hashing.close()
        finally:
            for f in self._handles.values():
                f.close()
            self._handles.clear()
            self.dit.checkpoint.close()

    def __enter__(self) -> "SourceReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.close()
        except Exception:
            if exc_type is None:
                raise  # otherwise keep the error already on its way
