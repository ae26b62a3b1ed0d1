// The fp64 reference itself: its gradients against central finite differences of its forward
// pass, on tiny problems (every other gradient test trusts reference_backward).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "engine/reference.hpp"

using namespace ringattn::detail;

namespace {

// Loss = sum(O * dout) for the whole sequence, in fp64, from float inputs.
double loss(const ReferenceProblem& p, const std::vector<float>& q, const std::vector<float>& k,
            const std::vector<float>& v, const std::vector<float>& dout) {
  std::vector<std::int64_t> all(static_cast<std::size_t>(p.seq_len));
  for (std::int64_t t = 0; t < p.seq_len; ++t) all[static_cast<std::size_t>(t)] = t;
  std::vector<double> out, lse;
  reference_forward(p, all, q, k, v, out, lse);
  double l = 0.0;
  for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * dout[i];
  return l;
}

std::vector<float> values(std::size_t n, unsigned seed) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) {
    seed = seed * 1103515245u + 12345u;
    // Multiples of 2^-10 in [-1, 1): exact in float, so +-h perturbations stay exact too.
    x[i] = static_cast<float>(static_cast<int>((seed >> 16) % 2048) - 1024) / 1024.0f;
  }
  return x;
}

}  // namespace

TEST(Reference, GradientsMatchFiniteDifferences) {
  for (bool causal : {false, true}) {
    const ReferenceProblem p{1, 5, 4, 2, 3, causal, 0.7};
    const auto nq = static_cast<std::size_t>(p.batch * p.seq_len * p.heads * p.head_dim);
    const auto nk = static_cast<std::size_t>(p.batch * p.seq_len * p.kv_heads * p.head_dim);
    std::vector<float> q = values(nq, 1), k = values(nk, 2), v = values(nk, 3), dout = values(nq, 4);
    std::vector<double> dq, dk, dv;
    reference_backward(p, q, k, v, dout, dq, dk, dv);
    const float h = 1.0f / 256.0f;  // exact in float; the loss is smooth, so O(h^2) error
    auto check = [&](std::vector<float>& x, const std::vector<double>& grad, const char* what) {
      for (std::size_t i = 0; i < x.size(); ++i) {
        const float x0 = x[i];
        x[i] = x0 + h;
        const double up = loss(p, q, k, v, dout);
        x[i] = x0 - h;
        const double down = loss(p, q, k, v, dout);
        x[i] = x0;
        EXPECT_NEAR(grad[i], (up - down) / (2.0 * h), 1e-4) << what << "[" << i << "] causal=" << causal;
      }
    };
    check(q, dq, "dq");
    check(k, dk, "dk (shared by 2 query heads)");
    check(v, dv, "dv");
  }
}
