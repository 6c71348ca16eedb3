// The row kernel behind quantize_per_token, gelu_tanh_quant, layer_norm(_modulate)(_quant) and
// rms_norm: one thread block per row. norms.cu instantiates it for float outputs, quantize.cu for 8-bit.
//
// Each thread owns the vectors v = threadIdx.x + i·blockDim.x (VEC elements each, one 16-byte access
// where alignment allows). When the row fits (NV > 0) the vectors stay in registers between the
// passes (statistics, then output), so the row is read from memory once; longer rows (NV == 0) are
// streamed again for every pass, the re-reads mostly hitting L1/L2.
#pragma once

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "ops.h"

namespace dit8 {

enum : int { kNormNone = 0, kNormLayer = 1, kNormRms = 2 };
enum : int { kActNone = 0, kActGeluTanh = 1 };

// GELU, tanh approximation, as the GEMM epilogue computes it (kernels/scaled_mm_triton.py):
// 0.5·x·(1 + tanh(u)) = x·sigmoid(2u) = x / (1 + 2^(-x·(C0 + C1·x²))), with C0 = 2·√(2/π)·log2(e) and
// C1 = 0.044715·C0. The hardware exp2 and a fast division err by a few fp32 ulps, a millionth of an
// 8-bit code step, at a fifth of the instructions of torch's accurate tanhf. exp2 overflows to +inf
// for very negative x, giving -0 as the limit is.
__device__ __forceinline__ float gelu_tanh(float x) {
  const float kC0 = 2.0f * 0.7978845608028654f * 1.4426950408889634f;
  const float kC1 = 0.044715f * kC0;
  return __fdividef(x, 1.0f + exp2f(-x * (kC0 + kC1 * x * x)));
}

// VEC consecutive fp32 parameters (weights, shift, scale): float4 accesses when VEC allows.
template <int VEC>
__device__ __forceinline__ void load_params(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      out[i] = f.x; out[i + 1] = f.y; out[i + 2] = f.z; out[i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

// f(i, v) for this thread's vectors: i the register slot (a compile-time index once unrolled).
template <int NV, typename F>
__device__ __forceinline__ void for_each_vec(int nvec, F&& f) {
  if constexpr (NV > 0) {
#pragma unroll
    for (int i = 0; i < NV; ++i) {
      const int v = threadIdx.x + i * blockDim.x;
      if (v < nvec) f(i, v);
    }
  } else {
    for (int v = threadIdx.x; v < nvec; v += blockDim.x) f(0, v);
  }
}

template <typename Tin, typename Tout, int VEC, int NV>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(const RowArgs a) {
  constexpr bool kQuant = IsQuant<Tout>::value;
  __shared__ float smem[32];
  const int64_t row = blockIdx.x;
  const Tin* x = static_cast<const Tin*>(a.x) + row * a.x_stride;
  Tout* out = static_cast<Tout*>(a.out) + row * a.cols;
  const int nvec = a.cols / VEC;
  const float cols = static_cast<float>(a.cols);

  float cache[NV > 0 ? NV : 1][VEC];
  // The input vector v (activation applied) into t, from the registers when they hold it.
  auto read = [&](int i, int v, float (&t)[VEC]) {
    if constexpr (NV > 0) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] = cache[i][k];
    } else {
      load_f32<Tin, VEC>(x + static_cast<int64_t>(v) * VEC, t);
      if (a.act == kActGeluTanh) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) t[k] = gelu_tanh(t[k]);
      }
    }
  };

  // Pass 1: load (into the registers) and the first statistic: the sum for LayerNorm, the sum of
  // squares for RMSNorm.
  float mean = 0.0f, rstd = 1.0f;
  if (NV > 0 || a.norm != kNormNone) {
    float s = 0.0f;
    for_each_vec<NV>(nvec, [&](int i, int v) {
      float t[VEC];
      if constexpr (NV > 0) {
        load_f32<Tin, VEC>(x + static_cast<int64_t>(v) * VEC, t);
        if (a.act == kActGeluTanh) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) t[k] = gelu_tanh(t[k]);
        }
#pragma unroll
        for (int k = 0; k < VEC; ++k) cache[i][k] = t[k];
      } else {
        read(i, v, t);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += a.norm == kNormRms ? t[k] * t[k] : t[k];
    });
    if (a.norm == kNormLayer) {
      // Two-pass variance (centred sum of squares): no cancellation for rows with a large mean.
      mean = __fdiv_rn(block_reduce(s, Sum(), smem), cols);
      float s2 = 0.0f;
      for_each_vec<NV>(nvec, [&](int i, int v) {
        float t[VEC];
        read(i, v, t);
#pragma unroll
        for (int k = 0; k < VEC; ++k) { const float d = t[k] - mean; s2 += d * d; }
      });
      rstd = rsqrtf(__fdiv_rn(block_reduce(s2, Sum(), smem), cols) + a.eps);
    } else if (a.norm == kNormRms) {
      rstd = rsqrtf(__fdiv_rn(block_reduce(s, Sum(), smem), cols) + a.eps);
    }
  }

  const int64_t batch = row / a.rows_per_batch;
  // Input vector -> output values, in the order of the torch reference: normalise, affine, modulate.
  auto finish = [&](int v, float (&t)[VEC]) {
    const int c0 = v * VEC;
    if (a.norm != kNormNone) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] = (t[k] - mean) * rstd;
    }
    if (a.weight != nullptr) {
      float w[VEC];
      load_params<VEC>(a.weight + c0, w);
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] *= w[k];
    }
    if (a.bias != nullptr) {
      float b[VEC];
      load_params<VEC>(a.bias + c0, b);
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] += b[k];
    }
    if (a.shift != nullptr) {
      float sh[VEC], sc[VEC];
      load_params<VEC>(a.shift + batch * a.shift_stride + c0, sh);
      load_params<VEC>(a.scale + batch * a.scale_stride + c0, sc);
#pragma unroll
      for (int k = 0; k < VEC; ++k) t[k] = t[k] * (1.0f + sc[k]) + sh[k];
    }
  };

  if constexpr (kQuant) {
    // Per-row symmetric quantization of the output: scale = max(amax, floor) / qmax.
    float amax = 0.0f;
    for_each_vec<NV>(nvec, [&](int i, int v) {
      float t[VEC];
      read(i, v, t);
      finish(v, t);
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        amax = max_nan(amax, fabsf(t[k]));
        if constexpr (NV > 0) cache[i][k] = t[k];  // keep the output values for the store pass
      }
    });
    amax = block_reduce(amax, MaxNan(), smem);
    const float scale = __fdiv_rn(max_nan(amax, kScaleFloor), qmax<Tout>());
    if (threadIdx.x == 0) a.out_scale[row] = scale;
    const ScaleDivisor divide = divisor_of(scale);
    for_each_vec<NV>(nvec, [&](int i, int v) {
      float t[VEC];
      if constexpr (NV > 0) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) t[k] = cache[i][k];
      } else {
        read(i, v, t);
        finish(v, t);
      }
      store_codes<Tout, VEC>(out + static_cast<int64_t>(v) * VEC, t, divide);
    });
  } else {
    for_each_vec<NV>(nvec, [&](int i, int v) {
      float t[VEC];
      read(i, v, t);
      finish(v, t);
      store_from_f32<Tout, VEC>(out + static_cast<int64_t>(v) * VEC, t);
    });
  }
}

