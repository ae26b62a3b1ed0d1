// The small ring kernels (src/kernels/cuda/ring_kernels.cu) against host computations.
// finalize_output writes out[b, s, h, d] = dtype(o_acc[b, h, s, d]): a row kernel with
// vector loads and stores where D % 4 == 0 and the output rows are 4-element aligned, a
// per-element kernel otherwise. Both must round exactly as the host does (round to nearest
// even) and write nothing outside the view. Skips where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#include "kernels/cuda/cuda_kernels.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

class RingKernels : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

// One case: an (B, S, H, D) output view inside a larger buffer with the given strides and a
// byte offset from the buffer's start (offset_elems elements), filled with a sentinel first.
void check_finalize(DType dtype, std::int64_t B, std::int64_t S, std::int64_t H, std::int64_t D,
                    std::int64_t row_stride, std::int64_t offset_elems) {
  SCOPED_TRACE(std::string(to_string(dtype)) + " B=" + std::to_string(B) + " S=" + std::to_string(S) +
               " H=" + std::to_string(H) + " D=" + std::to_string(D) + " row stride " +
               std::to_string(row_stride) + " offset " + std::to_string(offset_elems));
  const std::int64_t n = B * H * S * D;
  std::vector<float> acc(static_cast<std::size_t>(n));
  std::uint64_t state = 0x243f6a8885a308d3ull;
  for (float& x : acc) {  // values across many binades, signs and exact ties of the 16-bit types
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const auto bits = static_cast<std::uint32_t>(state >> 32);
    x = std::ldexp(static_cast<float>(bits & 0xffffffu) / 16777216.0f, static_cast<int>((bits >> 24) % 40) - 20);
    if (bits & 0x80000000u) x = -x;
  }
  const std::size_t elem = dtype_size(dtype);
  const std::int64_t head_stride = D, batch_stride = S * row_stride;
  const std::int64_t total = offset_elems + B * batch_stride;
  std::vector<unsigned char> sentinel(static_cast<std::size_t>(total) * elem, 0xab);

  DeviceBuffer d_acc(acc.size() * sizeof(float)), d_out(sentinel.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_acc.get(), acc.data(), d_acc.bytes(), cudaMemcpyHostToDevice));
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_out.get(), sentinel.data(), sentinel.size(), cudaMemcpyHostToDevice));
  TensorView out;
  out.data = static_cast<unsigned char*>(d_out.get()) + offset_elems * static_cast<std::int64_t>(elem);
  out.dtype = dtype;
  out.device = DeviceKind::cuda;
  out.ndim = 4;
  out.shape = {B, S, H, D};
  out.strides = {batch_stride, row_stride, head_stride, 1};
  finalize_output(d_acc.as<float>(), nullptr, out, TensorView{}, nullptr);
  std::vector<unsigned char> got(sentinel.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(got.data(), d_out.get(), got.size(), cudaMemcpyDeviceToHost));

  std::vector<unsigned char> want = sentinel;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t d = 0; d < D; ++d) {
          const float x = acc[static_cast<std::size_t>(((b * H + h) * S + s) * D + d)];
          const std::int64_t at = offset_elems + b * batch_stride + s * row_stride + h * head_stride + d;
          convert_from_f32(dtype, &x, want.data() + at * static_cast<std::int64_t>(elem), 1);
        }
  std::int64_t mismatches = 0, first = -1;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (got[i] != want[i]) {
      if (first < 0) first = static_cast<std::int64_t>(i);
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << "first differing byte " << first << " of " << got.size();
}

TEST_F(RingKernels, FinalizeOutputRowKernelEveryDtype) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_finalize(dtype, 2, 37, 3, 128, 3 * 128, 0);  // dense
    check_finalize(dtype, 1, 50, 4, 64, 4 * 64 + 8, 4);  // padded rows, offset by 4 elements
    check_finalize(dtype, 1, 9, 2, 196, 2 * 196, 0);   // D / 4 = 49 > 32: a lane takes two vectors
  }
}

TEST_F(RingKernels, FinalizeOutputElementKernelWhereRowsAreNotAligned) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_finalize(dtype, 1, 21, 3, 6, 3 * 6, 0);        // D % 4 != 0
    check_finalize(dtype, 2, 13, 2, 64, 2 * 64 + 2, 0);  // row stride not a multiple of 4
    check_finalize(dtype, 1, 11, 2, 64, 2 * 64, 1);      // base not 4-element aligned
  }
}

}  // namespace
