// Shared device helpers of the dit8 CUDA kernels: dtype codes, vector loads/stores, block reductions,
// the 8-bit encoders, and the host-side launch checks.
//
// Nothing here includes torch: tensors arrive as raw device pointers with sizes and element strides,
// the CUDA stream as an integer handle. Every kernel computes in fp32 whatever its storage types.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace dit8 {

// Storage types, numbered as dit8/kernels/cuda_ext.py's DTYPE_CODES.
enum class DType : int { F32 = 0, F16 = 1, BF16 = 2, I8 = 3, E4M3 = 4 };

// Largest code magnitude of the symmetric 8-bit formats and the floor of a row's amax
// (kernels/quantize.py: QMAX, SCALE_FLOOR).
constexpr float kInt8Max = 127.0f;
constexpr float kFp8Max = 448.0f;
constexpr float kScaleFloor = 1e-12f;

template <typename T> struct IsQuant { static constexpr bool value = false; };
template <> struct IsQuant<int8_t> { static constexpr bool value = true; };
template <> struct IsQuant<__nv_fp8_e4m3> { static constexpr bool value = true; };

template <typename T> __device__ __forceinline__ float qmax();
template <> __device__ __forceinline__ float qmax<int8_t>() { return kInt8Max; }
template <> __device__ __forceinline__ float qmax<__nv_fp8_e4m3>() { return kFp8Max; }

// ---- conversions -------------------------------------------------------------------------------

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
// 8-bit codes of y = x / scale, as kernels/quantize.py defines them: int8 rounds half to even and
// clamps to [-128, 127]; e4m3 rounds to nearest even, saturating at ±448 (the reference's clamp before
// its cast) and keeping NaN (which a clamp with fminf/fmaxf would turn into -448).
// The int8 code is one saturating conversion (F2I.S8); rintf, two clamps and a conversion were four
// instructions, two of them on the conversion unit. (NaN gives 0; the reference's cast of NaN is
// undefined, and a row holding one has a NaN scale.)
__device__ __forceinline__ int32_t int8_code(float y) {  // the code, sign-extended to 32 bits
  int32_t code;
  asm("cvt.rni.sat.s8.f32 %0, %1;" : "=r"(code) : "f"(y));
  return code;
}
template <> __device__ __forceinline__ int8_t from_f32<int8_t>(float y) { return static_cast<int8_t>(int8_code(y)); }
template <> __device__ __forceinline__ __nv_fp8_e4m3 from_f32<__nv_fp8_e4m3>(float y) {
  __nv_fp8_e4m3 out;
  out.__x = __nv_cvt_float_to_fp8(y, __NV_SATFINITE, __NV_E4M3);
  return out;
}

// NaN-propagating max (fmaxf drops NaNs; a NaN row must give a NaN scale as the torch reference does):
// one instruction (FMNMX.NAN) from sm_80 on, where a compare-and-select takes three.
__device__ __forceinline__ float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return (a > b || a != a) ? a : b;
#endif
}

// ---- vector memory access ----------------------------------------------------------------------
// N consecutive elements moved as one aligned access (16 bytes for 8 bf16 or 4 fp32). The callers
// guarantee the alignment (cuda_ext.py picks N from the pointers and strides).

template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };

template <typename T, int N>
__device__ __forceinline__ void load_f32(const T* p, float (&out)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_f32(pk.v[i]);
}

