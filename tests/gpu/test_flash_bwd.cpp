// The native CUDA flash backward kernels (mma.sync; the wgmma pair and the single-pass wgmma
// kernel on H100/H200) against the fp64 reference gradients, driven through ring and
// sliding-window plans on one GPU: every rank's steps run in turn, each step's KV block
// uploaded from the host and its dK/dV added into that block's own accumulator, as the ring
// would carry it. Exercises tiling, masks with diagonal
// offsets and band edges, uneven lengths, sinks and GQA sums.
//
// O and LSE come from the fp64 reference forward (O rounded to the dtype, as a forward pass
// would store it); dQ is compared as stored (the dtype), dK and dV as their fp32 sums.
// Tolerance: detail::gradient_tolerance, relative to the largest reference gradient. Each case
// runs twice and must give bitwise-identical gradients. Skips where no GPU is present.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <cuda_bf16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
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
using ringattn::testing::generate;
using ringattn::testing::name;
using ringattn::testing::to_f32;

DeviceBuffer upload(const void* src, std::size_t bytes) {
  DeviceBuffer d(bytes);
  RINGATTN_CUDA_CHECK(cudaMemcpy(d.get(), src, bytes, cudaMemcpyHostToDevice));
  return d;
}

std::vector<unsigned char> download(const DeviceBuffer& d) {
  std::vector<unsigned char> h(d.bytes());
  RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), h.size(), cudaMemcpyDeviceToHost));
  return h;
}

// Rows `pos` of a natural-order (B, S, heads, D) array.
template <class T>
std::vector<T> rows_at(const std::vector<T>& all, const Case& c, const std::vector<std::int64_t>& pos, std::int64_t heads) {
  const std::int64_t w = heads * c.dim, n = static_cast<std::int64_t>(pos.size());
  std::vector<T> out(static_cast<std::size_t>(c.batch * n * w));
  for (std::int64_t b = 0; b < c.batch; ++b)
    for (std::int64_t i = 0; i < n; ++i)
      for (std::int64_t e = 0; e < w; ++e)
        out[static_cast<std::size_t>((b * n + i) * w + e)] =
            all[static_cast<std::size_t>((b * c.seq + pos[static_cast<std::size_t>(i)]) * w + e)];
  return out;
}

