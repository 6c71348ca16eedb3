"""LoRA files merged into a DiT's weights in fp32, one target tensor at a time.

Key names and where alpha is written: converters/lora_formats.py. Merge, in fp32, LoRA files in the
order given, for every low-rank pair:
    W += (up · down) · (strength · alpha / rank)        rank = down.shape[0]
(alpha: the pair's `.alpha` tensor, else its PEFT config's (lora_formats.py), else the rank)
(up and down flattened to 2-D, the scalar computed in double precision and applied as one fp32
multiply; √rank for rsLoRA), the pair's bias delta (`lora_B.bias`) with the same scalar, and
W += strength · diff for full deltas. A key matching no tensor of the model is an error, and so is a
target given two pairs, or two full deltas, by one file (two names for one module).

The converter merges a target in blocks of rows (`merge_rows`). A target that fits one block (up to
convert.BLOCK_ELEMENTS = 4M elements: the 1.3B model's 1536 x 1536 projections, every norm, bias and
modulation table; not the 14B's 5120 x 5120 projections nor any FFN matrix) is merged exactly as
written above; for larger ones BLAS may sum a row's r products in another order than for the whole
matrix (differences ~1e-6 relative, far below 8-bit steps).
"""

from __future__ import annotations

import io
import math
import numbers
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Union

import torch

from dit8.checkpoint import SAFETENSORS_SUFFIX, Checkpoint, open_checkpoint
from dit8.errors import CheckpointError
from dit8.layouts import DIFFUSERS, from_official, to_official
from dit8.loader import check_finite

from .lora_formats import (ADAPTER_METADATA_KEY, KOHYA_PREFIX, AdapterConfig, kohya_names, read_adapter_config,
                           split_role, strip_prefix, unsupported_kind)
from .source import read_at, safetensors_offsets

