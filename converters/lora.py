"""LoRA files merged into a DiT's weights in fp32, one target tensor at a time.

Accepted keys (after an optional `model.diffusion_model.`, `diffusion_model.` or `transformer.`
prefix; module names official, or diffusers-named and mapped through dit8.layouts):
    {m}.lora_up.weight / {m}.lora_down.weight (+ optional {m}.alpha)
    {m}.lora_B.weight  / {m}.lora_A.weight    (+ optional {m}.alpha)
    {m}.diff    full delta of {m}.weight (or of the bare parameter {m}, e.g. blocks.N.modulation)
    {m}.diff_b  full delta of {m}.bias
Merge, in fp32, LoRA files in the order given, for every low-rank pair:
    W += (up · down) · (strength · alpha / rank)        rank = down.shape[0], alpha defaults to rank
(up and down flattened to 2-D, the scalar computed in double precision and applied as one fp32
multiply), and W += strength · diff for full deltas. A key matching no tensor of the model is an error.

The converter merges a target in blocks of rows (`merge_rows`). A target that fits one block (up to
convert.BLOCK_ELEMENTS = 4M elements: the 1.3B model's 1536 x 1536 projections, every norm, bias and
modulation table; not the 14B's 5120 x 5120 projections nor any FFN matrix) is merged exactly as
written above; for larger ones BLAS may sum a row's r products in another order than for the whole
matrix (differences ~1e-6 relative, far below 8-bit steps).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Mapping, Union

import torch

from dit8.checkpoint import SAFETENSORS_SUFFIX, Checkpoint, open_checkpoint
from dit8.errors import CheckpointError
from dit8.layouts import DIFFUSERS, to_official
from dit8.loader import check_finite

from .source import read_at, safetensors_offsets

LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
# key suffix -> role of the tensor in its module's delta
_SUFFIXES = {".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_B.weight": "up",
             ".lora_A.weight": "down", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b"}
_MAX_LISTED = 20

LoraArg = Union[str, Path, tuple]


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file to merge and its strength."""

    path: Path
    strength: float = 1.0


def parse_lora(arg: "LoraArg | LoraSpec") -> LoraSpec:
    """A LoraSpec from `FILE[:STRENGTH]`, a (path, strength) pair, or a path."""
    if isinstance(arg, LoraSpec):
        return arg
    if isinstance(arg, tuple):
        path, strength = arg
        spec = LoraSpec(Path(path), float(strength))
    else:
        text = str(arg)
        if not text:
            raise CheckpointError("a LoRA file name is empty")
        head, sep, tail = text.rpartition(":")
        try:
            spec = LoraSpec(Path(head), float(tail)) if sep and head else LoraSpec(Path(text))
        except ValueError:  # no number after the colon: the colon belongs to the path, unless it cannot
            if not Path(text).exists() and Path(head).is_file():
                raise CheckpointError(f"{head}: LoRA strength {tail!r} is not a number") from None
            spec = LoraSpec(Path(text))
    if not math.isfinite(spec.strength):
        raise CheckpointError(f"{spec.path}: LoRA strength {spec.strength} is not a finite number")
    return spec


class _LoraFile:
    """A LoRA checkpoint read tensor by tensor with plain reads (no memory map left resident)."""

    def __init__(self, spec: LoraSpec):
        self.spec = spec
        self.ckpt: Checkpoint = open_checkpoint(spec.path)
        self.offsets: dict[str, int] = {}
        for file in self.ckpt.files:
            if file.suffix == SAFETENSORS_SUFFIX:
                self.offsets.update(safetensors_offsets(file))
        self._handles: dict[Path, BinaryIO] = {}

    def read(self, key: str) -> torch.Tensor:
        """Tensor `key` as fp32, checked finite."""
        info = self.ckpt.infos[key]
        if not info.dtype.is_floating_point:
            raise CheckpointError(f"{info.file}: LoRA tensor {key!r} has dtype {info.dtype}, expected a float")
        if key in self.offsets:
            if info.file not in self._handles:
                self._handles[info.file] = info.file.open("rb")
            f = self._handles[info.file]
            t = read_at(f, self.offsets[key], info.nbytes, info.file, key).view(info.dtype).reshape(info.shape)
        else:
            t = self.ckpt.read(key)
        check_finite(t, key, info.file)
        return t.float()

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()
        self.ckpt.close()


@dataclass
class _Delta:
    """One delta on one target tensor: a low-rank pair or a full tensor."""

    file: _LoraFile
    factor: float  # strength · alpha / rank, or strength for a full delta
    up: str | None = None  # keys in the LoRA file
    down: str | None = None
    diff: str | None = None


