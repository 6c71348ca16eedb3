"""The Gluon GEMM kernels for Hopper (kernels/scaled_mm_gluon.py) routed into `scaled_mm`: those adopted
for a GPU generation (ADOPTED), and candidates on trial, for measuring what they change in a whole
forward before they are adopted.

DIT8_GLUON, when set, replaces the adopted ones with its list of candidates and, optionally, each one's
configuration:

    DIT8_GLUON="gemm gemm_fast gemm_int8"  # their default configurations
    DIT8_GLUON="gemm=k256"                 # gemm: a scaled_mm_gluon.CANDIDATES key
    DIT8_GLUON=""                          # none: the Triton kernels only

On an sm_90 GPU, then, `scaled_mm(..., backend="triton")` runs scaled_mm_gluon's kernels: for FP8
operands "gemm" where the Triton table promotes the accumulation and "gemm_fast"
(scaled_mm_gluon.FAST) where it takes its fast-accumulation tiles; for INT8 operands "gemm_int8" (FAST
too). Calls outside a candidate's scope (other GPUs, shapes, strides) run the Triton kernels as before.
`dit8 bench dit` records what was routed with its results. Pure Python: importing this imports no
triton.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .checks import OpArgumentError

ENV_VAR = "DIT8_GLUON"
# Each candidate's configurations; the first is its default.
CONFIGURATIONS = {
    "gemm": ("default", "stages5", "k256", "ws", "ws_k256", "split"),
    "gemm_fast": ("default", ),
    "gemm_int8": ("default", ),
}


# Per GPU generation (CUDA compute capability): the candidates routed where DIT8_GLUON is unset. Each
# passed its GPU tests on such a GPU and beat the Triton kernel it replaces there, in its benchmark and
# in whole forwards (bench/RESULTS.md).
ADOPTED: dict[tuple[int, int], str] = {
    # H100, torch 2.11, triton 3.6, 2026-11-26 (afternoon): the warp-specialized promoted FP8 GEMM took
    # 4.107 ms where the Triton kernel took 4.973 at (32760, 5120, 13824); the in-place INT8 GEMM was
    # 1.04-1.13x the Triton one on the three Wan shapes. With both, the FP8 forward's GEMMs took 606 ms
    # instead of 648, the INT8 forward's 620 instead of 696.
    (9, 0): "gemm=ws gemm_int8",
}


@functools.lru_cache(maxsize=None)  # (every GEMM call asks)
def _parsed(setting: str, source: str) -> tuple[tuple[str, str], ...]:
    return tuple(_parse(setting, source).items())


def _parse(setting: str, source: str) -> dict[str, str]:
    choice: dict[str, str] = {}
    for item in setting.split():
        name, _, config = item.partition("=")
        if name not in CONFIGURATIONS:
            raise OpArgumentError(f"{source}: unknown candidate {name!r}; the candidates are "
                                  f"{', '.join(CONFIGURATIONS)}")
        config = config or CONFIGURATIONS[name][0]
        if config not in CONFIGURATIONS[name]:
            raise OpArgumentError(f"{source}: {name} has no configuration {config!r}; it has "
                                  f"{', '.join(CONFIGURATIONS[name])}")
        choice[name] = config
    return choice


@functools.lru_cache(maxsize=None)
def _gluon_available() -> bool:
    """Whether this triton has the Gluon dialect (the adopted kernels are skipped where it has not)."""
    return importlib.util.find_spec("triton") is not None and \
        importlib.util.find_spec("triton.experimental.gluon") is not None


def _hopper(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def chosen(device: torch.device | None = None) -> dict[str, str]:
    """{candidate: configuration} routed for calls on `device`: DIT8_GLUON's when it is set (checked
    whatever the device: OpArgumentError naming the variable for anything it does not know), else the
    adopted ones of the device's GPU generation; {} off Hopper and for device None without DIT8_GLUON."""
    setting = os.environ.get(ENV_VAR)
    if setting is not None:
        return dict(_parsed(setting, ENV_VAR))
    if not _hopper(device) or not _gluon_available():
        return {}
    return dict(_parsed(ADOPTED.get(torch.cuda.get_device_capability(device), ""), "candidates.ADOPTED"))


def routed(candidate: str, device: torch.device) -> str | None:
    """The configuration of `candidate` routed for a call on `device` (chosen), or None: not chosen, or
    not a Hopper GPU."""
    if not _hopper(device):
        return None
    return chosen(device).get(candidate)
