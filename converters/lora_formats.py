"""How LoRA files name their tensors, and where their alpha is written.

Key names, as the tools that make Wan2.1 LoRAs write them (after an optional prefix, LORA_PREFIXES):
    {m}.lora_up.weight / {m}.lora_down.weight       kohya, LightX2V, CausVid
    {m}.lora_B.weight  / {m}.lora_A.weight          PEFT, diffusers (also with PEFT's adapter name
                                                    `default` before `.weight`)
    {m}.alpha                                       the pair's alpha, a scalar tensor (float or integer)
    {m}.lora_B.bias                                 a delta of {m}.bias scaled as the pair (PEFT's
                                                    lora_bias; diffusers' name for a `.diff_b`)
    {m}.diff / {m}.diff_b                           full deltas of {m}.weight (or of the bare parameter
                                                    {m}) and of {m}.bias
    {m}.diff_m                                      full delta of {m}.modulation (LightX2V's extractor)
with {m} an official module name (`blocks.0.self_attn.q`), a diffusers one (`blocks.0.attn1.to_q`), or
kohya's (musubi-tuner): `lora_unet_` and the official name with `_` for `.` (`lora_unet_blocks_0_self_attn_q`).

PEFT and diffusers keep alpha out of the tensors: in the safetensors header (`lora_adapter_metadata`,
a JSON object of PEFT's LoraConfig, its keys prefixed `transformer.` when a pipeline saved it) or in
`adapter_config.json` beside `adapter_model.safetensors`. Read here: `lora_alpha` (PEFT's default 8
where a config leaves it out), `alpha_pattern` (per-module alphas, matched as PEFT matches them, against
each of a module's names), `r` and `rank_pattern` (checked against the tensors) and `use_rslora`
(alpha / √rank); `use_dora`, initialisations that change the base weights (PiSSA, OLoRA, CorDA, LoftQ)
and adapter types other than LoRA are refused. Without a config, alpha is a pair's `.alpha` tensor, else
its rank (scale 1), as every tool takes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from dit8.checkpoint import optional_file
from dit8.errors import CheckpointError

LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "base_model.model.")
KOHYA_PREFIX = "lora_unet_"
# key suffix -> role of the tensor in its module's delta
ROLES = {".lora_up.weight": "up", ".lora_down.weight": "down", ".lora_B.weight": "up", ".lora_A.weight": "down",
         ".lora_B.default.weight": "up", ".lora_A.default.weight": "down", ".lora_B.bias": "up_bias",
         ".lora_B.default.bias": "up_bias", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b",
         ".diff_m": "diff_m"}
# Adapters that are not a sum of low-rank products and full deltas: merged as one, they would be wrong.
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "lora_mid": "LoCon (lora_mid)",
               "hada_": "LoHa", "lokr_": "LoKr"}
ADAPTER_METADATA_KEY = "lora_adapter_metadata"
ADAPTER_CONFIG_FILE = "adapter_config.json"


def strip_prefix(key: str) -> str:
    """`key` without the first of LORA_PREFIXES it starts with."""
    for prefix in LORA_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def split_role(key: str) -> tuple[str, str] | None:
    """(module, role) of a key without its prefix, or None for a key of no known role."""
    for suffix, role in ROLES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def unsupported_kind(key: str) -> str | None:
    """The adapter type a key belongs to when dit8 cannot merge it (DoRA, LoHa, ...), else None."""
    for marker, kind in UNSUPPORTED.items():
        if marker in key:
            return kind
    return None


def kohya_names(official_keys: Iterable[str]) -> dict[str, str]:
    """kohya module name -> official module name, for every weight and bare parameter of the model."""
    names: dict[str, str] = {}
    for key in official_keys:
        module = key.removesuffix(".weight") if key.endswith(".weight") else key
        names[KOHYA_PREFIX + module.replace(".", "_")] = module
    return names


# PEFT's LoraConfig default for lora_alpha, which a config without the field gets from PEFT and diffusers.
PEFT_DEFAULT_ALPHA = 8.0
# LoRA initialisations that also change the base weights (the adapter is a delta against a modified model).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass(frozen=True)
class AdapterConfig:
    """The scaling a PEFT-style config gives each module's pair."""

    source: str  # where it was read, for error messages
    alpha: float = PEFT_DEFAULT_ALPHA  # lora_alpha
    alpha_given: bool = False  # whether the config names lora_alpha (else PEFT's default)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rank: int | None = None  # r
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    rslora: bool = False

    def alpha_of(self, spellings: Sequence[str]) -> float | None:
        """The alpha an alpha_pattern entry gives the module, or None where none matches it. `spellings`:
        the module's names (as the file writes it, official, diffusers); PEFT matched the patterns against
        the names of the model it trained, which a file's keys may no longer use."""
        return self._pattern_value(self.alpha_pattern, spellings, "alpha_pattern")

    def rank_of(self, spellings: Sequence[str]) -> int | None:
        """The rank the config gives the module (rank_pattern, else r), or None where it gives none."""
        found = self._pattern_value(self.rank_pattern, spellings, "rank_pattern")
        return self.rank if found is None else int(found)

    def rank_divisor(self, rank: int) -> float:
        """What alpha is divided by: the rank, or its square root under rsLoRA."""
        return math.sqrt(rank) if self.rslora else float(rank)

    def _pattern_value(self, patterns: Mapping[str, float], spellings: Sequence[str], what: str) -> float | None:
        # As PEFT's get_pattern_key: the first pattern (in the config's order) that matches a name's end.
        found = {}
        for name in spellings:
            for pattern, value in patterns.items():
                if re.match(rf"(.*\.)?({pattern})$", name):
                    found[pattern] = value
                    break
        if len(set(found.values())) > 1:
            raise CheckpointError(f"{self.source}: {what} gives {spellings[0]!r} different values under its "
                                  f"names {list(spellings)}: {found}")
        return next(iter(found.values()), None)


