// The native CUDA flash forward kernel against the fp64 reference, driven through ring plans
// on one GPU (each step's KV block uploaded from the host), so that tiling, masking with
// diagonal offsets, sliding-window bands, uneven lengths, GQA and the fused merge are all exercised.
//
// Tolerance (flash-attention's rule): the kernel's max error may be at most twice that of a
// naive same-precision implementation plus a small atol. The naive one computes scores and
// softmax in fp32 from the 16-bit inputs, rounds P to the 16-bit dtype for the P@V product
// (as tensor cores consume it), accumulates in fp32 and rounds O to the dtype.
// Skips where no GPU is present.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>
#include <vector>

#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "plan/ring_plan.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using Case = ringattn::testing::AttentionCase;
using ringattn::testing::name;
using ringattn::testing::generate;
using ringattn::testing::to_f32;

void upload(DeviceBuffer& dst, const std::vector<unsigned char>& src) {
  RINGATTN_CUDA_CHECK(cudaMemcpy(dst.get(), src.data(), src.size(), cudaMemcpyHostToDevice));
}

// K at global positions `pos`, each row scaled by 1 + k_ramp * position and rounded back to
// the dtype (k_ramp = 0: the plain synthetic values). The same bytes feed the kernel and the
// reference.
std::vector<unsigned char> keys(const Case& c, const std::vector<std::int64_t>& pos, double k_ramp) {
  std::vector<unsigned char> k = generate(c, SyntheticTensor::k, pos, c.kv_heads);
  if (k_ramp == 0.0) return k;
  std::vector<float> f = to_f32(c.dtype, k);
  const std::int64_t row = c.kv_heads * c.dim;
  for (std::size_t i = 0; i < f.size(); ++i) {
    const auto t = static_cast<std::size_t>(static_cast<std::int64_t>(i) / row) % pos.size();  // (B, n, H, D)
    f[i] *= static_cast<float>(1.0 + k_ramp * static_cast<double>(pos[t]));
  }
  convert_from_f32(c.dtype, f.data(), k.data(), f.size());
  return k;
}

// How a case runs the warp-specialised kernel's last-wave split (FlashFwdParams::split_parts:
// 0 its rule, 1 never, 2/4/8 forced on half of each launch's query tiles), and whether a lone
// task (P = 1, no window) writes O and LSE itself instead of merging into the running state.
// merge_out: the ring's last block, where it is one full task over every row, merges and
// writes O and LSE itself (FlashFwdParams::merge_out, no finalize pass), leaving the running
// state as it was.
struct Run {
  int split_parts = 0;
  bool direct = false;
  bool merge_out = false;
};
// What a case gave: every rank's O bytes (rank after rank), and how many launches split.
struct Ran {
  std::vector<unsigned char> out;
  int split_launches = 0;
};