_MAX_LISTED = 20


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA file to merge and its strength."""

    path: Path
    strength: float = 1.0


# A LoRA to merge: "path[:strength]", a Path, a (path, strength) pair or a LoraSpec.
LoraArg = Union[str, Path, "tuple[str | Path, float]", "LoraSpec"]


def parse_lora(arg: LoraArg) -> LoraSpec:
    """A LoraSpec from `FILE[:STRENGTH]` (a str), a (path, strength) pair, or a path (a Path: its name is
    all path, strength 1)."""
    if isinstance(arg, LoraSpec):
        # Made by the caller, unchecked: its fields are held to what the other forms give (a bool strength,
        # NaN or a str path passed through to the merge).
        if not isinstance(arg.path, (str, os.PathLike)):
            raise CheckpointError(f"a LoraSpec's path must be a str or os.PathLike, got {type(arg.path).__name__}")
        if arg.path == "":  # Path("") is the current folder
            raise CheckpointError("a LoRA file name is empty")
        try:
            spec = LoraSpec(Path(arg.path), _strength(arg.strength))
        except TypeError as err:
            raise CheckpointError(f"{arg.path}: LoRA {err}") from None
    elif isinstance(arg, os.PathLike):
        spec = LoraSpec(Path(arg))
    elif isinstance(arg, tuple):
        try:
            path, strength = arg
            if isinstance(path, str) and not path:  # Path("") is the current folder
                raise ValueError("the file name is empty")
            spec = LoraSpec(Path(path), _strength(strength))
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"a LoRA given as a tuple must be (path, strength), got {arg!r}: {err}") from None
    elif not isinstance(arg, str):
        # str() of anything is some text: None, 5 or b"x.safetensors" became a file named 'None', '5' or
        # "b'x.safetensors'", refused much later as not found.
        raise CheckpointError(f"a LoRA must be a path (str or os.PathLike), a (path, strength) pair or a LoraSpec, "
                              f"got {type(arg).__name__} {arg!r}"[:300])
    else:
        text = arg
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


def _strength(value: object) -> float:
    """A strength given as a number (TypeError else): float(True) is 1.0, a switch and not a strength, and
    "0.5" is text."""
    if isinstance(value, bool):
        raise TypeError(f"strength {value!r} is a bool, not a number")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"strength {value!r} is not a number")
    return float(value)


class _LoraFile:
    """A LoRA checkpoint read tensor by tensor with plain reads (no memory map left resident)."""

    def __init__(self, spec: LoraSpec):
        self.spec = spec
        self.ckpt: Checkpoint = open_checkpoint(spec.path)
        self.offsets: dict[str, int] = {}
        self._handles: dict[Path, io.BufferedReader] = {}
        try:
            configs = {}  # each part's header config (a LoRA split over files shares one scaling)
            for file in self.ckpt.files:
                offsets, metadata = safetensors_offsets(file) if file.suffix == SAFETENSORS_SUFFIX else ({}, {})
                self.offsets.update(offsets)
                configs[file] = metadata.get(ADAPTER_METADATA_KEY)
            if len(set(configs.values())) > 1:
                raise CheckpointError(f"{spec.path}: its files' {ADAPTER_METADATA_KEY} headers differ "
                                      f"({', '.join(f.name for f in configs)}): merge each file as a LoRA of its own")
            self.adapter: AdapterConfig | None = read_adapter_config(spec.path, self.ckpt.metadata)
        except BaseException:
            self.ckpt.close()
            raise

    def read(self, key: str, *, integer: bool = False) -> torch.Tensor:
        """Tensor `key` as fp32, checked finite (`integer`: an integer tensor is accepted too)."""
        info = self.ckpt.infos[key]
        if not info.dtype.is_floating_point and not (integer and info.dtype != torch.bool):
            raise CheckpointError(f"{info.file}: LoRA tensor {key!r} has dtype {info.dtype}, expected a float")
        if key in self.offsets:
            if info.file not in self._handles:
                try:
                    self._handles[info.file] = info.file.open("rb")
                except OSError as err:
                    # Removed or unreadable since it was indexed: the LoRA's error (convert reports any other
                    # OSError as a failure to write its output).
                    raise CheckpointError(f"{info.file}: cannot read: {err.strerror or err}") from err
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


def _resolve(name: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """The official model key `name` denotes (official, else diffusers-named), or None."""
    if name in shapes:
        return name
    official = to_official(name, DIFFUSERS)
    return official if official in shapes else None


def _target(module: str, role: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    if role in ("diff_b", "up_bias"):
        return _resolve(module + ".bias", shapes)
    if role == "diff_m":
        return _resolve(module + ".modulation", shapes)
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
    alpha = float(rank) if "alpha" not in keys else _tensor_alpha(lf, keys["alpha"], rank)
    adapter = lf.adapter
    if adapter is not None:
        spellings = _spellings(module, target)
        configured_rank = adapter.rank_of(spellings)
        if configured_rank is not None and configured_rank != rank:
            raise CheckpointError(f"{lf.spec.path}: LoRA {module!r} has rank {rank}, {adapter.source} says "
                                  f"{configured_rank}")
        pattern_alpha = adapter.alpha_of(spellings)
        config_alpha = pattern_alpha if pattern_alpha is not None else adapter.alpha
        if "alpha" not in keys:
            alpha = config_alpha
        elif adapter.rslora:  # kohya-style tools read a .alpha tensor as alpha / rank: which is meant is a guess
            raise CheckpointError(f"{lf.spec.path}: LoRA tensor {keys['alpha']!r} beside {adapter.source}'s "
                                  f"use_rslora: alpha / rank or alpha / √rank is ambiguous")
        elif (adapter.alpha_given or pattern_alpha is not None) and config_alpha != alpha:
            raise CheckpointError(f"{lf.spec.path}: LoRA tensor {keys['alpha']!r} = {alpha:g} and "
                                  f"{adapter.source} says alpha {config_alpha:g} for {module!r}")
    divisor = adapter.rank_divisor(rank) if adapter is not None else float(rank)
    return _Delta(lf, lf.spec.strength * alpha / divisor, up=keys["up"], down=keys["down"])


def _tensor_alpha(lf: _LoraFile, key: str, rank: int) -> float:
    a = lf.read(key, integer=True)
    if a.numel() != 1:
        raise CheckpointError(f"{lf.spec.path}: LoRA tensor {key!r} has shape {tuple(a.shape)}, expected a scalar")
    alpha = float(a.reshape(()))
    if alpha == 0:  # some tools read 0 as "no alpha" (scale 1), others as a zero delta
        raise CheckpointError(f"{lf.spec.path}: LoRA tensor {key!r} is 0, which tools read as either no alpha "
                              f"or no change; give alpha = rank ({rank}) or a strength of 0")
    return alpha


def _spellings(module: str, target: str) -> list[str]:
    """A module's names: as the LoRA file writes it, official, and diffusers'."""
    official = target.removesuffix(".weight")
    try:
        diffusers = from_official(target, DIFFUSERS).removesuffix(".weight")
    except KeyError:
        diffusers = official
    return list(dict.fromkeys([module, official, diffusers]))


class LoraSet:
    """LoRA files indexed by the official key of each tensor they change.

    `shapes` maps every official key of the model to its shape. Raises CheckpointError for keys that
    match nothing, incomplete pairs, and shapes that do not fit their target.
    """

    def __init__(self, specs: Iterable[LoraArg], shapes: Mapping[str, tuple[int, ...]]):
        self.shapes = dict(shapes)
        self.files: list[_LoraFile] = []
        self.deltas: dict[str, list[_Delta]] = defaultdict(list)
        # LoRA tensors of the target being merged: a target read in several row blocks needs them each time.
        self._cache_target: str | None = None
        self._cache: dict[tuple[int, str], torch.Tensor] = {}
        self._kohya = kohya_names(self.shapes)
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
        unsupported = sorted({kind for key in lf.ckpt.keys() if (kind := unsupported_kind(key)) is not None})
        if unsupported:
            raise CheckpointError(f"{lf.spec.path}: a {' / '.join(unsupported)} adapter; dit8 merges low-rank pairs "
                                  f"(lora_up/lora_down, lora_A/lora_B) and full deltas (.diff) only")
        for key in lf.ckpt.keys():
            split = split_role(strip_prefix(key))
            if split is None:
                unmatched.append(key)
                continue
            module, role = split
            if module.startswith(KOHYA_PREFIX):
                module = self._kohya.get(module, module)
            if role in modules[module]:
                # Two naming styles or prefixes for one tensor: which is meant (or how to pair them) is a guess.
                raise CheckpointError(f"{lf.spec.path}: LoRA keys {modules[module][role]!r} and {key!r} are "
                                      f"both the {role} of {module!r}")
            modules[module][role] = key
        claimed: dict[tuple[str, str], str] = {}  # (target, "pair" or "full") -> module
        for module, keys in modules.items():
            unmatched += self._index_module(lf, module, keys, claimed)
        own = next((key for key in unmatched if _resolve(strip_prefix(key), self.shapes) is not None), None)
        if own is not None and not modules:  # else listed below as some hundreds of keys matching nothing
            raise CheckpointError(f"{lf.spec.path}: a DiT checkpoint (it holds the model's own tensors, such as "
                                  f"{own!r}, and no LoRA factors or deltas), not a LoRA: give it as the model to "
                                  f"convert; --lora takes LoRA files")
        if unmatched:
            raise CheckpointError(f"{lf.spec.path}: {len(unmatched)} LoRA key(s) match no weight of the model: "
                                  f"{_listing(sorted(unmatched))}")

    def _index_module(self, lf: _LoraFile, module: str, keys: dict[str, str],
                      claimed: dict[tuple[str, str], str]) -> list[str]:
        """Record one module's deltas; returns its keys that match nothing."""
        unmatched: list[str] = []

        def claim(target: str, kind: str, by: str) -> None:
            # One module under two names (official and diffusers), or a bias under two (.diff_b, lora_B.bias),
            # would be merged twice.
            other = claimed.setdefault((target, kind), by)
            if other != by:
                raise CheckpointError(f"{lf.spec.path}: LoRA {other!r} and {by!r} both change {target!r}")

        if ("up" in keys) != ("down" in keys):
            present = keys.get("up") or keys.get("down")
            raise CheckpointError(f"{lf.spec.path}: LoRA {present!r} has no matching "
                                  f"{'down/A' if 'up' in keys else 'up/B'} tensor")
        pair: _Delta | None = None
        if "up" in keys:
            target = _target(module, "up", self.shapes)
            if target is None:
                unmatched += [keys[r] for r in ("up", "down", "alpha") if r in keys]
            else:
                claim(target, "pair", module)
                pair = _low_rank(lf, module, keys, target, self.shapes[target])
                self.deltas[target].append(pair)
        elif "alpha" in keys:
            unmatched.append(keys["alpha"])  # an alpha without its pair scales nothing
        if "up_bias" in keys and "up" not in keys:
            raise CheckpointError(f"{lf.spec.path}: LoRA {keys['up_bias']!r} has no lora_A/lora_B pair to scale it by")
        for role in ("diff", "diff_b", "diff_m", "up_bias"):
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
            claim(target, "full", keys[role])
            # A pair's bias (PEFT's lora_bias) is scaled as the pair; a full delta by the strength alone.
            factor = pair.factor if role == "up_bias" and pair is not None else lf.spec.strength
            self.deltas[target].append(_Delta(lf, factor, diff=keys[role]))
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
        """Close every LoRA file."""
        self._cache = {}
        for lf in self.files:
            lf.close()

    def __enter__(self) -> "LoraSet":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
