"""Backend registry: every op has a torch reference and, where written, faster backends.

`backend="auto"` picks, among the kernels that have passed their tests on this GPU generation
(GPU_VERIFIED) and the torch reference, the first usable one of: the backend measured fastest for the
op on this GPU generation (FASTEST), then BACKENDS order. On CPU tensors it picks the torch reference.
A call the torch reference cannot serve (8-bit attention) takes the first kernel backend that runs on a
GPU; on CPU tensors it raises, naming backend="triton" (the interpreter is a test tool, not a path). The
DIT8_BACKEND environment variable names a backend to try first for every op that has it. An explicit
`backend=` is strict: it runs that backend or raises.

DIT8_VERIFIED names a JSON file that takes the place of GPU_VERIFIED's entry for its GPU generation:
what a GPU test run on this machine verified, as `python bench/verified_backends.py tests.xml --json
FILE` writes it. bench/gpu_check.sh's later stages run with the file of its tests stage, so that they
time exactly the kernels that passed there.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch

from dit8.choices import BACKENDS  # preference order of "auto": CUDA, then Triton, then the torch reference
from dit8.errors import Dit8Error

from .triton_support import triton_installed, triton_unavailable_reason

F = TypeVar("F", bound=Callable)

ENV_VAR = "DIT8_BACKEND"
VERIFIED_VAR = "DIT8_VERIFIED"


class BackendError(Dit8Error, ValueError):
    """An op was asked for a backend that does not exist or cannot run here."""


class NoFP8Error(BackendError):
    """An FP8 path was asked of a GPU without FP8 tensor cores (before sm_89)."""


@dataclass(frozen=True)
class _Impl:
    fn: Callable
    runs_on: Callable[[torch.device], bool]


_OPS: dict[str, dict[str, _Impl]] = {}

# Per GPU generation (CUDA compute capability), the (op, backend) pairs of kernel backends that have
# passed their tests on such a GPU. "auto" picks only these (and the torch reference); explicit
# backend= and DIT8_BACKEND reach every registered kernel. The interpreter tests check the Triton
# kernels on CPU; a run of bench/gpu_check.sh on a GPU adds entries for its generation.
GPU_VERIFIED: dict[tuple[int, int], frozenset[tuple[str, str]]] = {
    # H100 (sm_90), torch 2.11, triton 3.6, 2026-11-26: bench/gpu_check.sh, 1,021 tests passed (commit
    # 452f074; the 5 failures were the Gluon 8-bit attention candidate's, since removed). The H100 run of
    # 2026-11-27 passed every pair's tests again (bench/RESULTS.md).
    (9, 0): frozenset({
        ("attention", "triton"), ("cross_attention", "triton"),
        ("gelu_tanh_quant", "cuda"), ("gelu_tanh_quant", "triton"),
        ("layer_norm", "cuda"), ("layer_norm", "triton"),
        ("layer_norm_modulate", "cuda"), ("layer_norm_modulate", "triton"),
        ("layer_norm_modulate_quant", "cuda"), ("layer_norm_modulate_quant", "triton"),
        ("layer_norm_quant", "cuda"), ("layer_norm_quant", "triton"),
        ("qk_norm_rope", "cuda"), ("qk_norm_rope", "triton"),
        ("qk_norm_rope_quant", "cuda"), ("qk_norm_rope_quant", "triton"),
        ("quantize_per_token", "cuda"), ("quantize_per_token", "triton"),
        ("residual_add", "triton"),
        ("rms_norm", "cuda"), ("rms_norm", "triton"),
        ("scaled_mm", "triton"), ("scaled_mm_fused", "triton"),
    }),
}

# Per GPU generation (CUDA compute capability), the backend measured fastest for an op that has several
# (the torch reference among them: SDPA can beat a kernel): "auto" tries it before BACKENDS order.
# bench/fastest_backends.py prints these entries from the benchmark suites' JSON.
FASTEST: dict[tuple[int, int], dict[str, str]] = {
    # sm_90, torch 2.11, triton 3.6, 2026-11-26: bench/test_bench_fused.py at 32,760 x 5120 (H100 and
    # H200) and bench/test_bench_attention.py (bf16 self-attention on the H200: the Triton kernel with
    # TMA loads 37.3 ms, cuDNN SDPA 38.4 ms).
    (9, 0): {
        "attention": "triton", "gelu_tanh_quant": "triton", "layer_norm_modulate": "triton",
        "layer_norm_modulate_quant": "triton", "layer_norm_quant": "triton", "qk_norm_rope": "triton",
        "quantize_per_token": "triton", "residual_add": "triton", "rms_norm": "triton",
    },
}


@functools.lru_cache(maxsize=None)
def _verified_file(path: str) -> tuple[tuple[int, int], frozenset[tuple[str, str]]]:
    """(capability, {(op, backend)}) from a file of bench/verified_backends.py --json."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        major, minor = data["capability"]
        pairs = frozenset((str(op), str(backend)) for op, backend in data["verified"])
        return (int(major), int(minor)), pairs
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        raise BackendError(f"{VERIFIED_VAR}={path}: not a file of verified kernels as bench/verified_backends.py "
                           f"--json writes it ({type(err).__name__}: {err})") from None


