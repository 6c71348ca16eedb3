"""The CUDA backend: builds, loads and calls the `_dit8_cuda` pybind11 module compiled from csrc/.

Build: nvcc compiles csrc/*.cu (and the host compiler csrc/bindings.cpp) with ninja into a cache folder,
`$DIT8_CACHE/cuda_ext/<tag>` (default `~/.cache/dit8/cuda_ext/<tag>`; the tag hashes the Python ABI,
the target architectures, the source folder and its files' contents). It happens on first use, or ahead of
time with

    python -m dit8.kernels.cuda_ext build [--archs 80,89,90a] [--force] [-v]

The module does not include torch and links the CUDA runtime statically: it builds wherever nvcc,
ninja and pybind11 are installed (no GPU needed; CI builds and imports it on a CPU machine) and loads
into any torch version. Tensors cross as device pointers, element strides and dtype codes; the kernels
run on the current torch stream of the tensors' device.

Here, the torch side: argument checks (dtype, device, shape, strides, alignment) before every launch,
output allocation (`buffers.new_output`), and the torch.library ops `dit8::rows_cuda` and
`dit8::qk_norm_rope_cuda` with fake implementations, so the kernels compose with torch.compile and CUDA
graph capture. `cuda_available(device)` is the `runs_on` predicate of every "cuda" registration: true
on CUDA tensors when the module is built (it loads without nvcc) or can be built here. Otherwise (or
with DIT8_CUDA_EXT=0) it is false and "auto" falls through to the Triton backend.

Environment: DIT8_CACHE (cache root), DIT8_CUDA_ARCHS (e.g. "90a" or "80,89,90a"), DIT8_CUDA_EXT=0
(the ops never build or load it; the build command still builds; 1 or unset: on, anything else an
error), CUDA_HOME / CUDA_PATH (where nvcc is), CXX (the host compiler), DIT8_CSRC (the sources, if not
beside the package).
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    # `python -m dit8.kernels.cuda_ext`: run the package's own copy of this module, so that its
    # torch.library ops are defined once, under their package name.
    from dit8.kernels.cuda_ext import main as _main

    sys.exit(_main())

import argparse
import contextlib
import fcntl
import functools
import hashlib
import importlib.machinery
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch

from dit8.errors import Dit8Error

from . import fused_spec as spec
from .buffers import new_output

MODULE_NAME = "_dit8_cuda"
ABI_VERSION = 1  # csrc/bindings.cpp kAbiVersion
# Ahead-of-time targets: Ampere, Ada, Hopper (wgmma-capable sm_90a) and compute_90 PTX for newer GPUs.
DEFAULT_ARCHS = ("80", "89", "90a")
PTX_ARCH = "90"
# csrc/common.cuh DType
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int8: 3, torch.float8_e4m3fn: 4}
# csrc/ops.h limits: threads per block and vectors kept in registers per thread.
MAX_THREADS = 1024
QK_MAX_THREADS = 512
QK_VECS_PER_THREAD = 4
SOURCES = ("common.cuh", "rows.cuh", "ops.h", "norms.cu", "quantize.cu", "qk_norm_rope.cu", "bindings.cpp",
           "build.ninja")


class CudaExtError(Dit8Error, RuntimeError):
    """The CUDA extension cannot be built or loaded here."""


# ----------------------------------------------------------------------------------------------------
# Finding the tools
# ----------------------------------------------------------------------------------------------------

def source_dir() -> Path:
    """csrc/: $DIT8_CSRC, the repository's csrc/ beside kernels/, or an installed `dit8.csrc` package."""
    env = os.environ.get("DIT8_CSRC")
    if env:
        return Path(env).resolve()
    here = Path(__file__).resolve().parent.parent / "csrc"
    if (here / "build.ninja").is_file():
        return here
    spec_ = importlib.util.find_spec("dit8.csrc")
    if spec_ is not None and spec_.submodule_search_locations:
        return Path(next(iter(spec_.submodule_search_locations))).resolve()
    raise CudaExtError("the CUDA sources (csrc/) are not installed; set DIT8_CSRC to the csrc folder")