Ran check_case(const Case& c, FlashKernel kernel, double k_ramp = 0.0, Run run = {}) {
  SCOPED_TRACE(name(c) + " kernel " + to_string(kernel) + (k_ramp != 0.0 ? " k_ramp " + std::to_string(k_ramp) : "") +
               " split " + std::to_string(run.split_parts) + (run.direct ? " direct write" : "") +
               (run.merge_out ? " merge_out" : ""));
  Ran ran;
  const bool ws = kernel == FlashKernel::wgmma_ws;
  const int slots = ws ? flash_fwd_split_slots() : 0;
  int device = 0, sms = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DeviceBuffer split(std::max<std::size_t>(flash_fwd_split_bytes(c.dim, slots), 1));
  RINGATTN_CUDA_CHECK(cudaMemset(split.get(), 0, split.bytes()));
  const Layout layout(c.layout, c.seq, c.world);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  const std::vector<float> k_all = to_f32(c.dtype, keys(c, all, k_ramp));
  const std::vector<float> v_all = to_f32(c.dtype, generate(c, SyntheticTensor::v, all, c.kv_heads));
  const std::size_t elem = dtype_size(c.dtype);

  double kernel_err = 0.0, naive_err = 0.0, lse_err = 0.0;
  for (int r = 0; r < c.world; ++r) {
    const auto pos = layout.positions(r);
    const auto n = static_cast<std::int64_t>(pos.size());
    const std::vector<unsigned char> q = generate(c, SyntheticTensor::q, pos, c.heads);
    DeviceBuffer dq(q.size()), dout(q.size());
    upload(dq, q);
    DeviceBuffer o_acc(static_cast<std::size_t>(c.batch * c.heads * n * c.dim) * sizeof(float));
    DeviceBuffer lse_acc(static_cast<std::size_t>(c.batch * c.heads * n) * sizeof(float));
    DeviceBuffer dlse(lse_acc.bytes());
    fill_neg_inf(lse_acc.as<float>(), c.batch * c.heads * n, nullptr);
    const std::int64_t cap = std::max(layout.max_local_length(), c.sinks);
    DeviceBuffer dk(static_cast<std::size_t>(c.batch * cap * c.kv_heads * c.dim) * elem), dv(dk.bytes());
    const RingPlan plan = c.window >= 0 ? make_window_plan(layout, c.window, c.sinks, r, c.causal)
                                        : make_ring_plan(layout, c.causal ? MaskKind::causal : MaskKind::full, r);
    // A lone task covering every row (P = 1, no window or sinks) may write the output itself.
    const bool direct = run.direct && plan.steps.size() == 1 && plan.steps[0].tasks.size() == 1 &&
                        plan.reverse_steps.empty() && plan.sink_len == 0 && plan.steps[0].tasks[0].q_len == n;
    EXPECT_EQ(direct, run.direct) << "a direct write needs a lone task";
    const bool merge_out = run.merge_out && plan.reverse_steps.empty() && plan.sink_len == 0 &&
                           plan.steps.back().tasks.size() == 1 && plan.steps.back().tasks[0].mask == MaskKind::full &&
                           plan.steps.back().tasks[0].q_len == n;
    EXPECT_EQ(merge_out, run.merge_out) << "merge_out needs a last step of one full task over every row";
    const BlockTask* last_task = merge_out ? &plan.steps.back().tasks[0] : nullptr;
    std::vector<float> lse_before;  // the running LSE before the merge_out launch
    // Every block the rank computes on: ring steps, the other way (two-sided window), sinks.
    std::vector<std::pair<std::vector<std::int64_t>, const std::vector<BlockTask>*>> blocks;
    for (const RingStep& step : plan.steps) blocks.emplace_back(layout.positions(step.kv_source), &step.tasks);
    for (const RingStep& step : plan.reverse_steps) blocks.emplace_back(layout.positions(step.kv_source), &step.tasks);
    if (plan.sink_len > 0) {
      std::vector<std::int64_t> sink_pos(static_cast<std::size_t>(plan.sink_len));
      for (std::int64_t t = 0; t < plan.sink_len; ++t) sink_pos[static_cast<std::size_t>(t)] = t;
      blocks.emplace_back(sink_pos, &plan.sink_tasks);
    }
    for (const auto& [src, tasks] : blocks) {
      const auto block_len = static_cast<std::int64_t>(src.size());
      upload(dk, keys(c, src, k_ramp));
      upload(dv, generate(c, SyntheticTensor::v, src, c.kv_heads));
      for (const BlockTask& t : *tasks) {
        FlashFwdParams p;
        p.q = dq.get();
        p.q_batch_stride = n * c.heads * c.dim;
        p.q_row_stride = c.heads * c.dim;
        p.q_head_stride = c.dim;
        p.k = dk.get();
        p.v = dv.get();
        p.kv_batch_stride = block_len * c.kv_heads * c.dim;
        p.kv_row_stride = c.kv_heads * c.dim;
        p.kv_head_stride = c.dim;
        p.o_acc = o_acc.as<float>();
        p.lse = lse_acc.as<float>();
        p.s_q = n;
        p.batch = static_cast<int>(c.batch);
        p.heads = static_cast<int>(c.heads);
        p.kv_group = static_cast<int>(c.heads / c.kv_heads);
        set_task_fields(p, t);
        p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
        if (ws) {
          p.split_buf = split.as<float>();
          p.split_slots = slots;
          p.split_parts = run.split_parts;
          const int units = static_cast<int>((t.q_len + 127) / 128 * c.heads * c.batch);
          ran.split_launches += flash_fwd_split(p, units, static_cast<int>((t.kv_len + 127) / 128), sms).first > 1;
        }
        if (&t == last_task) {
          lse_before.resize(static_cast<std::size_t>(c.batch * c.heads * n));
          RINGATTN_CUDA_CHECK(cudaMemcpy(lse_before.data(), lse_acc.get(), lse_before.size() * sizeof(float),
                                         cudaMemcpyDeviceToHost));
          p.merge_out = 1;
        }
        if (direct || &t == last_task) {
          p.out = dout.get();
          p.out_batch_stride = n * c.heads * c.dim;
          p.out_row_stride = c.heads * c.dim;
          p.out_head_stride = c.dim;
          p.lse_out = dlse.as<float>();
          p.lse_batch_stride = c.heads * n;
          p.lse_head_stride = n;
          p.lse_row_stride = 1;
        }
        flash_fwd(p, c.dtype, c.dim, nullptr, kernel);
      }
    }
    const TensorView out_view = TensorView::contiguous(dout.get(), c.dtype, {c.batch, n, c.heads, c.dim}, DeviceKind::cuda);
    const TensorView lse_view = TensorView::contiguous(dlse.get(), DType::f32, {c.batch, c.heads, n}, DeviceKind::cuda);
    if (merge_out) {
      std::vector<float> lse_after(lse_before.size());
      RINGATTN_CUDA_CHECK(cudaMemcpy(lse_after.data(), lse_acc.get(), lse_after.size() * sizeof(float),
                                     cudaMemcpyDeviceToHost));
      EXPECT_TRUE(std::memcmp(lse_after.data(), lse_before.data(), lse_after.size() * sizeof(float)) == 0)
          << "merge_out changed the running LSE";
    } else if (!direct) {
      finalize_output(o_acc.as<float>(), lse_acc.as<float>(), out_view, lse_view, nullptr);
    }
    std::vector<unsigned char> out(q.size());
    std::vector<float> lse(static_cast<std::size_t>(c.batch * c.heads * n));
    RINGATTN_CUDA_CHECK(cudaMemcpy(out.data(), dout.get(), out.size(), cudaMemcpyDeviceToHost));
    RINGATTN_CUDA_CHECK(cudaMemcpy(lse.data(), dlse.get(), lse.size() * sizeof(float), cudaMemcpyDeviceToHost));

    const std::vector<float> q32 = to_f32(c.dtype, q);
    std::vector<double> ref_out, ref_lse;
    reference_forward({c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale, c.window, c.sinks}, pos, q32, k_all,
                      v_all, ref_out, ref_lse);
    const std::vector<float> got = to_f32(c.dtype, out);
    const std::vector<float> naive = ringattn::testing::naive_attention(c, scale, pos, q32, k_all, v_all, true);
    for (std::size_t i = 0; i < ref_out.size(); ++i) {
      if (std::isnan(got[i])) {
        ADD_FAILURE() << "element " << i << " is NaN";
        return ran;
      }
      kernel_err = std::max(kernel_err, ringattn::testing::abs_err(got[i], ref_out[i]));
      naive_err = std::max(naive_err, std::fabs(naive[i] - ref_out[i]));
    }
    for (std::size_t i = 0; i < ref_lse.size(); ++i) lse_err = std::max(lse_err, ringattn::testing::abs_err(lse[i], ref_lse[i]));
    ran.out.insert(ran.out.end(), out.begin(), out.end());
  }
  EXPECT_LE(kernel_err, 2.0 * naive_err + 1e-4) << "naive same-precision error " << naive_err;
  EXPECT_LE(lse_err, 1e-3);
  if (slots > 0) {  // every launch leaves the split's counts (the buffer's first words) zero
    std::vector<unsigned int> counts(static_cast<std::size_t>(slots));
    RINGATTN_CUDA_CHECK(cudaMemcpy(counts.data(), split.get(), counts.size() * sizeof(unsigned int), cudaMemcpyDeviceToHost));
    EXPECT_EQ(std::count(counts.begin(), counts.end(), 0u), slots) << "split counts left non-zero";
  }
  return ran;
}

