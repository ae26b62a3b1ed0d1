// The CPU block kernel against the fp64 reference, driven through ring plans on one process
// (every step's KV block built locally), so that tiling, masking, GQA and the merge across
// blocks are all exercised without MPI.
//
// Tolerance (flash-attention's rule): the kernel's max error against fp64 may be at most twice
// that of a naive same-precision implementation (two-pass softmax in fp32, output rounded to
// the storage dtype), plus a small atol.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <cmath>
#include <vector>

#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "kernels/cpu/cpu_forward.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using Case = ringattn::testing::AttentionCase;
using ringattn::testing::name;
using ringattn::testing::to_f32;

using ringattn::testing::generate;

void check_case(const Case& c) {
  SCOPED_TRACE(name(c));
  const Layout layout(c.layout, c.seq, c.world);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  const std::vector<float> k_all = to_f32(c.dtype, generate(c, SyntheticTensor::k, all, c.kv_heads));
  const std::vector<float> v_all = to_f32(c.dtype, generate(c, SyntheticTensor::v, all, c.kv_heads));
  const AttentionShape shape{c.batch, c.heads, c.kv_heads, c.dim};

  double kernel_err = 0.0, naive_err = 0.0, lse_err = 0.0;
  for (int r = 0; r < c.world; ++r) {
    const auto pos = layout.positions(r);
    const auto n = static_cast<std::int64_t>(pos.size());
    std::vector<unsigned char> q = generate(c, SyntheticTensor::q, pos, c.heads);
    CpuForwardKernel kernel(shape, n, layout.max_local_length(), 2);
    kernel.load_queries(TensorView::contiguous(q.data(), c.dtype, {c.batch, n, c.heads, c.dim}), static_cast<float>(scale));
    for (const RingStep& step : make_ring_plan(layout, c.causal ? MaskKind::causal : MaskKind::full, r).steps) {
      const auto src_pos = layout.positions(step.kv_source);
      std::vector<unsigned char> block = generate(c, SyntheticTensor::k, src_pos, c.kv_heads);
      const std::vector<unsigned char> v = generate(c, SyntheticTensor::v, src_pos, c.kv_heads);
      block.insert(block.end(), v.begin(), v.end());
      kernel.load_kv(c.dtype, block.data(), step.kv_len);
      kernel.run(step.tasks);
    }
    std::vector<unsigned char> out(q.size());
    std::vector<float> lse(static_cast<std::size_t>(c.batch * c.heads * n));
    kernel.store(TensorView::contiguous(out.data(), c.dtype, {c.batch, n, c.heads, c.dim}),
                 TensorView::contiguous(lse.data(), DType::f32, {c.batch, c.heads, n}));

    const std::vector<float> q32 = to_f32(c.dtype, q);
    std::vector<double> ref_out, ref_lse;
    reference_forward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale}, pos, q32, k_all, v_all, ref_out,
                      ref_lse);
    const std::vector<float> got = to_f32(c.dtype, out);
    const std::vector<float> naive = ringattn::testing::naive_attention(c, scale, pos, q32, k_all, v_all, false);
    for (std::size_t i = 0; i < ref_out.size(); ++i) {
      ASSERT_FALSE(std::isnan(got[i]));
      kernel_err = std::max(kernel_err, ringattn::testing::abs_err(got[i], ref_out[i]));
      naive_err = std::max(naive_err, std::fabs(naive[i] - ref_out[i]));
    }
    for (std::size_t i = 0; i < ref_lse.size(); ++i) lse_err = std::max(lse_err, ringattn::testing::abs_err(lse[i], ref_lse[i]));
  }
  const double atol = c.dtype == DType::f32 ? 1e-6 : 1e-4;
  EXPECT_LE(kernel_err, 2.0 * naive_err + atol) << "naive fp32 error " << naive_err;
  EXPECT_LE(lse_err, 2e-5);
}

}  // namespace

TEST(CpuKernel, MatchesReferenceAcrossDtypesAndHeadDims) {
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (std::int64_t dim : {32, 64, 96, 128, 256}) {
      for (bool causal : {false, true}) {
        check_case({1, 70, 2, 2, dim, causal, LayoutKind::contiguous, 1, dtype});
      }
    }
  }
}

TEST(CpuKernel, MatchesReferenceThroughRingPlans) {
  for (LayoutKind layout : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
    for (bool causal : {false, true}) {
      for (int world : {2, 3, 5}) {
        // Odd S, GQA 4/2, batch 2, and a sequence long enough for several key tiles per block.
        check_case({2, 203, 4, 2, 64, causal, layout, world, DType::f32});
        check_case({1, 161, 6, 1, 32, causal, layout, world, DType::bf16});  // MQA
      }
    }
  }
}

TEST(CpuKernel, OddHeadDimAndCustomScaleTile) {
  // Head dim 7 exercises the loop remainders; 1 query row per rank exercises tiny tiles.
  check_case({1, 33, 3, 3, 7, true, LayoutKind::zigzag, 4, DType::f32});
  check_case({1, 4, 1, 1, 16, false, LayoutKind::striped, 4, DType::f16});
}

TEST(CpuKernel, ReusedKernelStartsEachPassFresh) {
  // The benchmark runs one prepared kernel many times: each pass must forget the last.
  const Case c{1, 40, 2, 2, 16, true, LayoutKind::contiguous, 1, DType::f32};
  const Layout layout(c.layout, c.seq, 1);
  const auto pos = layout.positions(0);
  std::vector<unsigned char> q = generate(c, SyntheticTensor::q, pos, c.heads);
  std::vector<unsigned char> block = generate(c, SyntheticTensor::k, pos, c.kv_heads);
  const std::vector<unsigned char> v = generate(c, SyntheticTensor::v, pos, c.kv_heads);
  block.insert(block.end(), v.begin(), v.end());
  CpuForwardKernel kernel({c.batch, c.heads, c.kv_heads, c.dim}, c.seq, c.seq, 1);
  const RingPlan plan = make_ring_plan(layout, MaskKind::causal, 0);
  std::vector<float> out[2], lse[2];
  for (int pass = 0; pass < 2; ++pass) {
    kernel.load_queries(TensorView::contiguous(q.data(), c.dtype, {1, c.seq, c.heads, c.dim}), 0.25f);
    kernel.load_kv(c.dtype, block.data(), c.seq);
    kernel.run(plan.steps[0].tasks);
    out[pass].resize(q.size() / 4);
    lse[pass].resize(static_cast<std::size_t>(c.heads * c.seq));
    kernel.store(TensorView::contiguous(out[pass].data(), c.dtype, {1, c.seq, c.heads, c.dim}),
                 TensorView::contiguous(lse[pass].data(), DType::f32, {1, c.heads, c.seq}));
  }
  EXPECT_EQ(out[0], out[1]);
  EXPECT_EQ(lse[0], lse[1]);
}