template <typename T, int N>
__device__ __forceinline__ void store_from_f32(T* p, const float (&in)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(in[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// x / scale correctly rounded (as __fdiv_rn), for many x and one scale, at the cost of a multiply and two
// FMAs instead of a division's ~10 instructions and slow-path branch. q0 = x·rcp, with rcp the
// correctly rounded 1/scale, is within one ulp of x/scale; one step with the exact remainder (an FMA)
// then rounds it correctly (Markstein's theorem), barring underflow of the remainder, which happens
// only for quotients far below the smallest 8-bit code. The remainder is taken as q0·scale - x so that
// ±0 keeps its sign; an infinite scale (a row holding an Inf) enters it as FLT_MAX, so that finite x
// still gives ±0 as x / inf does. kernels/fused_triton.py's _divide_by_scale is the same computation.
struct ScaleDivisor {
  float scale, rcp;  // the scale (FLT_MAX for +inf) and __frcp_rn of the scale: made by divisor_of
  __device__ __forceinline__ float operator()(float x) const {
    const float q0 = __fmul_rn(x, rcp);
    const float minus_r = __fmaf_rn(q0, scale, -x);
    return __fmaf_rn(-minus_r, rcp, q0);
  }
};

// The divisor of `scale`; `rcp` must be __frcp_rn(scale).
__device__ __forceinline__ ScaleDivisor divisor_of(float scale, float rcp) { return {fminf(scale, FLT_MAX), rcp}; }
__device__ __forceinline__ ScaleDivisor divisor_of(float scale) { return divisor_of(scale, __frcp_rn(scale)); }

// Quantized store: codes of in[i] / scale, the division correctly rounded (it is the definition).
// Bytes are packed without a move per code: e4m3 codes are converted two at a time (one instruction a
// pair from sm_89 on, with from_f32's rounding and saturation), int8 codes four to a word in three
// byte permutes.
template <typename T, int N>
__device__ __forceinline__ void store_codes(T* p, const float (&in)[N], const ScaleDivisor& divide) {
  if constexpr (std::is_same_v<T, int8_t> && N % 4 == 0) {
    Pack<uint32_t, N / 4> pk;  // byte j of word i is in[4i + j]'s code
#pragma unroll
    for (int i = 0; i < N / 4; ++i) {
      int32_t c[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) c[j] = int8_code(divide(in[4 * i + j]));
      pk.v[i] = __byte_perm(__byte_perm(c[0], c[1], 0x0040), __byte_perm(c[2], c[3], 0x0040), 0x5410);
    }
    *reinterpret_cast<Pack<uint32_t, N / 4>*>(p) = pk;
  } else if constexpr (std::is_same_v<T, __nv_fp8_e4m3> && N % 2 == 0) {
    Pack<__nv_fp8x2_storage_t, N / 2> pk;  // byte 2i is in[2i]'s code, 2i + 1 in[2i + 1]'s
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      pk.v[i] = __nv_cvt_float2_to_fp8x2(make_float2(divide(in[2 * i]), divide(in[2 * i + 1])), __NV_SATFINITE,
                                         __NV_E4M3);
    }
    *reinterpret_cast<Pack<__nv_fp8x2_storage_t, N / 2>*>(p) = pk;
  } else {
    Pack<T, N> pk;
#pragma unroll
    for (int i = 0; i < N; ++i) pk.v[i] = from_f32<T>(divide(in[i]));
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  }
}

// ---- reductions --------------------------------------------------------------------------------

struct Sum { __device__ __forceinline__ float operator()(float a, float b) const { return a + b; } };
struct MaxNan { __device__ __forceinline__ float operator()(float a, float b) const { return max_nan(a, b); } };

template <typename Op>
__device__ __forceinline__ float warp_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduction of one value per thread over the whole block; every thread gets the result. `smem` holds
// 32 floats; the leading __syncthreads lets back-to-back calls reuse it safely.
template <typename Op>
__device__ __forceinline__ float block_reduce(float v, Op op, float* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float r = smem[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, smem[w]);
  return r;
}

// Two sums at once (q and k statistics): one pair of barriers instead of two.
__device__ __forceinline__ float2 block_sum2(float2 v, float2* smem) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, offset);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, offset);
  }
  __syncthreads();
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  float2 r = smem[0];
  for (int w = 1; w < nwarps; ++w) { r.x += smem[w].x; r.y += smem[w].y; }
  return r;
}

// ---- host side ---------------------------------------------------------------------------------

inline void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument(what);  // pybind11 turns it into ValueError
}

inline void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string(op) + ": CUDA error: " + cudaGetErrorString(err));
}

// The kernels run on the caller's device and stream. The static runtime linked into this module keeps
// its own current device, so every launcher sets it from the tensors' device first.
inline void set_device(int device) {
  const cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cudaSetDevice: ") + cudaGetErrorString(err));
}

inline cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

// Call fn(T{}) with T the C++ type of a floating storage dtype.
template <typename Fn>
void dispatch_float(DType t, const char* what, Fn&& fn) {
  switch (t) {
    case DType::F32: fn(float{}); break;
    case DType::F16: fn(__half{}); break;
    case DType::BF16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(what) + ": expected a float dtype code (0, 1, 2)");
  }
}

// Call fn(T{}) for any output dtype: the floats and the two 8-bit codes.
template <typename Fn>
void dispatch_out(DType t, const char* what, Fn&& fn) {
  switch (t) {
    case DType::I8: fn(int8_t{}); break;
    case DType::E4M3: fn(__nv_fp8_e4m3{}); break;
    default: dispatch_float(t, what, fn);
  }
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

}  // namespace dit8
