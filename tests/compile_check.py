"""Compiling the Triton kernels for a GPU that is not here.

The interpreter runs kernels as Python and never compiles them, so it accepts what a compiler refuses
(a tile past the shared memory, an unsupported dot) and says nothing of what a kernel costs in
registers, spills and instructions. triton.compile with an explicit target needs no GPU, only the
tools bundled with triton: `ptxas -v` on the PTX reports registers and spill bytes, and `nvdisasm` of
the cubin shows the machine code of the loops. The tests that use this are opt-in (seconds per kernel
on a small CPU) and run in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable


def compile_kernel(kernel, types: dict[str, str], constexprs: dict[str, object], *, num_warps: int,
                   num_stages: int = 3, arch: int = 90, aligned: Iterable[str] = (), ones: Iterable[str] = (),
                   max_registers: int | None = None) -> dict:
    """Compile `kernel` for sm_`arch` (sm_90a for 90) as the JIT would specialize it: `types` gives the
    Triton type of each non-constexpr argument not an "i32" ("*bf16", "fp32", "tensordesc<...>");
    pointers and the integer arguments named in `aligned` are marked divisible by 16 (torch allocations
    and Wan's strides are), and those named in `ones` become the constant 1 (the JIT compiles an integer
    argument equal to 1 as a constant: a unit stride is what lets it vectorize along that axis).
    max_registers: the launch's register cap (maxnreg), if any.
    Returns shared-memory bytes, registers and spill-store bytes (ptxas -v), the local-memory loads and
    stores inside loops (the spills that cost per iteration), the global loads and stores narrower
    than 32 bits (unvectorized element accesses) and the 8- and 16-byte global stores in the SASS of
    the cubin, and whether the PTX uses wgmma and TMA."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    aligned = set(aligned)
    constexprs = dict(constexprs) | dict.fromkeys(ones, 1)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in aligned or signature[n].startswith("*")}
    src = ASTSource(fn=kernel, signature=signature, attrs=attrs,
                    constexprs={(names.index(n),): v for n, v in constexprs.items()})
    options = dict(num_warps=num_warps, num_stages=num_stages)
    if max_registers is not None:
        options["maxnreg"] = max_registers
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    ptx = compiled.asm["ptx"]
    report, sass = _machine_code(compiled, arch)
    return report | dict(
        narrow_global_accesses=len(re.findall(r"\b(?:LDG|STG)(?:\.[A-Z0-9]+)*?\.[US](?:8|16)\b", sass)),
        wide_global_stores=len(re.findall(r"\bSTG(?:\.[A-Z0-9]+)*?\.(?:64|128)\b", sass)),
        wgmma="wgmma" in ptx, tma="cp.async.bulk.tensor" in ptx, **loop_statistics(sass))


def _machine_code(compiled, arch: int) -> tuple[dict, str]:
    """Shared-memory bytes, registers, spill-store bytes and whether ptxas serialized the kernel's wgmma
    instructions (its performance warning C7514: every product then waits for the one before) from
    `ptxas -v` on the PTX of a compiled kernel, and the SASS of its cubin (nvdisasm), with the tools
    bundled with triton."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        arch_flag = "sm_90a" if arch == 90 else f"sm_{arch}"
        log = subprocess.run([ptxas, f"-arch={arch_flag}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "nvdisasm"), "-c", cubin],
                              capture_output=True, text=True, check=True).stdout
    registers = re.search(r"Used (\d+) registers", log)
    return dict(shared=compiled.metadata.shared, registers=int(registers.group(1)) if registers else -1,
                spills=sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log)),
                wgmma_serialized="instructions are serialized" in log), sass


def compile_gluon_kernel(kernel, types: dict[str, str], constexprs: dict[str, object], *, num_warps: int,
                         aligned: Iterable[str] = ()) -> tuple[dict, str]:
    """A Gluon kernel compiled for sm_90a: (shared-memory bytes, registers and spill-store bytes from
    `ptxas -v`; the SASS)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = GluonASTSource(fn=kernel, signature=signature, attrs=attrs,
                         constexprs={(names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))
    return _machine_code(compiled, 90)


_INSTRUCTION = re.compile(r"\s*/\*[0-9a-f]+\*/\s+\S")


def _loop_ranges(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line of each loop in nvdisasm output: from a label to a later branch back to it (not
    the branch-to-itself every kernel ends with, after its EXIT, nor the branch back from an out-of-line
    retry of an mbarrier wait placed after the EXIT)."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.(L_x_\d+):", line))}
    ranges = [(labels[m.group(1)], i) for i, line in enumerate(lines)
              if (m := re.search(r"BRA.*`\(\.(L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i - 1]
    return [(a, b) for a, b in ranges if not any(re.search(r"\bEXIT\b", line) for line in lines[a:b + 1])]


def loops(sass: str) -> list[list[str]]:
    """The instructions of each loop in nvdisasm output, without their addresses."""
    lines = sass.splitlines()
    return [[re.sub(r"^\s*/\*[0-9a-f]+\*/\s+", "", x) for x in lines[a:b + 1] if _INSTRUCTION.match(x)]
            for a, b in _loop_ranges(lines)]


def loop_statistics(sass: str) -> dict[str, int]:
    """From nvdisasm output: local-memory loads and stores (LDL/STL, register spills) inside loops, and
    the instructions of the longest loop (a kernel's main loop; each warp issues them once per
    iteration) and its indexed lane shuffles (SHFL.IDX: data moved between layouts; reductions use
    SHFL.BFLY)."""
    lines = sass.splitlines()
    ranges = _loop_ranges(lines)
    main = max(loops(sass), key=len, default=[])
    return dict(local_in_loops=sum(1 for i, line in enumerate(lines)
                                   if re.search(r"\b(LDL|STL)\b", line) and any(a < i <= b for a, b in ranges)),
                loop_instructions=len(main), loop_index_shuffles=sum("SHFL.IDX" in x for x in main))


def run_without_interpreter(module: str, function: str, args: tuple = ()) -> dict:
    """tests/`module`.`function`(*args) in a fresh process without TRITON_INTERPRET; its JSON result."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    script = f"import json, sys; sys.path.insert(0, 'tests'); import {module} as t; print(json.dumps(t.{function}(*{args!r})))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    # python tests/compile_check.py: the attention kernels' reports as a table (what RESULTS.md quotes).
    from test_attention_triton import compile_for_sm90

    print(f"{'kernel':<44} {'regs':>4} {'spill B':>7} {'loop LDL/STL':>12} {'loop instr':>10} {'smem KiB':>8}")
    for name, r in compile_for_sm90().items():
        print(f"{name:<44} {r['registers']:>4} {r['spills']:>7} {r['local_in_loops']:>12} "
              f"{r['loop_instructions']:>10} {r['shared'] / 1024:>8.0f}")
