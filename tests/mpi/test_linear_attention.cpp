// Distributed linear attention (--attention linear) against its fp64 definition
// (reference_linear: every output as a weighted sum over the keys, no state, no scan), at
// whatever np CTest runs it. Elementwise tolerance: the storage rounding of O (8 unit
// roundoffs of the largest reference output, which also covers the unnormalised identity
// map) plus 1e-6; the computation itself is fp64. Also: bitwise-identical repeats, and every
// rank rejecting a bad decay alike.
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

struct LinearCase {
  std::int64_t batch, seq, heads, kv_heads, dim;
  bool causal;
  FeatureMap map;
  std::vector<double> decay;  // as AttentionOptions::decay
  DType dtype;
};

std::string name(const LinearCase& c) {
  std::string s = std::string(to_string(c.dtype)) + " S=" + std::to_string(c.seq) + " H=" + std::to_string(c.heads) +
                  "/" + std::to_string(c.kv_heads) + " D=" + std::to_string(c.dim) + (c.causal ? " causal " : " full ") +
                  to_string(c.map) + " decay";
  for (double g : c.decay) s += " " + std::to_string(g);
  return s;
}

// Runs linear attention on this rank's shard; returns its output and the max error.
std::vector<unsigned char> run(MPI_Comm comm, const LinearCase& c, double& max_err, double& tol) {
  int rank = 0, world = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  const Layout layout(LayoutKind::contiguous, c.seq, world);
  const auto pos = layout.positions(rank);
  const auto n = static_cast<std::int64_t>(pos.size());
  const std::size_t elem = dtype_size(c.dtype);
  std::vector<unsigned char> q(static_cast<std::size_t>(c.batch * n * c.heads * c.dim) * elem);
  std::vector<unsigned char> k(static_cast<std::size_t>(c.batch * n * c.kv_heads * c.dim) * elem), v(k.size());
  fill_synthetic(5, SyntheticTensor::q, c.dtype, c.batch, pos, c.heads, c.dim, q.data());
  fill_synthetic(5, SyntheticTensor::k, c.dtype, c.batch, pos, c.kv_heads, c.dim, k.data());
  fill_synthetic(5, SyntheticTensor::v, c.dtype, c.batch, pos, c.kv_heads, c.dim, v.data());
  std::vector<unsigned char> out(q.size());

  Context ctx(comm);
  AttentionOptions options;
  options.causal = c.causal;
  options.attention = AttentionKind::linear;
  options.feature_map = c.map;
  options.decay = c.decay;
  forward(ctx, TensorView::contiguous(q.data(), c.dtype, {c.batch, n, c.heads, c.dim}),
          TensorView::contiguous(k.data(), c.dtype, {c.batch, n, c.kv_heads, c.dim}),
          TensorView::contiguous(v.data(), c.dtype, {c.batch, n, c.kv_heads, c.dim}),
          TensorView::contiguous(out.data(), c.dtype, {c.batch, n, c.heads, c.dim}), TensorView{}, options);

  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  std::vector<unsigned char> k_all(static_cast<std::size_t>(c.batch * c.seq * c.kv_heads * c.dim) * elem), v_all(k_all.size());
  fill_synthetic(5, SyntheticTensor::k, c.dtype, c.batch, all, c.kv_heads, c.dim, k_all.data());
  fill_synthetic(5, SyntheticTensor::v, c.dtype, c.batch, all, c.kv_heads, c.dim, v_all.data());
  auto f32 = [&](const std::vector<unsigned char>& b) {
    std::vector<float> r(b.size() / elem);
    convert_to_f32(c.dtype, b.data(), r.data(), r.size());
    return r;
  };
  std::vector<double> decay(static_cast<std::size_t>(c.heads), 1.0);
  for (std::size_t h = 0; h < decay.size(); ++h) {
    if (!c.decay.empty()) decay[h] = c.decay[c.decay.size() == 1 ? 0 : h];
  }
  std::vector<double> ref;
  reference_linear({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, 1.0}, c.map == FeatureMap::identity ? 1 : 0,
                   decay, pos, f32(q), f32(k_all), f32(v_all), ref);
  double biggest = 0.0;
  for (double x : ref) biggest = std::max(biggest, std::fabs(x));
  MPI_Allreduce(MPI_IN_PLACE, &biggest, 1, MPI_DOUBLE, MPI_MAX, comm);
  const double unit = c.dtype == DType::f32 ? 0x1p-24 : c.dtype == DType::f16 ? 0x1p-11 : 0x1p-8;
  tol = 8.0 * unit * biggest + 1e-6;
  const std::vector<float> got = f32(out);
  max_err = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    max_err = std::max(max_err, std::isnan(got[i]) ? INFINITY : std::fabs(got[i] - ref[i]));
  }
  MPI_Allreduce(MPI_IN_PLACE, &max_err, 1, MPI_DOUBLE, MPI_MAX, comm);
  return out;
}

void check(const LinearCase& c) {
  SCOPED_TRACE(name(c));
  double err = 0.0, tol = 0.0, err2 = 0.0, tol2 = 0.0;
  const std::vector<unsigned char> first = run(MPI_COMM_WORLD, c, err, tol);
  EXPECT_LE(err, tol);
  const std::vector<unsigned char> again = run(MPI_COMM_WORLD, c, err2, tol2);
  EXPECT_TRUE(first == again) << "two runs differ";
}

}  // namespace

TEST(LinearAttention, EveryMapMaskDecayAndDtype) {
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (bool causal : {false, true}) {
      for (FeatureMap map : {FeatureMap::elu1, FeatureMap::identity}) {
        check({2, 203, 4, 4, 16, causal, map, {}, dtype});
      }
    }
    check({1, 203, 4, 2, 32, true, FeatureMap::elu1, {0.95}, dtype});
    check({1, 203, 4, 1, 16, true, FeatureMap::identity, {0.5, 0.9, 0.99, 1.0}, dtype});
  }
}

// Strong decay over a long sequence: the scan's decay^n factors underflow to 0 without NaN.
TEST(LinearAttention, StrongDecayLongSequence) {
  check({1, 3001, 2, 2, 8, true, FeatureMap::elu1, {0.3}, DType::f32});
}

TEST(LinearAttention, BadDecayFailsEveryRank) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const Layout layout(LayoutKind::contiguous, 64, world);
  const std::int64_t n = layout.local_length(rank);
  std::vector<float> x(static_cast<std::size_t>(n * 2 * 8), 0.5f), out(x.size());
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.attention = AttentionKind::linear;
  options.causal = true;
  options.decay = {rank == world - 1 ? 1.5 : 0.9};  // only the last rank is wrong (or differs)
  auto view = [&](std::vector<float>& d) { return TensorView::contiguous(d.data(), DType::f32, {1, n, 2, 8}); };
  try {
    forward(ctx, view(x), view(x), view(x), view(out), TensorView{}, options);
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string what = e.what();
    EXPECT_TRUE(what.find("decay") != std::string::npos) << what;
  }
}
