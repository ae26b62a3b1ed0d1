// The small ring kernels (src/kernels/cuda/ring_kernels.cu) against host computations.
// finalize_output writes out[b, s, h, d] = dtype(o_acc[b, h, s, d]) and accumulate_rows adds
// src (b, h, i, d) into rows row0 + i of an fp32 accumulator: each has a row kernel with
// vector loads and stores where D % 4 == 0 and the rows are 4-element aligned, and a
// per-element kernel otherwise. Both must give the host's bytes exactly (round to nearest
// even; the same fp32 adds) and touch nothing outside their rows. pack_rows copies a strided
// (B, S, H, D) view into a dense buffer: a row kernel of 16-byte vectors where D and the
// strides are multiples of 16 bytes and the view is 16-byte aligned, an element kernel
// otherwise; the host's gather, byte for byte, and nothing written past the dense rows.
// Skips where no GPU is present.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

std::vector<float> random_values(std::int64_t n, std::uint64_t state) {
  std::vector<float> v(static_cast<std::size_t>(n));
  for (float& x : v) {  // values across many binades, signs and exact ties of the 16-bit types
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    const auto bits = static_cast<std::uint32_t>(state >> 32);
    x = std::ldexp(static_cast<float>(bits & 0xffffffu) / 16777216.0f, static_cast<int>((bits >> 24) % 40) - 20);
    if (bits & 0x80000000u) x = -x;
  }
  return v;
}

// EXPECTs that got and want hold the same bytes, element for element (floats compared by their
// bits), naming the first difference.
template <typename E>
void expect_same(const std::vector<E>& got, const std::vector<E>& want, const char* what) {
  ASSERT_EQ(got.size(), want.size());
  std::int64_t mismatches = 0, first = -1;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(E)) != 0) {
      if (first < 0) first = static_cast<std::int64_t>(i);
      ++mismatches;
    }
  }
  EXPECT_EQ(mismatches, 0) << "first differing " << what << " " << first << " of " << got.size();
}

// One case: an (B, S, H, D) output view inside a larger buffer with the given strides and a
// byte offset from the buffer's start (offset_elems elements), filled with a sentinel first.
// add_rows > 0: an addend of acc's layout joins rows add_row0 .. add_row0 + add_rows (fp32 sum,
// then the rounding).
void check_finalize(DType dtype, std::int64_t B, std::int64_t S, std::int64_t H, std::int64_t D,
                    std::int64_t row_stride, std::int64_t offset_elems, std::int64_t add_row0 = 0,
                    std::int64_t add_rows = 0) {
  SCOPED_TRACE(std::string(to_string(dtype)) + " B=" + std::to_string(B) + " S=" + std::to_string(S) +
               " H=" + std::to_string(H) + " D=" + std::to_string(D) + " row stride " +
               std::to_string(row_stride) + " offset " + std::to_string(offset_elems) + " addend rows " +
               std::to_string(add_row0) + ".." + std::to_string(add_row0 + add_rows));
  const std::vector<float> acc = random_values(B * H * S * D, 0x243f6a8885a308d3ull);
  const std::vector<float> add = random_values(B * H * S * D, 0x13198a2e03707344ull);
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
  DeviceBuffer d_add(add.size() * sizeof(float));
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_add.get(), add.data(), d_add.bytes(), cudaMemcpyHostToDevice));
  finalize_output(d_acc.as<float>(), nullptr, out, TensorView{}, nullptr, add_rows > 0 ? d_add.as<float>() : nullptr,
                  add_row0, add_rows);
  std::vector<unsigned char> got(sentinel.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(got.data(), d_out.get(), got.size(), cudaMemcpyDeviceToHost));

  std::vector<unsigned char> want = sentinel;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t s = 0; s < S; ++s)
        for (std::int64_t d = 0; d < D; ++d) {
          const std::size_t i = static_cast<std::size_t>(((b * H + h) * S + s) * D + d);
          const float x = s >= add_row0 && s < add_row0 + add_rows ? acc[i] + add[i] : acc[i];
          const std::int64_t at = offset_elems + b * batch_stride + s * row_stride + h * head_stride + d;
          convert_from_f32(dtype, &x, want.data() + at * static_cast<std::int64_t>(elem), 1);
        }
  expect_same(got, want, "byte");
}