// Every native kernel this device can run: mma.sync everywhere, wgmma and its warp-specialised
// variant on compute capability 9.0.
void check_case(const Case& c, double k_ramp = 0.0) {
  check_case(c, FlashKernel::mma_sync, k_ramp);
  if (flash_fwd_wgmma_available()) {
    check_case(c, FlashKernel::wgmma, k_ramp);
    check_case(c, FlashKernel::wgmma_ws, k_ramp);
  }
}

class FlashFwd : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
    RecordProperty("wgmma", flash_fwd_wgmma_available() ? "yes" : "no");
  }
};

}  // namespace

TEST_F(FlashFwd, SingleBlockEveryDtypeHeadDimAndMask) {
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (std::int64_t dim : {64, 128}) {
      for (bool causal : {false, true}) {
        check_case({2, 300, 4, 2, dim, causal, LayoutKind::contiguous, 1, dtype});
      }
    }
  }
}

TEST_F(FlashFwd, ThroughRingPlansWithOffsetsAndGqa) {
  for (LayoutKind layout : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
    for (bool causal : {false, true}) {
      check_case({1, 517, 8, 2, 128, causal, layout, 3, DType::bf16});
      check_case({1, 389, 4, 1, 64, causal, layout, 2, DType::f16});
    }
  }
}

