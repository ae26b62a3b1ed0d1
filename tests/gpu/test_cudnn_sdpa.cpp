// cuDNN's fused attention (kernels/cudnn) for one task against the fp64 reference: O within
// 2x the error of a naive same-precision implementation + 1e-4 (the native kernels' rule),
// LSE within 1e-3. Queries are the last q_len rows of the sequence and the keys all of it, so
// causal cases exercise the diagonal offset kv_len - q_len that ring sub-blocks need.
// Skips where there is no GPU; absent from builds without cuDNN.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <cmath>
#include <vector>

#include "core/cuda_raii.hpp"
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
  sdpa.forward(p, dq.get(), dk.get(), dv.get(), dout.get(), dlse.as<float>(), static_cast<float>(scale), nullptr);
  RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<unsigned char> out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(c.batch * c.heads * q_len));
  RINGATTN_CUDA_CHECK(cudaMemcpy(out.data(), dout.get(), out.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(lse.data(), dlse.get(), lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
  const auto q32 = to_f32(c.dtype, q), k32 = to_f32(c.dtype, k), v32 = to_f32(c.dtype, v);
  std::vector<double> ref_out, ref_lse;
  reference_forward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale}, pos, q32, k32, v32, ref_out, ref_lse);
  const auto got = to_f32(c.dtype, out);
  const auto naive = ringattn::testing::naive_attention(c, scale, pos, q32, k32, v32, true);
  double err = 0.0, naive_err = 0.0, lse_err = 0.0;
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << "element " << i;
    err = std::max(err, std::fabs(got[i] - ref_out[i]));
    naive_err = std::max(naive_err, std::fabs(naive[i] - ref_out[i]));
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) lse_err = std::max(lse_err, std::fabs(lse[i] - ref_lse[i]));
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

TEST_F(CudnnSdpaTest, PlansAreCachedPerProblem) {
  CudnnSdpa sdpa;
  const Case c{1, 256, 4, 4, 128, true, LayoutKind::contiguous, 1, DType::bf16};
  check(sdpa, c, 256);
  check(sdpa, c, 256);  // the second run reuses the plan; the result must not change
}