// Runs the backward pass of every rank of the plan (ring or sliding-window: forward steps,
// reverse steps, the sink block) with `kernel`; returns dq (rounded to the dtype, as stored)
// and the fp32 dk, dv sums of every block, concatenated.
// store: every task overwrites its rows (FlashBwdParams::dkv_store) of a scratch accumulator
// filled with NaN, whose other rows must stay untouched; its rows are then added to the
// block's accumulator (so a NaN left in a task's rows, e.g. of keys no query sees, fails).
std::vector<unsigned char> run_case(const Case& c, FlashKernel kernel, double& rel_err, bool store = false,
                                    int head_chunk = 0, int split_parts = 0) {
  const Layout layout(c.layout, c.seq, c.world);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  const std::vector<float> q_all = to_f32(c.dtype, generate(c, SyntheticTensor::q, all, c.heads));
  const std::vector<float> k_all = to_f32(c.dtype, generate(c, SyntheticTensor::k, all, c.kv_heads));
  const std::vector<float> v_all = to_f32(c.dtype, generate(c, SyntheticTensor::v, all, c.kv_heads));
  const std::vector<float> do_all = to_f32(c.dtype, generate(c, SyntheticTensor::dout, all, c.heads));
  const ReferenceProblem ref{c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale, c.window, c.sinks};
  std::vector<double> o_ref, lse_ref, rdq, rdk, rdv;
  reference_forward(ref, all, q_all, k_all, v_all, o_ref, lse_ref);
  reference_backward(ref, q_all, k_all, v_all, do_all, rdq, rdk, rdv);
  const std::size_t elem = dtype_size(c.dtype);
  const std::int64_t D = c.dim, H = c.heads, Hkv = c.kv_heads, B = c.batch;
  auto plan_of = [&](int r) {
    return c.window >= 0 ? make_window_plan(layout, c.window, c.sinks, r, c.causal)
                         : make_ring_plan(layout, c.causal ? MaskKind::causal : MaskKind::full, r);
  };

  // One fp32 dK/dV accumulator per block (per owner rank), (B, H_kv, len, D) each, and one
  // for the sink block, which every rank's sink tasks add to.
  const std::int64_t sink_len = plan_of(0).sink_len;
  std::vector<DeviceBuffer> acc;
  std::vector<std::vector<std::int64_t>> acc_pos;
  for (int r = 0; r <= c.world; ++r) {
    std::vector<std::int64_t> pos = r < c.world ? layout.positions(r) : std::vector<std::int64_t>{};
    if (r == c.world)
      for (std::int64_t t = 0; t < sink_len; ++t) pos.push_back(t);
    acc.emplace_back(std::max<std::size_t>(1, 2 * static_cast<std::size_t>(B * Hkv * D) * pos.size()) * sizeof(float));
    RINGATTN_CUDA_CHECK(cudaMemset(acc.back().get(), 0, acc.back().bytes()));
    acc_pos.push_back(std::move(pos));
  }
  std::vector<float> dq_all(q_all.size()), dk_all(k_all.size(), 0.0f), dv_all(v_all.size(), 0.0f);
  std::vector<unsigned char> result;

  for (int r = 0; r < c.world; ++r) {
    const auto pos = layout.positions(r);
    const auto n = static_cast<std::int64_t>(pos.size());
    const std::vector<unsigned char> q = generate(c, SyntheticTensor::q, pos, H);
    const std::vector<unsigned char> dout = generate(c, SyntheticTensor::dout, pos, H);
    std::vector<float> o32(static_cast<std::size_t>(B * n * H * D));
    const std::vector<double> o_rows = rows_at(o_ref, c, pos, H);
    for (std::size_t i = 0; i < o32.size(); ++i) o32[i] = static_cast<float>(o_rows[i]);
    std::vector<unsigned char> o(o32.size() * elem);
    convert_from_f32(c.dtype, o32.data(), o.data(), o32.size());
    std::vector<float> lse(static_cast<std::size_t>(B * H * n));  // (B, H, n)
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < H; ++h)
        for (std::int64_t i = 0; i < n; ++i)
          lse[static_cast<std::size_t>((b * H + h) * n + i)] =
              static_cast<float>(lse_ref[static_cast<std::size_t>((b * H + h) * c.seq + pos[static_cast<std::size_t>(i)])]);

    DeviceBuffer dq_in = upload(q.data(), q.size()), ddo = upload(dout.data(), dout.size()),
                 dO = upload(o.data(), o.size()), dlse = upload(lse.data(), lse.size() * sizeof(float));
    DeviceBuffer lse2(lse.size() * sizeof(float)), delta(lse.size() * sizeof(float));
    DeviceBuffer dq_acc(static_cast<std::size_t>(B * H * n * D) * sizeof(float));
    FlashBwdParams sizing;  // the single-pass kernel's dQ semaphores, for the largest task (all n rows)
    sizing.batch = static_cast<int>(B);
    sizing.heads = static_cast<int>(H);
    sizing.q_len = static_cast<int>(n);
    DeviceBuffer dq_sem(static_cast<std::size_t>(std::max<std::int64_t>(1, flash_bwd_semaphores(sizing))) *
                        sizeof(unsigned int));
    RINGATTN_CUDA_CHECK(cudaMemset(dq_acc.get(), 0, dq_acc.bytes()));
    auto rows_view = [&](const DeviceBuffer& d, std::int64_t heads, DType dt) {
      return TensorView::contiguous(d.get(), dt, {B, n, heads, D}, DeviceKind::cuda);
    };
    backward_prep(rows_view(dO, H, c.dtype), rows_view(ddo, H, c.dtype),
                  TensorView::contiguous(dlse.get(), DType::f32, {B, H, n}, DeviceKind::cuda), lse2.as<float>(),
                  delta.as<float>(), nullptr);

    const RingPlan plan = plan_of(r);
    // Every block the rank computes on, with the accumulator its gradients go to.
    std::vector<std::pair<int, const std::vector<BlockTask>*>> blocks;
    for (const RingStep& step : plan.steps) blocks.emplace_back(step.kv_source, &step.tasks);
    for (const RingStep& step : plan.reverse_steps) blocks.emplace_back(step.kv_source, &step.tasks);
    if (plan.sink_len > 0) blocks.emplace_back(c.world, &plan.sink_tasks);
    for (const auto& [owner, tasks] : blocks) {
      const std::vector<std::int64_t>& src = acc_pos[static_cast<std::size_t>(owner)];
      const auto block_len = static_cast<std::int64_t>(src.size());
      const std::vector<unsigned char> k = generate(c, SyntheticTensor::k, src, Hkv);
      const std::vector<unsigned char> v = generate(c, SyntheticTensor::v, src, Hkv);
      DeviceBuffer dk_in = upload(k.data(), k.size()), dv_in = upload(v.data(), v.size());
      FlashBwdParams p;
      p.q = dq_in.get();
      p.q_batch_stride = n * H * D;
      p.q_row_stride = H * D;
      p.q_head_stride = D;
      p.dout = ddo.get();
      p.do_batch_stride = n * H * D;
      p.do_row_stride = H * D;
      p.do_head_stride = D;
      p.k = dk_in.get();
      p.v = dv_in.get();
      p.kv_batch_stride = block_len * Hkv * D;
      p.kv_row_stride = Hkv * D;
      p.kv_head_stride = D;
      p.lse2 = lse2.as<float>();
      p.delta = delta.as<float>();
      p.dq = dq_acc.as<float>();
      p.dq_sem = dq_sem.as<unsigned int>();
      p.dq_sem_len = static_cast<std::int64_t>(dq_sem.bytes() / sizeof(unsigned int));
      p.dk = acc[static_cast<std::size_t>(owner)].as<float>();
      p.dv = p.dk + B * Hkv * block_len * D;
      p.s_q = n;
      p.acc_len = block_len;
      p.batch = static_cast<int>(B);
      p.heads = static_cast<int>(H);
      p.kv_heads = static_cast<int>(Hkv);
      p.kv_group = static_cast<int>(H / Hkv);
      p.scale = static_cast<float>(scale);
      p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
      p.head_chunk = head_chunk;
      p.split_parts = split_parts;
      for (const BlockTask& t : *tasks) {
        set_task_fields(p, t);
        if (kernel != FlashKernel::mma_sync && !flash_bwd_wgmma_supports(p)) {
          ADD_FAILURE() << "the wgmma kernels cannot take these tensors: flash_bwd would fall back to mma.sync";
          rel_err = INFINITY;
          return {};
        }
        if (kernel == FlashKernel::wgmma_fused && !flash_bwd_fused_supports(p)) {
          ADD_FAILURE() << "the single-pass kernel cannot take this launch: flash_bwd would run the pair";
          rel_err = INFINITY;
          return {};
        }
        if (!store) {
          flash_bwd(p, c.dtype, D, nullptr, FlashBwdPart::both, kernel);
          continue;
        }
        float* const block_acc = p.dk;
        const std::int64_t half = B * Hkv * block_len * D;
        DeviceBuffer scratch(2 * static_cast<std::size_t>(half) * sizeof(float));
        RINGATTN_CUDA_CHECK(cudaMemset(scratch.get(), 0xff, scratch.bytes()));  // NaN
        p.dk = scratch.as<float>();
        p.dv = p.dk + half;
        p.dkv_store = 1;
        flash_bwd(p, c.dtype, D, nullptr, FlashBwdPart::both, kernel);
        p.dkv_store = 0;
        p.dk = block_acc;
        p.dv = block_acc + half;
        const std::vector<unsigned char> raw = download(scratch);
        const auto* words = reinterpret_cast<const std::uint32_t*>(raw.data());
        std::size_t touched = 0;
        for (std::int64_t e = 0; e < 2 * half; ++e) {
          const std::int64_t row = (e / D) % block_len;
          touched += (row < t.kv_begin || row >= t.kv_begin + t.kv_len) && words[e] != 0xffffffffu;
        }
        EXPECT_EQ(touched, 0u) << "store mode wrote outside the task's rows " << t.kv_begin << " .. "
                               << t.kv_begin + t.kv_len;
        const std::int64_t strides[3] = {Hkv * block_len * D, block_len * D, D};
        accumulate_rows(block_acc, block_len, t.kv_begin, scratch.as<float>() + t.kv_begin * D, DType::f32, 2 * B,
                        Hkv, t.kv_len, D, strides, nullptr);
      }
    }
    DeviceBuffer dq_out(q.size());
    finalize_output(dq_acc.as<float>(), nullptr, rows_view(dq_out, H, c.dtype), TensorView{}, nullptr);
    const std::vector<unsigned char> got = download(dq_out);
    const std::vector<float> g = to_f32(c.dtype, got);
    const std::int64_t w = H * D;
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t i = 0; i < n; ++i)
        for (std::int64_t e = 0; e < w; ++e)
          dq_all[static_cast<std::size_t>((b * c.seq + pos[static_cast<std::size_t>(i)]) * w + e)] =
              g[static_cast<std::size_t>((b * n + i) * w + e)];
    result.insert(result.end(), got.begin(), got.end());
  }
  // dK, dV: every block's fp32 sums (B, H_kv, len, D), added at their positions.
  for (std::size_t a = 0; a < acc.size(); ++a) {
    const std::vector<std::int64_t>& pos = acc_pos[a];
    const auto n = static_cast<std::int64_t>(pos.size());
    if (n == 0) continue;
    const std::vector<unsigned char> raw = download(acc[a]);
    result.insert(result.end(), raw.begin(), raw.end());
    const auto* sums = reinterpret_cast<const float*>(raw.data());
    for (int which = 0; which < 2; ++which) {
      std::vector<float>& dst = which == 0 ? dk_all : dv_all;
      const float* src = sums + which * B * Hkv * n * D;
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t h = 0; h < Hkv; ++h)
          for (std::int64_t i = 0; i < n; ++i)
            for (std::int64_t d = 0; d < D; ++d)
              dst[static_cast<std::size_t>(((b * c.seq + pos[static_cast<std::size_t>(i)]) * Hkv + h) * D + d)] +=
                  src[((b * Hkv + h) * n + i) * D + d];
    }
  }
  double err = 0.0, biggest = 0.0;
  for (const auto& [got, want] : {std::pair{&dq_all, &rdq}, {&dk_all, &rdk}, {&dv_all, &rdv}}) {
    for (std::size_t i = 0; i < want->size(); ++i) {
      const double g = (*got)[i];
      err = std::max(err, std::isnan(g) ? INFINITY : std::fabs(g - (*want)[i]));
      biggest = std::max(biggest, std::fabs((*want)[i]));
    }
  }
  rel_err = err / biggest;
  return result;
}

