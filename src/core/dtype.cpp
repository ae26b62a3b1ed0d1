#include "core/dtype.hpp"

#include <array>
#include <bit>
#include <cmath>
#include <stdexcept>

#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

float f16_bits_to_f32(std::uint16_t h) {
  const std::uint32_t sign = std::uint32_t{h & 0x8000u} << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t man = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0) {
    // Zero or subnormal: value = man * 2^-24, exact in fp32.
    const float v = static_cast<float>(man) * 0x1p-24f;
    return sign ? -v : v;
  } else if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  return std::bit_cast<float>(bits);
}

// fp16 has only 65536 values: a table makes the hot conversion a single load.
const std::array<float, 65536>& f16_table() {
  static const std::array<float, 65536> table = [] {
    std::array<float, 65536> t{};
    for (std::uint32_t i = 0; i < 65536; ++i) t[i] = f16_bits_to_f32(static_cast<std::uint16_t>(i));
    return t;
  }();
  return table;
}

}  // namespace

float f16_to_f32(std::uint16_t h) { return f16_table()[h]; }

std::uint16_t f32_to_f16(float f) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(f);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {
    // Below the smallest normal (2^-14): a subnormal multiple of 2^-24, rounded to nearest even.
    const float scaled = std::bit_cast<float>(abs) * 0x1p24f;
    return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(std::nearbyint(scaled)));
  }
  // Normal: rebias the exponent and round the 13 dropped mantissa bits to nearest even.
  std::uint32_t bits = abs - (112u << 23);
  bits += 0xfffu + ((bits >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | (bits >> 13));
}

float round_to(DType dtype, float x) {
  switch (dtype) {
    case DType::f32: return x;
    case DType::f16: return f16_to_f32(f32_to_f16(x));
    case DType::bf16: return bf16_to_f32(f32_to_bf16(x));
  }
  return x;
}

void convert_to_f32(DType dtype, const void* src, float* dst, std::size_t n) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::f16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      const float* table = f16_table().data();
      for (std::size_t i = 0; i < n; ++i) dst[i] = table[s[i]];
      break;
    }
    case DType::bf16: {
      const auto* s = static_cast<const std::uint16_t*>(src);
      for (std::size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      break;
    }
  }
}

void convert_from_f32(DType dtype, const float* src, void* dst, std::size_t n) {
  switch (dtype) {
    case DType::f32:
      std::memcpy(dst, src, n * sizeof(float));
      break;
    case DType::f16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      break;
    }
    case DType::bf16: {
      auto* d = static_cast<std::uint16_t*>(dst);
      for (std::size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      break;
    }
  }
}

}  // namespace ringattn::detail