TEST_F(FlashFwd, LongerBlocksCrossManyTiles) {
  check_case({1, 2048, 2, 1, 128, true, LayoutKind::zigzag, 2, DType::bf16});
  check_case({1, 1500, 2, 2, 64, false, LayoutKind::contiguous, 2, DType::bf16});
  check_case({1, 1100, 2, 2, 128, false, LayoutKind::contiguous, 1, DType::f16});
  check_case({1, 1300, 2, 1, 64, true, LayoutKind::contiguous, 1, DType::bf16});
}

// A ring's last step of one full task over every row merges and writes O and LSE itself
// (merge_out): every kernel, through the split (forced, and the rule), against the reference.
TEST_F(FlashFwd, RingsLastTaskWritesTheMergedOutput) {
  const Case rings[] = {{1, 1536, 4, 2, 128, false, LayoutKind::zigzag, 2, DType::bf16},
                        {2, 900, 2, 1, 64, false, LayoutKind::contiguous, 3, DType::f16},
                        {1, 2048, 4, 4, 128, false, LayoutKind::striped, 2, DType::bf16}};
  for (const Case& c : rings) {
    check_case(c, FlashKernel::mma_sync, 0.0, {0, false, true});
    if (!flash_fwd_wgmma_available()) continue;
    check_case(c, FlashKernel::wgmma, 0.0, {0, false, true});
    check_case(c, FlashKernel::wgmma_ws, 0.02, {0, false, true});
    check_case(c, FlashKernel::wgmma_ws, 0.02, {4, false, true});
  }
}