// Every native backward kernel this device runs: mma.sync, and on sm_90a the wgmma pair and
// the single-pass kernel (head dims 64 and 128).
std::vector<FlashKernel> kernels() {
  std::vector<FlashKernel> out{FlashKernel::mma_sync};
  if (flash_fwd_wgmma_available()) {
    out.push_back(FlashKernel::wgmma);
    out.push_back(FlashKernel::wgmma_fused);
  }
  return out;
}

void check_case(const Case& c) {
  for (FlashKernel kernel : kernels()) {
    SCOPED_TRACE(name(c) + " kernel " + to_string(kernel));
    double err = 0.0, err_again = 0.0;
    const std::vector<unsigned char> first = run_case(c, kernel, err);
    EXPECT_LE(err, gradient_tolerance(c.dtype)) << "max |err| / max |reference gradient|";
    const std::vector<unsigned char> second = run_case(c, kernel, err_again);
    EXPECT_TRUE(first == second) << "two runs gave different gradients";
  }
}

// Store mode (FlashBwdParams::dkv_store, a ring step's own sums): every kernel, gradients within
// the tolerance, nothing written outside the task's rows, repeatable.
void check_store_case(const Case& c) {
  for (FlashKernel kernel : kernels()) {
    SCOPED_TRACE(name(c) + " kernel " + to_string(kernel) + " store mode");
    double err = 0.0, err_again = 0.0;
    const std::vector<unsigned char> first = run_case(c, kernel, err, true);
    EXPECT_LE(err, gradient_tolerance(c.dtype)) << "max |err| / max |reference gradient|";
    const std::vector<unsigned char> second = run_case(c, kernel, err_again, true);
    EXPECT_TRUE(first == second) << "two runs gave different gradients";
  }
}

