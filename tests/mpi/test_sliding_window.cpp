// Sliding-window attention, causal and two-sided, with and without attention sinks, over MPI against the
// fp64 reference, at whatever np CTest runs it; and the bytes each rank sends: for the hops the
// farthest window needs (each way), exactly the rows of each block that the windows of the
// ranks it travels to reach, plus its share of the sink tokens, no more.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"
#include <mpi.h>

#include <cmath>
#include <vector>

#include "api/prepared_forward.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "ringattn/ringattn.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

struct WindowCase {
  std::int64_t seq, heads, kv_heads, dim, window, sinks;
  DType dtype;
  bool causal = true;  // false: the two-sided window
};

void check(const WindowCase& c) {
  SCOPED_TRACE(std::string(to_string(c.dtype)) + " S=" + std::to_string(c.seq) + " W=" + std::to_string(c.window) +
               " sinks=" + std::to_string(c.sinks) + " H=" + std::to_string(c.heads) + "/" + std::to_string(c.kv_heads) +
               (c.causal ? " causal" : " two-sided"));
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const std::int64_t B = 2;
  const Layout layout(LayoutKind::contiguous, c.seq, world);
  const auto pos = layout.positions(rank);
  const auto n = static_cast<std::int64_t>(pos.size());
  const std::size_t elem = dtype_size(c.dtype);
  std::vector<unsigned char> q(static_cast<std::size_t>(B * n * c.heads * c.dim) * elem);
  std::vector<unsigned char> k(static_cast<std::size_t>(B * n * c.kv_heads * c.dim) * elem), v(k.size());
  fill_synthetic(3, SyntheticTensor::q, c.dtype, B, pos, c.heads, c.dim, q.data());
  fill_synthetic(3, SyntheticTensor::k, c.dtype, B, pos, c.kv_heads, c.dim, k.data());
  fill_synthetic(3, SyntheticTensor::v, c.dtype, B, pos, c.kv_heads, c.dim, v.data());
  std::vector<unsigned char> out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(B * c.heads * n));
  const TensorView qv = TensorView::contiguous(q.data(), c.dtype, {B, n, c.heads, c.dim});
  const TensorView kv = TensorView::contiguous(k.data(), c.dtype, {B, n, c.kv_heads, c.dim});
  const TensorView vv = TensorView::contiguous(v.data(), c.dtype, {B, n, c.kv_heads, c.dim});
  const TensorView ov = TensorView::contiguous(out.data(), c.dtype, {B, n, c.heads, c.dim});
  const TensorView lv = TensorView::contiguous(lse.data(), DType::f32, {B, c.heads, n});

  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.causal = c.causal;
  options.window = c.window;
  options.sinks = c.sinks;
  PreparedForward prepared = prepare_forward(ctx, qv, kv, vv, ov, lv, options);
  prepared.run(qv, kv, vv, ov, lv);

  // Bytes: the rows the windows reach of the blocks of the first `hops` steps (the farthest
  // window's reach) and, two-sided, of the `ahead` hops the other way, and this rank's sink
  // rows to each other rank.
  int hops = 0, ahead = 0;
  for (int r = 0; r < world; ++r) {
    const std::int64_t first = layout.positions(r).front(), last = layout.positions(r).back();
    hops = std::max(hops, r - layout.owner(std::max<std::int64_t>(0, first - c.window)));
    if (!c.causal) ahead = std::max(ahead, layout.owner(std::min(c.seq - 1, last + c.window)) - r);
  }
  const auto row_bytes = static_cast<std::uint64_t>(c.kv_heads * c.dim) * elem;
  std::uint64_t expected = 0;
  for (int s = 0; s < hops; ++s) {
    // Hop s passes the block of rank - s to rank + 1, whose windows (and those of the ranks
    // after it, which reach less far back) need its keys from rank + 1's first query - W on.
    // A block that wrapped around the ring (rank - s < 0), or one passed on to rank 0, is
    // needed by nobody.
    const int source = rank - s, next = rank + 1;
    if (source < 0 || next >= world) continue;
    const std::int64_t begin = layout.positions(source).front(), end = begin + layout.local_length(source);
    const std::int64_t from = std::max(begin, layout.positions(next).front() - c.window);
    expected += 2 * static_cast<std::uint64_t>(B * std::max<std::int64_t>(0, end - from)) * row_bytes;
  }
  for (int j = 0; j < ahead; ++j) {
    // The other way: hop j passes the block of rank + j (the own block first) to rank - 1,
    // whose windows (and those before it) need its keys up to rank - 1's last query + W.
    const int source = rank + j, next = rank - 1;
    if (source >= world || next < 0) continue;
    const std::int64_t begin = layout.positions(source).front(), end = begin + layout.local_length(source);
    const std::int64_t to = std::min(end, layout.positions(next).back() + c.window + 1);
    expected += 2 * static_cast<std::uint64_t>(B * std::max<std::int64_t>(0, to - begin)) * row_bytes;
  }
  const std::int64_t own_sinks = std::clamp<std::int64_t>(c.sinks - pos.front(), 0, n);
  expected += 2 * static_cast<std::uint64_t>(B * own_sinks) * row_bytes * static_cast<std::uint64_t>(world - 1);
  EXPECT_EQ(prepared.cpu->bytes_sent(), expected);

  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  std::vector<unsigned char> k_all(static_cast<std::size_t>(B * c.seq * c.kv_heads * c.dim) * elem), v_all(k_all.size());
  fill_synthetic(3, SyntheticTensor::k, c.dtype, B, all, c.kv_heads, c.dim, k_all.data());
  fill_synthetic(3, SyntheticTensor::v, c.dtype, B, all, c.kv_heads, c.dim, v_all.data());
  auto f32 = [&](const std::vector<unsigned char>& b) {
    std::vector<float> r(b.size() / elem);
    convert_to_f32(c.dtype, b.data(), r.data(), r.size());
    return r;
  };
  ReferenceProblem ref{B, c.seq, c.heads, c.kv_heads, c.dim, c.causal, 1.0 / std::sqrt(double(c.dim))};
  ref.window = c.window;
  ref.sinks = c.sinks;
  std::vector<double> ref_out, ref_lse;
  reference_forward(ref, pos, f32(q), f32(k_all), f32(v_all), ref_out, ref_lse);
  const Tolerance tol = output_tolerance(c.dtype, 1.7320508075688772);  // synthetic |V| < sqrt(3)
  const Tolerance ltol = lse_tolerance();
  const std::vector<float> got = f32(out);
  int bad = 0;
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    if (!(std::fabs(got[i] - ref_out[i]) <= tol.atol + tol.rtol * std::fabs(ref_out[i]))) ++bad;
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    if (!(std::fabs(lse[i] - ref_lse[i]) <= ltol.atol + ltol.rtol * std::fabs(ref_lse[i]))) ++bad;
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace

TEST(SlidingWindow, AgainstReferenceAndBytes) {
  for (DType dtype : {DType::f32, DType::bf16}) {
    check({301, 4, 2, 32, 0, 0, dtype});
    check({301, 4, 2, 32, 23, 0, dtype});
    check({301, 4, 4, 16, 40, 5, dtype});
    check({301, 2, 1, 64, 7, 120, dtype});   // sinks spanning ranks
    check({301, 2, 2, 16, 500, 3, dtype});   // window wider than the sequence
    check({301, 4, 2, 32, 23, 0, dtype, false});
    check({301, 2, 1, 64, 7, 120, dtype, false});
    check({301, 2, 2, 16, 90, 2, dtype, false});
  }
}

TEST(SlidingWindow, BadOptionsFailEveryRank) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  const Layout layout(LayoutKind::zigzag, 64, world);
  const std::int64_t n = layout.local_length(rank);
  std::vector<float> x(static_cast<std::size_t>(n * 2 * 8), 0.5f), out(x.size());
  auto view = [&](std::vector<float>& d) { return TensorView::contiguous(d.data(), DType::f32, {1, n, 2, 8}); };
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.causal = true;
  options.window = 8;
  options.layout = LayoutKind::zigzag;
  EXPECT_THROW(forward(ctx, view(x), view(x), view(x), view(out), TensorView{}, options), Error);
  options.layout = LayoutKind::contiguous;
  const Layout contiguous(LayoutKind::contiguous, 64, world);
  const std::int64_t m = contiguous.local_length(rank);
  std::vector<float> y(static_cast<std::size_t>(m * 2 * 8), 0.5f), out2(y.size());
  auto view2 = [&](std::vector<float>& d) { return TensorView::contiguous(d.data(), DType::f32, {1, m, 2, 8}); };
  options.window = -1;
  options.sinks = 4;  // sinks without a window
  EXPECT_THROW(forward(ctx, view2(y), view2(y), view2(y), view2(out2), TensorView{}, options), Error);
}