def find_nvcc() -> str | None:
    """nvcc's path: under $CUDA_HOME or $CUDA_PATH, on PATH, or in /usr/local/cuda; None where there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def find_ninja() -> str | None:
    """ninja's path: on PATH, or the binary of the `ninja` PyPI package; None where there is none."""
    found = shutil.which("ninja")
    if found:
        return found
    with contextlib.suppress(ImportError):
        import ninja  # the PyPI package ships the binary

        path = Path(ninja.BIN_DIR) / "ninja"
        if path.is_file():
            return str(path)
    return None


def pybind11_include() -> str | None:
    """pybind11's header folder, or None where pybind11 is not installed."""
    try:
        import pybind11
    except ImportError:
        return None
    return pybind11.get_include()


def missing_tools() -> list[str]:
    """What the build needs and this machine lacks (empty when it can build)."""
    missing = []
    if find_nvcc() is None:
        missing.append("nvcc (the CUDA toolkit; set CUDA_HOME)")
    if find_ninja() is None:
        missing.append("ninja (pip install ninja)")
    if pybind11_include() is None:
        missing.append("pybind11 (pip install pybind11)")
    cxx = os.environ.get("CXX", "c++")
    if len(shlex.split(cxx)) > 1:  # (nvcc's -ccbin takes one executable: no launcher, no flags)
        missing.append(f"a C++ compiler: CXX={cxx!r} must name one executable, without a launcher or flags")
    elif shutil.which(cxx) is None:
        missing.append("a C++ compiler (c++ or $CXX)")
    return missing


def parse_archs(text: str, source: str = "architectures") -> tuple[str, ...]:
    """"80,89,90a" (commas or semicolons, optional "sm_" prefixes) as ("80", "89", "90a"), each once;
    CudaExtError naming `source` for anything that is not an architecture, or for none at all."""
    archs = tuple(dict.fromkeys(a.strip().removeprefix("sm_") for a in text.replace(";", ",").split(",")
                                if a.strip()))
    for a in archs:
        if not re.fullmatch(r"[1-9][0-9]*[af]?", a, flags=re.ASCII):
            raise CudaExtError(f"{source}: bad CUDA architecture {a!r}; expected e.g. 80, 89, 90a")
    if not archs:
        raise CudaExtError(f"{source}: no CUDA architecture in {text!r}; expected e.g. 80, 89, 90a")
    return archs


def default_archs() -> tuple[str, ...]:
    """$DIT8_CUDA_ARCHS; else the current GPU's architecture (sm_90 builds as sm_90a); else DEFAULT_ARCHS."""
    env = os.environ.get("DIT8_CUDA_ARCHS")
    if env:
        return parse_archs(env, "DIT8_CUDA_ARCHS")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return (f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else ""),)
    return DEFAULT_ARCHS