// One case: src rows (B, heads, n, D) with strides {sb, sh, ss} = {heads * sh, n * ss, ss},
// offset_elems into their buffer, added into rows row0 .. row0 + n of a (B, heads, acc_rows, D)
// accumulator that starts from random values.
void check_accumulate(DType dtype, std::int64_t B, std::int64_t heads, std::int64_t n, std::int64_t D,
                      std::int64_t acc_rows, std::int64_t row0, std::int64_t ss, std::int64_t offset_elems) {
  SCOPED_TRACE(std::string(to_string(dtype)) + " B=" + std::to_string(B) + " heads=" + std::to_string(heads) +
               " n=" + std::to_string(n) + " D=" + std::to_string(D) + " rows " + std::to_string(row0) + ".." +
               std::to_string(row0 + n) + " of " + std::to_string(acc_rows) + " row stride " + std::to_string(ss) +
               " offset " + std::to_string(offset_elems));
  const std::int64_t sh = n * ss, sb = heads * sh;
  const std::size_t elem = dtype_size(dtype);
  const std::vector<float> values = random_values(offset_elems + B * sb, 0x13198a2e03707344ull);
  std::vector<unsigned char> src(values.size() * elem);
  convert_from_f32(dtype, values.data(), src.data(), values.size());
  const std::vector<float> acc0 = random_values(B * heads * acc_rows * D, 0xa4093822299f31d0ull);

  DeviceBuffer d_src(src.size()), d_acc(acc0.size() * sizeof(float));
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_src.get(), src.data(), src.size(), cudaMemcpyHostToDevice));
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_acc.get(), acc0.data(), d_acc.bytes(), cudaMemcpyHostToDevice));
  const std::int64_t strides[3] = {sb, sh, ss};
  accumulate_rows(d_acc.as<float>(), acc_rows, row0, static_cast<unsigned char*>(d_src.get()) + offset_elems * elem,
                  dtype, B, heads, n, D, strides, nullptr);
  std::vector<float> got(acc0.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(got.data(), d_acc.get(), d_acc.bytes(), cudaMemcpyDeviceToHost));

  std::vector<float> want = acc0;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t d = 0; d < D; ++d) {
          const float x = load_f32(dtype, src.data(), offset_elems + b * sb + h * sh + i * ss + d);
          want[static_cast<std::size_t>(((b * heads + h) * acc_rows + row0 + i) * D + d)] += x;
        }
  expect_same(got, want, "sum");
}

// One case: a (B, S, H, D) view with strides (sb, ss, sh, 1) at offset_elems into a buffer of
// random bytes, packed into a dense buffer followed by a sentinel.
void check_pack(DType dtype, std::int64_t B, std::int64_t S, std::int64_t H, std::int64_t D, std::int64_t sb,
                std::int64_t ss, std::int64_t sh, std::int64_t offset_elems) {
  SCOPED_TRACE(std::string(to_string(dtype)) + " B=" + std::to_string(B) + " S=" + std::to_string(S) +
               " H=" + std::to_string(H) + " D=" + std::to_string(D) + " strides " + std::to_string(sb) + ", " +
               std::to_string(ss) + ", " + std::to_string(sh) + " offset " + std::to_string(offset_elems));
  const auto elem = static_cast<std::int64_t>(dtype_size(dtype));
  const std::int64_t src_elems = offset_elems + (B - 1) * sb + (S - 1) * ss + (H - 1) * sh + D;
  std::vector<unsigned char> src(static_cast<std::size_t>(src_elems * elem));
  std::uint64_t state = 0x13198a2e03707344ull;
  for (unsigned char& x : src) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    x = static_cast<unsigned char>(state >> 56);
  }
  const std::int64_t n = B * S * H * D, tail = 64;
  std::vector<unsigned char> want(static_cast<std::size_t>((n + tail) * elem), 0xcd);  // the sentinel after the rows
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t si = 0; si < S; ++si) {
      for (std::int64_t h = 0; h < H; ++h) {
        const std::int64_t from = offset_elems + b * sb + si * ss + h * sh, to = ((b * S + si) * H + h) * D;
        std::memcpy(&want[static_cast<std::size_t>(to * elem)], &src[static_cast<std::size_t>(from * elem)],
                    static_cast<std::size_t>(D * elem));
      }
    }
  }
  DeviceBuffer d_src(src.size()), d_dst(want.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(d_src.get(), src.data(), src.size(), cudaMemcpyHostToDevice));
  RINGATTN_CUDA_CHECK(cudaMemset(d_dst.get(), 0xcd, want.size()));
  TensorView view;
  view.data = static_cast<unsigned char*>(d_src.get()) + offset_elems * elem;
  view.dtype = dtype;
  view.device = DeviceKind::cuda;
  view.ndim = 4;
  view.shape = {B, S, H, D};
  view.strides = {sb, ss, sh, 1};
  pack_rows(view, d_dst.get(), nullptr);
  std::vector<unsigned char> got(want.size());
  RINGATTN_CUDA_CHECK(cudaMemcpy(got.data(), d_dst.get(), got.size(), cudaMemcpyDeviceToHost));
  expect_same(got, want, "byte");
}

