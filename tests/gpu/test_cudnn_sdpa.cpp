// cuDNN's fused attention (kernels/cudnn) for one task against the fp64 reference: O within
// 2x the error of a naive same-precision implementation + 1e-4 (the native kernels' rule),
// LSE within 1e-3. Queries are the last q_len rows of the sequence and the keys all of it, so
// causal cases exercise the diagonal offset kv_len - q_len that ring sub-blocks need.
// Skips where there is no GPU; absent from builds without cuDNN.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "kernels/cudnn/cudnn_sdpa.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using Case = ringattn::testing::AttentionCase;
using ringattn::testing::generate;
using ringattn::testing::name;
using ringattn::testing::to_f32;

void upload(DeviceBuffer& dst, const std::vector<unsigned char>& src) {
  RINGATTN_CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size(), cudaMemcpyHostToDevice));
}

void check(CudnnSdpa& sdpa, const Case& c, std::int64_t q_len) {
  SCOPED_TRACE(name(c) + " q_len " + std::to_string(q_len));
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq)), pos;
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  for (std::int64_t t = c.seq - q_len; t < c.seq; ++t) pos.push_back(t);
  const auto q = generate(c, SyntheticTensor::q, pos, c.heads);
  const auto k = generate(c, SyntheticTensor::k, all, c.kv_heads);
  const auto v = generate(c, SyntheticTensor::v, all, c.kv_heads);
  DeviceBuffer dq(q.size()), dk(k.size()), dv(v.size()), dout(q.size());
  DeviceBuffer dlse(static_cast<std::size_t>(c.batch * c.heads * q_len) * sizeof(float));
  upload(dq, q);
  upload(dk, k);
  upload(dv, v);

  CudnnSdpaProblem p;
  p.dtype = c.dtype;
  p.batch = c.batch;
  p.heads = c.heads;
  p.kv_heads = c.kv_heads;
  p.q_len = q_len;
  p.kv_len = c.seq;
  p.head_dim = c.dim;
  p.q_batch_stride = p.o_batch_stride = q_len * c.heads * c.dim;
  p.q_row_stride = p.o_row_stride = c.heads * c.dim;
  p.q_head_stride = p.o_head_stride = c.dim;
  p.kv_batch_stride = c.seq * c.kv_heads * c.dim;
  p.kv_row_stride = c.kv_heads * c.dim;
  p.kv_head_stride = c.dim;
  p.causal = c.causal;
  p.diag_offset = c.seq - q_len;
  if (c.window >= 0) {  // query i (position seq - q_len + i) sees keys from position - window on
    p.band = true;
    p.lower_offset = p.diag_offset - c.window;
    std::string why_not;
    if (!sdpa.try_prepare(p, &why_not)) GTEST_SKIP() << "cuDNN refuses the sliding-window graph: " << why_not;
  }
  sdpa.forward(p, dq.get(), dk.get(), dv.get(), dout.get(), dlse.as<float>(), static_cast<float>(scale), nullptr);
  RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<unsigned char> out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(c.batch * c.heads * q_len));
  RINGATTN_CUDA_CHECK(cudaMemcpy(out.data(), dout.get(), out.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(lse.data(), dlse.get(), lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
  const auto q32 = to_f32(c.dtype, q), k32 = to_f32(c.dtype, k), v32 = to_f32(c.dtype, v);
  std::vector<double> ref_out, ref_lse;
  reference_forward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale, c.window, c.sinks}, pos, q32, k32, v32,
                    ref_out, ref_lse);
  const auto got = to_f32(c.dtype, out);
  const auto naive = ringattn::testing::naive_attention(c, scale, pos, q32, k32, v32, true);
  double err = 0.0, naive_err = 0.0, lse_err = 0.0;
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << "element " << i;
    err = std::max(err, ringattn::testing::abs_err(got[i], ref_out[i]));
    naive_err = std::max(naive_err, std::fabs(naive[i] - ref_out[i]));
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) lse_err = std::max(lse_err, ringattn::testing::abs_err(lse[i], ref_lse[i]));
  EXPECT_LE(err, 2.0 * naive_err + 1e-4) << "naive same-precision error " << naive_err;
  EXPECT_LE(lse_err, 1e-3);
}

class CudnnSdpaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

}  // namespace

TEST_F(CudnnSdpaTest, FullAndCausalEveryDtypeAndHeadDim) {
  CudnnSdpa sdpa;
  for (DType dtype : {DType::bf16, DType::f16})
    for (std::int64_t dim : {64, 128})
      for (bool causal : {false, true}) check(sdpa, {2, 384, 4, 2, dim, causal, LayoutKind::contiguous, 1, dtype}, 384);
}

TEST_F(CudnnSdpaTest, DiagonalOffsetsUnevenLengthsAndGqa) {
  CudnnSdpa sdpa;
  check(sdpa, {1, 517, 8, 2, 128, true, LayoutKind::contiguous, 1, DType::bf16}, 200);
  check(sdpa, {1, 517, 8, 2, 128, false, LayoutKind::contiguous, 1, DType::bf16}, 200);
  check(sdpa, {1, 300, 4, 1, 64, true, LayoutKind::contiguous, 1, DType::f16}, 1);
}