def _number(value: Any, what: str, source: str) -> float:
    if not isinstance(value, bool) and isinstance(value, (int, float)):
        # A JSON integer past float's range makes math.isfinite raise OverflowError: it is no finite alpha.
        with contextlib.suppress(OverflowError):
            if math.isfinite(value) and value != 0:
                return float(value)
    raise CheckpointError(f"{source}: {what} is {value!r}, expected a finite nonzero number")


def _rank(value: Any, what: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {what} is {value!r}, expected a positive integer")
    return value


def _patterns(config: Mapping[str, Any], name: str, convert: Callable[[Any, str, str], Any],
              source: str) -> dict[str, Any]:
    """The `name` patterns of a PEFT config (alpha_pattern, rank_pattern), each checked to be a regular
    expression and its value passed through `convert` (`_number` or `_rank`)."""
    patterns = config.get(name) or {}
    if not isinstance(patterns, Mapping):
        raise CheckpointError(f"{source}: {name} is not an object")
    for pattern in patterns:
        try:
            # Python 3.10 only warns of a flag such as (?i) inside the expression, then applies it to the whole
            # of it; 3.11 and later refuse it. As an error, it is refused alike everywhere.
            with warnings.catch_warnings():
                warnings.simplefilter("error", DeprecationWarning)
                re.compile(rf"(.*\.)?({pattern})$")  # as _pattern_value matches it
        # (RecursionError: deep nesting; OverflowError: a repeat count past C's int.)
        except (re.error, RecursionError, OverflowError, DeprecationWarning) as err:
            raise CheckpointError(f"{source}: {name} key {pattern!r} is not a regular expression: {err}") from None
    return {str(p): convert(v, f"{name}[{p!r}]", source) for p, v in patterns.items()}


def parse_adapter_config(config: Mapping[str, Any], source: str) -> AdapterConfig:
    """An AdapterConfig from a PEFT LoraConfig's dict (keys bare or prefixed `transformer.`)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the adapter config is not a JSON object")
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or dict(config)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"{source}: a {peft_type} adapter; dit8 merges LoRAs only")
    if _flag(config, "use_dora", source):
        raise CheckpointError(f"{source}: a DoRA adapter (use_dora); dit8 merges plain LoRAs only")
    init = config.get("init_lora_weights")
    if init is not None and not isinstance(init, (bool, str)):
        raise CheckpointError(f"{source}: init_lora_weights must be true, false or a method's name, got {init!r}")
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"{source}: init_lora_weights {init!r} changes the base weights too; convert the "
                              f"adapter to a plain LoRA first")
    given = "lora_alpha" in config
    alpha = _number(config["lora_alpha"], "lora_alpha", source) if given else PEFT_DEFAULT_ALPHA
    rank = config.get("r")
    return AdapterConfig(source, alpha, given, _patterns(config, "alpha_pattern", _number, source),
                         None if rank is None else _rank(rank, "r", source),
                         _patterns(config, "rank_pattern", _rank, source), _flag(config, "use_rslora", source))


def _flag(config: Mapping[str, Any], name: str, source: str) -> bool:
    """A PEFT config's boolean `name` (absent or null: False); anything but true or false is refused, as
    "false", a true string, would otherwise turn it on."""
    value = config.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {name} must be true or false, got {value!r}")
    return value


def read_adapter_config(path: Path, metadata: Mapping[str, str]) -> AdapterConfig | None:
    """The PEFT config of the LoRA at `path` (a file or folder) with header `metadata`, or None.

    `adapter_config.json` is read from a LoRA folder, beside `adapter_model.*` (and checked against its
    header's config), or beside a file of another name whose header has none when no `adapter_model.*`
    file is there that it could describe."""
    configs = []
    if ADAPTER_METADATA_KEY in metadata:
        configs.append((_json(metadata[ADAPTER_METADATA_KEY], f"{path}: header {ADAPTER_METADATA_KEY}"),
                        f"{path}: header {ADAPTER_METADATA_KEY}"))
    if path.is_dir():
        folder: Path | None = path
    elif path.stem == "adapter_model" or (not configs and not any(path.parent.glob("adapter_model.*"))):
        folder = path.parent
    else:
        folder = None
    file = None if folder is None else optional_file(folder / ADAPTER_CONFIG_FILE)
    if file is not None:
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: cannot be read: {err}") from None
        configs.append((_json(text, str(file)), str(file)))
    parsed = [parse_adapter_config(config, source) for config, source in configs]
    if len(parsed) == 2 and _described(parsed[0]) != _described(parsed[1]):
        raise CheckpointError(f"{parsed[1].source} and {parsed[0].source} describe the LoRA differently "
                              f"(lora_alpha, r, their patterns or use_rslora)")
    return parsed[0] if parsed else None


def _described(config: AdapterConfig) -> AdapterConfig:
    """What a config says, without where it was read or whether lora_alpha was PEFT's default."""
    return dataclasses.replace(config, source="", alpha_given=False)


def _json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:
        raise CheckpointError(f"{source}: not valid JSON: {err}") from None