def verified_kernels(capability: tuple[int, int]) -> frozenset[tuple[str, str]]:
    """The (op, backend) kernels "auto" may run on a GPU of `capability`: those of the DIT8_VERIFIED file
    when it is for this capability, else GPU_VERIFIED's."""
    if path := os.environ.get(VERIFIED_VAR):
        file_capability, file_pairs = _verified_file(path)
        if file_capability == capability:
            return file_pairs
    return GPU_VERIFIED.get(capability, frozenset())


@functools.lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """False on CUDA GPUs before sm_89; True elsewhere (CPU tensors: the interpreter emulates FP8)."""
    return device.type != "cuda" or _capability(device) >= (8, 9)


def require_fp8_tensor_cores(what: str, device: torch.device, instead: str) -> None:
    """BackendError unless `device` has FP8 tensor cores (sm_89 or newer), saying to do `instead`.
    Devices other than CUDA GPUs pass: on CPU tensors the Triton kernels run in the interpreter."""
    if not has_fp8_tensor_cores(device):
        major, minor = _capability(device)
        raise NoFP8Error(f"{what} needs FP8 tensor cores (sm_89 or newer); this GPU is sm_{major}{minor}: "
                         f"{instead}")


def _any_device(device: torch.device) -> bool:
    return True


def register(op: str, backend: str, runs_on: Callable[[torch.device], bool] = _any_device) -> Callable[[F], F]:
    """Decorator registering `fn` as `backend`'s implementation of `op`.

    `runs_on(device)` tells whether it can run on tensors of that device on this machine.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: F) -> F:
        _OPS.setdefault(op, {})[backend] = _Impl(fn if backend == "torch" else _without_gradients(op, backend, fn),
                                                 runs_on)
        return fn

    return decorate


def _without_gradients(op: str, backend: str, fn: Callable) -> Callable:
    """`fn`, refusing inputs that require grad while autograd records: the kernels have no backward, so
    their outputs would silently drop out of the gradient."""
    names = list(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.is_grad_enabled():
            for name, value in (*zip(names, args), *kwargs.items()):
                if isinstance(value, torch.Tensor) and value.requires_grad:
                    raise BackendError(f"{op}: {name} requires grad, and the {backend} kernels compute no "
                                       f"gradients; call under torch.no_grad() or torch.inference_mode(), or "
                                       f"use backend='torch'")
        return fn(*args, **kwargs)

    return run


def _check_name(name: str, where: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise BackendError(f"{where}: unknown backend {name!r}; expected 'auto' or one of {BACKENDS}")


def check_preferred_backend() -> None:
    """BackendError for a DIT8_BACKEND that names no backend. Read at each op call, it showed only at the
    first forward, after a model was built or loaded; a model checks it when it is built."""
    _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def unavailable_reason(backend: str, device: torch.device) -> str:
    """Why `backend`'s kernels ("triton" or "cuda", whose runs_on has said no) do not run on `device`
    tensors here."""
    if backend == "triton":
        return triton_unavailable_reason(device)
    if device.type != "cuda":
        return f"the {backend.upper()} kernels take CUDA tensors, not {device.type} ones"
    from .cuda_ext import unavailable_reason as cuda_unavailable_reason  # (imported for CUDA tensors only)

    return cuda_unavailable_reason(device) or f"the {backend!r} kernels do not run here"


def resolve(op: str, backend: str, device: torch.device, *, reference: bool = True) -> Callable:
    """The implementation of `op` to run on `device` for the requested backend.

    reference=False: the torch reference cannot serve this call (a path only the kernels have, such
    as 8-bit attention), so "auto" takes the first kernel backend that runs here, verified or not.
    """
    _check_name(backend, f"{op}(backend=...)")
    impls = _OPS[op]
    if backend != "auto":
        impl = impls.get(backend)
        if impl is None:
            raise BackendError(f"{op}: there is no {backend!r} kernel of this op, on any device; "
                               f"its backends: {[b for b in BACKENDS if b in impls]}")
        if not impl.runs_on(device):
            # A path without a torch reference (8-bit attention) cannot be served by it either.
            usable = [b for b, i in impls.items() if (reference or b != "torch") and i.runs_on(device)]
            raise BackendError(f"{op}: backend {backend!r} cannot run on {device.type} tensors here "
                               f"({unavailable_reason(backend, device)}); usable: {usable}")
        return impl.fn
    preferred = os.environ.get(ENV_VAR, "auto")
    _check_name(preferred, ENV_VAR)
    # On CPU tensors "auto" means the torch reference: Triton there is the interpreter, a testing tool.
    fallback = BACKENDS if device.type != "cpu" else ("torch",)
    on_cuda = device.type == "cuda"
    fastest = FASTEST.get(_capability(device), {}).get(op) if on_cuda and FASTEST else None
    verified = verified_kernels(_capability(device)) if on_cuda else frozenset()
    order = [name for name in (preferred, fastest) if name not in (None, "auto")] + list(fallback)
    for name in order:
        if name == "torch" and not reference:
            continue
        impl = impls.get(name)
        # Eligibility before runs_on: the "cuda" predicate may build the extension.
        eligible = name in (preferred, "torch") or (op, name) in verified or not reference
        if impl is not None and eligible and impl.runs_on(device):
            return impl.fn
    if not reference and device.type == "cpu":
        missing = "" if triton_installed() else f"; {triton_unavailable_reason(device)}"
        raise BackendError(f"{op}: this path has no torch reference; on CPU tensors run the Triton kernels "
                           f"in the interpreter with backend='triton' (TRITON_INTERPRET=1){missing}")
    raise BackendError(f"{op}: no backend can run on {device.type} tensors here")


def model_backend(op: str, backend: str, device: torch.device) -> str:
    """The backend= a model built with `backend` passes to `op`. A model's backend is a preference, not
    a demand on every op: "triton" or "cuda" where the op has that kernel and it runs on `device`, else
    "auto" (so a model on "triton" runs its float linears, which have only the torch reference, as
    "auto" would). "auto" and "torch" pass through."""
    _check_name(backend, "backend")
    if backend in ("auto", "torch"):
        return backend
    impl = _OPS[op].get(backend)
    return backend if impl is not None and impl.runs_on(device) else "auto"


def backend_runs_on(backend: str, device: torch.device) -> bool:
    """Whether any op's `backend` implementation runs on `device` here (asks only that backend, so
    checking "triton" does not build the CUDA extension)."""
    _check_name(backend, "backend")
    return backend == "auto" or any(backend in impls and impls[backend].runs_on(device) for impls in _OPS.values())


def reference_only_notice(backend: str, device: torch.device) -> str | None:
    """Why "auto" will run only the torch reference ops on this GPU, or None when it will not: no kernel
    has been verified on this GPU generation and DIT8_BACKEND names none. Said once to users of a GPU,
    whose models would otherwise run many times slower than they can without a word."""
    if backend != "auto" or device.type != "cuda" or os.environ.get(ENV_VAR, "auto") != "auto":
        return None
    major, minor = _capability(device)
    if verified_kernels((major, minor)):
        return None
    return (f"dit8: no kernel has passed its GPU tests on this GPU generation (sm_{major}{minor}) yet, so "
            f"backend='auto' runs the torch reference ops, many times slower than the kernels (8-bit "
            f"attention, which has no reference, runs its Triton kernel untested); DIT8_BACKEND=triton "
            f"(or backend='triton') runs the Triton kernels, bench/gpu_check.sh tests them")


def available_backends(device: str | torch.device = "cpu") -> dict[str, list[str]]:
    """For every registered op, the backends that can run on `device` on this machine, in auto's order
    (`scaled_mm_fused` is the entry `scaled_mm` dispatches to when it has an epilogue to fuse)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise BackendError(f"available_backends: {device!r} is not a device name (e.g. cpu, cuda): {err}") from None
    return {op: [b for b in BACKENDS if b in impls and impls[b].runs_on(device)]
            for op, impls in sorted(_OPS.items())}