class FlashBwd : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

}  // namespace

TEST_F(FlashBwd, SingleBlockEveryDtypeHeadDimAndMask) {
  for (DType dtype : {DType::bf16, DType::f16}) {
    for (std::int64_t dim : {64, 128}) {
      for (bool causal : {false, true}) {
        check_case({2, 200, 4, 2, dim, causal, LayoutKind::contiguous, 1, dtype});
      }
    }
  }
}

TEST_F(FlashBwd, ThroughRingPlansWithOffsetsAndGqa) {
  for (LayoutKind layout : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
    for (bool causal : {false, true}) {
      check_case({1, 389, 8, 2, 128, causal, layout, 3, DType::bf16});
      check_case({1, 261, 4, 1, 64, causal, layout, 2, DType::f16});
    }
  }
}

// Blocks of many tiles: the wgmma kernels' 3-stage pipelines wrap several times (64-key tiles
// of the dq kernel, 64-row query tiles of every query head of a group in the dkv kernel).
TEST_F(FlashBwd, LongerBlocksCrossManyTiles) {
  check_case({1, 2048, 2, 1, 128, true, LayoutKind::zigzag, 2, DType::bf16});
  check_case({1, 1100, 4, 2, 128, false, LayoutKind::contiguous, 1, DType::f16});
  check_case({1, 1300, 2, 1, 64, true, LayoutKind::contiguous, 1, DType::bf16});
  check_case({1, 1100, 4, 2, 64, false, LayoutKind::zigzag, 2, DType::f16});
  // The single-pass kernel's CTAs interleave chunks of KV heads (4 here: short tasks, and at
  // least 4 for causal MHA); 6 heads make a whole chunk and a partial one, in each of 2
  // batches; GQA 6/3 a chunk of 2 and one of 1.
  check_case({2, 1024, 6, 6, 128, true, LayoutKind::zigzag, 2, DType::bf16});
  check_case({2, 640, 6, 6, 64, true, LayoutKind::contiguous, 1, DType::f16});
  check_case({2, 1024, 6, 6, 128, false, LayoutKind::zigzag, 2, DType::bf16});
  check_case({1, 768, 6, 3, 64, false, LayoutKind::contiguous, 1, DType::f16});
}