def gencode_flags(archs: tuple[str, ...]) -> list[str]:
    """nvcc's -gencode flags for `archs`, plus compute_90 PTX when they are the DEFAULT_ARCHS."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if set(archs) == set(DEFAULT_ARCHS):
        flags.append(f"-gencode=arch=compute_{PTX_ARCH},code=compute_{PTX_ARCH}")
    return flags


def cache_root() -> Path:
    """$DIT8_CACHE (a leading ~ expanded, as a shell would have), else ~/.cache/dit8; CudaExtError naming
    the variable where it is something other than a folder."""
    env = os.environ.get("DIT8_CACHE")
    if not env:
        return Path.home() / ".cache" / "dit8"
    root = Path(env).expanduser()
    if root.exists() and not root.is_dir():
        raise CudaExtError(f"DIT8_CACHE={env!r}: not a folder")
    return root


def build_dir(archs: tuple[str, ...]) -> Path:
    """The cache folder of a build for `archs`: cuda_ext/<tag> (module docstring)."""
    # The sources' contents are in the key, so a module built from other sources is never loaded; no
    # build tool is, so a module built ahead of time loads on a machine without nvcc.
    src = source_dir()
    sources = hashlib.sha256(b"".join((src / name).read_bytes() for name in SOURCES if (src / name).is_file()))
    key = "|".join([sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "", ",".join(archs), str(src),
                    sources.hexdigest(), str(ABI_VERSION)])
    return cache_root() / "cuda_ext" / hashlib.sha256(key.encode()).hexdigest()[:16]


def module_path(archs: tuple[str, ...]) -> Path:
    """Where the module built for `archs` is (or will be)."""
    return build_dir(archs) / (MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


# ----------------------------------------------------------------------------------------------------
# Build and load
# ----------------------------------------------------------------------------------------------------

def _ninja_file(archs: tuple[str, ...]) -> str:
    # The tools and include folders go into shell commands: quoted, so paths with spaces stay whole.
    q = shlex.quote
    lines = [
        "# Written by dit8/kernels/cuda_ext.py; the rules are csrc/build.ninja's.",
        f"srcdir = {source_dir()}",
        f"nvcc = {q(find_nvcc())}",
        f"cxx = {q(shutil.which(os.environ.get('CXX', 'c++')))}",
        f"python_include = {q(sysconfig.get_paths()['include'])}",
        f"pybind11_include = {q(pybind11_include())}",
        f"gencode = {' '.join(gencode_flags(archs))}",
        f"archs = {','.join('sm_' + a for a in archs)}",
        f"module = {module_path(archs).name}",
        "include $srcdir/build.ninja",
        "",
    ]
    return "\n".join(lines)


# Written into the build folder when ninja fails: loading refuses to build the same sources again; the
# build command (and --force) tries.
FAILED_BUILD_LOG = "build-failed.log"


@contextlib.contextmanager
def _locked(folder: Path):
    """Holds the build folder's lock; yields its file descriptor, which the build's processes inherit so
    that the lock outlives a killed Python process until its compilers are done too."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent first uses build once
        try:
            yield lock.fileno()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build(archs: tuple[str, ...] | None = None, *, force: bool = False, verbose: bool = False,
          retry_failed: bool = False) -> Path:
    """Compile the module (ninja: only what changed) and return its path. Raises CudaExtError.

    A build of these sources that failed before is not tried again (its log says why) unless
    `retry_failed` (the build command) or `force` (which also starts from scratch)."""
    missing = missing_tools()
    if missing:
        raise CudaExtError("cannot build the CUDA extension: missing " + ", ".join(missing))
    archs = tuple(archs or default_archs())
    out_dir = build_dir(archs)
    failed = out_dir / FAILED_BUILD_LOG
    with _locked(out_dir) as lock:
        if force:
            for p in out_dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        elif failed.is_file() and not retry_failed:
            # The folder is keyed by the sources: the same build would fail again, once per process that
            # asks (test workers queue on the lock), each taking minutes.
            raise CudaExtError(f"an earlier build of these sources failed (its log: {failed}); after fixing "
                               "the cause, rebuild with: python -m dit8.kernels.cuda_ext build --force")
        (out_dir / "build.ninja").write_text(_ninja_file(archs))
        module = module_path(archs)
        linked = _file_stamp(module)
        _run_ninja(out_dir, verbose, lock)
        if _file_stamp(module) == linked and _damaged(module):
            # Changed after its link (ninja only compares times, so it would keep it): link it again.
            module.unlink()
            _run_ninja(out_dir, verbose, lock)
        if _file_stamp(module) != linked or not _checksum_path(module).is_file():
            _write_checksum(module)
        failed.unlink(missing_ok=True)
    return module


def _run_ninja(out_dir: Path, verbose: bool, lock: int) -> None:
    jobs = str(max(1, min(len(os.sched_getaffinity(0)), 8)))
    cmd = [find_ninja(), "-C", str(out_dir), "-j", jobs] + (["-v"] if verbose else [])
    proc = subprocess.run(cmd, capture_output=not verbose, text=True, pass_fds=(lock, ))
    if proc.returncode != 0:
        log = ((proc.stdout or "") + (proc.stderr or ""))[-6000:]
        # Only ninja's "a command failed" (1) is the sources' (or the toolchain's) doing: 2 is ninja
        # interrupted (SIGINT, SIGTERM, SIGHUP), a negative status ninja killed by a signal.
        if proc.returncode == 1:
            (out_dir / FAILED_BUILD_LOG).write_text(log)
        raise CudaExtError(f"building the CUDA extension in {out_dir} failed:\n{log}")


# Each module's SHA-256, written beside it when it is linked and checked before it is imported: a module
# damaged after its build (a truncated copy, a full disk) would crash the importing process.
def _checksum_path(module: Path) -> Path:
    return module.with_name(module.name + ".sha256")


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_checksum(module: Path) -> None:
    partial = module.with_name(module.name + ".sha256.partial")
    partial.write_text(_digest(module) + "\n")
    partial.replace(_checksum_path(module))


