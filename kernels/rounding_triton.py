"""Round-to-nearest-even onto the bf16 and e4m3 grids, in fp32, for the Triton interpreter.

The interpreter's fp32 -> bf16 conversion truncates, and its fp32 -> e4m3 conversion loses the carry
into the exponent (7.9 becomes 4.0) (spec/gpu-notes.md). Kernels running under INTERPRET round in fp32
with these first, so the conversion that follows is exact and stores what a GPU's round-to-nearest-even
conversion gives. On a GPU the conversion rounds by itself and the kernels skip these.

BIAS_2_23, on GPUs and in the interpreter alike: floats from 2^23 to 2^24 step by exactly 1, so adding
1.5·2^23 rounds an fp32 |y| < 2^22 to an integer (nearest even) and subtracting it is exact; and the
bits of 1.5·2^23 plus an int32 |x| < 2^22 read as a float are 1.5·2^23 + x (0x4B400000 its bits).
"""

from __future__ import annotations

import triton
import triton.language as tl

BIAS_2_23 = tl.constexpr(12582912.0)  # 1.5·2^23


@triton.jit
def round_mantissa(x, DROP: tl.constexpr):
    """fp32 x rounded to nearest-even with its lowest DROP mantissa bits cleared (16: bf16's 7 bits,
    20: e4m3's 3 bits). Works on the bit pattern, so carries into the exponent come out right."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + ((1 << (DROP - 1)) - 1) + ((bits >> DROP) & 1)
    bits = (bits >> DROP) << DROP
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def round_bf16(x):
    """x rounded to the nearest bf16 value, still fp32."""
    return round_mantissa(x, 16)


@triton.jit
def round_e4m3(x):
    """x (already within ±448) rounded to the nearest e4m3 value, still fp32: 3 mantissa bits in the
    normal range; below 2^-6 (subnormals) multiples of 2^-9, by the fp32 add of 1.5·2^14, whose own
    round-to-nearest-even drops exactly the bits below 2^-9. The add works on |x| and x's sign bit is
    put back: a negative value that rounds to zero is -0, as the cast makes it (code 0x80)."""
    magnitude = (tl.abs(x) + 24576.0) - 24576.0
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000
    subnormal = (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, subnormal, round_mantissa(x, 20))
