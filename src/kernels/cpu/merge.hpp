// kernels/cpu/merge.hpp: the online-softmax merge of two partial attention results (fp32).
//
// For one query row with running (o, lse) and a block result (o_b, lse_b), where each o is
// already normalised by its own softmax sum:
//   lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|))
//   o'   = o * exp(lse - lse') + o_b * exp(lse_b - lse')
// A row that has seen no key yet has lse = -inf and o = 0. Merging two such rows must keep
// (0, -inf) rather than compute exp(-inf - -inf) = NaN, hence the guard.
#pragma once

#include <cmath>
#include <cstdint>

namespace ringattn::detail {

// Returns lse' and rewrites o in place. o_b is scaled by `o_b_scale` on the fly, so a block
// kernel can pass its unnormalised accumulator with scale 1/rowsum.
inline float merge_block_into(float* o, float lse, const float* o_b, float o_b_scale, float lse_b,
                              std::int64_t dim) {
  if (lse_b == -INFINITY) return lse;  // the block saw no key: nothing to add
  if (lse == -INFINITY) {
    for (std::int64_t d = 0; d < dim; ++d) o[d] = o_b[d] * o_b_scale;
    return lse_b;
  }
  const float hi = std::fmax(lse, lse_b);
  const float merged = hi + std::log1p(std::exp(-std::fabs(lse - lse_b)));
  const float w = std::exp(lse - merged);
  const float w_b = std::exp(lse_b - merged) * o_b_scale;
  for (std::int64_t d = 0; d < dim; ++d) o[d] = o[d] * w + o_b[d] * w_b;
  return merged;
}

}  // namespace ringattn::detail
