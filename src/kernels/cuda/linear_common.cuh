// kernels/cuda/linear_common.cuh: what the linear-attention kernels (forward and backward)
// share: the chunk and slice sizes, conversions, the feature map and decay powers, tile loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "ringattn/error.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail::lin {

constexpr int kChunk = 32;    // tokens per chunk
constexpr int kSlice = 64;    // value columns per output CTA
constexpr int kThreads = 256;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }

__device__ __forceinline__ std::int64_t min64(std::int64_t a, std::int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float phi(float x, int map) { return map == 1 ? x : (x > 0.0f ? x + 1.0f : __expf(x)); }

// g^n for a head with log2(g) = l2g (0: no decay).
__device__ __forceinline__ float decay_pow(float l2g, float n) { return l2g == 0.0f ? 1.0f : exp2f(l2g * n); }

// Rows [row0, row0 + rows) of a (B, S, heads, D) tensor's head h, batch b, as fp32 in a
// (kChunk, ld) shared tile (columns col0 .. col0 + cols), phi applied when map >= 0; rows past
// `rows` are zero.
template <typename T>
__device__ __forceinline__ void load_rows(float* dst, int ld, const void* base,
                                          const std::int64_t (&strides)[3], int b, int h, std::int64_t row0, int rows,
                                          int col0, int cols, int map) {
  const T* src = static_cast<const T*>(base) + b * strides[0] + h * strides[2] + col0;
  for (int idx = threadIdx.x; idx < kChunk * cols; idx += blockDim.x) {
    const int r = idx / cols, c = idx % cols;
    float x = 0.0f;
    if (r < rows) {
      x = to_float<T>(src[(row0 + r) * strides[1] + c]);
      if (map >= 0) x = phi(x, map);
    }
    dst[r * ld + c] = x;
  }
}

// Calls fn(T{}, integral_constant<int, D>{}) for the dtype and head dim (64 or 128).
template <class Fn>
inline void dispatch(DType dtype, std::int64_t head_dim, Fn&& fn) {
  if (head_dim != 64 && head_dim != 128) {
    throw Error(ErrorCode::invalid_argument,
                "linear attention on GPUs supports head_dim 64 and 128, not " + std::to_string(head_dim));
  }
  const bool d64 = head_dim == 64;
  switch (dtype) {
    case DType::bf16:
      d64 ? fn(__nv_bfloat16{}, std::integral_constant<int, 64>{}) : fn(__nv_bfloat16{}, std::integral_constant<int, 128>{});
      break;
    case DType::f16:
      d64 ? fn(__half{}, std::integral_constant<int, 64>{}) : fn(__half{}, std::integral_constant<int, 128>{});
      break;
    case DType::f32:
      d64 ? fn(float{}, std::integral_constant<int, 64>{}) : fn(float{}, std::integral_constant<int, 128>{});
      break;
  }
}


}  // namespace ringattn::detail::lin
