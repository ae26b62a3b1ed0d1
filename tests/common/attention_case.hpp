// tests/common/attention_case.hpp: problem descriptions and naive baselines shared by the
// CPU and GPU kernel tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <vector>

#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "ringattn/layout.hpp"

namespace ringattn::testing {

// |got - ref| for a running maximum: std::max(err, NaN) keeps err, so a NaN would pass
// unseen; here it is infinite (equal infinities are 0).
inline double abs_err(double got, double ref) {
  if (got == ref) return 0.0;
  if (std::isnan(got) || std::isnan(ref)) return INFINITY;
  return std::fabs(got - ref);
}

struct AttentionCase {
  std::int64_t batch, seq, heads, kv_heads, dim;
  bool causal;
  LayoutKind layout;
  int world;
  DType dtype;
  std::int64_t window = -1;  // sliding window (see ReferenceProblem); -1: none
  std::int64_t sinks = 0;

  // Whether query position p sees key position t.
  bool sees(std::int64_t p, std::int64_t t) const {
    if (causal && t > p) return false;
    if (window < 0 || t < sinks) return true;
    return t >= p - window && t <= p + window;
  }
};

inline std::string name(const AttentionCase& c) {
  return std::string(to_string(c.dtype)) + " B=" + std::to_string(c.batch) + " S=" + std::to_string(c.seq) +
         " H=" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) + " D=" + std::to_string(c.dim) +
         (c.causal ? " causal " : " full ") + to_string(c.layout) + " P=" + std::to_string(c.world) +
         (c.window >= 0 ? " window " + std::to_string(c.window) + " sinks " + std::to_string(c.sinks) : "");
}

// How GoogleTest shows a case (a parameter) in its messages.
inline void PrintTo(const AttentionCase& c, std::ostream* os) { *os << name(c); }

// A problem for the MPI ring tests, which run at whatever rank count mpirun gives them.
struct RingCase {
  std::int64_t batch, seq, heads, kv_heads, dim;
  bool causal;
  LayoutKind layout;
  DType dtype;
};

inline std::string name(const RingCase& c) {
  return std::string(to_string(c.dtype)) + " S=" + std::to_string(c.seq) + " H=" + std::to_string(c.heads) + "/" +
         std::to_string(c.kv_heads) + " D=" + std::to_string(c.dim) + (c.causal ? " causal " : " full ") +
         to_string(c.layout);
}

// Dense (B, pos.size(), heads, D) synthetic values of `c.dtype` at global positions `pos`.
inline std::vector<unsigned char> generate(const AttentionCase& c, detail::SyntheticTensor t,
                                           const std::vector<std::int64_t>& pos, std::int64_t heads,
                                           std::uint64_t seed = 7) {
  std::vector<unsigned char> buf(static_cast<std::size_t>(c.batch) * pos.size() *
                                 static_cast<std::size_t>(heads * c.dim) * dtype_size(c.dtype));
  detail::fill_synthetic(seed, t, c.dtype, c.batch, pos, heads, c.dim, buf.data());
  return buf;
}

inline std::vector<float> to_f32(DType dtype, const std::vector<unsigned char>& buf) {
  std::vector<float> out(buf.size() / dtype_size(dtype));
  detail::convert_to_f32(dtype, buf.data(), out.data(), out.size());
  return out;
}

// Naive two-pass attention in fp32: the same-precision baseline of flash-attention's test
// rule. With round_p, P is rounded to the storage dtype before P@V, as tensor cores take it.
// q: (B, n, H, D) for the rows at `pos`; k, v: (B, S, H_kv, D). Returns O rounded to the dtype.
inline std::vector<float> naive_attention(const AttentionCase& c, double scale, const std::vector<std::int64_t>& pos,
                                          const std::vector<float>& q, const std::vector<float>& k,
                                          const std::vector<float>& v, bool round_p) {
  const auto n = static_cast<std::int64_t>(pos.size());
  std::vector<float> out(static_cast<std::size_t>(c.batch * n * c.heads * c.dim));
  auto at = [](std::int64_t i) { return static_cast<std::size_t>(i); };
  // Rows are independent (each output row written by one iteration): parallel where the test
  // is built with OpenMP, the same values either way.
#pragma omp parallel for collapse(2) schedule(dynamic, 16)
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t h = 0; h < c.heads; ++h) {
        const std::int64_t hk = h / (c.heads / c.kv_heads);
        const std::int64_t keys = c.causal ? pos[at(i)] + 1 : c.seq;
        std::vector<float> s(at(keys));
        float mx = -INFINITY;
        for (std::int64_t t = 0; t < keys; ++t) {
          if (!c.sees(pos[at(i)], t)) {
            s[at(t)] = -INFINITY;
            continue;
          }
          float dot = 0.0f;
          for (std::int64_t d = 0; d < c.dim; ++d)
            dot += q[at(((b * n + i) * c.heads + h) * c.dim + d)] * k[at(((b * c.seq + t) * c.kv_heads + hk) * c.dim + d)];
          s[at(t)] = dot * static_cast<float>(scale);
          mx = std::max(mx, s[at(t)]);
        }
        float sum = 0.0f;
        for (float& x : s) {
          x = std::exp(x - mx);
          sum += x;
          if (round_p) x = detail::round_to(c.dtype, x);
        }
        for (std::int64_t d = 0; d < c.dim; ++d) {
          float acc = 0.0f;
          for (std::int64_t t = 0; t < keys; ++t) acc += s[at(t)] * v[at(((b * c.seq + t) * c.kv_heads + hk) * c.dim + d)];
          out[at(((b * n + i) * c.heads + h) * c.dim + d)] = detail::round_to(c.dtype, acc / sum);
        }
      }
  return out;
}

}  // namespace ringattn::testing
