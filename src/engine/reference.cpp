#include "engine/reference.hpp"

#include <cmath>
#include <algorithm>
#include <limits>

namespace ringattn::detail {

void reference_forward(const ReferenceProblem& p, const std::vector<std::int64_t>& positions,
                       const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                       std::vector<double>& out, std::vector<double>& lse) {
  const std::int64_t B = p.batch, S = p.seq_len, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const std::int64_t window = std::min(p.window, S);  // a window past S reaches every key (and cannot overflow)
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
          if (p.window >= 0 && (t < pos - window || t > pos + window) && t >= p.sinks) {
            scores[static_cast<std::size_t>(t)] = -std::numeric_limits<double>::infinity();  // outside the window
          }
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

void reference_linear(const ReferenceProblem& p, int map, const std::vector<double>& decay,
                      const std::vector<std::int64_t>& positions, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<double>& out) {
  const std::int64_t B = p.batch, S = p.seq_len, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const auto n = static_cast<std::int64_t>(positions.size());
  const std::int64_t group = H / Hkv;
  auto phi = [map](double x) { return map == 1 ? x : (x > 0.0 ? x + 1.0 : std::exp(x)); };
  out.assign(static_cast<std::size_t>(B * n * H * D), 0.0);
#pragma omp parallel for collapse(3) schedule(dynamic)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t pos = positions[static_cast<std::size_t>(i)];
        const std::int64_t keys = p.causal ? pos + 1 : S;
        const std::int64_t hk = h / group;
        const float* qi = &q[static_cast<std::size_t>(((b * n + i) * H + h) * D)];
        double* o = &out[static_cast<std::size_t>(((b * n + i) * H + h) * D)];
        double denom = 0.0;
        for (std::int64_t t = 0; t < keys; ++t) {
          const float* kt = &k[static_cast<std::size_t>(((b * S + t) * Hkv + hk) * D)];
          const float* vt = &v[static_cast<std::size_t>(((b * S + t) * Hkv + hk) * D)];
          double a = 0.0;
          for (std::int64_t d = 0; d < D; ++d) a += phi(qi[d]) * phi(kt[d]);
          if (p.causal) a *= std::pow(decay[static_cast<std::size_t>(h)], static_cast<double>(pos - t));
          denom += a;
          for (std::int64_t d = 0; d < D; ++d) o[d] += a * static_cast<double>(vt[d]);
        }
        if (map == 0) {
          for (std::int64_t d = 0; d < D; ++d) o[d] /= denom + 1e-6;
        }
      }
    }
  }
}

