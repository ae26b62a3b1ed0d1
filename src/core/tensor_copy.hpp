// core/tensor_copy.hpp: copying a strided (B, S, H, D) host view into a dense buffer.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// dst <- t as a dense (B, S, H, D) array of t's dtype (head_dim must have stride 1).
inline void pack_dense(const TensorView& t, unsigned char* dst) {
  const std::size_t elem = dtype_size(t.dtype);
  const std::size_t row_bytes = static_cast<std::size_t>(t.shape[3]) * elem;
  const auto* src = static_cast<const unsigned char*>(t.data);
  for (std::int64_t b = 0; b < t.shape[0]; ++b)
    for (std::int64_t s = 0; s < t.shape[1]; ++s)
      for (std::int64_t h = 0; h < t.shape[2]; ++h) {
        const std::int64_t from = b * t.strides[0] + s * t.strides[1] + h * t.strides[2];
        std::memcpy(dst, src + static_cast<std::size_t>(from) * elem, row_bytes);
        dst += row_bytes;
      }
}

}  // namespace ringattn::detail