// Sliding-window bands (lower_offset = diag_offset - window), as the window plans' tasks
// have them: whole blocks and ring sub-blocks with a diagonal offset.
TEST_F(CudnnSdpaTest, SlidingWindowBands) {
  CudnnSdpa sdpa;
  check(sdpa, {1, 512, 4, 2, 128, true, LayoutKind::contiguous, 1, DType::bf16, 100, 0}, 512);
  check(sdpa, {1, 517, 8, 2, 128, true, LayoutKind::contiguous, 1, DType::bf16, 400, 0}, 200);
  check(sdpa, {2, 384, 4, 1, 64, true, LayoutKind::contiguous, 1, DType::f16, 0, 0}, 384);
}

TEST_F(CudnnSdpaTest, PlansAreCachedPerProblem) {
  CudnnSdpa sdpa;
  const Case c{1, 256, 4, 4, 128, true, LayoutKind::contiguous, 1, DType::bf16};
  check(sdpa, c, 256);
  check(sdpa, c, 256);  // the second run reuses the plan; the result must not change
}

namespace {

// cuDNN's backward on one whole (square) problem against the fp64 reference gradients: dQ,
// dK, dV within detail::gradient_tolerance of the
// largest reference gradient. O comes from the fp64 reference forward, rounded to the dtype.
void check_backward(CudnnSdpa& sdpa, const Case& c) {
  SCOPED_TRACE(name(c) + " backward");
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  const auto q = generate(c, SyntheticTensor::q, all, c.heads);
  const auto k = generate(c, SyntheticTensor::k, all, c.kv_heads);
  const auto v = generate(c, SyntheticTensor::v, all, c.kv_heads);
  const auto dout = generate(c, SyntheticTensor::dout, all, c.heads);
  const ReferenceProblem ref{c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale};
  std::vector<double> o_ref, lse_ref, rdq, rdk, rdv;
  reference_forward(ref, all, to_f32(c.dtype, q), to_f32(c.dtype, k), to_f32(c.dtype, v), o_ref, lse_ref);
  reference_backward(ref, to_f32(c.dtype, q), to_f32(c.dtype, k), to_f32(c.dtype, v), to_f32(c.dtype, dout), rdq, rdk,
                     rdv);
  std::vector<float> o32(o_ref.begin(), o_ref.end()), lse32(lse_ref.begin(), lse_ref.end());
  std::vector<unsigned char> o(q.size());
  convert_from_f32(c.dtype, o32.data(), o.data(), o32.size());

  DeviceBuffer d_q(q.size()), d_k(k.size()), d_v(v.size()), d_o(o.size()), d_do(dout.size());
  const DType grad = c.dtype;
  DeviceBuffer d_lse(lse32.size() * sizeof(float)), d_dq(q.size()), d_dk(k.size()), d_dv(v.size());
  upload(d_q, q);
  upload(d_k, k);
  upload(d_v, v);
  upload(d_o, o);
  upload(d_do, dout);
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_lse.get(), lse32.data(), d_lse.bytes(), cudaMemcpyHostToDevice));

  const std::int64_t H = c.heads, Hk = c.kv_heads, D = c.dim, S = c.seq;
  CudnnSdpaProblem p;
  p.dtype = c.dtype;
  p.batch = c.batch;
  p.heads = H;
  p.kv_heads = Hk;
  p.q_len = p.kv_len = S;
  p.head_dim = D;
  p.q_batch_stride = p.o_batch_stride = p.do_batch_stride = p.dq_batch_stride = S * H * D;
  p.q_row_stride = p.o_row_stride = p.do_row_stride = p.dq_row_stride = H * D;
  p.q_head_stride = p.o_head_stride = p.do_head_stride = p.dq_head_stride = D;
  p.kv_batch_stride = p.dkv_batch_stride = S * Hk * D;
  p.kv_row_stride = p.dkv_row_stride = Hk * D;
  p.kv_head_stride = p.dkv_head_stride = D;
  p.causal = c.causal;
  std::string why;
  ASSERT_TRUE(sdpa.try_prepare_backward(p, &why)) << why;
  sdpa.backward(p, d_q.get(), d_k.get(), d_v.get(), d_o.get(), d_do.get(), d_lse.as<float>(), d_dq.get(), d_dk.get(),
                d_dv.get(), static_cast<float>(scale), nullptr);
  RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());
  auto fetch = [&](const DeviceBuffer& d) {
    std::vector<unsigned char> h(d.bytes());
    RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), h.size(), cudaMemcpyDeviceToHost));
    return h;
  };
  const std::vector<float> dq = to_f32(grad, fetch(d_dq)), dk = to_f32(grad, fetch(d_dk)), dv = to_f32(grad, fetch(d_dv));
  double biggest = 0.0;
  for (const auto* r : {&rdq, &rdk, &rdv})
    for (double x : *r) biggest = std::max(biggest, std::fabs(x));
  auto rel_err = [&](const std::vector<float>& got, const std::vector<double>& want) {
    double e = 0.0;
    for (std::size_t i = 0; i < want.size(); ++i) e = std::max(e, std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - want[i]));
    return e / biggest;
  };
  const double tol = gradient_tolerance(c.dtype);
  EXPECT_LE(rel_err(dq, rdq), tol) << "dQ";
  EXPECT_LE(rel_err(dk, rdk), tol) << "dK";
  EXPECT_LE(rel_err(dv, rdv), tol) << "dV";
}

}  // namespace

TEST_F(CudnnSdpaTest, BackwardAgainstReferenceGradients) {
  CudnnSdpa sdpa;
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (bool causal : {false, true}) {
      check_backward(sdpa, {1, 256, 4, 4, 128, causal, LayoutKind::contiguous, 1, dtype});
      check_backward(sdpa, {2, 384, 4, 1, 64, causal, LayoutKind::contiguous, 1, dtype});
    }
  }
}
