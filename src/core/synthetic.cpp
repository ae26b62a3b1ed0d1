#include "core/synthetic.hpp"

#include "core/dtype.hpp"

namespace ringattn::detail {

namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

float synthetic_value(std::uint64_t seed, SyntheticTensor tensor, std::int64_t batch, std::int64_t pos,
                      std::int64_t head, std::int64_t dim) {
  std::uint64_t h = splitmix64(seed ^ (static_cast<std::uint64_t>(tensor) << 56));
  h = splitmix64(h ^ static_cast<std::uint64_t>(batch));
  h = splitmix64(h ^ static_cast<std::uint64_t>(pos));
  h = splitmix64(h ^ (static_cast<std::uint64_t>(head) << 32 | static_cast<std::uint64_t>(dim)));
  const double u = static_cast<double>(h >> 11) * 0x1p-53;  // [0, 1)
  return static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772);
}

void fill_synthetic(std::uint64_t seed, SyntheticTensor tensor, DType dtype, std::int64_t batch,
                    const std::vector<std::int64_t>& positions, std::int64_t heads, std::int64_t dim, void* dst) {
  const auto n = static_cast<std::int64_t>(positions.size());
#pragma omp parallel for collapse(2)
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < n; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        for (std::int64_t d = 0; d < dim; ++d) {
          const std::int64_t idx = ((b * n + i) * heads + h) * dim + d;
          store_f32(dtype, dst, idx, synthetic_value(seed, tensor, b, positions[static_cast<std::size_t>(i)], h, d));
        }
      }
    }
  }
}

}  // namespace ringattn::detail
