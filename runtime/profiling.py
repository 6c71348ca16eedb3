"""Timing and per-part profiles of a forward on the GPU (CUDA events, the torch profiler) or the CPU.

Parts (`classify`): the torch profiler's GPU kernel time (on CPU: each op's self time) is summed per
part, the first matching rule winning (case-insensitive substrings of the kernel or op name):
- attention: "flash", "fmha", "sdpa", "attention", "attn": cuDNN / flash / memory-efficient SDPA, our
  Triton `_attention_kernel`, `_cross_attention_kernel`, `_attention_8bit_kernel` and the Q/K/V
  quantization kernels of the 8-bit paths (`_quantize_blocks_kernel`, `_quantize_v_kernel`), which
  are part of what 8-bit attention costs. On CPU, any op inside an attention op counts as attention.
- gemm: "gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "splitk" (cuBLAS and CUTLASS GEMMs and
  their split-K reductions), "scaled_mm", "int_mm" (ours and torch's), and the CPU matmul ops
  (aten::mm, addmm, bmm, matmul, linear, mkldnn).
- memory_bound (fused and memory-bound ops): our fused kernels ("rows_kernel": norms, modulation,
  GELU and per-token quantization; "qk_norm_rope"; "quantize"; on CPU their "dit8::" ops), torch's
  elementwise, reduction, norm and copy kernels ("at::native", "elementwise", "reduce", "norm", "gelu",
  "silu", "copy", "cat", "fill", "triton_"), "memcpy", "memset" and, on CPU, every other "aten::" op.
- other: anything else (unknown kernels).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from .devices import synchronize

if TYPE_CHECKING:
    from torch.autograd.profiler_util import FunctionEvent

PARTS = ("gemm", "attention", "memory_bound", "other")

_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn",
                   "_quantize_blocks_kernel", "_quantize_v_kernel")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "wgmma", "splitk", "scaled_mm", "int_mm",
              "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "mkldnn")),
    ("memory_bound", ("rows_kernel", "qk_norm_rope", "dit8::", "quantize", "at::native", "elementwise",
                      "reduce", "norm", "gelu", "silu", "copy", "cat", "fill", "triton_", "memcpy", "memset",
                      "aten::")),
)


def time_ms(fn: Callable[[], object], device: torch.device, repeat: int = 1) -> list[float]:
    """Milliseconds of each of `repeat` calls: CUDA events on a GPU (on `device`'s current stream, where
    its kernels run, whichever device is current), wall time on a CPU."""
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            stream = torch.cuda.current_stream(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            fn()
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def classify(name: str) -> str:
    """The part (PARTS) a GPU kernel or CPU op of that name belongs to; rules in the module docstring."""
    lower = name.lower()
    for part, needles in _RULES:
        if any(n in lower for n in needles):
            return part
    return "other"


def _event_part(event: FunctionEvent) -> str:
    """classify() of a CPU op, which counts as attention inside an attention op."""
    part = classify(event.name)
    parent = getattr(event, "cpu_parent", None)
    while parent is not None and part != "attention":  # the matmuls inside a math-path SDPA, say
        if classify(parent.name) == "attention":
            return "attention"
        parent = getattr(parent, "cpu_parent", None)
    return part


@dataclass
class Profile:
    """Per-part milliseconds of one profiled call and its heaviest kernels (or CPU ops)."""

    parts: dict[str, float]
    top: list[dict] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Milliseconds of all parts together."""
        return sum(self.parts.values())


def profile_parts(fn: Callable[[], object], device: torch.device, top: int = 15) -> Profile:
    """Run fn() once under torch.profiler; sum GPU kernel time per part (on a CPU: op self time)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        synchronize(device)
    parts = dict.fromkeys(PARTS, 0.0)
    by_name: dict[str, list] = {}
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != DeviceType.CUDA:
                continue
            ms, part = event.time_range.elapsed_us() / 1e3, classify(event.name)
        else:
            ms, part = event.self_cpu_time_total / 1e3, _event_part(event)
        parts[part] += ms
        entry = by_name.setdefault(event.name, [part, 0.0, 0])
        entry[1] += ms
        entry[2] += 1
    heaviest = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    return Profile(parts, [{"name": n[:200], "part": p, "ms": round(ms, 3), "calls": c}
                           for n, (p, ms, c) in heaviest])


