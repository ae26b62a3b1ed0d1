// The fp64 reference itself: its gradients against central finite differences of its forward
// pass, on tiny problems (every other gradient test trusts reference_backward).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
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

// Every element of x against the central difference of loss() with step 1/256 (exact in
// float; the losses are smooth, so the error is O(h^2)): |grad - fd| <= tol(fd).
template <class Loss, class Tol>
void expect_matches_finite_differences(std::vector<float>& x, const std::vector<double>& grad, Loss&& loss, Tol&& tol,
                                       const std::string& what) {
  const float h = 1.0f / 256.0f;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const float x0 = x[i];
    x[i] = x0 + h;
    const double up = loss();
    x[i] = x0 - h;
    const double down = loss();
    x[i] = x0;
    const double fd = (up - down) / (2.0 * h);
    EXPECT_NEAR(grad[i], fd, tol(fd)) << what << "[" << i << "]";
  }
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
    auto check = [&](std::vector<float>& x, const std::vector<double>& grad, const std::string& what) {
      expect_matches_finite_differences(x, grad, [&] { return loss(p, q, k, v, dout); }, [](double) { return 1e-4; },
                                        what + " causal=" + std::to_string(causal));
    };
    check(q, dq, "dq");
    check(k, dk, "dk (shared by 2 query heads)");
    check(v, dv, "dv");
  }
}

// The linear-attention gradients (from the definition) against finite differences of
// reference_linear: both feature maps, causal with per-head decays and non-causal, and a
// window on the softmax reference's gradients too.
TEST(Reference, LinearGradientsMatchFiniteDifferences) {
  for (int map : {0, 1}) {
    for (bool causal : {false, true}) {
      const ReferenceProblem p{1, 6, 4, 2, 3, causal, 1.0};
      const std::vector<double> decay = causal ? std::vector<double>{0.9, 1.0, 0.6, 0.8} : std::vector<double>(4, 1.0);
      const auto nq = static_cast<std::size_t>(p.batch * p.seq_len * p.heads * p.head_dim);
      const auto nk = static_cast<std::size_t>(p.batch * p.seq_len * p.kv_heads * p.head_dim);
      std::vector<float> q = values(nq, 5), k = values(nk, 6), v = values(nk, 7), dout = values(nq, 8);
      std::vector<double> dq, dk, dv;
      reference_linear_backward(p, map, decay, q, k, v, dout, dq, dk, dv);
      std::vector<std::int64_t> all(static_cast<std::size_t>(p.seq_len));
      for (std::int64_t t = 0; t < p.seq_len; ++t) all[static_cast<std::size_t>(t)] = t;
      auto linear_loss = [&] {
        std::vector<double> out;
        reference_linear(p, map, decay, all, q, k, v, out);
        double l = 0.0;
        for (std::size_t i = 0; i < out.size(); ++i) l += out[i] * dout[i];
        return l;
      };
      auto check = [&](std::vector<float>& x, const std::vector<double>& grad, const std::string& what) {
        expect_matches_finite_differences(x, grad, linear_loss,
                                          [](double fd) { return 2e-3 * std::max(1.0, std::fabs(fd)); },
                                          what + " map=" + std::to_string(map) + " causal=" + std::to_string(causal));
      };
      check(q, dq, "dq");
      check(k, dk, "dk");
      check(v, dv, "dv");
    }
  }
}

TEST(Reference, WindowGradientsMatchFiniteDifferences) {
  for (bool causal : {false, true}) {
    ReferenceProblem p{1, 7, 2, 1, 3, causal, 0.7};
    p.window = 2;
    p.sinks = 1;
    const auto nq = static_cast<std::size_t>(p.batch * p.seq_len * p.heads * p.head_dim);
    const auto nk = static_cast<std::size_t>(p.batch * p.seq_len * p.kv_heads * p.head_dim);
    std::vector<float> q = values(nq, 9), k = values(nk, 10), v = values(nk, 11), dout = values(nq, 12);
    std::vector<double> dq, dk, dv;
    reference_backward(p, q, k, v, dout, dq, dk, dv);
    auto check = [&](std::vector<float>& x, const std::vector<double>& grad, const std::string& what) {
      expect_matches_finite_differences(x, grad, [&] { return loss(p, q, k, v, dout); }, [](double) { return 1e-4; },
                                        what + " causal=" + std::to_string(causal));
    };
    check(q, dq, "dq");
    check(k, dk, "dk");
    check(v, dv, "dv");
  }
}