// The single-pass kernel's launch order with every head chunk, whole and partial (6 KV heads:
// 1, 2, 3, 4 and 6; the rule gives 4 to these short tasks), blocks fastest (1) being what
// launches of 32k+ rows run: within the tolerance, and the same bits as the rule's order (the
// adds to each dQ tile go in key-block order whatever the interleaving).
TEST_F(FlashBwd, EveryHeadChunkGivesTheSameBits) {
  if (!flash_fwd_wgmma_available()) GTEST_SKIP() << "the single-pass kernel needs sm_90a";
  for (const Case& c : {Case{2, 1024, 6, 6, 128, false, LayoutKind::zigzag, 2, DType::bf16},
                        Case{1, 1024, 6, 6, 64, true, LayoutKind::contiguous, 1, DType::bf16},
                        Case{1, 768, 12, 6, 128, true, LayoutKind::zigzag, 2, DType::f16}}) {
    double err = 0.0;
    // (No tail split: which key blocks it splits, and so how their dK/dV sums are formed,
    // follows the launch order.)
    const std::vector<unsigned char> rule = run_case(c, FlashKernel::wgmma_fused, err, false, 0, 1);
    EXPECT_LE(err, gradient_tolerance(c.dtype)) << name(c);
    for (const int hc : {1, 2, 3, 4, 6}) {
      SCOPED_TRACE(name(c) + " head chunk " + std::to_string(hc));
      double err_hc = 0.0;
      const std::vector<unsigned char> got = run_case(c, FlashKernel::wgmma_fused, err_hc, false, hc, 1);
      EXPECT_LE(err_hc, gradient_tolerance(c.dtype));
      EXPECT_TRUE(got == rule) << "the gradients depend on the launch order";
    }
  }
}

