// Bad inputs on one rank, or ranks that disagree, must make every rank throw the same error
// (never a hang, never a crash).
#include <gtest/gtest.h>

#include "common/mpi_world.hpp"
#include <mpi.h>

#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "ringattn/ringattn.hpp"

using namespace ringattn;

namespace {

using ringattn::testing::world_rank;
using ringattn::testing::world_size;

// Runs fn on every rank; asserts that every rank threw an Error with `code` whose message
// contains `needle`, and that the messages are identical on all ranks.
void expect_same_error_everywhere(const std::function<void()>& fn, ErrorCode code, const std::string& needle) {
  std::string message;
  bool threw = false;
  ErrorCode got = ErrorCode::internal;
  bool all_ranks = false;
  try {
    fn();
  } catch (const Error& e) {
    threw = true;
    got = e.code();
    message = e.what();
    all_ranks = e.on_all_ranks();
  }
  ASSERT_TRUE(threw) << "expected an error containing '" << needle << "'";
  EXPECT_EQ(got, code) << message;
  EXPECT_TRUE(all_ranks) << message;
  EXPECT_NE(message.find(needle), std::string::npos) << "message: " << message;
  // Same message on every rank: compare lengths and a checksum with rank 0's.
  long long sig[2] = {static_cast<long long>(message.size()), 0};
  for (unsigned char ch : message) sig[1] = sig[1] * 131 + ch;
  long long root[2] = {sig[0], sig[1]};
  MPI_Bcast(root, 2, MPI_LONG_LONG, 0, MPI_COMM_WORLD);
  EXPECT_EQ(sig[0], root[0]) << "message differs from rank 0's: " << message;
  EXPECT_EQ(sig[1], root[1]) << "message differs from rank 0's: " << message;
}

// A well-formed fp32 problem with this rank's contiguous shard, adjustable per test.
struct Shard {
  std::int64_t batch = 1, heads = 4, kv_heads = 2, dim = 16, seq = 0;
  std::int64_t local = 0;
  std::vector<float> q, k, v, out, lse;

  explicit Shard(std::int64_t S) : seq(S) {
    local = Layout(LayoutKind::contiguous, S, world_size()).local_length(world_rank());
  }
  void allocate() {
    q.assign(static_cast<std::size_t>(batch * local * heads * dim), 0.5f);
    k.assign(static_cast<std::size_t>(batch * local * kv_heads * dim), 0.25f);
    v.assign(k.size(), 1.0f);
    out.assign(q.size(), 0.0f);
    lse.assign(static_cast<std::size_t>(batch * heads * local), 0.0f);
  }
  TensorView qv() { return TensorView::contiguous(q.data(), DType::f32, {batch, local, heads, dim}); }
  TensorView kv(std::int64_t d) { return TensorView::contiguous(k.data(), DType::f32, {batch, local, kv_heads, d}); }
  TensorView vv() { return TensorView::contiguous(v.data(), DType::f32, {batch, local, kv_heads, dim}); }
  TensorView ov() { return TensorView::contiguous(out.data(), DType::f32, {batch, local, heads, dim}); }
  TensorView lv() { return TensorView::contiguous(lse.data(), DType::f32, {batch, heads, local}); }
};

}  // namespace

TEST(Agreement, AgreeSharesTheLowestFailingRanksError) {
  const int last = world_size() - 1;
  expect_same_error_everywhere(
      [&] {
        detail::agree_on(MPI_COMM_WORLD, [&] {
          if (world_rank() == last) throw Error(ErrorCode::io, "disk on fire");
        });
      },
      ErrorCode::io, "disk on fire");
  EXPECT_NO_THROW(detail::agree_on(MPI_COMM_WORLD, [] {}));
}

TEST(Agreement, FingerprintNamesRankAndField) {
  const int last = world_size() - 1;
  if (world_size() == 1) GTEST_SKIP() << "needs two ranks to disagree";
  expect_same_error_everywhere(
      [&] {
        detail::agree_fingerprint(MPI_COMM_WORLD, {{"heads", 8}, {"seq", world_rank() == last ? 2048 : 1024}}, "test");
      },
      ErrorCode::mismatch, "rank " + std::to_string(last) + " has seq=2048 but rank 0 has seq=1024");
  const auto values = detail::agree_fingerprint(MPI_COMM_WORLD, {{"heads", 8}, {"seq", 1024}}, "test");
  EXPECT_EQ(values.size(), static_cast<std::size_t>(2 * world_size()));
}

