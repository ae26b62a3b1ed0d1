#include "engine/reference.hpp"

#include <cmath>
#include <limits>

namespace ringattn::detail {

void reference_forward(const ReferenceProblem& p, const std::vector<std::int64_t>& positions,
                       const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                       std::vector<double>& out, std::vector<double>& lse) {
  const std::int64_t B = p.batch, S = p.seq_len, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const auto n = static_cast<std::int64_t>(positions.size());
  const std::int64_t group = H / Hkv;
  out.assign(static_cast<std::size_t>(B * n * H * D), 0.0);
  lse.assign(static_cast<std::size_t>(B * H * n), -std::numeric_limits<double>::infinity());
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t pos = positions[static_cast<std::size_t>(i)];
        const std::int64_t keys = p.causal ? pos + 1 : S;
        const std::int64_t hk = h / group;
        const float* qi = &q[static_cast<std::size_t>(((b * n + i) * H + h) * D)];
        std::vector<double> scores(static_cast<std::size_t>(keys));
        double max_score = -std::numeric_limits<double>::infinity();
        for (std::int64_t t = 0; t < keys; ++t) {
          const float* kt = &k[static_cast<std::size_t>(((b * S + t) * Hkv + hk) * D)];
          double dot = 0.0;
          for (std::int64_t d = 0; d < D; ++d) dot += static_cast<double>(qi[d]) * static_cast<double>(kt[d]);
          scores[static_cast<std::size_t>(t)] = dot * p.scale;
          max_score = std::max(max_score, scores[static_cast<std::size_t>(t)]);
        }
        if (keys == 0) continue;
        double sum = 0.0;
        for (double& s : scores) {
          s = std::exp(s - max_score);
          sum += s;
        }
        double* o = &out[static_cast<std::size_t>(((b * n + i) * H + h) * D)];
        for (std::int64_t t = 0; t < keys; ++t) {
          const double w = scores[static_cast<std::size_t>(t)] / sum;
          const float* vt = &v[static_cast<std::size_t>(((b * S + t) * Hkv + hk) * D)];
          for (std::int64_t d = 0; d < D; ++d) o[d] += w * static_cast<double>(vt[d]);
        }
        lse[static_cast<std::size_t>((b * H + h) * n + i)] = max_score + std::log(sum);
      }
    }
  }
}

Tolerance output_tolerance(DType dtype, double max_abs_v) {
  switch (dtype) {
    case DType::f32: return {2e-5 + 0x1p-24 * max_abs_v, 4.0 * 0x1p-24};
    case DType::f16: return {2e-4 + 0x1p-11 * max_abs_v, 4.0 * 0x1p-11};
    case DType::bf16: return {1e-3 + 0x1p-8 * max_abs_v, 4.0 * 0x1p-8};
  }
  return {0.0, 0.0};
}

Tolerance lse_tolerance() { return {1e-4, 1e-5}; }

}  // namespace ringattn::detail
