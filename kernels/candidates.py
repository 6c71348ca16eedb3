"""Kernels on trial: the Gluon candidates for Hopper (kernels/*_gluon.py) routed into the ops, for
measuring what they change in a whole forward before any table or registry entry names them.

DIT8_GLUON lists the candidates to route and, optionally, each one's configuration:

    DIT8_GLUON="attention gemm gemm_fast"  # their default configurations (also gemm_int8, attention_8bit)
    DIT8_GLUON="attention=ws gemm=k256"    # attention(_8bit): "default" or "ws"; gemm: a scaled_mm_gluon.CANDIDATES key

On an sm_90 GPU, then, `attention(precision="bf16", backend="triton")` runs attention_gluon's kernel,
`attention(precision="int8" or "fp8", backend="triton")` attention_8bit_gluon's ("attention_8bit"),
and `scaled_mm(..., backend="triton")` runs scaled_mm_gluon's: for FP8 operands "gemm" where the
Triton table promotes the accumulation and "gemm_fast" (scaled_mm_gluon.FAST) where it takes its
fast-accumulation tiles; for INT8 operands "gemm_int8" (FAST too). Calls outside a candidate's scope
(other GPUs, shapes, strides) run the Triton kernels as before. Unset, the ops are unchanged. `dit8 bench
dit` records the setting with its results. Pure Python: importing this imports no triton.
"""

from __future__ import annotations

import os

import torch

from .checks import OpArgumentError

ENV_VAR = "DIT8_GLUON"
# Each candidate's configurations; the first is its default.
CONFIGURATIONS = {
    "attention": ("default", "ws"),
    "attention_8bit": ("default", "ws"),
    "gemm": ("default", "stages5", "k256", "ws", "ws_k256"),
    "gemm_fast": ("default", ),
    "gemm_int8": ("default", ),
}


def chosen() -> dict[str, str]:
    """{candidate: configuration} from DIT8_GLUON; OpArgumentError naming the variable for anything it
    does not know."""
    choice: dict[str, str] = {}
    for item in os.environ.get(ENV_VAR, "").split():
        name, _, config = item.partition("=")
        if name not in CONFIGURATIONS:
            raise OpArgumentError(f"{ENV_VAR}: unknown candidate {name!r}; the candidates are "
                                  f"{', '.join(CONFIGURATIONS)}")
        config = config or CONFIGURATIONS[name][0]
        if config not in CONFIGURATIONS[name]:
            raise OpArgumentError(f"{ENV_VAR}: {name} has no configuration {config!r}; it has "
                                  f"{', '.join(CONFIGURATIONS[name])}")
        choice[name] = config
    return choice


def routed(candidate: str, device: torch.device) -> str | None:
    """The configuration DIT8_GLUON asks of `candidate` for a call on `device`, or None: not asked for,
    or not a Hopper GPU."""
    config = chosen().get(candidate)
    if config is None or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9:
        return None
    return config