TEST_F(RingKernels, PackRowsRowKernelEveryDtype) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    // K of a fused (B, S, 3, H, D) QKV projection: rows 3 H D apart, H D elements in.
    check_pack(dtype, 2, 37, 3, 128, 37 * 3 * 3 * 128, 3 * 3 * 128, 128, 3 * 128);
    check_pack(dtype, 1, 50, 4, 64, 50 * (4 * 64 + 8), 4 * 64 + 8, 64, 8);  // padded rows, offset by 8 elements
    check_pack(dtype, 2, 9, 2, 328, 2 * 9 * 328, 328, 9 * 328, 0);        // (B, H, S, D) seen as (B, S, H, D); 41 vectors a row
  }
}

TEST_F(RingKernels, PackRowsElementKernelWhereRowsAreNotAligned) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_pack(dtype, 1, 21, 3, 6, 21 * 3 * 3 * 6, 3 * 3 * 6, 6, 3 * 6);  // D not a multiple of 16 bytes
    check_pack(dtype, 2, 13, 2, 64, 13 * (2 * 64 + 2), 2 * 64 + 2, 64, 0);  // row stride not a multiple
    check_pack(dtype, 1, 11, 2, 64, 11 * 3 * 2 * 64, 3 * 2 * 64, 64, 1);   // base not 16-byte aligned
  }
}

TEST_F(RingKernels, AccumulateRowsRowKernelEveryDtype) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_accumulate(dtype, 2, 3, 40, 128, 40, 0, 128, 0);     // dense, the whole accumulator
    check_accumulate(dtype, 1, 4, 25, 64, 70, 33, 64 + 8, 4);  // padded rows into a middle range, offset
    check_accumulate(dtype, 1, 2, 7, 196, 9, 2, 196, 0);       // a lane takes two vectors
  }
}

TEST_F(RingKernels, AccumulateRowsElementKernelWhereRowsAreNotAligned) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_accumulate(dtype, 1, 3, 21, 6, 30, 5, 6, 0);       // D % 4 != 0
    check_accumulate(dtype, 2, 2, 13, 64, 13, 0, 66, 0);     // row stride not a multiple of 4
    check_accumulate(dtype, 1, 2, 11, 64, 20, 9, 64, 1);     // base not 4-element aligned
  }
}

TEST_F(RingKernels, FinalizeOutputRowKernelEveryDtype) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_finalize(dtype, 2, 37, 3, 128, 3 * 128, 0);  // dense
    check_finalize(dtype, 1, 50, 4, 64, 4 * 64 + 8, 4);  // padded rows, offset by 4 elements
    check_finalize(dtype, 1, 9, 2, 196, 2 * 196, 0);   // D / 4 = 49 > 32: a lane takes two vectors
    check_finalize(dtype, 2, 37, 3, 128, 3 * 128, 0, 5, 20);  // an addend in rows 5 .. 24
    check_finalize(dtype, 1, 50, 2, 64, 2 * 64, 0, 0, 50);    // an addend in every row
  }
}

TEST_F(RingKernels, FinalizeOutputElementKernelWhereRowsAreNotAligned) {
  for (DType dtype : {DType::bf16, DType::f16, DType::f32}) {
    check_finalize(dtype, 1, 21, 3, 6, 3 * 6, 0);        // D % 4 != 0
    check_finalize(dtype, 2, 13, 2, 64, 2 * 64 + 2, 0);  // row stride not a multiple of 4
    check_finalize(dtype, 1, 11, 2, 64, 2 * 64, 1);      // base not 4-element aligned
    check_finalize(dtype, 2, 13, 2, 64, 2 * 64 + 2, 0, 3, 7);  // an addend in rows 3 .. 9
  }
}

}  // namespace