void reference_linear_backward(const ReferenceProblem& p, int map, const std::vector<double>& decay,
                               const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                               const std::vector<float>& dout, std::vector<double>& dq, std::vector<double>& dk,
                               std::vector<double>& dv) {
  // From the definition: a_ij = w_ij phi(q_i).phi(k_j), num_i = sum_j a_ij v_j, den_i =
  // sum_j a_ij + eps (elu1; 1 for identity), o_i = num_i / den_i. Then dnum_i = do_i / den_i,
  // dden_i = -(do_i . o_i) / den_i, da_ij = dnum_i . v_j + dden_i; dv_j += a_ij dnum_i;
  // dphi(q_i) += da_ij w_ij phi(k_j), dphi(k_j) += da_ij w_ij phi(q_i); then phi'.
  const std::int64_t B = p.batch, S = p.seq_len, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const std::int64_t group = H / Hkv;
  auto phi = [map](double x) { return map == 1 ? x : (x > 0.0 ? x + 1.0 : std::exp(x)); };
  auto dphi = [map](double x) { return map == 1 ? 1.0 : (x > 0.0 ? 1.0 : std::exp(x)); };
  dq.assign(static_cast<std::size_t>(B * S * H * D), 0.0);
  dk.assign(static_cast<std::size_t>(B * S * Hkv * D), 0.0);
  dv.assign(dk.size(), 0.0);
  auto qi = [&](std::int64_t b, std::int64_t t, std::int64_t h) { return static_cast<std::size_t>(((b * S + t) * H + h) * D); };
  auto ki = [&](std::int64_t b, std::int64_t t, std::int64_t h) { return static_cast<std::size_t>(((b * S + t) * Hkv + h) * D); };
#pragma omp parallel for
  for (std::int64_t b = 0; b < B; ++b) {
    std::vector<double> a(static_cast<std::size_t>(S)), w(static_cast<std::size_t>(S)), o(static_cast<std::size_t>(D));
    std::vector<double> de(static_cast<std::size_t>(D));
    std::vector<double> dfk(static_cast<std::size_t>(S * D));  // dphi(k_j) for this (b, kv head), summed over heads
    for (std::int64_t hk = 0; hk < Hkv; ++hk) {
      std::fill(dfk.begin(), dfk.end(), 0.0);
      for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (std::int64_t i = 0; i < S; ++i) {
          const std::int64_t keys = p.causal ? i + 1 : S;
          double den = 0.0;
          std::fill(o.begin(), o.end(), 0.0);
          for (std::int64_t j = 0; j < keys; ++j) {
            w[static_cast<std::size_t>(j)] = p.causal ? std::pow(decay[static_cast<std::size_t>(h)], double(i - j)) : 1.0;
            double dot = 0.0;
            for (std::int64_t d = 0; d < D; ++d) dot += phi(q[qi(b, i, h) + d]) * phi(k[ki(b, j, hk) + d]);
            a[static_cast<std::size_t>(j)] = w[static_cast<std::size_t>(j)] * dot;
            den += a[static_cast<std::size_t>(j)];
            for (std::int64_t d = 0; d < D; ++d) o[static_cast<std::size_t>(d)] += a[static_cast<std::size_t>(j)] * v[ki(b, j, hk) + d];
          }
          den = map == 0 ? den + 1e-6 : 1.0;
          double dden = 0.0;
          for (std::int64_t d = 0; d < D; ++d) {
            o[static_cast<std::size_t>(d)] /= den;
            dden -= dout[qi(b, i, h) + d] * o[static_cast<std::size_t>(d)] / den;
          }
          if (map != 0) dden = 0.0;
          std::fill(de.begin(), de.end(), 0.0);
          for (std::int64_t j = 0; j < keys; ++j) {
            double da = dden;
            for (std::int64_t d = 0; d < D; ++d) da += dout[qi(b, i, h) + d] / den * v[ki(b, j, hk) + d];
            const double wj = w[static_cast<std::size_t>(j)];
            for (std::int64_t d = 0; d < D; ++d) {
              dv[ki(b, j, hk) + static_cast<std::size_t>(d)] += a[static_cast<std::size_t>(j)] * dout[qi(b, i, h) + d] / den;
              de[static_cast<std::size_t>(d)] += da * wj * phi(k[ki(b, j, hk) + d]);
              dfk[static_cast<std::size_t>(j * D + d)] += da * wj * phi(q[qi(b, i, h) + d]);
            }
          }
          for (std::int64_t d = 0; d < D; ++d) dq[qi(b, i, h) + static_cast<std::size_t>(d)] = de[static_cast<std::size_t>(d)] * dphi(q[qi(b, i, h) + d]);
        }
      }
      for (std::int64_t j = 0; j < S; ++j)
        for (std::int64_t d = 0; d < D; ++d)
          dk[ki(b, j, hk) + static_cast<std::size_t>(d)] = dfk[static_cast<std::size_t>(j * D + d)] * dphi(k[ki(b, j, hk) + d]);
    }
  }
}