TEST(Agreement, HeadDimMismatchOnOneRankFailsEveryRank) {
  Shard s(37);
  s.allocate();
  const bool bad = world_rank() == world_size() - 1;
  Context ctx(MPI_COMM_WORLD);
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(bad ? 8 : 16), s.vv(), s.ov(), s.lv()); },
                               ErrorCode::invalid_argument, "k: head_dim 8 differs from q's 16");
}

TEST(Agreement, KvHeadsMustDivideHeads) {
  Shard s(37);
  s.kv_heads = 3;
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv()); },
                               ErrorCode::invalid_argument, "kv-heads 3 does not divide q's heads 4");
}

TEST(Agreement, RanksWithDifferentOptionsAllFail) {
  if (world_size() == 1) GTEST_SKIP() << "needs two ranks to disagree";
  Shard s(37);
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.causal = world_rank() == 1;
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options); },
                               ErrorCode::mismatch, "rank 1 has causal=true but rank 0 has causal=false");
}

TEST(Agreement, WrongLocalLengthNamesTheRank) {
  if (world_size() == 1) GTEST_SKIP() << "one rank's length is always the total";
  Shard s(40);
  if (world_rank() == 1) s.local -= 1;  // rank 1 holds one token too few for S = 40
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.seq_len = 40;
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options); },
                               ErrorCode::invalid_argument, "rank 1: q holds");
}

TEST(Agreement, BadLseShapeAndDtypeAndScale) {
  Shard s(37);
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  TensorView bad_lse = TensorView::contiguous(s.lse.data(), DType::f32, {s.batch, s.local, s.heads});
  if (s.local == s.heads) bad_lse = TensorView::contiguous(s.lse.data(), DType::f32, {s.batch, s.heads, s.local, 1});
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), bad_lse); },
                               ErrorCode::invalid_argument, "lse:");
  TensorView half_out = s.ov();
  half_out.dtype = DType::f16;
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), half_out, s.lv()); },
                               ErrorCode::invalid_argument, "out: dtype fp16 differs from q's fp32");
  AttentionOptions options;
  // Negative, and finite in double but not in fp32 (the kernels' scale: it became inf, and
  // every output NaN).
  for (const double bad : {-1.0, 1e300, 1e-50, 3e38}) {
    options.scale = bad;
    expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options); },
                                 ErrorCode::invalid_argument, "scale must be a positive number that fp32 can hold");
  }
}

// Sizes whose element count or largest offset overflows int64 (a wrapped count skipped the
// null-data check and crashed), enum values outside their range, and outputs that share memory.
TEST(Agreement, UnaddressableViewsUnknownEnumsAndSharedOutputs) {
  Shard s(37);
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  TensorView huge = s.qv();
  huge.shape[0] = std::int64_t{1} << 62;
  huge.data = nullptr;
  expect_same_error_everywhere([&] { forward(ctx, huge, s.kv(16), s.vv(), s.ov(), s.lv()); },
                               ErrorCode::invalid_argument, "too large");
  TensorView far = s.qv();
  far.strides[1] = std::int64_t{1} << 61;
  if (s.local < 2) far.shape[1] = 2;
  expect_same_error_everywhere([&] { forward(ctx, far, s.kv(16), s.vv(), s.ov(), s.lv()); },
                               ErrorCode::invalid_argument, "too large");
  TensorView odd = s.qv();
  odd.dtype = static_cast<DType>(7);
  expect_same_error_everywhere([&] { forward(ctx, odd, s.kv(16), s.vv(), s.ov(), s.lv()); },
                               ErrorCode::invalid_argument, "q: unknown dtype");
  AttentionOptions options;
  options.layout = static_cast<LayoutKind>(9);
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options); },
                               ErrorCode::invalid_argument, "layout: unknown value");
  // LSE written into O's memory made O wrong with no error.
  TensorView lse_in_out = TensorView::contiguous(s.out.data(), DType::f32, {s.batch, s.heads, s.local});
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), lse_in_out); },
                               ErrorCode::invalid_argument, "out and lse are one buffer");
  TensorView flat_out = s.ov();
  flat_out.strides[1] = 0;
  if (s.local < 2) flat_out.shape[1] = 2;  // (then its shape differs from q's; the stride is seen first)
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), flat_out, s.lv()); },
                               ErrorCode::invalid_argument, "out");
  // An output may alias an input: out = q is fine.
  EXPECT_NO_THROW(forward(ctx, s.qv(), s.kv(16), s.vv(), s.qv(), s.lv()));
}

