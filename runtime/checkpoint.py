"""Tensor files on disk seen as one mapping from keys to tensors, read one tensor at a time.

Reads a single `.safetensors` file (memory-mapped), a `.pth`/`.pt`/`.bin` file (torch.load with
weights_only=True, memory-mapped when it is a zip checkpoint), a folder of shards with an index json,
or a folder of files (per-block checkpoints). Nothing is loaded until `read(key)`. `load_encoder_weights`
copies such a file into a module's buffers, checked first (the T5 and CLIP encoders load through it).
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import pickle
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import CheckpointError, Dit8Error, InputError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")
_MAX_HEADER = 100_000_000  # safetensors refuses longer headers


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of `shape` and `dtype`."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, known without reading its data."""

    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return tensor_nbytes(self.shape, self.dtype)


_SNIFF_BYTES = 64
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def describe_other_file(path: Path) -> str | None:
    """What a file that cannot be read as the checkpoint its name says actually is, where its first bytes
    tell: a Git LFS pointer or a web page saved in place of the weights (a download that failed), a GGUF
    file, a torch or safetensors file under the other's suffix, or some other text. None when they do not."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    pickle_name = path.suffix in PICKLE_SUFFIXES
    if head.startswith(_LFS_POINTER):
        return ("a Git LFS pointer (the small text file a clone without git-lfs holds in place of the weights): "
                "fetch the file itself (`git lfs pull`, or download it again)")
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp's format), which dit8 does not read: use a .safetensors release of the model"
    if head.startswith(b"PK\x03\x04") and not pickle_name:
        return "a zip archive, as torch.save writes: name it .pth to read it as a torch checkpoint"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05") and not pickle_name:
        return "a pickle, as older torch.save writes: name it .pth to read it as a torch checkpoint"
    if pickle_name and len(head) > 9 and head[8:10] in (b'{"', b"{ ") \
            and struct.unpack("<Q", head[:8])[0] < size:
        return "a safetensors file: name it .safetensors"
    for cut in range(4):  # the bytes read may end inside a character of up to 4 bytes
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if not text or not all(c.isprintable() or c in "\t\r\n" for c in text):
        return None
    if text.lstrip().startswith("<"):
        return ("an HTML or XML page (what a server sends back for a failed, expired or refused download), not "
                "the weights: download the file again")
    return f"a text file, not tensors (it begins {text.strip()[:40]!r})"


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header: tensor infos and the `__metadata__` strings.

    Raises CheckpointError naming the file when the header is corrupt or the data is truncated.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                other = describe_other_file(path)
                if other is not None:
                    raise CheckpointError(f"{path}: not a safetensors file: {other}")
                raise CheckpointError(f"{path}: corrupt or truncated: header length {n} exceeds the file")
            # Strict UTF-8, as safetensors reads it (json.loads of bytes would also take UTF-16 or a BOM).
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
            # A \uXXXX escape of half a surrogate pair decodes to a lone surrogate, which is no UTF-8 text and
            # which safetensors refuses: encoding the header raises UnicodeEncodeError for one anywhere in it.
            json.dumps(header, ensure_ascii=False).encode("utf-8")
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{path}: corrupt safetensors header: {type(err).__name__}: {err}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # (null, as safetensors takes it; false or 0 are corrupt)
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map names to strings")
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = _json_ints(entry["shape"])
            begin, end = _json_ints(entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {entry!r}"[:500]) from None
        if not _fits_int64(shape, dtype.itemsize):
            raise CheckpointError(f"{path}: corrupt header: tensor {key!r} has shape {list(shape)}"[:500]
                                  + ", whose element or byte count overflows 64 bits")
        info = TensorInfo(path, shape, dtype)
        if end - begin != info.nbytes or begin < 0:
            raise CheckpointError(f"{path}: corrupt header: tensor {key!r} of shape {shape} {entry['dtype']} "
                                  f"spans {end - begin} bytes, expected {info.nbytes}")
        infos[key] = info
        spans.append((begin, end, key))
    # Tensor data is one run of bytes, tensor after tensor (safetensors refuses anything else).
    data_end = 0
    for begin, end, key in sorted(spans):
        if begin != data_end:
            raise CheckpointError(f"{path}: corrupt header: the data of tensor {key!r} starts at byte {begin}, "
                                  f"not {data_end} where the tensor before it ends")
        data_end = end
    if 8 + n + data_end > size:
        raise CheckpointError(f"{path}: truncated: the header promises {8 + n + data_end} bytes, "
                              f"the file has {size}")
    if 8 + n + data_end < size:  # as safetensors itself refuses: the file is not what its header says
        raise CheckpointError(f"{path}: corrupt: {size - 8 - n - data_end} bytes past the end of the tensor "
                              f"data the header describes")
    return infos, metadata


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict, refusing a name given twice: json.loads keeps the last silently, where
    another reader may keep the first, so the file would hold different tensors for different readers."""
    obj: dict[str, object] = {}
    for name, value in pairs:
        if name in obj:
            raise ValueError(f"the name {name!r} is given twice in one object"[:300])
        obj[name] = value
    return obj


