// Row normalisations with float outputs: LayerNorm (+ affine, + adaLN modulation) and RMSNorm.
// The kernel is rows.cuh's; this file instantiates it for fp32/fp16/bf16 outputs and dispatches.
#include "rows.cuh"

namespace dit8 {

void rows_forward(const RowArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream) {
  const DType out = static_cast<DType>(out_dtype);
  if (out == DType::I8 || out == DType::E4M3) {
    rows_forward_quant(a, in_dtype, out_dtype, vec, device, stream);  // quantize.cu
    return;
  }
  dispatch_float(static_cast<DType>(in_dtype), "rows: in_dtype", [&](auto tin) {
    dispatch_float(out, "rows: out_dtype", [&](auto tout) {
      launch_rows<decltype(tin), decltype(tout)>(a, vec, device, as_stream(stream));
    });
  });
}

}  // namespace dit8