// Launch for one (input, output) type pair. vec: VEC elements per access, either 16 bytes' worth of
// the input type or 1 (the Python wrapper picks 1 when a pointer or stride is not 16-byte aligned).
template <typename Tin, typename Tout>
void launch_rows(const RowArgs& a, int vec, int device, cudaStream_t stream) {
  constexpr int kFull = 16 / sizeof(Tin);
  require(vec == kFull || vec == 1, "rows: vec must be 1 or " + std::to_string(kFull));
  require(a.cols > 0 && a.cols % vec == 0, "rows: cols must be a positive multiple of vec");
  require(a.rows_per_batch > 0, "rows: rows_per_batch must be positive");
  require((a.shift == nullptr) == (a.scale == nullptr), "rows: shift and scale go together");
  require(a.norm >= kNormNone && a.norm <= kNormRms, "rows: norm must be 0, 1 or 2");
  require(a.act == kActNone || a.act == kActGeluTanh, "rows: act must be 0 or 1");
  require(IsQuant<Tout>::value == (a.out_scale != nullptr), "rows: out_scale is needed exactly for 8-bit outputs");
  require(a.rows <= 0x7fffffffLL, "rows: at most 2^31 - 1 rows per launch");
  if (a.rows == 0) return;
  set_device(device);  // after the argument checks, so they work (and are tested) without a GPU
  const int nvec = a.cols / vec;
  auto go = [&](auto vec_c) {
    constexpr int V = decltype(vec_c)::value;
    if (nvec <= kMaxThreads * kRowVecsPerThread) {
      const int threads = std::min(kMaxThreads, std::max(32, round_up((nvec + kRowVecsPerThread - 1) / kRowVecsPerThread, 32)));
      rows_kernel<Tin, Tout, V, kRowVecsPerThread><<<static_cast<unsigned>(a.rows), threads, 0, stream>>>(a);
    } else {
      rows_kernel<Tin, Tout, V, 0><<<static_cast<unsigned>(a.rows), kMaxThreads, 0, stream>>>(a);
    }
  };
  if (vec == 1) go(std::integral_constant<int, 1>{});
  else go(std::integral_constant<int, kFull>{});
  check_launch("rows");
}

}  // namespace dit8