// The split (flash_bwd_fused_sm90.cuh, "The last wave"): key blocks given to 2 or 4 CTAs that
// walk consecutive shares of the query tiles and add their dK/dV sums in order (forced here
// for half of the blocks; the rule splits a full-mask launch's last wave, or every block of a
// small causal launch). Within the tolerance, repeatable, in store mode too (part 0 stores,
// the others add), and dQ's bits those of the unsplit launch: each dQ tile still gets one add
// per key block, in key-block order. The causal cases' last blocks visit 2 tiles, so some of
// their parts have none and only pass the turn on (part 0 zeroing the rows in store mode).
TEST_F(FlashBwd, SplitKeyBlocksAddTheirPartsInOrder) {
  if (!flash_fwd_wgmma_available()) GTEST_SKIP() << "the single-pass kernel needs sm_90a";
  // (Small: every run computes the fp64 reference. Tasks of 10 and 8 query tiles.)
  for (const Case& c : {Case{1, 640, 2, 1, 128, false, LayoutKind::contiguous, 1, DType::bf16},
                        Case{1, 1024, 4, 2, 64, false, LayoutKind::zigzag, 2, DType::f16},
                        Case{1, 640, 2, 1, 128, true, LayoutKind::contiguous, 1, DType::bf16},
                        Case{1, 1024, 4, 2, 64, true, LayoutKind::zigzag, 2, DType::f16}}) {
    double err = 0.0;
    const std::vector<unsigned char> whole = run_case(c, FlashKernel::wgmma_fused, err, false, 0, 1);
    EXPECT_LE(err, gradient_tolerance(c.dtype)) << name(c);
    const auto dq_bytes = static_cast<std::ptrdiff_t>(c.batch * c.seq * c.heads * c.dim * dtype_size(c.dtype));
    ASSERT_GE(static_cast<std::ptrdiff_t>(whole.size()), dq_bytes);
    for (const int parts : {2, 4}) {
      for (const bool store : {false, true}) {
        SCOPED_TRACE(name(c) + " split in " + std::to_string(parts) + (store ? " store mode" : ""));
        double e1 = 0.0, e2 = 0.0;
        const std::vector<unsigned char> got = run_case(c, FlashKernel::wgmma_fused, e1, store, 0, parts);
        EXPECT_LE(e1, gradient_tolerance(c.dtype));
        if (!store) {
          const std::vector<unsigned char> again = run_case(c, FlashKernel::wgmma_fused, e2, store, 0, parts);
          EXPECT_TRUE(got == again) << "two runs gave different gradients";
        }
        ASSERT_EQ(got.size(), whole.size());
        EXPECT_TRUE(std::equal(got.begin(), got.begin() + dq_bytes, whole.begin())) << "dQ changed with the split";
      }
    }
  }
}

// The rule: a full-mask launch's last-wave key blocks split where that shortens the tail; a
// causal launch's blocks all split where they fill at most half of the SMs.
TEST(FlashBwdSplit, SplitsTheLastWaveWhereItShortensTheTail) {
  FlashBwdParams p;
  auto split = [&](int units, int q_tiles, int sms, bool causal = false) {
    p.causal = causal ? 1 : 0;
    return flash_bwd_split(p, units, q_tiles, sms);
  };
  EXPECT_EQ(split(8192, 512, 132), std::make_pair(8, 8));    // 64k on two GPUs: 62 waves and 8 CTAs
  EXPECT_EQ(split(8448, 512, 132), std::make_pair(1, 0));    // whole waves
  EXPECT_EQ(split(512, 32, 132), std::make_pair(1, 0));      // 3 waves and 116: no shorter tail
  EXPECT_EQ(split(180, 64, 132), std::make_pair(8, 48));     // 48 in 8: 3 waves of eighths, not 1 of halves
  EXPECT_EQ(split(32, 32, 132), std::make_pair(4, 32));      // a small launch: 8 parts no shorter than 4
  EXPECT_EQ(split(16, 32, 132), std::make_pair(8, 16));      // 16 blocks in 8
  EXPECT_EQ(split(16, 12, 132), std::make_pair(4, 16));      // 12 tiles: at most 4 parts of 2 or more
  EXPECT_EQ(split(8192, 6, 132), std::make_pair(2, 8));      // 6 tiles: halves, not quarters
  EXPECT_EQ(split(8192, 3, 132), std::make_pair(1, 0));      // too few tiles to share
  // Causal: a partial last wave is left alone (the launch ends with its shortest CTAs) ...
  EXPECT_EQ(split(8192, 512, 132, true), std::make_pair(1, 0));
  EXPECT_EQ(split(67, 512, 132, true), std::make_pair(1, 0));  // over half of the SMs
  // ... but a launch on at most half of them waits for its longest CTA: every block splits.
  EXPECT_EQ(split(66, 512, 132, true), std::make_pair(2, 66));
  EXPECT_EQ(split(32, 32, 132, true), std::make_pair(4, 32));
  EXPECT_EQ(split(16, 32, 132, true), std::make_pair(8, 16));
  EXPECT_EQ(split(16, 6, 132, true), std::make_pair(2, 16));
  EXPECT_EQ(split(16, 3, 132, true), std::make_pair(1, 0));
  p.split_parts = 1;
  EXPECT_EQ(split(8192, 512, 132), std::make_pair(1, 0));
  EXPECT_EQ(split(16, 32, 132, true), std::make_pair(1, 0));
  p.split_parts = 2;
  EXPECT_EQ(split(100, 8, 132), std::make_pair(2, 50));
  EXPECT_EQ(split(100, 8, 132, true), std::make_pair(2, 50));
}

