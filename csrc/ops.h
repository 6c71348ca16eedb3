// The launchers the pybind11 module exposes. Plain C++ (no CUDA, no torch headers), so that
// bindings.cpp compiles with the host compiler alone. Pointers are device addresses, strides are in
// elements, dtype codes are common.cuh's DType, `stream` is a cudaStream_t as an integer.
#pragma once

#include <cstdint>

namespace dit8 {

// One launch over the rows of a 2-D activation: optional activation, optional normalisation
// (LayerNorm or RMSNorm over the row), optional affine weight/bias, optional per-batch modulation
// y·(1 + scale[b]) + shift[b], then a float store or per-row (per-token) 8-bit quantization.
struct RowArgs {
  const void* x;            // [rows, cols], rows x_stride elements apart, unit column stride
  int64_t x_stride;
  void* out;                // [rows, cols] contiguous: float dtype, or 8-bit codes
  float* out_scale;         // [rows] fp32 scales when out is 8-bit, else null
  const float* weight;      // [cols] or null
  const float* bias;        // [cols] or null
  const float* shift;       // rows of [batch, cols] (stride shift_stride) or null
  const float* scale;       // rows of [batch, cols] (stride scale_stride) or null; set with shift
  int64_t shift_stride;
  int64_t scale_stride;
  int64_t rows;
  int64_t rows_per_batch;   // row r uses shift/scale row r / rows_per_batch
  int cols;
  int norm;                 // 0 none, 1 LayerNorm (biased variance), 2 RMSNorm
  int act;                  // 0 none, 1 GELU (tanh approximation), applied to x before anything else
  float eps;
};

// q/k RMSNorm over the full width C = heads·head_dim, then 3D RoPE (interleaved pairs) with the
// cos/sin table of every token, on q and on k of one token in the same thread block.
struct QkArgs {
  const void* q;            // [batch, tokens, C], unit channel stride (e.g. a view of a QKV output)
  const void* k;
  int64_t q_batch_stride, q_token_stride, k_batch_stride, k_token_stride;
  const float* weight_q;    // [C]
  const float* weight_k;
  const float* cos;         // [tokens, head_dim/2] contiguous
  const float* sin;
  void* q_out;              // [batch, tokens, heads, head_dim] contiguous
  void* k_out;
  float* q_scale;           // [batch, heads, tokens] fp32 when the outputs are 8-bit, else null
  float* k_scale;
  int64_t batch, tokens;
  int heads, head_dim;
  float eps;
};

// Throw std::invalid_argument (-> ValueError) on arguments they cannot run and std::runtime_error
// (-> RuntimeError) on CUDA errors.
void rows_forward(const RowArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream);
// rows_forward's 8-bit outputs (quantize.cu); called by rows_forward, not bound to Python.
void rows_forward_quant(const RowArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream);
void qk_norm_rope_forward(const QkArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream);

// Launch limits, exported by bindings.cpp and mirrored in kernels/cuda_ext.py. The q/k limits bound the
// width a block takes: its Python wrapper and its launcher refuse wider rows. The row limits only
// choose the path: a row of more than kMaxThreads · kRowVecsPerThread vectors is streamed, not refused.
constexpr int kMaxThreads = 1024;
constexpr int kRowVecsPerThread = 4;   // row kernels keep up to this many vectors per thread in registers
constexpr int kQkVecsPerThread = 4;
// q/k blocks hold q and k of a token in registers: at most 512 threads so each may use 128 registers.
constexpr int kQkMaxThreads = 512;

}  // namespace dit8
