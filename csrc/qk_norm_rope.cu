// q/k RMSNorm over the full width + 3D RoPE, on q and k of one token in one thread block.
//
// Wan2.1 self-attention: q = norm_q(q(x)), k = norm_k(k(x)) with RMSNorm over all C = heads·head_dim
// channels together (not per head), then each head's channel pairs (2j, 2j+1) rotate by the token's
// angle j: out[2j] = a·cos − b·sin, out[2j+1] = a·sin + b·cos (spec/wan21-dit.md). The angles come
// from the caller's table (dit8.rope.rope_table: built in float64, stored fp32 [tokens, head_dim/2]).
//
// Block (token l, batch b): loads the token's q and k rows (reading the GEMM outputs through their
// batch/token strides, so q and k may be views of one QKV tensor), reduces both sums of squares in one
// pass, then rotates and writes [b, l, :, :] of the outputs. With 8-bit outputs every (token, head)
// row of head_dim values gets its own symmetric scale (amax over the head's channels, collected with
// shared-memory atomics), written to q_scale/k_scale [batch, heads, tokens].
#include <algorithm>

#include "rows.cuh"

namespace dit8 {

// RMSNorm factor r and weight w, then the rotation of VEC/2 interleaved pairs, in place.
template <int VEC>
__device__ __forceinline__ void norm_rotate(float (&t)[VEC], float r, const float (&w)[VEC],
                                            const float (&c)[VEC / 2], const float (&s)[VEC / 2]) {
#pragma unroll
  for (int p = 0; p < VEC / 2; ++p) {
    const float x0 = t[2 * p] * r * w[2 * p];
    const float x1 = t[2 * p + 1] * r * w[2 * p + 1];
    t[2 * p] = x0 * c[p] - x1 * s[p];
    t[2 * p + 1] = x0 * s[p] + x1 * c[p];
  }
}

template <typename Tin, typename Tout, int VEC>
__global__ void __launch_bounds__(kQkMaxThreads) qk_norm_rope_kernel(const QkArgs a) {
  constexpr bool kQuant = IsQuant<Tout>::value;
  constexpr int NV = kQkVecsPerThread;
  __shared__ float2 red[32];
  // 8-bit only: [2 · heads] float bits of the amax (|values| >= 0 order as ints), then scales, and
  // [2 · heads] reciprocals of the scales.
  extern __shared__ int head_amax[];
  const int64_t l = blockIdx.x, b = blockIdx.y;
  const int C = a.heads * a.head_dim;
  const int nvec = C / VEC;
  const Tin* q = static_cast<const Tin*>(a.q) + b * a.q_batch_stride + l * a.q_token_stride;
  const Tin* k = static_cast<const Tin*>(a.k) + b * a.k_batch_stride + l * a.k_token_stride;

  float qv[NV][VEC], kv[NV][VEC];
  float2 ss = make_float2(0.0f, 0.0f);
  for_each_vec<NV>(nvec, [&](int i, int v) {
    load_f32<Tin, VEC>(q + v * VEC, qv[i]);
    load_f32<Tin, VEC>(k + v * VEC, kv[i]);
#pragma unroll
    for (int e = 0; e < VEC; ++e) { ss.x += qv[i][e] * qv[i][e]; ss.y += kv[i][e] * kv[i][e]; }
  });
  if constexpr (kQuant) {
    for (int h = threadIdx.x; h < 2 * a.heads; h += blockDim.x) head_amax[h] = 0;  // ordered by the barriers below
  }
  ss = block_sum2(ss, red);
  const float cols = static_cast<float>(C);
  const float rq = rsqrtf(__fdiv_rn(ss.x, cols) + a.eps);
  const float rk = rsqrtf(__fdiv_rn(ss.y, cols) + a.eps);

  const int half = a.head_dim / 2;
  const float* cos_l = a.cos + l * half;
  const float* sin_l = a.sin + l * half;
  const int64_t out_row = (b * a.tokens + l) * C;
  Tout* q_out = static_cast<Tout*>(a.q_out) + out_row;
  Tout* k_out = static_cast<Tout*>(a.k_out) + out_row;

  for_each_vec<NV>(nvec, [&](int i, int v) {
    const int c0 = v * VEC;
    const int h = c0 / a.head_dim;  // a vector never straddles two heads (head_dim % VEC == 0)
    const int j0 = (c0 - h * a.head_dim) / 2;
    float c[VEC / 2], s[VEC / 2], w[VEC];
    load_params<VEC / 2>(cos_l + j0, c);
    load_params<VEC / 2>(sin_l + j0, s);
    load_params<VEC>(a.weight_q + c0, w);
    norm_rotate<VEC>(qv[i], rq, w, c, s);
    load_params<VEC>(a.weight_k + c0, w);
    norm_rotate<VEC>(kv[i], rk, w, c, s);
    if constexpr (kQuant) {
      float mq = 0.0f, mk = 0.0f;
#pragma unroll
      for (int e = 0; e < VEC; ++e) { mq = max_nan(mq, fabsf(qv[i][e])); mk = max_nan(mk, fabsf(kv[i][e])); }
      atomicMax(&head_amax[h], __float_as_int(mq));
      atomicMax(&head_amax[a.heads + h], __float_as_int(mk));
    } else {
      store_from_f32<Tout, VEC>(q_out + c0, qv[i]);
      store_from_f32<Tout, VEC>(k_out + c0, kv[i]);
    }
  });

  if constexpr (kQuant) {
    // Each slot's amax becomes its scale, in place, with the reciprocal beside it: one division per
    // (token, head) instead of one per vector.
    float* head_scale = reinterpret_cast<float*>(head_amax);
    float* head_rcp = head_scale + 2 * a.heads;
    __syncthreads();
    for (int slot = threadIdx.x; slot < 2 * a.heads; slot += blockDim.x) {
      const float scale = __fdiv_rn(max_nan(__int_as_float(head_amax[slot]), kScaleFloor), qmax<Tout>());
      head_scale[slot] = scale;
      head_rcp[slot] = __frcp_rn(scale);
      const int h = slot % a.heads;
      const int64_t at = (b * a.heads + h) * a.tokens + l;
      (slot < a.heads ? a.q_scale : a.k_scale)[at] = scale;
    }
    __syncthreads();
    auto divisor = [&](int slot) { return divisor_of(head_scale[slot], head_rcp[slot]); };
    for_each_vec<NV>(nvec, [&](int i, int v) {
      const int c0 = v * VEC;
      const int h = c0 / a.head_dim;
      store_codes<Tout, VEC>(q_out + c0, qv[i], divisor(h));
      store_codes<Tout, VEC>(k_out + c0, kv[i], divisor(a.heads + h));
    });
  }
}

template <typename Tin, typename Tout>
void launch_qk(const QkArgs& a, int vec, int device, cudaStream_t stream) {
  constexpr int kFull = 16 / sizeof(Tin);
  constexpr bool kQuant = IsQuant<Tout>::value;
  require(vec == kFull || vec == 2, "qk_norm_rope: vec must be 2 or " + std::to_string(kFull));
  require(a.heads > 0 && a.head_dim > 0 && a.head_dim % vec == 0,
          "qk_norm_rope: head_dim must be a positive multiple of vec (and even)");
  const int64_t C = static_cast<int64_t>(a.heads) * a.head_dim;
  require(C / vec <= static_cast<int64_t>(kQkMaxThreads) * kQkVecsPerThread,
          "qk_norm_rope: heads·head_dim too large for one thread block (at most " +
              std::to_string(kQkMaxThreads * kQkVecsPerThread * vec) + " channels at this vec)");
  require(kQuant == (a.q_scale != nullptr && a.k_scale != nullptr),
          "qk_norm_rope: q_scale/k_scale are needed exactly for 8-bit outputs");
  require(a.batch <= 65535, "qk_norm_rope: batch at most 65535");
  require(a.tokens <= 0x7fffffffLL, "qk_norm_rope: at most 2^31 - 1 tokens");
  if (a.batch == 0 || a.tokens == 0) return;
  set_device(device);  // after the argument checks, so they work (and are tested) without a GPU
  const int nvec = static_cast<int>(C / vec);
  const int threads = std::min(kQkMaxThreads, std::max(32, round_up((nvec + kQkVecsPerThread - 1) / kQkVecsPerThread, 32)));
  const size_t smem = kQuant ? 4 * sizeof(float) * a.heads : 0;  // amax, then scale and reciprocal
  const dim3 grid(static_cast<unsigned>(a.tokens), static_cast<unsigned>(a.batch));
  if (vec == 2) qk_norm_rope_kernel<Tin, Tout, 2><<<grid, threads, smem, stream>>>(a);
  else qk_norm_rope_kernel<Tin, Tout, kFull><<<grid, threads, smem, stream>>>(a);
  check_launch("qk_norm_rope");
}

void qk_norm_rope_forward(const QkArgs& a, int in_dtype, int out_dtype, int vec, int device, uintptr_t stream) {
  dispatch_float(static_cast<DType>(in_dtype), "qk_norm_rope: in_dtype", [&](auto tin) {
    dispatch_out(static_cast<DType>(out_dtype), "qk_norm_rope: out_dtype", [&](auto tout) {
      launch_qk<decltype(tin), decltype(tout)>(a, vec, device, as_stream(stream));
    });
  });
}

}  // namespace dit8