def _damaged(module: Path) -> bool:
    """Whether the module differs from the checksum recorded at its link (False without a record)."""
    recorded = _checksum_path(module)
    return recorded.is_file() and recorded.read_text().strip() != _digest(module)


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(path))
    mod_spec = importlib.util.spec_from_file_location(MODULE_NAME, str(path), loader=loader)
    module = importlib.util.module_from_spec(mod_spec)
    loader.exec_module(module)
    return module


_MODULE: ModuleType | None = None


def _disabled() -> bool:
    """DIT8_CUDA_EXT=0 turns the extension off; unset, empty or 1 leaves it on. Any other value is refused
    (an "off" or "false" read as on would run the kernels it meant to stop)."""
    value = os.environ.get("DIT8_CUDA_EXT", "")
    if value not in ("", "0", "1"):
        raise CudaExtError(f"DIT8_CUDA_EXT={value!r}: expected 0 (off) or 1 (on)")
    return value == "0"


def load() -> ModuleType:
    """The `_dit8_cuda` module for this machine's GPUs (`default_archs`), built or brought up to date
    first where the build tools are installed; loaded once per process."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    if _disabled():
        raise CudaExtError("the CUDA extension is disabled (DIT8_CUDA_EXT=0)")
    archs = default_archs()
    path = module_path(archs)
    if missing_tools():
        # A module built ahead of time is used as it is: this GPU's own, or the default targets' (the
        # build command's on a machine without a GPU), which hold sm_90a and PTX for newer GPUs.
        path = next((p for p in (path, module_path(DEFAULT_ARCHS)) if p.is_file()), None)
        if path is None:
            build(archs)  # raises, naming the missing tools
    else:
        # ninja brings the module up to date (a no-op when it is). Where it cannot (a read-only mount, a
        # failed build), a module the cache holds still serves: this GPU's own, or the default targets'.
        try:
            path = build(archs)
        except (OSError, CudaExtError) as err:
            held = next((p for p in (path, module_path(DEFAULT_ARCHS)) if p.is_file()), None)
            if held is None:
                if isinstance(err, CudaExtError):
                    raise
                raise CudaExtError(f"cannot build the CUDA extension in {path.parent}: {err}") from None
            path = held
    if not _checksum_path(path).is_file() or _damaged(path):
        raise CudaExtError(f"{path} was changed after its build (the checksum recorded then, "
                           f"{_checksum_path(path).name}, is missing or differs); rebuild with: "
                           "python -m dit8.kernels.cuda_ext build --force")
    module = _import(path)
    if getattr(module, "ABI_VERSION", None) != ABI_VERSION:
        raise CudaExtError(f"{path} has ABI {getattr(module, 'ABI_VERSION', None)}, expected {ABI_VERSION}; "
                           "rebuild with: python -m dit8.kernels.cuda_ext build --force")
    _MODULE = module
    return module


@functools.cache
def _load_error() -> str | None:
    """Why the module does not load (building it if it can), or None when it does; warns once on failure."""
    try:
        load()
    except (CudaExtError, OSError, ImportError) as err:
        warnings.warn(f"dit8: CUDA kernels unavailable, using the Triton/torch backends: {err}", stacklevel=4)
        return str(err)
    return None


def unavailable_reason(device: torch.device) -> str | None:
    """Why the "cuda" registrations cannot run on `device` tensors here, or None when they can (an
    explicit backend="cuda" that cannot run says this)."""
    if device.type != "cuda":
        return f"the CUDA kernels take CUDA tensors, not {device.type} ones"
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    if _disabled():
        return "the CUDA extension is disabled (DIT8_CUDA_EXT=0)"
    return None if _MODULE is not None else _load_error()


def cuda_available(device: torch.device) -> bool:
    """runs_on predicate of the "cuda" registrations: CUDA tensors, a GPU, and a built/buildable module."""
    return unavailable_reason(device) is None


# ----------------------------------------------------------------------------------------------------
# Launchers (argument checks, alignment, output allocation)
# ----------------------------------------------------------------------------------------------------

def _aligned(*items) -> bool:
    """All pointers/byte offsets given are multiples of 16 bytes."""
    return all(int(v) % 16 == 0 for v in items)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a contiguous copy when its start or a row stride is not a multiple of 16 bytes."""
    if _aligned(t.data_ptr(), *(s * t.element_size() for s in t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check_device(op: str, *tensors) -> None:
    for t in tensors:
        if t is not None and t.device.type != "cuda":
            raise spec.OpArgumentError(f"{op}: the cuda backend needs CUDA tensors, got one on {t.device}")


def launch_rows(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                shift: torch.Tensor | None, scale: torch.Tensor | None, norm: int, act: int, rows_per_batch: int,
                eps: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the rows kernel (fused_spec.py) on CUDA tensors."""
    op = "rows_cuda"
    spec.check_rows(op, x, weight, bias, shift, scale, norm, act, rows_per_batch, out_dtype)
    _check_device(op, x)
    out, out_scale = spec.rows_outputs(x, out_dtype, new_output)
    M, C = x.shape
    if M == 0:
        return out, out_scale
    esize = x.element_size()
    full = 16 // esize
    # 16-byte accesses need every row start (input, output, parameters) on a 16-byte boundary.
    vec = full if (C % full == 0 and _aligned(x.data_ptr(), x.stride(0) * esize, out.data_ptr(), _ptr(weight),
                                                   _ptr(bias), _ptr(shift), _ptr(scale),
                                                   0 if shift is None else shift.stride(0) * 4,
                                                   0 if scale is None else scale.stride(0) * 4)) else 1
    load().rows(
        x=x.data_ptr(), x_stride=x.stride(0), out=out.data_ptr(), out_scale=_ptr(out_scale) if out_scale.numel() else 0,
        weight=_ptr(weight), bias=_ptr(bias), shift=_ptr(shift), scale=_ptr(scale),
        shift_stride=0 if shift is None else shift.stride(0), scale_stride=0 if scale is None else scale.stride(0),
        rows=M, rows_per_batch=max(rows_per_batch, 1), cols=C, norm=norm, act=act, eps=eps,
        in_dtype=DTYPE_CODES[x.dtype], out_dtype=DTYPE_CODES[out_dtype], vec=vec,
        device=x.device.index if x.device.index is not None else torch.cuda.current_device(),
        stream=_stream(x.device))
    return out, out_scale


def launch_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                        cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                        out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the q/k RMSNorm + RoPE kernel (fused_spec.py) on CUDA tensors."""
    op = "qk_norm_rope_cuda"
    spec.check_qk(op, q, k, weight_q, weight_k, cos, sin, heads, out_dtype)
    _check_device(op, q)
    B, L, C = q.shape
    D = C // heads
    esize = q.element_size()
    full = 16 // esize
    if D % full == 0:
        # 16-byte accesses need every row start on a 16-byte boundary. An operand that lacks it is
        # copied (a fresh tensor is aligned) rather than read in pairs: the pair path covers at most
        # QK_MAX_THREADS * QK_VECS_PER_THREAD * 2 channels, fewer than Wan's 5120.
        q, k = _aligned_rows(q), _aligned_rows(k)
        # The parameters are read as contiguous vectors and [L, D/2] tables: only their start matters.
        weight_q, weight_k, cos, sin = (t if _aligned(t.data_ptr()) else t.clone()
                                        for t in (weight_q, weight_k, cos, sin))
        vec = full
    else:
        # Pairs: 2-element accesses need 2-element alignment; copy the rare input that lacks it.
        def pair_aligned(t):
            return t.data_ptr() % (2 * esize) == 0 and t.stride(0) % 2 == 0 and t.stride(1) % 2 == 0
        # A fresh copy (contiguous() would return a contiguous tensor at an odd address as it is).
        q = q if pair_aligned(q) else q.clone(memory_format=torch.contiguous_format)
        k = k if pair_aligned(k) else k.clone(memory_format=torch.contiguous_format)
        vec = 2
    if C // vec > QK_MAX_THREADS * QK_VECS_PER_THREAD:
        raise spec.OpArgumentError(f"{op}: width {C} is more than one thread block handles "
                                   f"({QK_MAX_THREADS * QK_VECS_PER_THREAD * vec} channels at this alignment)")
    q_out, k_out, q_scale, k_scale = spec.qk_outputs(q, heads, out_dtype, new_output)
    if B * L == 0:
        return q_out, k_out, q_scale, k_scale
    load().qk_norm_rope(
        q=q.data_ptr(), k=k.data_ptr(), q_batch_stride=q.stride(0), q_token_stride=q.stride(1),
        k_batch_stride=k.stride(0), k_token_stride=k.stride(1), weight_q=weight_q.data_ptr(),
        weight_k=weight_k.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(), q_out=q_out.data_ptr(),
        k_out=k_out.data_ptr(), q_scale=_ptr(q_scale) if q_scale.numel() else 0,
        k_scale=_ptr(k_scale) if k_scale.numel() else 0, batch=B, tokens=L, heads=heads, head_dim=D, eps=eps,
        in_dtype=DTYPE_CODES[q.dtype], out_dtype=DTYPE_CODES[out_dtype], vec=vec,
        device=q.device.index if q.device.index is not None else torch.cuda.current_device(),
        stream=_stream(q.device))
    return q_out, k_out, q_scale, k_scale


# ----------------------------------------------------------------------------------------------------
# torch.library ops
# ----------------------------------------------------------------------------------------------------

@torch.library.custom_op("dit8::rows_cuda", mutates_args=(), device_types="cuda")
def rows_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, shift: torch.Tensor | None,
            scale: torch.Tensor | None, norm: int, act: int, rows_per_batch: int, eps: float,
            out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The CUDA rows kernel as a torch.library op: `launch_rows`."""
    return launch_rows(x, weight, bias, shift, scale, norm, act, rows_per_batch, eps, out_dtype)


@rows_op.register_fake
def _(x, weight, bias, shift, scale, norm, act, rows_per_batch, eps, out_dtype):
    spec.check_rows("rows_cuda", x, weight, bias, shift, scale, norm, act, rows_per_batch, out_dtype)
    return spec.rows_outputs(x, out_dtype, spec.fake_alloc)


@torch.library.custom_op("dit8::qk_norm_rope_cuda", mutates_args=(), device_types="cuda")
def qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, weight_q: torch.Tensor, weight_k: torch.Tensor,
                    cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CUDA q/k RMSNorm + RoPE kernel as a torch.library op: `launch_qk_norm_rope`."""
    return launch_qk_norm_rope(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype)


@qk_norm_rope_op.register_fake
def _(q, k, weight_q, weight_k, cos, sin, heads, eps, out_dtype):
    spec.check_qk("qk_norm_rope_cuda", q, k, weight_q, weight_k, cos, sin, heads, out_dtype)
    return spec.qk_outputs(q, heads, out_dtype, spec.fake_alloc)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """`python -m dit8.kernels.cuda_ext build|info`; the exit status."""
    parser = argparse.ArgumentParser(prog="python -m dit8.kernels.cuda_ext",
                                     description="Build or inspect dit8's CUDA extension.")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile the module into the cache folder (ahead of first use)")
    b.add_argument("--archs", help=f"comma-separated, e.g. 90a or 80,89,90a (default: {','.join(DEFAULT_ARCHS)} "
                                   "without a GPU, else the GPU's; or $DIT8_CUDA_ARCHS)")
    b.add_argument("--force", action="store_true", help="rebuild from scratch")
    b.add_argument("-v", "--verbose", action="store_true", help="show the compiler commands")
    sub.add_parser("info", help="where the module is, whether it is built, what is missing")
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            archs = parse_archs(args.archs, "--archs") if args.archs is not None else default_archs()
            start = time.perf_counter()
            path = build(archs, force=args.force, verbose=args.verbose, retry_failed=True)
            module = _import(path)
            print(f"{path} for {module.ARCHS} is up to date ({time.perf_counter() - start:.1f} s)")
            return 0
        archs = default_archs()
        print(f"sources: {source_dir()}")
        print(f"archs: {','.join(archs)}")
        missing = missing_tools()
        print("missing: " + (", ".join(missing) if missing else "nothing"))
        for candidate in dict.fromkeys((archs, DEFAULT_ARCHS)):
            path = module_path(candidate)
            print(f"module: {path} ({'built' if path.is_file() else 'not built'})")
        if _disabled():
            print("disabled: DIT8_CUDA_EXT=0 (the ops never load it; the build command still builds)")
        return 0
    except (CudaExtError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1