_INT64_MAX = (1 << 63) - 1


def _fits_int64(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether every partial product of `shape` (left to right, as safetensors multiplies it) and the byte
    count fit an int64: a zero among the dimensions makes the byte count 0, which a dimension of 2^70 before
    it would pass, though neither safetensors nor torch can hold such a shape."""
    count = itemsize
    for dim in shape:
        count *= dim
        if dim > _INT64_MAX or count > _INT64_MAX:
            return False
    return True


def _json_ints(values: object) -> tuple[int, ...]:
    """A JSON list of non-negative integers as a tuple; TypeError for anything else (floats, strings,
    booleans: int() would round, parse or count them)."""
    if not isinstance(values, list) or not all(type(v) is int and v >= 0 for v in values):
        raise TypeError("expected a list of non-negative integers")
    return tuple(values)


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    # Training checkpoints often nest the weights one level down.
    if isinstance(obj, dict) and len(obj) == 1:
        (only,) = obj.values()
        if isinstance(only, dict) and next(iter(obj)) in ("state_dict", "model", "module"):
            obj = only
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: entry {key!r} is named by a {type(key).__name__}, not a string")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.device.type != "cpu" or value.is_quantized:
            raise CheckpointError(f"{path}: tensor {key!r} is not a dense tensor of numbers (layout "
                                  f"{value.layout}, device {value.device.type}, dtype {value.dtype})")
    return obj


# How torch.load(weights_only=True) begins the message of the UnpicklingError it raises for what it refuses.
_WEIGHTS_ONLY_FAILED = "Weights only load failed"


def _first_line(message: str) -> str:
    """The line of an error message that says what is wrong: for a refused weights-only load, the one
    after torch's paragraph about its default (whose advice, weights_only=False, dit8 does not take)."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if lines[0].startswith(_WEIGHTS_ONLY_FAILED):
        lines = [line for line in lines[1:] if not line.startswith("Please file an issue")] or lines
    return lines[0]


class _Anything:
    """What the storage reader below makes of every class or function a pickle names: takes any
    arguments and state, builds nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass


class _StorageReader(pickle.Unpickler):
    """Lists the storages a zip checkpoint's data.pkl declares, (record key, bytes), running nothing:
    every global is _Anything, except the storage classes, whose element size the byte count needs."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.storages: list[tuple[str, int | None]] = []

    def find_class(self, module: str, name: str) -> object:
        if module == "torch" and name.endswith("Storage"):
            return name
        return _Anything

    def persistent_load(self, pid: object) -> object:
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            _, kind, key, _, numel = pid
            size = _STORAGE_ITEM_SIZES.get(kind) if isinstance(kind, str) else None
            self.storages.append((str(key), None if size is None or not isinstance(numel, int) else size * numel))
        return _Anything()


# Element sizes of the storage classes torch.save names (UntypedStorage counts bytes).
_STORAGE_ITEM_SIZES = {"UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1,
                       "ShortStorage": 2, "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4,
                       "FloatStorage": 4, "LongStorage": 8, "DoubleStorage": 8, "ComplexFloatStorage": 8,
                       "ComplexDoubleStorage": 16}


def _check_storage_records(path: Path) -> None:
    """Each storage of a zip checkpoint is as long as its pickle declares. torch.load checks this
    unless it memory-maps the file, as dit8 does: a shorter record was read on into the next one."""
    with zipfile.ZipFile(path) as archive:
        records = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in records if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            return  # torch.load found its way through this archive; nothing here to compare with
        prefix = pickles[0].removesuffix("data.pkl")
        reader = _StorageReader(io.BytesIO(archive.read(pickles[0])))
        try:
            reader.load()
        except Exception:  # a form the stand-ins do not take; torch.load has read the pickle
            return
    for key, size in reader.storages:
        record = records.get(f"{prefix}data/{key}")
        if record is None:
            raise CheckpointError(f"{path}: corrupt: its pickle names the storage {key!r}, which the archive "
                                  f"does not hold")
        if size is not None and record.file_size != size:
            raise CheckpointError(f"{path}: corrupt: the storage record {record.filename} holds "
                                  f"{record.file_size} bytes, where its pickle declares {size}")


def _refuse_compressed_records(path: Path) -> None:
    """torch.save stores every record of its zip uncompressed; a compressed one (a checkpoint repacked by a
    zip tool) is refused before torch.load: memory-mapped, a storage's compressed bytes were read as its
    values, and a deflated data.pkl is inflated whole, whatever its size (2 MB of zip held 2 GiB)."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except Exception:  # not a zip (a legacy pickle), or a broken one: torch.load says what it is
        return
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(f"{path}: the record {record.filename} is compressed ({record.file_size} bytes "
                                  f"in {record.compress_size}), where torch.save stores records as they are: save "
                                  f"the checkpoint again with torch.save, not repacked by a zip tool")


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    _refuse_compressed_records(path)
    mapped = True
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            mapped = False
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        refused = re.search(r"GLOBAL (\S+)", str(err)) if str(err).startswith(_WEIGHTS_ONLY_FAILED) else None
        if refused:
            # A torch checkpoint (zip or legacy) naming a function or class: torch's message would advise
            # loading it with weights_only=False, which runs whatever the pickle calls.
            raise CheckpointError(f"{path}: refused: its pickle calls {refused[1]}, which is not part of a "
                                  "checkpoint of tensors; dit8 loads .pth files weights-only, running no code "
                                  "they name") from None
        detail = f"{type(err).__name__}: {_first_line(str(err))}" if str(err) else type(err).__name__
        if not zipfile.is_zipfile(path):
            other = describe_other_file(path)
            if other is not None:
                raise CheckpointError(f"{path}: not a torch checkpoint: {other}") from None
            raise CheckpointError(f"{path}: not a torch checkpoint (neither a zip archive, as torch.save writes, "
                                  f"nor a readable legacy pickle; {detail})") from None
        raise CheckpointError(f"{path}: cannot load as a weights-only torch checkpoint: {detail}") from None
    if mapped:
        _check_storage_records(path)
    return _unwrap_state_dict(obj, path)


@dataclass
class Checkpoint:
    """A checkpoint (one file or a folder of files) as a lazy mapping key -> tensor."""

    path: Path
    infos: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    config_json: Path | None = None
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    @property
    def files(self) -> list[Path]:
        """The files holding the tensors, sorted."""
        return sorted({info.file for info in self.infos.values()})

    def keys(self) -> list[str]:
        """The tensor keys, as the files name them."""
        return list(self.infos)

    def read(self, key: str) -> torch.Tensor:
        """Read one tensor into CPU memory (safetensors and zip-format .pth files are memory-mapped: only
        this tensor is touched; a legacy pickle was read whole when opened)."""
        info = self.infos[key]
        handle = self._handles.get(info.file)
        if info.file.suffix == SAFETENSORS_SUFFIX:
            try:
                if handle is None:
                    handle = self._handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
                return handle.get_tensor(key)
            except Exception as err:
                raise CheckpointError(f"{info.file}: cannot read tensor {key!r}: {err}") from None
        if handle is None:
            handle = self._handles[info.file] = _load_pickle(info.file)
        return handle[key]

    def close(self) -> None:
        """Drop the open files and loaded pickles (`read` opens them again when asked)."""
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _file_infos(path: Path, handles: dict) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        mode = path.stat().st_mode
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        # Reading a named pipe waits for a writer that may never come; a device may never end.
        raise CheckpointError(f"{path}: {'a folder' if stat.S_ISDIR(mode) else 'not a regular file'}, where a "
                              f"checkpoint file is expected")
    if path.suffix == SAFETENSORS_SUFFIX:
        return read_safetensors_header(path)
    if path.suffix in PICKLE_SUFFIXES:
        # A pickle must be loaded to see its shapes; keep it (memory-mapped) for reading.
        tensors = handles[path] = _load_pickle(path)
        return {k: TensorInfo(path, tuple(t.shape), t.dtype) for k, t in tensors.items()}, {}
    raise CheckpointError(f"{path}: not a checkpoint file (expected {SAFETENSORS_SUFFIX} or "
                          f"{'/'.join(PICKLE_SUFFIXES)})")


def _merge(files: list[Path], handles: dict) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    infos: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    said_by: dict[str, Path] = {}
    stated_by_file: dict[Path, set[str]] = {}
    for file in files:
        file_infos, file_meta = _file_infos(file, handles)
        stated_by_file[file] = {name for name in file_meta if name.startswith("dit8.")}
        for key, info in file_infos.items():
            if key in infos:
                raise CheckpointError(f"{file}: tensor {key!r} is also in {infos[key].file}")
            infos[key] = info
        # The parts of a dit8 checkpoint describe it alike (format version, configuration): a part that
        # says otherwise is named, rather than the last part's word being taken for all. (Other tools'
        # metadata may differ per file and is not checked here; the LoRA reader checks its own.)
        for name, value in file_meta.items():
            if name.startswith("dit8.") and metadata.get(name, value) != value:
                raise CheckpointError(f"{file}: header metadata {name} = {value!r} differs from "
                                      f"{said_by[name].name}'s {metadata[name]!r}")
            metadata[name] = value
            said_by.setdefault(name, file)
    # ... and each says all of it: a part without (a float file among packed ones) is not of that checkpoint.
    stated = {name for name in metadata if name.startswith("dit8.")}
    for file, own in stated_by_file.items():
        missing = stated - own
        if missing:
            raise CheckpointError(f"{file}: header metadata without {sorted(missing)}, which "
                                  f"{said_by[min(missing)].name} states")
    return infos, metadata


def _open_sharded(index: Path, handles: dict) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise CheckpointError(f"{index}: not a valid shard index: {err}") from None
    for name in set(weight_map.values()):
        if Path(name).name != name or name in ("", ".", ".."):  # shards lie beside their index, nowhere else
            raise CheckpointError(f"{index}: shard name {name!r} is not a file name in {index.parent}")
    shards = sorted({index.parent / name for name in weight_map.values()})
    for shard in shards:
        try:
            present = shard.is_file()
        except OSError as err:  # a name the file system refuses (longer than it allows)
            raise CheckpointError(f"{index}: shard name {shard.name!r} cannot be looked up: "
                                  f"{err.strerror or err}") from None
        if not present:
            raise CheckpointError(f"{shard}: shard named in {index.name} is missing")
    infos, metadata = _merge(shards, handles)
    for key, name in weight_map.items():
        info = infos.get(key)
        if info is None:
            raise CheckpointError(f"{index.parent / name}: tensor {key!r} listed in {index.name} is missing")
        if info.file.name != name:
            raise CheckpointError(f"{info.file}: tensor {key!r} is listed in {index.name} under {name}")
    for key, info in infos.items():
        if key not in weight_map:
            raise CheckpointError(f"{info.file}: tensor {key!r} is not listed in {index.name}")
    return infos, metadata


def _refuse_model_folder(folder: Path, files: list[Path]) -> None:
    """A folder's .pth files are the parts of one DiT, unless they are a model folder's encoders and VAE
    (whose keys would otherwise be reported as unexpected DiT tensors)."""
    from .model_folder import CLIP_FILE, T5_FILE, VAE_FILE, find_model_files

    others = [p.name for p in files if p.name in (T5_FILE, CLIP_FILE, VAE_FILE)]
    if others:
        try:  # the DiT the pipeline would take from it, where the folder is whole enough to tell
            found = f" (its DiT: {find_model_files(folder).dit})"
        except Dit8Error:
            found = ""
        raise CheckpointError(f"{folder}: a model folder ({', '.join(others)}), not a DiT checkpoint: pass the "
                              f"DiT file or folder{found}, or use dit8.I2VPipeline / `dit8 generate --model`")


def diffusers_pipeline_hint(folder: Path) -> str:
    """For a message about `folder`: where its DiT is, if it is the root of a diffusers pipeline (whose
    model_index.json lists a folder per part), else ""."""
    if (folder / "model_index.json").is_file() and (folder / "transformer").is_dir():
        return f" (a diffusers pipeline's folder: its DiT is {folder / 'transformer'})"
    return ""


def open_weights_file(path: str | Path, what: str, usual_name: str) -> Checkpoint:
    """open_checkpoint for the single-file weights of an encoder or the VAE: a folder (a model folder,
    say, whose DiT shards would be read in its place) is refused, naming the file wanted."""
    if Path(path).is_dir():
        raise CheckpointError(f"{path}: a folder; give the {what} file itself ({usual_name})")
    return open_checkpoint(path)


def as_path(value: object, name: str) -> Path:
    """A path argument as a Path; InputError naming the argument for anything else, or an empty string
    (which would mean the current folder)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise InputError(f"{name} must be a non-empty file or folder path, got {value!r}")
    return Path(value)


def why_missing(path: Path, absent: str) -> str:
    """Why `path.exists()` is False: `absent` where nothing is there, else what is (a symbolic link to
    nothing, a loop of links, a folder that may not be read), which an absent path would hide."""
    try:
        path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a loop of symbolic links"
        if err.errno == errno.ENOENT and path.is_symlink():
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        if err.errno != errno.ENOENT:
            return f"cannot read: {err.strerror or err}"
    return absent


def optional_file(path: Path) -> Path | None:
    """`path` where it is a file, None where nothing is there; CheckpointError where something else is (a
    folder, a symbolic link to nothing, a loop of links, a name that may not be read): an optional file
    such as a config.json must not be skipped for being broken, or what it states goes unchecked."""
    try:
        mode = path.stat().st_mode
    except OSError:
        reason = why_missing(path, "")
        if not reason:
            return None
        raise CheckpointError(f"{path}: {reason}") from None
    if stat.S_ISREG(mode):
        return path
    raise CheckpointError(f"{path}: {'a folder' if stat.S_ISDIR(mode) else 'not a regular file'}, where a file "
                          f"is expected")


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a checkpoint file or folder without reading tensor data.

    A folder holding `*.index.json` is read as shards; otherwise every `.safetensors` (or, failing
    that, `.pth`/`.pt`/`.bin`) file in it is one part of the checkpoint, as per-block files are. A
    `config.json` beside the weights is remembered for cross-checking.
    """
    path = as_path(path, "path")
    handles: dict[Path, object] = {}
    try:
        path.stat()  # (path.exists() raises for a name too long, as for any error but a missing path)
    except OSError:
        raise CheckpointError(f"{path}: {why_missing(path, 'no such file or folder')}") from None
    if path.is_dir():
        # Hidden files are not the checkpoint's: macOS's "._" resource forks, editors' and tools' temporaries.
        visible = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        indexes = [p for p in visible if p.name.endswith(".index.json")]
        if len(indexes) > 1:
            raise CheckpointError(f"{path}: more than one shard index: {[p.name for p in indexes]}")
        if indexes:
            infos, metadata = _open_sharded(indexes[0], handles)
        else:
            files = [p for p in visible if p.suffix == SAFETENSORS_SUFFIX]
            if not files:
                files = [p for p in visible if p.suffix in PICKLE_SUFFIXES]
                _refuse_model_folder(path, files)
            if not files:
                raise CheckpointError(f"{path}: no {SAFETENSORS_SUFFIX} or {'/'.join(PICKLE_SUFFIXES)} files in "
                                      f"this folder{diffusers_pipeline_hint(path)}")
            infos, metadata = _merge(files, handles)
        folder = path
    else:
        infos, metadata = _file_infos(path, handles)
        folder = path.parent
    if not infos:
        raise CheckpointError(f"{path}: holds no tensors")
    return Checkpoint(path, infos, metadata, optional_file(folder / "config.json"), handles)


def require_float_weight(dtype: torch.dtype, source: str | Path, key: str) -> None:
    """Refuse 8-bit codes (int8, fp8) where float weights are read: cast, they would become numbers."""
    if not dtype.is_floating_point or dtype.itemsize < 2:
        raise CheckpointError(f"{source}: tensor {key!r} has dtype {dtype}; only unquantized float weights are "
                              f"supported")


def load_encoder_weights(module: torch.nn.Module, ckpt: Checkpoint, *, prefix: str = "",
                         skip: Callable[[str], bool] = lambda key: False) -> None:
    """Copy every tensor of `module.state_dict()` from `ckpt` key `prefix + name`, one at a time,
    converting to the module's dtype and device. Keys the module does not hold are an error unless
    `skip(key)` says they are known and unused.

    Raises CheckpointError naming the file and key for a missing, unexpected, non-float or mis-shaped
    tensor; nothing is copied before every key and shape has been checked.
    """
    targets = module.state_dict(keep_vars=True)
    for key, info in ckpt.infos.items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in targets:
            want = tuple(targets[name].shape)
            if info.shape != want:
                raise CheckpointError(f"{info.file}: tensor {key!r} has shape {info.shape}, expected {want}")
            require_float_weight(info.dtype, info.file, key)
        elif not skip(key):
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r}")
    missing = [prefix + name for name in targets if prefix + name not in ckpt.infos]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{ckpt.path}: missing tensor {missing[0]!r}{more}")
    with torch.no_grad():
        for name, target in targets.items():
            target.copy_(ckpt.read(prefix + name))