// The split (flash_fwd_sm90_ws.cuh, "The last wave"): query tiles given to 2, 4 or 8 CTAs that
// walk consecutive shares of the key tiles, the last to finish combining the parts' states in
// part order (forced here on half of each launch's tiles, so that split and unsplit CTAs share
// a launch as in a ring's last wave; the rule splits that wave or every tile of a small launch).
// Within the tolerance, through the merge and through the direct write, with maxima that grow
// along the keys (the parts' states then have far apart maxima), and bitwise repeatable. The
// causal cases' first query tiles have fewer key tiles than parts: some parts have none and
// only count themselves in.
TEST_F(FlashFwd, SplitQueryTilesCombineTheirPartsInOrder) {
  if (!flash_fwd_wgmma_available()) GTEST_SKIP() << "the warp-specialised kernel needs sm_90a";
  for (const int parts : {2, 4, 8}) {
    for (const bool causal : {false, true}) {
      const Case lone{1, 1024, 4, 2, 128, causal, LayoutKind::contiguous, 1, DType::bf16};
      for (const bool direct : {false, true}) {
        const Ran a = check_case(lone, FlashKernel::wgmma_ws, 0.0, {parts, direct});
        const Ran b = check_case(lone, FlashKernel::wgmma_ws, 0.0, {parts, direct});
        EXPECT_EQ(a.split_launches, 1) << parts << " parts" << (causal ? " causal" : "");
        EXPECT_TRUE(a.out == b.out) << parts << " parts" << (causal ? " causal" : "") << ": two runs differ";
      }
    }
    // Uneven: 9 key tiles (the last of 76 keys), 2 batches; every part of 8 gets 1 or 2 tiles.
    const Case uneven{2, 1100, 2, 1, 128, false, LayoutKind::contiguous, 1, DType::f16};
    EXPECT_EQ(check_case(uneven, FlashKernel::wgmma_ws, 0.02, {parts, false}).split_launches, 1) << parts << " parts";
    // A ring: each rank's tasks, merged step after step (head dim 64); causal: 1024-key chunks.
    const Case ring{1, 2048, 4, 2, 64, false, LayoutKind::zigzag, 2, DType::bf16};
    EXPECT_GE(check_case(ring, FlashKernel::wgmma_ws, 0.0, {parts, false}).split_launches, 2) << parts << " parts";
    const Case causal_ring{1, 4096, 2, 1, 64, true, LayoutKind::zigzag, 2, DType::f16};
    EXPECT_GE(check_case(causal_ring, FlashKernel::wgmma_ws, 0.02, {parts, false}).split_launches, 2)
        << parts << " parts";
  }
}

// The rule: a full-mask launch's last-wave query tiles split where that shortens the tail; every
// tile of a launch, full or causal, that fills at most half of the SMs; never a causal launch's
// last wave; never more CTAs than the buffer's slots.
TEST(FlashFwdSplit, SplitsTheLastWaveWhereItShortensTheTail) {
  FlashFwdParams p;
  float buffer = 0.0f;  // only tested for null
  p.split_buf = &buffer;
  p.split_slots = 264;
  auto split = [&](int units, int key_tiles, int sms, bool causal = false) {
    p.causal = causal ? 1 : 0;
    return flash_fwd_split(p, units, key_tiles, sms);
  };
  EXPECT_EQ(split(8192, 256, 132), std::make_pair(8, 8));    // 64k on two GPUs: 62 waves and 8 CTAs
  EXPECT_EQ(split(8448, 256, 132), std::make_pair(1, 0));    // whole waves
  EXPECT_EQ(split(512, 32, 132), std::make_pair(1, 0));      // 3 waves and 116: no shorter tail
  EXPECT_EQ(split(32, 16, 132), std::make_pair(4, 32));      // a small launch: every tile, 4 parts fit
  EXPECT_EQ(split(16, 32, 132), std::make_pair(8, 16));
  EXPECT_EQ(split(16, 12, 132), std::make_pair(4, 16));      // 12 key tiles: at most 4 parts of 2 or more
  EXPECT_EQ(split(8192, 6, 132), std::make_pair(2, 8));      // 6 key tiles: halves
  EXPECT_EQ(split(8192, 3, 132), std::make_pair(1, 0));      // too few to share
  EXPECT_EQ(split(8192, 256, 132, true), std::make_pair(1, 0));  // causal: not the last wave ...
  EXPECT_EQ(split(67, 256, 132, true), std::make_pair(1, 0));    // (over half of the SMs)
  EXPECT_EQ(split(66, 256, 132, true), std::make_pair(2, 66));   // ... but small launches whole
  EXPECT_EQ(split(16, 32, 132, true), std::make_pair(8, 16));
  EXPECT_EQ(split(16, 6, 132, true), std::make_pair(2, 16));
  EXPECT_EQ(split(16, 3, 132, true), std::make_pair(1, 0));
  p.split_slots = 16;  // the buffer bounds the split CTAs
  EXPECT_EQ(split(8192, 256, 132), std::make_pair(2, 8));
  EXPECT_EQ(split(16, 32, 132), std::make_pair(1, 0));
  p.split_slots = 264;
  p.split_buf = nullptr;
  EXPECT_EQ(split(8192, 256, 132), std::make_pair(1, 0));
  p.split_buf = &buffer;
  p.split_parts = 1;
  EXPECT_EQ(split(8192, 256, 132), std::make_pair(1, 0));
  p.split_parts = 4;  // forced: half of the tiles
  EXPECT_EQ(split(100, 8, 132), std::make_pair(4, 50));
  EXPECT_EQ(split(100, 3, 132), std::make_pair(1, 0));       // fewer key tiles than parts
}

