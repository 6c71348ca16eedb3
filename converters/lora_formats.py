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
`adapter_config.json` beside `adapter_model.safetensors`. Read here: `lora_alpha`, `alpha_pattern`
(per-module alphas, matched as PEFT matches them) and `use_rslora` (alpha / √rank); `use_dora` and
adapter types other than LoRA are refused. Without either, alpha is the rank (scale 1), as every
tool takes it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

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


@dataclass(frozen=True)
class AdapterConfig:
    """The scaling a PEFT-style config gives each module's pair."""

    source: str  # where it was read, for error messages
    alpha: float | None = None  # lora_alpha; None: not given (alpha = rank)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    rslora: bool = False

    def alpha_of(self, module: str) -> float | None:
        """The alpha PEFT gives `module` (its name as the file writes it, without prefix)."""
        for pattern, alpha in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", module):
                return alpha
        return self.alpha

    def rank_divisor(self, rank: int) -> float:
        """What alpha is divided by: the rank, or its square root under rsLoRA."""
        return math.sqrt(rank) if self.rslora else float(rank)


def _number(value: Any, what: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value == 0:
        raise CheckpointError(f"{source}: {what} is {value!r}, expected a finite nonzero number")
    return float(value)


def parse_adapter_config(config: Mapping[str, Any], source: str) -> AdapterConfig:
    """An AdapterConfig from a PEFT LoraConfig's dict (keys bare or prefixed `transformer.`)."""
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{source}: the adapter config is not a JSON object")
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    config = prefixed or dict(config)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CheckpointError(f"{source}: a {peft_type} adapter; dit8 merges LoRAs only")
    if config.get("use_dora"):
        raise CheckpointError(f"{source}: a DoRA adapter (use_dora); dit8 merges plain LoRAs only")
    alpha = config.get("lora_alpha")
    patterns = config.get("alpha_pattern") or {}
    if not isinstance(patterns, Mapping):
        raise CheckpointError(f"{source}: alpha_pattern is not an object")
    return AdapterConfig(source, None if alpha is None else _number(alpha, "lora_alpha", source),
                         {str(p): _number(a, f"alpha_pattern[{p!r}]", source) for p, a in patterns.items()},
                         bool(config.get("use_rslora", False)))


def read_adapter_config(path: Path, metadata: Mapping[str, str]) -> AdapterConfig | None:
    """The PEFT config of the LoRA at `path` (a file or folder) with header `metadata`, or None."""
    configs = []
    if ADAPTER_METADATA_KEY in metadata:
        configs.append((_json(metadata[ADAPTER_METADATA_KEY], f"{path}: header {ADAPTER_METADATA_KEY}"),
                        f"{path}: header {ADAPTER_METADATA_KEY}"))
    folder = path if path.is_dir() else path.parent if path.stem == "adapter_model" else None
    if folder is not None and (folder / ADAPTER_CONFIG_FILE).is_file():
        file = folder / ADAPTER_CONFIG_FILE
        try:
            text = file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file}: cannot be read: {err}") from None
        configs.append((_json(text, str(file)), str(file)))
    parsed = [parse_adapter_config(config, source) for config, source in configs]
    if len(parsed) == 2 and (parsed[0].alpha, parsed[0].alpha_pattern, parsed[0].rslora) != \
            (parsed[1].alpha, parsed[1].alpha_pattern, parsed[1].rslora):
        raise CheckpointError(f"{parsed[1].source} and {parsed[0].source} give the LoRA different scalings")
    return parsed[0] if parsed else None


def _json(text: str, source: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{source}: not valid JSON: {err}") from None
