// pybind11 module `_dit8_cuda`: the launchers of ops.h with plain integers for pointers, strides,
// dtype codes and the stream. No torch headers: the module links against the CUDA runtime only
// (statically), so it works with any torch build, and importing it touches no GPU.
// The torch-facing side (argument checks, output allocation, torch.library ops) is
// dit8/kernels/cuda_ext.py.
#include <pybind11/pybind11.h>

#include "ops.h"

namespace py = pybind11;

#ifndef DIT8_ARCHS
#define DIT8_ARCHS "unknown"
#endif

// Bumped whenever an argument list below changes, so cuda_ext.py refuses a stale build.
constexpr int kAbiVersion = 1;

PYBIND11_MODULE(_dit8_cuda, m) {
  m.doc() = "dit8 CUDA kernels (row norms / quantization, q/k RMSNorm + RoPE); see csrc/README.md";
  m.attr("ABI_VERSION") = kAbiVersion;
  m.attr("ARCHS") = DIT8_ARCHS;
  m.attr("MAX_THREADS") = dit8::kMaxThreads;
  m.attr("ROW_VECS_PER_THREAD") = dit8::kRowVecsPerThread;
  m.attr("QK_MAX_THREADS") = dit8::kQkMaxThreads;
  m.attr("QK_VECS_PER_THREAD") = dit8::kQkVecsPerThread;

  m.def(
      "rows",
      [](uintptr_t x, int64_t x_stride, uintptr_t out, uintptr_t out_scale, uintptr_t weight, uintptr_t bias,
         uintptr_t shift, uintptr_t scale, int64_t shift_stride, int64_t scale_stride, int64_t rows,
         int64_t rows_per_batch, int cols, int norm, int act, double eps, int in_dtype, int out_dtype, int vec,
         int device, uintptr_t stream) {
        dit8::RowArgs a{};
        a.x = reinterpret_cast<const void*>(x);
        a.x_stride = x_stride;
        a.out = reinterpret_cast<void*>(out);
        a.out_scale = reinterpret_cast<float*>(out_scale);
        a.weight = reinterpret_cast<const float*>(weight);
        a.bias = reinterpret_cast<const float*>(bias);
        a.shift = reinterpret_cast<const float*>(shift);
        a.scale = reinterpret_cast<const float*>(scale);
        a.shift_stride = shift_stride;
        a.scale_stride = scale_stride;
        a.rows = rows;
        a.rows_per_batch = rows_per_batch;
        a.cols = cols;
        a.norm = norm;
        a.act = act;
        a.eps = static_cast<float>(eps);
        dit8::rows_forward(a, in_dtype, out_dtype, vec, device, stream);
      },
      "Row kernel (see csrc/ops.h RowArgs); pointers 0 mean absent.", py::arg("x"), py::arg("x_stride"),
      py::arg("out"), py::arg("out_scale"), py::arg("weight"), py::arg("bias"), py::arg("shift"), py::arg("scale"),
      py::arg("shift_stride"), py::arg("scale_stride"), py::arg("rows"), py::arg("rows_per_batch"), py::arg("cols"),
      py::arg("norm"), py::arg("act"), py::arg("eps"), py::arg("in_dtype"), py::arg("out_dtype"), py::arg("vec"),
      py::arg("device"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def(
      "qk_norm_rope",
      [](uintptr_t q, uintptr_t k, int64_t q_batch_stride, int64_t q_token_stride, int64_t k_batch_stride,
         int64_t k_token_stride, uintptr_t weight_q, uintptr_t weight_k, uintptr_t cos, uintptr_t sin,
         uintptr_t q_out, uintptr_t k_out, uintptr_t q_scale, uintptr_t k_scale, int64_t batch, int64_t tokens,
         int heads, int head_dim, double eps, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream) {
        dit8::QkArgs a{};
        a.q = reinterpret_cast<const void*>(q);
        a.k = reinterpret_cast<const void*>(k);
        a.q_batch_stride = q_batch_stride;
        a.q_token_stride = q_token_stride;
        a.k_batch_stride = k_batch_stride;
        a.k_token_stride = k_token_stride;
        a.weight_q = reinterpret_cast<const float*>(weight_q);
        a.weight_k = reinterpret_cast<const float*>(weight_k);
        a.cos = reinterpret_cast<const float*>(cos);
        a.sin = reinterpret_cast<const float*>(sin);
        a.q_out = reinterpret_cast<void*>(q_out);
        a.k_out = reinterpret_cast<void*>(k_out);
        a.q_scale = reinterpret_cast<float*>(q_scale);
        a.k_scale = reinterpret_cast<float*>(k_scale);
        a.batch = batch;
        a.tokens = tokens;
        a.heads = heads;
        a.head_dim = head_dim;
        a.eps = static_cast<float>(eps);
        dit8::qk_norm_rope_forward(a, in_dtype, out_dtype, vec, device, stream);
      },
      "q/k RMSNorm + RoPE (see csrc/ops.h QkArgs); q_scale/k_scale 0 for float outputs.", py::arg("q"),
      py::arg("k"), py::arg("q_batch_stride"), py::arg("q_token_stride"), py::arg("k_batch_stride"),
      py::arg("k_token_stride"), py::arg("weight_q"), py::arg("weight_k"), py::arg("cos"), py::arg("sin"),
      py::arg("q_out"), py::arg("k_out"), py::arg("q_scale"), py::arg("k_scale"), py::arg("batch"),
      py::arg("tokens"), py::arg("heads"), py::arg("head_dim"), py::arg("eps"), py::arg("in_dtype"),
      py::arg("out_dtype"), py::arg("vec"), py::arg("device"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>());
}