// Scores that keep growing along the keys: K's rows scaled by 1 + 0.02 t, so a row's maximum
// grows by ~3 (natural units; ~4.6 in log2) per 64 keys and by ~80 in log2 over the walk. The
// wgmma kernels' lazy rescaling keeps a row's maximum until a tile exceeds it by 8 in log2:
// here it moves every few tiles, mid-walk, with output already accumulated, which unit-variance
// inputs (tile maxima within a few units of each other) almost never make it do.
TEST_F(FlashFwd, GrowingScoresRescaleMidWalk) {
  for (bool causal : {false, true}) {
    check_case({1, 1100, 2, 1, 128, causal, LayoutKind::contiguous, 1, DType::bf16}, 0.02);
    check_case({1, 1100, 2, 2, 64, causal, LayoutKind::contiguous, 1, DType::f16}, 0.02);
    check_case({1, 1300, 4, 2, 128, causal, LayoutKind::zigzag, 2, DType::f16}, 0.02);
    check_case({1, 1300, 4, 2, 64, causal, LayoutKind::zigzag, 2, DType::bf16}, 0.02);
  }
}

// Sliding-window plans: band tasks whose lower edge skips whole key tiles and cuts through
// others, causal and two-sided, with and without sinks, windows smaller and larger than a
// rank's block.
TEST_F(FlashFwd, SlidingWindowBands) {
  for (bool causal : {true, false}) {
    for (std::int64_t window : {0, 37, 200, 700}) {
      check_case({1, 1100, 4, 2, 128, causal, LayoutKind::contiguous, 3, DType::bf16, window, 0});
    }
    check_case({2, 900, 4, 1, 64, causal, LayoutKind::contiguous, 2, DType::f16, 130, 70});
    check_case({1, 1300, 2, 2, 128, causal, LayoutKind::contiguous, 1, DType::bf16, 257, 5});
  }
}

