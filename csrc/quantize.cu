// Per-token (per-row) 8-bit quantization, alone (quantize_per_token), after GELU (gelu_tanh_quant) or
// after a LayerNorm (+ affine / modulation): rows.cuh's kernel with int8 / e4m3 outputs.
//
// Codes are those of kernels/quantize.py: scale = max(amax, 1e-12) / qmax (IEEE division),
// y = x / scale (correctly rounded, as IEEE division: common.cuh's ScaleDivisor), int8 = clamp(rint(y))
// (half to even), e4m3 = RNE(clamp(y, ±448)).
#include "rows.cuh"

namespace dit8 {

void rows_forward_quant(const RowArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream) {
  const DType out = static_cast<DType>(out_dtype);
  dispatch_float(static_cast<DType>(in_dtype), "quantize: in_dtype", [&](auto tin) {
    using Tin = decltype(tin);
    if (out == DType::I8) launch_rows<Tin, int8_t>(a, vec, device, as_stream(stream));
    else if (out == DType::E4M3) launch_rows<Tin, __nv_fp8_e4m3>(a, vec, device, as_stream(stream));
    else throw std::invalid_argument("quantize: out_dtype must be int8 (3) or e4m3 (4)");
  });
}

}  // namespace dit8