TEST(Agreement, NullCommunicatorAndMovedFromContext) {
  try {
    Context bad(MPI_COMM_NULL);
    ADD_FAILURE() << "MPI_COMM_NULL accepted";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
    EXPECT_NE(std::string(e.what()).find("MPI_COMM_NULL"), std::string::npos) << e.what();
  }
  Shard s(37);
  s.allocate();
  Context a(MPI_COMM_WORLD);
  Context b(std::move(a));
  try {
    forward(a, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv());  // NOLINT(bugprone-use-after-move): on purpose
    ADD_FAILURE() << "a moved-from context ran";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("moved from"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(forward(b, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv()));
}

// A call that failed mid-ring (here a bound too short for any transfer) left messages in flight
// that the next call on the context received into smaller buffers (heap overflow at np 3).
// Now every rank refuses the next call, whichever ranks the failure reached.
TEST(Agreement, ARingThatFailedMidwayLeavesTheContextRefusingCalls) {
  if (world_size() == 1) GTEST_SKIP() << "one rank has no transfers to time out";
  // Blocks of 8 MiB (64 tokens x 64 heads x 256 x fp32, K and V) against little compute: no
  // transfer is complete at the first look, so the 1 ns bound expires.
  Shard s(64 * world_size());
  s.heads = s.kv_heads = 64;
  s.dim = 256;
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.timeout_s = 1e-9;
  int failed = 0;
  try {
    forward(ctx, s.qv(), s.kv(256), s.vv(), s.ov(), s.lv(), options);
  } catch (const Error& e) {
    failed = e.code() == ErrorCode::timeout ? 1 : 2;
  }
  int any = 0;
  MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any == 0) GTEST_SKIP() << "no rank timed out within 1 ns";
  EXPECT_NE(any, 2) << "a failure other than the timeout";
  options.timeout_s = 60.0;
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(256), s.vv(), s.ov(), s.lv(), options); },
                               ErrorCode::invalid_argument, "create a new Context");
  // A new context works.
  Context fresh(MPI_COMM_WORLD);
  EXPECT_NO_THROW(forward(fresh, s.qv(), s.kv(256), s.vv(), s.ov(), s.lv(), options));
}

// A rank that never makes a call (it skipped it, or stopped before it) left the others blocked
// in the call's first agreement for ever. They give up after timeout_s, each on its own, with
// Error(timeout); their context then refuses every call at once and communicating nothing (a
// collective would meet the abandoned one on the rank that skipped). A new context works.
TEST(Agreement, ARankThatSkipsTheCallTimesTheOthersOut) {
  if (world_size() == 1) GTEST_SKIP() << "one rank has no one to wait for";
  Shard s(64 * world_size());
  s.allocate();
  AttentionOptions options;
  options.timeout_s = 1.0;
  {
    Context ctx(MPI_COMM_WORLD);
    if (world_rank() != world_size() - 1) {
      const double start = MPI_Wtime();
      try {
        forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options);
        ADD_FAILURE() << "forward returned while the last rank never called it";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::timeout) << e.what();
        EXPECT_FALSE(e.on_all_ranks()) << e.what();
        EXPECT_NE(std::string(e.what()).find("waited 1 s (timeout_s, --timeout) in the agreement on a call's checks"),
                  std::string::npos)
            << e.what();
      }
      const double waited = MPI_Wtime() - start;
      EXPECT_GE(waited, 0.99);
      EXPECT_LT(waited, 30.0);
      EXPECT_TRUE(ctx.collectives_abandoned());
      const double again = MPI_Wtime();
      try {
        forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options);
        ADD_FAILURE() << "a context with an abandoned collective ran a call";
      } catch (const Error& e) {
        EXPECT_EQ(e.code(), ErrorCode::invalid_argument) << e.what();
        EXPECT_NE(std::string(e.what()).find("create a new Context"), std::string::npos) << e.what();
      }
      EXPECT_LT(MPI_Wtime() - again, 0.5) << "the refusal waited for the other ranks";
    }
  }
  MPI_Barrier(MPI_COMM_WORLD);
  Context fresh(MPI_COMM_WORLD);
  EXPECT_NO_THROW(forward(fresh, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options));
}

