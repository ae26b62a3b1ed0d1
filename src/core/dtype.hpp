// core/dtype.hpp: storage dtypes <-> fp32 on the CPU (round to nearest even, NaN kept NaN).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// memcpy rather than std::bit_cast: CUDA translation units (C++17) include this header too.
inline float bf16_to_f32(std::uint16_t h) {
  const std::uint32_t u = std::uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline std::uint16_t f32_to_bf16(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<std::uint16_t>(u >> 16);
}

float f16_to_f32(std::uint16_t h);
std::uint16_t f32_to_f16(float f);

// Rounds through the storage dtype: what a value becomes once stored as `dtype`.
float round_to(DType dtype, float x);

// dst[i] = float(src[i]) for n elements stored as `dtype`.
void convert_to_f32(DType dtype, const void* src, float* dst, std::size_t n);
// dst[i] = dtype(src[i]).
void convert_from_f32(DType dtype, const float* src, void* dst, std::size_t n);

inline float load_f32(DType dtype, const void* base, std::int64_t index) {
  switch (dtype) {
    case DType::f32: return static_cast<const float*>(base)[index];
    case DType::f16: return f16_to_f32(static_cast<const std::uint16_t*>(base)[index]);
    case DType::bf16: return bf16_to_f32(static_cast<const std::uint16_t*>(base)[index]);
  }
  return 0.0f;
}

inline void store_f32(DType dtype, void* base, std::int64_t index, float value) {
  switch (dtype) {
    case DType::f32: static_cast<float*>(base)[index] = value; break;
    case DType::f16: static_cast<std::uint16_t*>(base)[index] = f32_to_f16(value); break;
    case DType::bf16: static_cast<std::uint16_t*>(base)[index] = f32_to_bf16(value); break;
  }
}

}  // namespace ringattn::detail