// Scores beyond fp32 once scaled (|q.k| * scale * log2(e) > FLT_MAX) have no fp32 answer. The
// kernels computed every exponential against an infinite maximum as 0, so such a row looked
// like one that sees no key: O and LSE kept what the buffers held (zeros, exit 0 in the CLI).
// Every row must come out NaN instead, for scores that overflow upwards (head 0: q.k = +D)
// and downwards (head 1: q.k = -D), through the merge into the running state and through the
// direct write of a lone task, masked or not, on every native kernel.
TEST_F(FlashFwd, ScoresBeyondFp32AreNaNNotZero) {
  constexpr std::int64_t kSeq = 200, kHeads = 2;
  std::vector<FlashKernel> kernels{FlashKernel::mma_sync};
  if (flash_fwd_wgmma_available()) kernels.insert(kernels.end(), {FlashKernel::wgmma, FlashKernel::wgmma_ws});
  for (std::int64_t dim : {64, 128}) {
    const auto n = static_cast<std::size_t>(kSeq * kHeads * dim);
    std::vector<float> qf(n, 1.0f), kf(n, 1.0f), vf(n, 1.0f);
    for (std::size_t i = 0; i < n; ++i) {
      if ((static_cast<std::int64_t>(i) / dim) % kHeads == 1) kf[i] = -1.0f;
    }
    std::vector<unsigned char> qb(n * 2), kb(n * 2), vb(n * 2);
    convert_from_f32(DType::bf16, qf.data(), qb.data(), n);
    convert_from_f32(DType::bf16, kf.data(), kb.data(), n);
    convert_from_f32(DType::bf16, vf.data(), vb.data(), n);
    DeviceBuffer dq(qb.size()), dk(kb.size()), dv(vb.size()), dout(qb.size());
    upload(dq, qb);
    upload(dk, kb);
    upload(dv, vb);
    DeviceBuffer o_acc(n * sizeof(float)), lse_acc(static_cast<std::size_t>(kHeads * kSeq) * sizeof(float)),
        dlse(lse_acc.bytes());
    for (FlashKernel kernel : kernels) {
      for (bool causal : {false, true}) {
        for (bool direct : {false, true}) {
          SCOPED_TRACE("dim " + std::to_string(dim) + " kernel " + to_string(kernel) + (causal ? " causal" : " full") +
                       (direct ? " direct write" : " merged"));
          RINGATTN_CUDA_CHECK(cudaMemset(dout.get(), 0, dout.bytes()));
          RINGATTN_CUDA_CHECK(cudaMemset(dlse.get(), 0, dlse.bytes()));
          fill_neg_inf(lse_acc.as<float>(), kHeads * kSeq, nullptr);
          FlashFwdParams p;
          p.q = dq.get();
          p.k = dk.get();
          p.v = dv.get();
          p.q_batch_stride = p.kv_batch_stride = kSeq * kHeads * dim;
          p.q_row_stride = p.kv_row_stride = kHeads * dim;
          p.q_head_stride = p.kv_head_stride = dim;
          p.o_acc = o_acc.as<float>();
          p.lse = lse_acc.as<float>();
          p.s_q = kSeq;
          p.heads = static_cast<int>(kHeads);
          p.q_len = p.kv_len = static_cast<int>(kSeq);
          p.causal = causal ? 1 : 0;
          p.scale_log2 = static_cast<float>(1e38 * 1.4426950408889634);
          if (direct) {
            p.out = dout.get();
            p.out_batch_stride = p.q_batch_stride;
            p.out_row_stride = p.q_row_stride;
            p.out_head_stride = p.q_head_stride;
            p.lse_out = dlse.as<float>();
            p.lse_batch_stride = kHeads * kSeq;
            p.lse_head_stride = kSeq;
            p.lse_row_stride = 1;
          }
          flash_fwd(p, DType::bf16, dim, nullptr, kernel);
          if (!direct) {
            finalize_output(o_acc.as<float>(), lse_acc.as<float>(),
                            TensorView::contiguous(dout.get(), DType::bf16, {1, kSeq, kHeads, dim}, DeviceKind::cuda),
                            TensorView::contiguous(dlse.get(), DType::f32, {1, kHeads, kSeq}, DeviceKind::cuda),
                            nullptr);
          }
          std::vector<unsigned char> out(dout.bytes());
          std::vector<float> lse(static_cast<std::size_t>(kHeads * kSeq));
          RINGATTN_CUDA_CHECK(cudaMemcpy(out.data(), dout.get(), out.size(), cudaMemcpyDeviceToHost));
          RINGATTN_CUDA_CHECK(cudaMemcpy(lse.data(), dlse.get(), lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
          const std::vector<float> got = to_f32(DType::bf16, out);
          std::size_t finite_out = 0, finite_lse = 0;
          for (float x : got) finite_out += std::isfinite(x) ? 1 : 0;
          for (float x : lse) finite_lse += std::isfinite(x) ? 1 : 0;
          EXPECT_EQ(finite_out, 0u) << "of " << got.size() << " O elements";
          EXPECT_EQ(finite_lse, 0u) << "of " << lse.size() << " LSE entries";
        }
      }
    }
  }
}