// The head chunk: the largest power of two of KV heads whose CTAs walk at most 32k rows of Q,
// dO and dQ at once (a causal launch counts half its rows; a GQA head its group's), at least 4
// for causal MHA, at most the KV heads (H100: 2k-row tasks +14% at hc 16, 64k ones 0.67x with
// every head interleaved; docs/PERFORMANCE.md).
TEST(FlashBwdHeadChunk, KeepsTheRowsWalkedAtOnceWithin32k) {
  auto chunk = [](int q_len, int heads, int kv_heads, bool causal) {
    FlashBwdParams p;
    p.q_len = q_len;
    p.heads = heads;
    p.kv_heads = kv_heads;
    p.kv_group = heads / kv_heads;
    p.causal = causal ? 1 : 0;
    return flash_bwd_head_chunk(p);
  };
  EXPECT_EQ(chunk(2048, 32, 32, false), 16);
  EXPECT_EQ(chunk(2049, 32, 32, false), 8);
  EXPECT_EQ(chunk(4096, 32, 32, false), 8);
  EXPECT_EQ(chunk(16384, 32, 32, false), 2);
  EXPECT_EQ(chunk(32768, 32, 32, false), 1);
  EXPECT_EQ(chunk(65536, 32, 32, false), 1);
  EXPECT_EQ(chunk(2048, 32, 32, true), 32);
  EXPECT_EQ(chunk(8192, 32, 32, true), 8);
  EXPECT_EQ(chunk(65536, 32, 32, true), 4);  // causal MHA: never fewer than 4
  EXPECT_EQ(chunk(512, 32, 32, false), 32);  // never more than the KV heads
  EXPECT_EQ(chunk(512, 6, 6, false), 4);
  EXPECT_EQ(chunk(512, 2, 2, true), 2);
  EXPECT_EQ(chunk(512, 3, 3, true), 3);  // causal MHA: 4, or all of fewer heads
  // GQA: a KV head's CTAs walk every query head of its group.
  EXPECT_EQ(chunk(2048, 32, 8, false), 4);
  EXPECT_EQ(chunk(2048, 32, 8, true), 8);
  EXPECT_EQ(chunk(4096, 32, 8, true), 4);
  EXPECT_EQ(chunk(16384, 32, 8, true), 1);
}

// Sliding-window plans: band tasks whose lower edge skips whole tiles and cuts through others,
// causal and two-sided (reverse steps), with and without sinks.
TEST_F(FlashBwd, SlidingWindowBands) {
  for (bool causal : {true, false}) {
    for (std::int64_t window : {0, 37, 300}) {
      check_case({1, 900, 4, 2, 128, causal, LayoutKind::contiguous, 3, DType::bf16, window, 0});
    }
    check_case({2, 700, 4, 1, 64, causal, LayoutKind::contiguous, 2, DType::f16, 130, 70});
  }
}

// Store mode through plans whose tasks leave some keys unseen (striped causal: a block's last
// key; windows: keys below every query's band), GQA, both head dims and dtypes.
TEST_F(FlashBwd, StoreModeOverwritesOnlyTheTaskRows) {
  check_store_case({1, 389, 8, 2, 128, true, LayoutKind::striped, 3, DType::bf16});
  check_store_case({1, 1024, 4, 4, 128, false, LayoutKind::zigzag, 2, DType::bf16});
  check_store_case({1, 1024, 4, 1, 64, true, LayoutKind::zigzag, 2, DType::f16});
  check_store_case({1, 900, 4, 2, 128, true, LayoutKind::contiguous, 3, DType::bf16, 37, 0});
  check_store_case({2, 700, 4, 1, 64, false, LayoutKind::contiguous, 2, DType::f16, 130, 70});
}