// The bounded exchange the reverse scans use: it carries the bytes between a pair, and a peer
// that never posts its half times the other out; a bound nested in one that saw an abandoned
// collective refuses to start another.
TEST(Agreement, BoundedSendrecvExchangesAndTimesOut) {
  if (world_size() == 1) GTEST_SKIP() << "one rank has no one to exchange with";
  const int rank = world_rank(), world = world_size();
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &comm);
  {
    detail::CollectiveBound bound(5.0);
    const int mirror = world - 1 - rank;
    std::vector<double> mine(1000, rank + 0.5), theirs(1000, -1.0);
    if (mirror != rank) {
      detail::bounded_sendrecv(comm, mine.data(), mine.size() * sizeof(double), theirs.data(), mirror, 7, "a test");
      EXPECT_EQ(theirs.front(), mirror + 0.5);
      EXPECT_EQ(theirs.back(), mirror + 0.5);
    }
  }
  // Rank 0 waits for the last rank, which never posts: a fresh communicator, leaked, so the
  // abandoned request can never match anything later.
  MPI_Comm lonely = MPI_COMM_NULL;
  MPI_Comm_dup(MPI_COMM_WORLD, &lonely);
  if (rank == 0) {
    detail::CollectiveBound bound(1.0);
    double one = 1.0, got = 0.0;
    const double start = MPI_Wtime();
    try {
      detail::bounded_sendrecv(lonely, &one, sizeof one, &got, world - 1, 7, "a lonely exchange");
      ADD_FAILURE() << "the exchange returned while its peer never posted";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::timeout) << e.what();
      EXPECT_NE(std::string(e.what()).find("in a lonely exchange"), std::string::npos) << e.what();
    }
    EXPECT_GE(MPI_Wtime() - start, 0.99);
    EXPECT_TRUE(bound.abandoned());
    detail::CollectiveBound nested(1.0);
    EXPECT_TRUE(nested.abandoned()) << "a nested bound forgot the abandoned collective";
    EXPECT_THROW(detail::bounded_barrier(lonely, "a barrier after it"), Error);
  }
  MPI_Barrier(MPI_COMM_WORLD);
  MPI_Comm_free(&comm);
}

// An exception from on_step on one rank is rethrown there once the ring has finished, so the
// other ranks finish too and the context stays usable.
TEST(Agreement, AnOnStepExceptionWaitsForTheRing) {
  Shard s(256);
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.on_step = [](int done, int) {
    if (world_rank() == 0 && done == 1) throw std::runtime_error("caller's callback failed");
  };
  if (world_rank() == 0) {
    EXPECT_THROW(forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options), std::runtime_error);
  } else {
    EXPECT_NO_THROW(forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options));
  }
  std::vector<float> first = s.out;
  options.on_step = nullptr;
  EXPECT_NO_THROW(forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options));
  EXPECT_EQ(first, s.out) << "the ring did not finish the call whose callback threw";
}

TEST(Agreement, SequenceShorterThanRanks) {
  if (world_size() == 1) GTEST_SKIP() << "one rank always has a token";
  Shard s(37);
  s.allocate();
  Context ctx(MPI_COMM_WORLD);
  AttentionOptions options;
  options.seq_len = world_size() - 1;
  expect_same_error_everywhere([&] { forward(ctx, s.qv(), s.kv(16), s.vv(), s.ov(), s.lv(), options); },
                               ErrorCode::invalid_argument, "shorter than the");
}
