"""Model dimensions of a Wan2.1 DiT, read from tensor shapes and cross-checked against config.json."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import CheckpointError, InputError

# Wan2.1 uses 128-wide attention heads in every released size; the head count is not visible in any
# tensor shape, so it is derived from this unless a config.json or the file's metadata says otherwise.
WAN_HEAD_DIM = 128

# The most text rows a model may pad its context to (Wan2.1: 512). text_len is in no tensor shape, only in
# a config.json: a bound turns a wrong value there into an error instead of an allocation of terabytes.
MAX_TEXT_LEN = 65_536


@dataclass(frozen=True)
class WanConfig:
    """Dimensions of one Wan2.1 DiT. `clip_dim` is set for image-to-video models, None for text-to-video."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    clip_dim: int | None = None
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    def __post_init__(self) -> None:
        # Any integer-like value (numpy integers too) and any sequence of three for patch_size are taken
        # and stored as Python ints; anything else (strings, zeros, booleans) is refused here, where the
        # message can name the field, rather than failing later in arithmetic.
        def positive_int(name: str, value: object) -> int:
            if not isinstance(value, bool):
                with contextlib.suppress(TypeError):
                    if (number := operator.index(value)) > 0:
                        return number
            raise InputError(f"{name} must be a positive integer, got {value!r}")

        for name in ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "freq_dim", "text_dim",
                     "text_len"):
            object.__setattr__(self, name, positive_int(name, getattr(self, name)))
        if self.text_len > MAX_TEXT_LEN:
            raise InputError(f"text_len {self.text_len} is past the {MAX_TEXT_LEN:,} text rows taken (Wan2.1 pads "
                             f"its text to 512)")
        if self.clip_dim is not None:
            object.__setattr__(self, "clip_dim", positive_int("clip_dim", self.clip_dim))
        patch = self.patch_size
        if isinstance(patch, (str, bytes)) or not hasattr(patch, "__len__") or len(patch) != 3:
            raise InputError(f"patch_size must be three positive integers, got {patch!r}")
        object.__setattr__(self, "patch_size", tuple(positive_int("patch_size", p) for p in patch))
        eps = self.eps
        if isinstance(eps, (bool, str, bytes)) or not isinstance(eps, numbers.Real) or not 0 < eps < 1:
            raise InputError(f"eps must be a number in (0, 1), got {eps!r}")
        object.__setattr__(self, "eps", float(eps))
        if self.dim % self.num_heads:
            raise InputError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise InputError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        """Channels per attention head."""
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        """Whether the model takes a CLIP image (I2V); T2V models do not."""
        return self.clip_dim is not None

    @property
    def variant(self) -> str:
        """"i2v" or "t2v"."""
        return "i2v" if self.is_i2v else "t2v"

    def to_dict(self) -> dict:
        """The fields as JSON-ready values (what the packed format's header stores)."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "WanConfig":
        """The config `to_dict` wrote; unknown fields raise InputError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise InputError(f"unknown WanConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


# Fields of the official (WanModel) and diffusers (WanTransformer3DModel) config.json files that
# correspond to WanConfig fields.
_OFFICIAL_FIELDS = {
    "dim": "dim", "ffn_dim": "ffn_dim", "num_heads": "num_heads", "num_layers": "num_layers",
    "in_dim": "in_dim", "out_dim": "out_dim", "freq_dim": "freq_dim", "text_dim": "text_dim",
    "text_len": "text_len", "eps": "eps", "patch_size": "patch_size",
}
_DIFFUSERS_FIELDS = {
    "num_attention_heads": "num_heads", "num_layers": "num_layers", "in_channels": "in_dim",
    "out_channels": "out_dim", "freq_dim": "freq_dim", "text_dim": "text_dim", "ffn_dim": "ffn_dim",
    "eps": "eps", "patch_size": "patch_size", "image_dim": "clip_dim",
}


def config_json_values(raw: Mapping) -> dict:
    """WanConfig field values stated by an official or diffusers config.json (only those present), and
    "variant" where an official one names its model_type."""
    diffusers = "num_attention_heads" in raw or "in_channels" in raw
    table = _DIFFUSERS_FIELDS if diffusers else _OFFICIAL_FIELDS
    values = {ours: raw[theirs] for theirs, ours in table.items() if theirs in raw}
    heads, head_dim = raw.get("num_attention_heads"), raw.get("attention_head_dim")
    if diffusers and isinstance(heads, int) and isinstance(head_dim, int):
        values["dim"] = heads * head_dim
    if not diffusers and "model_type" in raw:
        values["variant"] = raw["model_type"]
    if isinstance(values.get("patch_size"), list):
        values["patch_size"] = tuple(values["patch_size"])
    return values


# The `_class_name` of the official DiT's config.json; diffusers' are those of its *Transformer3DModel classes.
DIT_CONFIG_CLASSES = ("WanModel",)


def read_config_json(path: Path) -> dict:
    """Parse a DiT's config.json, raising CheckpointError naming the file when it is not valid JSON or is
    the config of another model (a transformers model's, or a `_class_name` other than a DiT's)."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise CheckpointError(f"{path}: cannot read config: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: config must be a JSON object")
    # Another model's config (a VAE's, or a CLIP's from transformers, which names its heads as diffusers
    # does) could state a head count that no shape contradicts: the DiT would load and compute nonsense.
    if "architectures" in raw:  # what transformers writes; neither Wan nor diffusers does for the DiT
        raise CheckpointError(f"{path}: the config of a transformers model ({raw['architectures']!r}), not of a "
                              f"Wan2.1 DiT")
    name = raw.get("_class_name")
    if name is not None and name not in DIT_CONFIG_CLASSES and not str(name).endswith("Transformer3DModel"):
        raise CheckpointError(f"{path}: the config of a {name!r} (its _class_name), not of a Wan2.1 DiT")
    return raw


# The fields of a config.json that no tensor shape tells: taken from it, not checked against the weights.
UNSHAPED_FIELDS = ("num_heads", "eps", "text_len")


def check_against_config_json(config: WanConfig, raw: Mapping, source: Path) -> WanConfig:
    """Cross-check dimensions read from shapes against a config.json; returns the config with the
    fields shapes cannot tell (heads, eps, text_len) taken from the json."""
    stated = config_json_values(raw)
    if stated.get("variant", config.variant) not in ("i2v", "t2v"):  # Wan2.2's ti2v, Wan2.1's flf2v, vace, ...
        raise CheckpointError(f"{source}: model_type {raw['model_type']!r} is not one dit8 runs: it reads Wan2.1's "
                              f"'i2v' and 't2v' DiTs")
    if "variant" in stated and stated.pop("variant") != config.variant:
        raise CheckpointError(
            f"{source}: model_type {raw['model_type']!r} disagrees with the weights, which are {config.variant}")
    adopt = {k: stated.pop(k) for k in UNSHAPED_FIELDS if k in stated}
    if stated.get("clip_dim", config.clip_dim) is None and config.clip_dim is not None:
        # image_dim: null beside I2V weights is taken as not stated (in_channels, checked below, already
        # tells I2V from T2V).
        stated.pop("clip_dim")
    for field, value in stated.items():
        if getattr(config, field) != value:
            raise CheckpointError(
                f"{source}: {field} = {value!r} disagrees with the weights ({getattr(config, field)!r})")
    try:
        return dataclasses.replace(config, **adopt)
    except ValueError as err:
        raise CheckpointError(f"{source}: {err}") from None


def tiny_config(variant: str = "i2v", **overrides: Any) -> WanConfig:
    """A small configuration of the real architecture, for tests and the demo (runs in ms on a CPU)."""
    base: dict[str, Any] = dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2,
                                in_dim=36 if variant == "i2v" else 16, out_dim=16, freq_dim=256, text_dim=64,
                                clip_dim=32 if variant == "i2v" else None)
    base.update(overrides)
    return WanConfig(**base)


I2V_14B = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16, clip_dim=1280)