// One task whose last key tiles no query sees (causal, diagonal offset -200: keys 100 and on
// are unseen), inside a larger accumulator (kv_begin 40): store mode into NaN must give the
// same bits as adding into zeros (rows of unseen keys 0), and leave the rows around the task
// alone. The single-pass kernel's CTAs with no query tile take their own path here.
TEST_F(FlashBwd, StoreModeZeroesKeysNoQuerySees) {
  for (const std::int64_t D : {64, 128}) {
    const std::int64_t B = 1, H = 2, Hkv = 1, n = 300, acc_len = 400, kv_begin = 40;
    std::vector<__nv_bfloat16> host(static_cast<std::size_t>(B * n * H * D));
    for (std::size_t i = 0; i < host.size(); ++i) host[i] = __float2bfloat16(std::sin(0.37 * static_cast<double>(i)));
    DeviceBuffer q = upload(host.data(), host.size() * 2), dout = upload(host.data(), host.size() * 2);
    std::vector<__nv_bfloat16> kv(static_cast<std::size_t>(B * acc_len * Hkv * D));
    for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = __float2bfloat16(std::cos(0.11 * static_cast<double>(i)));
    DeviceBuffer k = upload(kv.data(), kv.size() * 2), v = upload(kv.data(), kv.size() * 2);
    std::vector<float> lse2(static_cast<std::size_t>(B * H * n), 6.0f), delta(lse2.size(), 0.25f);
    DeviceBuffer dl = upload(lse2.data(), lse2.size() * 4), dd = upload(delta.data(), delta.size() * 4);
    FlashBwdParams p;
    p.q = q.get();
    p.dout = dout.get();
    p.q_batch_stride = p.do_batch_stride = n * H * D;
    p.q_row_stride = p.do_row_stride = H * D;
    p.q_head_stride = p.do_head_stride = D;
    p.k = k.get();
    p.v = v.get();
    p.kv_batch_stride = acc_len * Hkv * D;
    p.kv_row_stride = Hkv * D;
    p.kv_head_stride = D;
    p.lse2 = dl.as<float>();
    p.delta = dd.as<float>();
    p.s_q = n;
    p.acc_len = acc_len;
    p.heads = static_cast<int>(H);
    p.kv_heads = static_cast<int>(Hkv);
    p.kv_group = static_cast<int>(H / Hkv);
    p.q_len = static_cast<int>(n);
    p.kv_begin = static_cast<int>(kv_begin);
    p.kv_len = static_cast<int>(n);
    p.causal = 1;
    p.diag_offset = -200;
    p.scale = 0.088f;
    p.scale_log2 = 0.088f * 1.4426950408889634f;
    DeviceBuffer dq_sem(static_cast<std::size_t>(std::max<std::int64_t>(1, flash_bwd_semaphores(p))) * 4);
    p.dq_sem = dq_sem.as<unsigned int>();
    p.dq_sem_len = static_cast<std::int64_t>(dq_sem.bytes() / 4);
    const std::size_t acc_bytes = 2 * static_cast<std::size_t>(B * Hkv * acc_len * D) * sizeof(float);
    for (FlashKernel kernel : kernels()) {
      SCOPED_TRACE("head dim " + std::to_string(D) + " kernel " + to_string(kernel));
      std::vector<unsigned char> result[2];
      for (int store = 0; store < 2; ++store) {
        DeviceBuffer acc(acc_bytes), dq(static_cast<std::size_t>(B * H * n * D) * sizeof(float));
        RINGATTN_CUDA_CHECK(cudaMemset(acc.get(), store ? 0xff : 0, acc.bytes()));
        RINGATTN_CUDA_CHECK(cudaMemset(dq.get(), 0, dq.bytes()));
        p.dk = acc.as<float>();
        p.dv = p.dk + B * Hkv * acc_len * D;
        p.dq = dq.as<float>();
        p.dkv_store = store;
        if (kernel == FlashKernel::wgmma_fused) {
          ASSERT_TRUE(flash_bwd_fused_supports(p)) << "the single-pass kernel would not run";
        }
        flash_bwd(p, DType::bf16, D, nullptr, FlashBwdPart::both, kernel);
        result[store] = download(acc);
      }
      const auto* added = reinterpret_cast<const std::uint32_t*>(result[0].data());
      const auto* stored = reinterpret_cast<const std::uint32_t*>(result[1].data());
      std::size_t differ = 0, outside = 0, nonzero_unseen = 0, nonzero_seen = 0;
      for (std::size_t e = 0; e < acc_bytes / 4; ++e) {
        const std::int64_t row = static_cast<std::int64_t>(e / static_cast<std::size_t>(D)) % acc_len;
        if (row < kv_begin || row >= kv_begin + n) {
          outside += stored[e] != 0xffffffffu;
          continue;
        }
        differ += added[e] != stored[e];
        (row - kv_begin >= 100 ? nonzero_unseen : nonzero_seen) += stored[e] != 0u;
      }
      EXPECT_EQ(differ, 0u) << "store mode differs from adding into zeros";
      EXPECT_EQ(outside, 0u) << "store mode wrote outside the task's rows";
      EXPECT_EQ(nonzero_unseen, 0u) << "rows of keys no query sees are not zero";
      EXPECT_GT(nonzero_seen, 0u) << "no gradient at all: the case tests nothing";
    }
  }
}
