// The ring forward pass over MPI against the fp64 reference, at whatever np CTest runs it.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"
#include <mpi.h>

#include <cmath>
#include <vector>

#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "ringattn/ringattn.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using Case = ringattn::testing::RingCase;
using ringattn::testing::name;

struct Errors {
  double out = 0.0;  // max |O - ref| over this rank's rows
  double lse = 0.0;
  bool within_tolerance = true;
};

// Runs the ring on `comm` for this rank's shard and compares with the fp64 reference.
Errors run_and_check(MPI_Comm comm, const Case& c) {
  int rank = 0, world = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  const Layout layout(c.layout, c.seq, world);
  const auto pos = layout.positions(rank);
  const auto n = static_cast<std::int64_t>(pos.size());
  const std::size_t elem = dtype_size(c.dtype);
  std::vector<unsigned char> q(static_cast<std::size_t>(c.batch * n * c.heads * c.dim) * elem);
  std::vector<unsigned char> k(static_cast<std::size_t>(c.batch * n * c.kv_heads * c.dim) * elem), v(k.size());
  fill_synthetic(11, SyntheticTensor::q, c.dtype, c.batch, pos, c.heads, c.dim, q.data());
  fill_synthetic(11, SyntheticTensor::k, c.dtype, c.batch, pos, c.kv_heads, c.dim, k.data());
  fill_synthetic(11, SyntheticTensor::v, c.dtype, c.batch, pos, c.kv_heads, c.dim, v.data());
  std::vector<unsigned char> out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(c.batch * c.heads * n));

  Context ctx(comm);
  AttentionOptions options;
  options.causal = c.causal;
  options.layout = c.layout;
  forward(ctx, TensorView::contiguous(q.data(), c.dtype, {c.batch, n, c.heads, c.dim}),
          TensorView::contiguous(k.data(), c.dtype, {c.batch, n, c.kv_heads, c.dim}),
          TensorView::contiguous(v.data(), c.dtype, {c.batch, n, c.kv_heads, c.dim}),
          TensorView::contiguous(out.data(), c.dtype, {c.batch, n, c.heads, c.dim}),
          TensorView::contiguous(lse.data(), DType::f32, {c.batch, c.heads, n}), options);

  // Reference: rebuild the whole sequence's K and V locally (no communication).
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  std::vector<unsigned char> k_all(static_cast<std::size_t>(c.batch * c.seq * c.kv_heads * c.dim) * elem), v_all(k_all.size());
  fill_synthetic(11, SyntheticTensor::k, c.dtype, c.batch, all, c.kv_heads, c.dim, k_all.data());
  fill_synthetic(11, SyntheticTensor::v, c.dtype, c.batch, all, c.kv_heads, c.dim, v_all.data());
  auto f32 = [&](const std::vector<unsigned char>& b) {
    std::vector<float> r(b.size() / elem);
    convert_to_f32(c.dtype, b.data(), r.data(), r.size());
    return r;
  };
  std::vector<double> ref_out, ref_lse;
  reference_forward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, 1.0 / std::sqrt(double(c.dim))}, pos, f32(q),
                    f32(k_all), f32(v_all), ref_out, ref_lse);

  Errors e;
  const Tolerance tol = output_tolerance(c.dtype, 1.7320508075688772);  // synthetic |V| < sqrt(3)
  const Tolerance ltol = lse_tolerance();
  const std::vector<float> got = f32(out);
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    const double err = std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - ref_out[i]);
    e.out = std::max(e.out, err);
    if (err > tol.atol + tol.rtol * std::fabs(ref_out[i])) e.within_tolerance = false;
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    const double err = std::isnan(lse[i]) ? INFINITY : std::fabs(lse[i] - ref_lse[i]);
    e.lse = std::max(e.lse, err);
    if (err > ltol.atol + ltol.rtol * std::fabs(ref_lse[i])) e.within_tolerance = false;
  }
  return e;
}

Errors max_over_ranks(MPI_Comm comm, Errors e) {
  double local[3] = {e.out, e.lse, e.within_tolerance ? 0.0 : 1.0};
  double global[3];
  MPI_Allreduce(local, global, 3, MPI_DOUBLE, MPI_MAX, comm);
  return {global[0], global[1], global[2] == 0.0};
}

}  // namespace

TEST(RingForward, MatchesReferenceForEveryLayoutMaskGqaAndDtype) {
  for (DType dtype : {DType::f32, DType::f16, DType::bf16}) {
    for (LayoutKind layout : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
      for (bool causal : {false, true}) {
        for (std::int64_t kv_heads : {4, 2, 1}) {  // MHA, GQA, MQA
          const Case c{2, 131, 4, kv_heads, 32, causal, layout, dtype};  // odd S
          SCOPED_TRACE(name(c));
          const Errors e = max_over_ranks(MPI_COMM_WORLD, run_and_check(MPI_COMM_WORLD, c));
          EXPECT_TRUE(e.within_tolerance) << "max |O err| " << e.out << ", max |LSE err| " << e.lse;
        }
      }
    }
  }
}

// More ranks mean more merges; the error may grow only a little: at most 1.5x the error of
// the same inputs on one rank (plus an atol far below the storage precision, so that ratios
// of errors at the level of fp32 rounding noise do not decide the test).
TEST(RingForward, ErrorDoesNotGrowWithRanks) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (LayoutKind layout : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
      for (bool causal : {false, true}) {
        const Case c{1, 257, 2, 2, 64, causal, layout, dtype};
        SCOPED_TRACE(name(c));
        const Errors many = max_over_ranks(MPI_COMM_WORLD, run_and_check(MPI_COMM_WORLD, c));
        double one = 0.0;
        if (rank == 0) one = run_and_check(MPI_COMM_SELF, c).out;
        MPI_Bcast(&one, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
        const double atol = dtype == DType::f32 ? 1e-7 : 1e-5;
        EXPECT_LE(many.out, 1.5 * one + atol) << "error on 1 rank " << one;
      }
    }
  }
}

TEST(RingForward, BatchAndLargerHeadDim) {
  const Case c{3, 97, 2, 1, 128, true, LayoutKind::zigzag, DType::bf16};
  SCOPED_TRACE(name(c));
  const Errors e = max_over_ranks(MPI_COMM_WORLD, run_and_check(MPI_COMM_WORLD, c));
  EXPECT_TRUE(e.within_tolerance) << "max |O err| " << e.out;
}
