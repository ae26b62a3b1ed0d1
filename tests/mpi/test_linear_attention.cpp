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

namespace {

// Runs linear attention (S = 64 over the ranks, 2 heads of 8) with `options` and expects every
// rank to throw invalid_argument mentioning `expected`.
void expect_refused(AttentionOptions options, const char* expected) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const Layout layout(LayoutKind::contiguous, 64, world);
  const std::int64_t n = layout.local_length(rank);
  std::vector<float> x(static_cast<std::size_t>(n * 2 * 8), 0.5f), out(x.size());
  Context ctx(MPI_COMM_WORLD);
  options.attention = AttentionKind::linear;
  auto view = [&](std::vector<float>& d) { return TensorView::contiguous(d.data(), DType::f32, {1, n, 2, 8}); };
  try {
    forward(ctx, view(x), view(x), view(x), view(out), TensorView{}, options);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
}

}  // namespace

TEST(LinearAttention, BadDecayFailsEveryRank) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  AttentionOptions options;
  options.causal = true;
  options.decay = {rank == world - 1 ? 1.5 : 0.9};  // only the last rank is wrong (or differs)
  expect_refused(options, "decay");
}

// Linear attention has no softmax scale: a given one was silently ignored.
TEST(LinearAttention, ScaleIsRefusedOnEveryRank) {
  AttentionOptions options;
  options.scale = 0.5;
  expect_refused(options, "linear attention has no softmax scale");
}

namespace {

// The gradients at whatever np CTest runs against the fp64 reference_linear_backward (from the
// definition, no state), relative to the largest reference gradient.
double backward_error(MPI_Comm comm, const LinearCase& c) {
  int rank = 0, world = 1;
  MPI_Comm_rank(comm, &rank);
  MPI_Comm_size(comm, &world);
  const Layout layout(LayoutKind::contiguous, c.seq, world);
  const auto pos = layout.positions(rank);
  const auto n = static_cast<std::int64_t>(pos.size());
  const std::size_t elem = dtype_size(c.dtype);
  auto make = [&](SyntheticTensor t, std::int64_t heads, const std::vector<std::int64_t>& at) {
    std::vector<unsigned char> x(static_cast<std::size_t>(c.batch) * at.size() * static_cast<std::size_t>(heads * c.dim) * elem);
    fill_synthetic(5, t, c.dtype, c.batch, at, heads, c.dim, x.data());
    return x;
  };
  std::vector<unsigned char> q = make(SyntheticTensor::q, c.heads, pos), k = make(SyntheticTensor::k, c.kv_heads, pos),
                             v = make(SyntheticTensor::v, c.kv_heads, pos), dout = make(SyntheticTensor::dout, c.heads, pos);
  std::vector<unsigned char> out(q.size()), dq(q.size()), dk(k.size()), dv(v.size());
  Context ctx(comm);
  AttentionOptions options;
  options.causal = c.causal;
  options.attention = AttentionKind::linear;
  options.feature_map = c.map;
  options.decay = c.decay;
  auto qv = [&](void* p) { return TensorView::contiguous(p, c.dtype, {c.batch, n, c.heads, c.dim}); };
  auto kv = [&](void* p) { return TensorView::contiguous(p, c.dtype, {c.batch, n, c.kv_heads, c.dim}); };
  forward(ctx, qv(q.data()), kv(k.data()), kv(v.data()), qv(out.data()), TensorView{}, options);
  backward(ctx, qv(q.data()), kv(k.data()), kv(v.data()), qv(out.data()), TensorView{}, qv(dout.data()), qv(dq.data()),
           kv(dk.data()), kv(dv.data()), options);

  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  auto f32 = [&](const std::vector<unsigned char>& b) {
    std::vector<float> r(b.size() / elem);
    convert_to_f32(c.dtype, b.data(), r.data(), r.size());
    return r;
  };
  std::vector<double> decay(static_cast<std::size_t>(c.heads), 1.0);
  for (std::size_t h = 0; h < decay.size(); ++h) {
    if (!c.decay.empty()) decay[h] = c.decay[c.decay.size() == 1 ? 0 : h];
  }
  std::vector<double> rdq, rdk, rdv;
  reference_linear_backward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, 1.0},
                            c.map == FeatureMap::identity ? 1 : 0, decay, f32(make(SyntheticTensor::q, c.heads, all)),
                            f32(make(SyntheticTensor::k, c.kv_heads, all)), f32(make(SyntheticTensor::v, c.kv_heads, all)),
                            f32(make(SyntheticTensor::dout, c.heads, all)), rdq, rdk, rdv);
  double err = 0.0, biggest = 0.0;
  auto compare = [&](const std::vector<unsigned char>& got, const std::vector<double>& ref, std::int64_t heads) {
    const std::vector<float> g = f32(got);
    for (std::int64_t b = 0; b < c.batch; ++b)
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t e = 0; e < heads * c.dim; ++e) {
          const double want = ref[static_cast<std::size_t>((b * c.seq + pos[static_cast<std::size_t>(i)]) * heads * c.dim + e)];
          const float x = g[static_cast<std::size_t>((b * n + i) * heads * c.dim + e)];
          err = std::max(err, std::isnan(x) ? INFINITY : std::fabs(x - want));
          biggest = std::max(biggest, std::fabs(want));
        }
  };
  compare(dq, rdq, c.heads);
  compare(dk, rdk, c.kv_heads);
  compare(dv, rdv, c.kv_heads);
  double local[2] = {err, biggest}, global[2];
  MPI_Allreduce(local, global, 2, MPI_DOUBLE, MPI_MAX, comm);
  return global[0] / global[1];
}

}  // namespace

TEST(LinearAttention, BackwardMatchesReferenceGradients) {
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (bool causal : {false, true}) {
      for (FeatureMap map : {FeatureMap::elu1, FeatureMap::identity}) {
        const LinearCase c{2, 83, 4, 2, 16, causal, map, {}, dtype};
        SCOPED_TRACE(name(c));
        EXPECT_LE(backward_error(MPI_COMM_WORLD, c), gradient_tolerance(dtype));
      }
    }
    const LinearCase c{1, 83, 4, 1, 16, true, FeatureMap::elu1, {0.5, 0.9, 0.99, 1.0}, dtype};
    SCOPED_TRACE(name(c));
    EXPECT_LE(backward_error(MPI_COMM_WORLD, c), gradient_tolerance(dtype));
  }
}
