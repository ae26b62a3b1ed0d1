// core/synthetic.hpp: seeded inputs generated from global positions.
//
// Every value is a pure function of (seed, tensor, batch, position, head, dim), so any rank
// can build its own shard, and any reference can rebuild any other rank's, without
// communication and independently of the number of ranks (nccl-tests' -c idea).
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/tensor.hpp"

namespace ringattn::detail {

enum class SyntheticTensor : std::uint8_t { q = 1, k = 2, v = 3, dout = 4 };

// Uniform on [-sqrt(3), sqrt(3)) (unit variance), before rounding to a storage dtype.
float synthetic_value(std::uint64_t seed, SyntheticTensor tensor, std::int64_t batch, std::int64_t pos,
                      std::int64_t head, std::int64_t dim);

// Fills a dense (B, positions.size(), heads, dim) buffer of `dtype` with the values at the
// given global positions.
void fill_synthetic(std::uint64_t seed, SyntheticTensor tensor, DType dtype, std::int64_t batch,
                    const std::vector<std::int64_t>& positions, std::int64_t heads, std::int64_t dim, void* dst);

}  // namespace ringattn::detail