void reference_backward(const ReferenceProblem& p, const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, const std::vector<float>& dout, std::vector<double>& dq,
                        std::vector<double>& dk, std::vector<double>& dv) {
  const std::int64_t B = p.batch, S = p.seq_len, H = p.heads, Hkv = p.kv_heads, D = p.head_dim;
  const std::int64_t window = std::min(p.window, S);  // a window past S reaches every key (and cannot overflow)
  const std::int64_t group = H / Hkv;
  dq.assign(static_cast<std::size_t>(B * S * H * D), 0.0);
  dk.assign(static_cast<std::size_t>(B * S * Hkv * D), 0.0);
  dv.assign(dk.size(), 0.0);
  auto qi = [&](std::int64_t b, std::int64_t t, std::int64_t h) { return static_cast<std::size_t>(((b * S + t) * H + h) * D); };
  auto ki = [&](std::int64_t b, std::int64_t t, std::int64_t h) { return static_cast<std::size_t>(((b * S + t) * Hkv + h) * D); };
  // Two passes, each parallel over rows, whose sums come out the bits of the one serial loop
  // (dq_i over the keys j in order; dk_j and dv_j over the query heads h of j's group, then
  // the rows i, in order), whatever the thread count:
  //   1. per query row: the scores, their maximum and sum, O, delta = dout . O, then
  //      dS_ij = P_ij (dP_ij - delta) scale with dP = dout . v, and dq_i = sum_j dS_ij k_j;
  //   2. per key row: P_ij and dS_ij again from the row's maximum, sum and delta (the same
  //      operations, so the same values), dk_j = sum dS_ij q_i and dv_j = sum P_ij dout_i.
  const std::int64_t rows = B * H * S;
  std::vector<double> row_max(static_cast<std::size_t>(rows)), row_sum(row_max.size()), row_delta(row_max.size());
  auto ri = [&](std::int64_t b, std::int64_t h, std::int64_t i) { return static_cast<std::size_t>((b * H + h) * S + i); };
  auto hidden = [&](std::int64_t i, std::int64_t j) {  // outside the window (sinks excepted)
    return p.window >= 0 && (j < i - window || j > i + window) && j >= p.sinks;
  };
  // The scaled score of (i, j) as a probability's exponent input, -inf where masked.
  auto score = [&](std::int64_t b, std::int64_t h, std::int64_t hk, std::int64_t i, std::int64_t j) {
    double dot = 0.0;
    for (std::int64_t d = 0; d < D; ++d) dot += static_cast<double>(q[qi(b, i, h) + d]) * k[ki(b, j, hk) + d];
    return hidden(i, j) ? -std::numeric_limits<double>::infinity() : dot * p.scale;
  };
  auto dprob = [&](std::int64_t b, std::int64_t h, std::int64_t hk, std::int64_t i, std::int64_t j) {
    double dp = 0.0;
    for (std::int64_t d = 0; d < D; ++d) dp += static_cast<double>(dout[qi(b, i, h) + d]) * v[ki(b, j, hk) + d];
    return dp;
  };
#pragma omp parallel
  {
    std::vector<double> prob(static_cast<std::size_t>(S)), o(static_cast<std::size_t>(D));
#pragma omp for collapse(3) schedule(dynamic, 16)
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t h = 0; h < H; ++h) {
        for (std::int64_t i = 0; i < S; ++i) {
          const std::int64_t hk = h / group;
          const std::int64_t keys = p.causal ? i + 1 : S;
          double mx = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < keys; ++j) {
            prob[static_cast<std::size_t>(j)] = score(b, h, hk, i, j);
            mx = std::max(mx, prob[static_cast<std::size_t>(j)]);
          }
          double sum = 0.0;
          for (std::int64_t j = 0; j < keys; ++j) sum += (prob[static_cast<std::size_t>(j)] = std::exp(prob[static_cast<std::size_t>(j)] - mx));
          std::fill(o.begin(), o.end(), 0.0);
          for (std::int64_t j = 0; j < keys; ++j) {
            prob[static_cast<std::size_t>(j)] /= sum;
            for (std::int64_t d = 0; d < D; ++d) o[static_cast<std::size_t>(d)] += prob[static_cast<std::size_t>(j)] * v[ki(b, j, hk) + d];
          }
          double delta = 0.0;
          for (std::int64_t d = 0; d < D; ++d) delta += static_cast<double>(dout[qi(b, i, h) + d]) * o[static_cast<std::size_t>(d)];
          row_max[ri(b, h, i)] = mx;
          row_sum[ri(b, h, i)] = sum;
          row_delta[ri(b, h, i)] = delta;
          for (std::int64_t j = 0; j < keys; ++j) {
            const double ds = prob[static_cast<std::size_t>(j)] * (dprob(b, h, hk, i, j) - delta) * p.scale;
            for (std::int64_t d = 0; d < D; ++d) dq[qi(b, i, h) + static_cast<std::size_t>(d)] += ds * k[ki(b, j, hk) + d];
          }
        }
      }
    }
#pragma omp for collapse(3) schedule(dynamic, 16)
    for (std::int64_t b = 0; b < B; ++b) {
      for (std::int64_t hk = 0; hk < Hkv; ++hk) {
        for (std::int64_t j = 0; j < S; ++j) {
          for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            for (std::int64_t i = p.causal ? j : 0; i < S; ++i) {
              const std::int64_t r = static_cast<std::int64_t>(ri(b, h, i));
              const double pj = std::exp(score(b, h, hk, i, j) - row_max[static_cast<std::size_t>(r)]) /
                                row_sum[static_cast<std::size_t>(r)];
              const double ds = pj * (dprob(b, h, hk, i, j) - row_delta[static_cast<std::size_t>(r)]) * p.scale;
              for (std::int64_t d = 0; d < D; ++d) {
                dk[ki(b, j, hk) + static_cast<std::size_t>(d)] += ds * q[qi(b, i, h) + d];
                dv[ki(b, j, hk) + static_cast<std::size_t>(d)] += pj * dout[qi(b, i, h) + d];
              }
            }
          }
        }
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

double gradient_tolerance(DType dtype) {
  switch (dtype) {
    case DType::f32: return 1e-5;
    case DType::f16: return 8 * 0x1p-11;
    case DType::bf16: return 8 * 0x1p-8;
  }
  return 0.0;
}

Tolerance lse_tolerance() { return {1e-4, 1e-5}; }

}  // namespace ringattn::detail