def _strip_prefix(key: str) -> str:
    for prefix in LORA_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _split_role(key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def _resolve(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The official model key `name` denotes (official, else diffusers-named), or None."""
    if name in shapes:
        return name
    official = to_official(name, DIFFUSERS)
    return official if official in shapes else None


def _target(module: str, role: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if role == "diff_b":
        return _resolve(module + ".bias", shapes)
    # `.weight` first; `.diff` may also address a bare parameter such as blocks.N.modulation.
    candidates = [module + ".weight"] + ([module] if role == "diff" else [])
    for name in candidates:
        found = _resolve(name, shapes)
        if found is not None:
            return found
    return None


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _listing(keys: list[str]) -> str:
    more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return ", ".join(keys[:_MAX_LISTED]) + more


def _low_rank(lf: _LoraFile, module: str, keys: dict[str, str], target: str,
              shape: tuple[int, ...]) -> _Delta:
    """Validate a low-rank pair's shapes against its target and compute its scalar factor."""
    infos = lf.ckpt.infos
    up, down = infos[keys["up"]], infos[keys["down"]]
    rank = down.shape[0] if down.shape else 0
    up_cols = math.prod(up.shape[1:]) if len(up.shape) >= 2 else -1
    down_cols = math.prod(down.shape[1:]) if len(down.shape) >= 2 else -1
    if rank == 0 or up_cols != rank or up.shape[0] != shape[0] or up.shape[0] * down_cols != math.prod(shape):
        raise CheckpointError(f"{lf.spec.path}: LoRA {module!r} has up {up.shape} and down {down.shape}, which "
                              f"do not make a delta of {target!r} {shape}")
    alpha = float(rank)
    if "alpha" in keys:
        a = lf.read(keys["alpha"])
        if a.numel() != 1:
            raise CheckpointError(f"{lf.spec.path}: LoRA tensor {keys['alpha']!r} has shape {tuple(a.shape)}, "
                                  f"expected a scalar")
        alpha = float(a.reshape(()))
    return _Delta(lf, lf.spec.strength * alpha / rank, up=keys["up"], down=keys["down"])


class LoraSet:
    """LoRA files indexed by the official key of each tensor they change.

    `shapes` maps every official key of the model to its shape. Raises CheckpointError for keys that
    match nothing, incomplete pairs, and shapes that do not fit their target.
    """

    def __init__(self, specs: Iterable["LoraArg | LoraSpec"], shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.files: list[_LoraFile] = []
        self.deltas: dict[str, list[_Delta]] = defaultdict(list)
        # LoRA tensors of the target being merged: a target read in several row blocks needs them each time.
        self._cache_target: str | None = None
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        try:
            for spec in specs:
                self.files.append(_LoraFile(parse_lora(spec)))
                self._index(self.files[-1])
        except BaseException:
            self.close()
            raise

    def _index(self, lf: _LoraFile) -> None:
        modules: dict[str, dict[str, str]] = defaultdict(dict)  # module -> role -> key in the file
        unmatched: list[str] = []
        for key in lf.ckpt.keys():
            split = _split_role(_strip_prefix(key))
            if split is None:
                unmatched.append(key)
            elif split[1] in modules[split[0]]:
                # Two naming styles or prefixes for one tensor: which is meant (or how to pair them) is a guess.
                raise CheckpointError(f"{lf.spec.path}: LoRA keys {modules[split[0]][split[1]]!r} and {key!r} are "
                                      f"both the {split[1]} of {split[0]!r}")
            else:
                modules[split[0]][split[1]] = key
        for module, keys in modules.items():
            unmatched += self._index_module(lf, module, keys)
        if unmatched:
            raise CheckpointError(f"{lf.spec.path}: {len(unmatched)} LoRA key(s) match no weight of the model: "
                                  f"{_listing(sorted(unmatched))}")

    def _index_module(self, lf: _LoraFile, module: str, keys: dict[str, str]) -> list[str]:
        """Record one module's deltas; returns its keys that match nothing."""
        unmatched: list[str] = []
        if ("up" in keys) != ("down" in keys):
            present = keys.get("up") or keys.get("down")
            raise CheckpointError(f"{lf.spec.path}: LoRA {present!r} has no matching "
                                  f"{'down/A' if 'up' in keys else 'up/B'} tensor")
        if "up" in keys:
            target = _target(module, "up", self.shapes)
            if target is None:
                unmatched += [keys[r] for r in ("up", "down", "alpha") if r in keys]
            else:
                self.deltas[target].append(_low_rank(lf, module, keys, target, self.shapes[target]))
        elif "alpha" in keys:
            unmatched.append(keys["alpha"])  # an alpha without its pair scales nothing
        for role in ("diff", "diff_b"):
            if role not in keys:
                continue
            target = _target(module, role, self.shapes)
            if target is None:
                unmatched.append(keys[role])
                continue
            shape = lf.ckpt.infos[keys[role]].shape
            if _squeezed(shape) != _squeezed(self.shapes[target]):  # the same up to axes of size 1
                raise CheckpointError(f"{lf.spec.path}: LoRA tensor {keys[role]!r} has shape {shape}, its target "
                                      f"{target!r} has shape {self.shapes[target]}")
            self.deltas[target].append(_Delta(lf, lf.spec.strength, diff=keys[role]))
        return unmatched

    def merge_rows(self, key: str, rows: torch.Tensor, start: int) -> torch.Tensor:
        """`rows` (fp32, rows start.. of model tensor `key`) plus every delta on them, in order."""
        shape = self.shapes[key]
        if key != self._cache_target:
            self._cache_target, self._cache = key, {}
        stop = start + (rows.shape[0] if rows.dim() else 1)
        for delta in self.deltas.get(key, ()):
            if delta.diff is not None:
                full = self._full(delta.file, delta.diff).reshape(shape)
                part = full if not shape else full[start:stop]
                rows = rows + part * delta.factor
            else:
                up = self._full(delta.file, delta.up).flatten(1)[start:stop]
                down = self._full(delta.file, delta.down).flatten(1)
                rows = rows + ((up @ down) * delta.factor).reshape(rows.shape)
        return rows

    def _full(self, lf: _LoraFile, key: str) -> torch.Tensor:
        tag = (id(lf), key)
        if tag not in self._cache:
            self._cache[tag] = lf.read(key)
        return self._cache[tag]

    def describe(self) -> list[dict]:
        """What `dit8.lora` metadata records: each file's name and strength."""
        return [{"file": lf.spec.path.name, "strength": lf.spec.strength} for lf in self.files]

    def close(self) -> None:
        self._cache = {}
        for lf in self.files:
            lf.close()

    def __enter__(self) -> "LoraSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
