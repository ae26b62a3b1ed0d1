// kernels/cuda/flash_fwd_sm90_ws.cuh: the warp-specialised Hopper (sm_90a) flash forward kernel
// for head_dims 64 and 128 (FlashKernel::wgmma_ws; flash_fwd_sm90.cuh serves tensors whose
// strides or alignment TMA cannot describe). The default on sm_90a: see cuda_kernels.hpp.
// At head dim 64 (since the fourteenth session; the same code, one 128-byte atom column)
// against the wgmma kernel, H100, forward alone, same call: 16k 461 / 474-481 TFLOP/s full /
// causal against 406 / 369-373, 64k 474-476 / 489-492 against 422 / 403. One exponential in
// four on the FMA pipe (poly_exp2, as the backward does at 128), tried there since at head dim
// 64 MUFU's 16 exponentials per clock match the tensor cores' tile time: 436-458 / 437-453, lost.
//
// Same contract as flash_fwd_sm90.cuh (FlashFwdParams: one task; the merge into the running
// state or the direct write fused into the epilogue). What changes is how the tensor cores
// are kept busy (the FlashAttention-3 recipe, written here from the paper's description):
//  - a producer warp (warp 0) loads Q once and the K and V tiles with TMA
//    (cp.async.bulk.tensor) into 128-byte-swizzled shared memory, two stages deep, each load
//    signalling a "full" mbarrier with its byte count; the consumers free a stage by arriving
//    on its "empty" mbarrier (one arrival per consumer warp). No CTA-wide barrier in the loop.
//  - two consumer warpgroups own 64 query rows each (128 per CTA) over 128-key tiles;
//  - within a warpgroup, S_j = Q K_j^T is issued before O += P_{j-1} V_{j-1}, and the softmax of
//    S_j runs while that second MMA is still in flight (intra-warpgroup overlap): the tensor
//    cores see the next MMA while the exp2s run.
//  - a warpgroup's Q rows live in registers (A fragments, loaded once), so the S MMAs read only
//    K from shared memory (H100, forward alone, 64k full: 661-663 against 654-655 TFLOP/s, same
//    call; causal and 16k within the noise).
//  - lazy rescaling (softmax_tile_sm90's kLazy): a row's running maximum moves, and the output
//    is rescaled, only when a row of the warp grows by more than 2^8; otherwise the 64
//    multiplies per thread and tile are skipped (H100, forward alone, same call: 64k full
//    687.8-688.5 against 660.1-662.7, causal 680.8-681.7 against 649.8-653.4, 16k +2-4%).
// Measured and dropped (same call): the paper's ping-pong of the two warpgroups (named barriers
// that make them take turns issuing their MMAs, so that one's softmax overlaps the other's
// MMAs): 636-639 against 654 at 64k full, 662-674 against 709-712 at 16k. Not analysed; our
// reading: the intra-warpgroup overlap already hides the softmax, so the turns only add waits.
// 384 threads and one CTA per SM: the producer warpgroup gives up registers (setmaxnreg 40) so
// that the consumers get 232 each (O, S, P and the Q fragments alone take 192). A 4-warp
// sub-partition of the SM holds 16K registers: one producer warp and two consumer warps,
// 32 x (40 + 2 x 232) = 16128.
//
// The last wave: a CTA holds an SM for its query tile's whole walk over the keys, and in a
// full-mask launch every CTA walks as far, so the CTAs run in waves of one per SM; a launch of
// N CTAs on W SMs whose last wave is partial (r = N mod W > 0) runs it with W - r SMs idle for
// a whole CTA's time (one rank's share of a 64k ring on two GPUs: 8,192 CTAs, 62 waves and 8).
// There (flash_fwd_split) the last r query tiles each go to k CTAs (2, 4 or 8) that walk
// consecutive shares of the key tiles, and a launch that fills at most half of the SMs splits
// every tile the same way. A part ends with its online-softmax state (unnormalised output,
// row maxima and partial sums, per thread) in a slot of FlashFwdParams::split_buf and counts
// itself in; the part that arrives last (no CTA waits for another) reads the parts' states
// back, combines them in part order (the bits do not depend on which part was last) and
// finishes the rows as an unsplit CTA would, merging or writing them. A causal launch's last
// wave is left alone (its CTAs differ in length and it ends with the shortest), but one that
// fills at most half of the SMs waits for its longest CTA, and there every tile splits; a
// causal tile's share may hold no key tile (its last rows' tiles are few), and such a part
// counts itself in with an empty state. The combined sums are formed part by part, so their
// bits depend on W: repeatable on one kind of GPU, not across kinds.
// H100, forward alone, against no split, same call: the 64k share above +1.3-1.7% (causal, its
// full sub-blocks, +0.9%), 4 heads at 1k and 2k (32 and 64 tiles, all split) +18-23% full,
// +11-30% causal.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_fwd_params.hpp"
#include "kernels/cuda/flash_fwd_sm90.cuh"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/wgmma.cuh"
#include "ringattn/error.hpp"

namespace ringattn::detail::flash {

template <typename T_, int kHeadDim_>
struct Sm90WsTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // two consumer warpgroups of 64 rows
  static constexpr int kBlockN = 128;
  // Head dim 64: three stages (80 KiB of shared memory for two). H100, forward alone, same
  // call: 16k full 490-492 TFLOP/s against 463-466, 64k 481 against 465; causal within the
  // noise (473-479 against 477-482).
  static constexpr int kStages = kHeadDim == 64 ? 3 : 2;
  static constexpr int kThreads = 384;  // a producer warpgroup + 2 consumer warpgroups
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kTileBytes = kBlockN * kHeadDim * 2;  // one K or one V tile
  // Q, kStages K and V tiles, 1 KiB of alignment slack, the mbarriers.
  static constexpr int kBarrierBytes = 8 * (1 + 4 * kStages);
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kTileBytes + 1024 + kBarrierBytes;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "head dims 64 and 128 (whole 128-byte swizzle atoms)");
};

// FlashFwdParams::split_buf: first the counts, one 32-bit word per split query tile (as many
// as slots, rounded up to 256 bytes; at the front, so that a buffer sized for one head dim and
// reused for another keeps them in place), then split_slots slots, each a part's state:
// fwd_split_values(D) floats for each of the 256 consumer threads, thread fastest (coalesced),
// its D / 2 output accumulators, then its two rows' maxima and partial sums.
constexpr int kFwdSplitThreads = 256;
__host__ __device__ constexpr int fwd_split_values(int head_dim) { return head_dim / 2 + 4; }
__host__ __device__ constexpr std::size_t fwd_split_slot_floats(int head_dim) {
  return static_cast<std::size_t>(fwd_split_values(head_dim)) * kFwdSplitThreads;
}
__host__ __device__ constexpr std::size_t fwd_split_count_words(int slots) {
  return (static_cast<std::size_t>(slots) + 63) / 64 * 64;
}

// Part `part` of `parts` of a split query tile (its state goes to slot `slot`; the tile's parts
// hold slots slot - part .. slot - part + parts - 1; `tile`: its count's index) stores its
// state and counts itself in; the last to arrive loads every part's state and combines them,
// in part order, into o, row_max and row_sum, and returns true. Every other part returns false
// (its rows are finished by the last). t: the consumer thread, 0 .. 255.
template <int D>
__device__ __forceinline__ bool fwd_split_combine(const FlashFwdParams& p, int slot, int part, int parts, int tile,
                                                  int t, float (&o)[D / 2], float (&row_max)[2], float (&row_sum)[2]) {
  constexpr int NO = D / 2;
  __shared__ int last_part;
  float* const slots = p.split_buf + fwd_split_count_words(p.split_slots);
  float* mine = slots + static_cast<std::size_t>(slot) * fwd_split_slot_floats(D) + t;
#pragma unroll
  for (int e = 0; e < NO; ++e) __stcg(mine + e * kFwdSplitThreads, o[e]);
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    __stcg(mine + (NO + hr) * kFwdSplitThreads, row_max[hr]);
    __stcg(mine + (NO + 2 + hr) * kFwdSplitThreads, row_sum[hr]);
  }
  __threadfence();  // the state is visible device-wide before the count says so
  named_bar_sync(1, kFwdSplitThreads);
  if (t == 0) {
    unsigned int* count = reinterpret_cast<unsigned int*>(p.split_buf) + tile;
    const bool last = atomicAdd(count, 1u) == static_cast<unsigned int>(parts - 1);
    if (last) *count = 0u;  // every part has arrived: zero for the next launch
    last_part = last ? 1 : 0;
  }
  named_bar_sync(1, kFwdSplitThreads);
  if (last_part == 0) return false;
  __threadfence();  // the other parts' states, counted in before the last arrival
  const float* first = slots + static_cast<std::size_t>(slot - part) * fwd_split_slot_floats(D) + t;
  float m[2] = {-INFINITY, -INFINITY};
  for (int i = 0; i < parts; ++i) {
    const float* st = first + static_cast<std::size_t>(i) * fwd_split_slot_floats(D);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) m[hr] = fmaxf(m[hr], __ldcg(st + (NO + hr) * kFwdSplitThreads));
  }
#pragma unroll
  for (int e = 0; e < NO; ++e) o[e] = 0.0f;
  row_sum[0] = row_sum[1] = 0.0f;
  for (int i = 0; i < parts; ++i) {
    const float* st = first + static_cast<std::size_t>(i) * fwd_split_slot_floats(D);
    float f[2];
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      // A part whose maximum is -inf saw no key of the row (nothing to add): not inf - inf.
      const float mx = __ldcg(st + (NO + hr) * kFwdSplitThreads);
      f[hr] = mx == -INFINITY ? 0.0f : exp2f(mx - m[hr]);
      row_sum[hr] += f[hr] * __ldcg(st + (NO + 2 + hr) * kFwdSplitThreads);
    }
#pragma unroll
    for (int e = 0; e < NO; ++e) o[e] += f[(e >> 1) & 1] * __ldcg(st + e * kFwdSplitThreads);
  }
  row_max[0] = m[0];
  row_max[1] = m[1];
  return true;
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_fwd_sm90_ws_kernel(const FlashFwdParams p, const __grid_constant__ CUtensorMap tm_q,
                             const __grid_constant__ CUtensorMap tm_k, const __grid_constant__ CUtensorMap tm_v,
                             const int split_from, const int split_parts) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, NSTAGE = Tr::kStages;
  constexpr int NS = BN / 2;  // S accumulator registers per thread
  constexpr int NO = D / 2;   // O accumulator registers per thread
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t smem_base = (static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const std::uint32_t sQ = smem_base;
  const std::uint32_t sK = sQ + Tr::kQBytes;
  const std::uint32_t sV = sK + NSTAGE * Tr::kTileBytes;
  const std::uint32_t bars = sV + NSTAGE * Tr::kTileBytes;
  const std::uint32_t q_full = bars;
  auto k_full = [&](int s) { return bars + 8u * (1 + s); };
  auto v_full = [&](int s) { return bars + 8u * (1 + NSTAGE + s); };
  auto k_empty = [&](int s) { return bars + 8u * (1 + 2 * NSTAGE + s); };
  auto v_empty = [&](int s) { return bars + 8u * (1 + 3 * NSTAGE + s); };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Unsplit launches: the grid's (query tile, head, batch). Split ones run on a 1-D grid: CTA
  // c < split_from is query tile c (tiles fastest, causal ones last first, then heads, then
  // batches, the order of the 3-D grid); from split_from on, each tile has split_parts CTAs in
  // a row.
  int part = 0, parts = 1, slot = 0, split_tile = 0;
  const CtaTask<T, BM, kCausal> task = [&] {
    if (split_parts <= 1) return CtaTask<T, BM, kCausal>(p);
    const int c = static_cast<int>(blockIdx.x);
    int unit = c;
    if (c >= split_from) {
      slot = c - split_from;
      split_tile = slot / split_parts;
      part = slot % split_parts;
      parts = split_parts;
      unit = split_from + split_tile;
    }
    const int m_blocks = (p.q_len + BM - 1) / BM, m_block = unit % m_blocks;
    return CtaTask<T, BM, kCausal>(p, kCausal ? m_blocks - 1 - m_block : m_block, (unit / m_blocks) % p.heads,
                                   unit / (m_blocks * p.heads));
  }();
  const int m0 = task.m0, h = task.h, b = task.b, n_end = task.n_end;
  int j0 = task.n_begin / BN;
  int n_tiles = n_end > 0 ? (n_end + BN - 1) / BN - j0 : 0;  // tiles this CTA computes
  if (parts > 1) {  // this part's share of the key tiles (a causal tile's parts may get none)
    const int lo = part * n_tiles / parts, hi = (part + 1) * n_tiles / parts;
    j0 += lo;
    n_tiles = hi - lo;
  }

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < NSTAGE; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 8);  // one arrival per consumer warp
      mbar_init(v_empty(s), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (n_tiles <= 0) {  // no key reaches this CTA's rows
    if (parts == 1 || warp < 4) return;  // nothing to write
    // An empty share of a split tile still counts itself in, with nothing seen (the last part
    // to arrive finishes the rows).
    const int row0 = m0 + (warp / 4 - 1) * 64 + (warp % 4) * 16 + lane / 4;
    float o[NO], row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.0f;
    if (fwd_split_combine<D>(p, slot, part, parts, split_tile, tid - 128, o, row_max, row_sum)) {
      finish_rows_sm90<T, D>(p, b, h, row0, lane, o, row_max, row_sum);
    }
    return;
  }

  if (warp < 4) {  // the producer warpgroup: one thread issues the loads; registers go to the consumers
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == 0 && lane == 0) {
      const int kv_head = h / p.kv_group;
      mbar_expect_tx(q_full, Tr::kQBytes);
      tma_load_tile<BM, D / 64>(sQ, &tm_q, q_full, p.q_begin + m0, h, b);
      for (int it = 0; it < n_tiles; ++it) {
        const int s = it % NSTAGE;
        const std::uint32_t phase = static_cast<std::uint32_t>(it / NSTAGE) & 1u;
        const int row = p.kv_begin + (j0 + it) * BN;
        mbar_wait(k_empty(s), phase ^ 1u);
        mbar_expect_tx(k_full(s), Tr::kTileBytes);
        tma_load_tile<BN, D / 64>(sK + s * Tr::kTileBytes, &tm_k, k_full(s), row, kv_head, b);
        mbar_wait(v_empty(s), phase ^ 1u);
        mbar_expect_tx(v_full(s), Tr::kTileBytes);
        tma_load_tile<BN, D / 64>(sV + s * Tr::kTileBytes, &tm_v, v_full(s), row, kv_head, b);
      }
    }
    return;
  }

  // The consumers: warpgroup wg owns rows m0 + 64 wg .. + 63.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int wg = warp / 4 - 1, warp_in_wg = warp % 4;
  const int wg_row = m0 + wg * 64;
  const int row0 = wg_row + warp_in_wg * 16 + lane / 4;  // this thread's rows: row0, row0 + 8

  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.0f;
  float s[NS];
  std::uint32_t a[BN / 16][4];
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f}, correction[2] = {1.0f, 1.0f};

  // This warpgroup's 64 rows of Q as A fragments (one k16 slice each), read from shared memory
  // once: S = Q K^T then reads only K there (32 of the 48 KiB a warpgroup's S MMAs read per
  // tile with Q in shared memory as well). ldmatrix.x4: lane l gives row 8 ((l / 8) % 2) + l % 8
  // of the warp's 16, 16-byte chunk 2 (ks % 4) + l / 16 of atom column ks / 4, swizzled.
  std::uint32_t qa[D / 16][4];
  auto load_q_fragments = [&] {
    const int r = wg * 64 + warp_in_wg * 16 + 8 * ((lane / 8) % 2) + lane % 8;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int chunk = 2 * (ks % 4) + lane / 16;
      ldmatrix_x4(qa[ks], sQ + (ks / 4) * BM * 128 + r * 128 + ((chunk ^ (r % 8)) << 4));
    }
  };
  auto issue_s = [&](int st) {  // S = Q K^T for this warpgroup's rows, stage st
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const std::uint32_t b_addr = sK + st * Tr::kTileBytes + (ks / 4) * BN * 128 + (ks % 4) * 32;
      Wgmma<T, BN>::rs(s, qa[ks], smem_desc_sw128(b_addr, 16, 1024), ks > 0);
    }
  };
  auto issue_pv = [&](int st) {  // O += P V, stage st
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      Wgmma<T, D>::rs_tn(o, a[kk], smem_desc_sw128(sV + st * Tr::kTileBytes + kk * 16 * 128, BN * 128, 1024));
    }
  };
  auto release = [&](std::uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // Tile j's masks and online softmax (shared with flash_fwd_sm90.cuh, lazy); where it moved the
  // maxima (its return value, the same in every lane), correction[] then rescales the output so
  // far once the previous P V has landed.
  auto softmax = [&](int j) {
    return softmax_tile_sm90<BN, kCausal, true>(s, p, j * BN, wg_row, row0, lane, row_max, row_sum,
                                                [&](int hr, float c) { correction[hr] = c; });
  };
  auto rescale_and_pack = [&](bool rescale) {
#pragma unroll
    for (int hr = 0; hr < 2 && rescale; ++hr) {
#pragma unroll
      for (int t = 0; t < D / 8; ++t) {
        o[4 * t + 2 * hr] *= correction[hr];
        o[4 * t + 2 * hr + 1] *= correction[hr];
      }
    }
    pack_p_sm90<T, BN>(a, s);
  };

  mbar_wait(q_full, 0);
  load_q_fragments();
  // The first tile: S, softmax, P.
  mbar_wait(k_full(0), 0);
  wgmma_fence();
  issue_s(0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);
  fence_regs_u32(qa);  // read by the S MMAs until here
  release(k_empty(0));
  rescale_and_pack(softmax(j0));
  for (int it = 1; it < n_tiles; ++it) {
    const int st = it % NSTAGE, prev = (it - 1) % NSTAGE;
    const std::uint32_t phase = static_cast<std::uint32_t>(it / NSTAGE) & 1u;
    const std::uint32_t prev_phase = static_cast<std::uint32_t>((it - 1) / NSTAGE) & 1u;
    mbar_wait(k_full(st), phase);
    mbar_wait(v_full(prev), prev_phase);
    wgmma_fence();  // after the waits' loops (ptxas would insert it: C7519)
    issue_s(st);  // S_j ...
    wgmma_commit();
    issue_pv(prev);  // ... then O += P_{j-1} V_{j-1}, both in flight
    wgmma_commit();
    wgmma_wait<1>();  // S_j has landed; the softmax overlaps the P V MMAs
    fence_regs(s);
    fence_regs_u32(qa);
    release(k_empty(st));
    const bool rescale = softmax(j0 + it);
    wgmma_wait<0>();
    fence_regs(o);
    fence_regs_u32(a);
    release(v_empty(prev));
    rescale_and_pack(rescale);
  }
  const int last = (n_tiles - 1) % NSTAGE;
  mbar_wait(v_full(last), static_cast<std::uint32_t>((n_tiles - 1) / NSTAGE) & 1u);
  wgmma_fence();
  issue_pv(last);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(o);
  fence_regs_u32(a);
  release(v_empty(last));
  if (parts > 1 && !fwd_split_combine<D>(p, slot, part, parts, split_tile, tid - 128, o, row_max, row_sum)) return;
  finish_rows_sm90<T, D>(p, b, h, row0, lane, o, row_max, row_sum);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// TMA's constraints on the tensors: 16-byte aligned bases and strides (8 16-bit elements).
inline bool sm90_ws_supports(const FlashFwdParams& p) {
  return tma_aligned(p.q) && tma_aligned(p.k) && tma_aligned(p.v) && tma_stride_ok(p.q_row_stride) &&
         tma_stride_ok(p.q_head_stride) && tma_stride_ok(p.kv_row_stride) && tma_stride_ok(p.kv_head_stride) &&
         (p.batch <= 1 || (tma_stride_ok(p.q_batch_stride) && tma_stride_ok(p.kv_batch_stride)));
}

// The split of a launch of `units` query tiles of a task `key_tiles` key tiles long, on `sms`
// SMs (one CTA each; "The last wave" above): how many CTAs each of the last `split` tiles
// becomes (parts 1: none). Never more CTAs than p.split_slots, never fewer than 2 key tiles per
// part of the task's longest tile (a part's Q load and its state's store and combine are its
// fixed cost).
struct FwdSplit {
  int parts = 1, split = 0;
};
inline FwdSplit fwd_split_rule(const FlashFwdParams& p, int units, int key_tiles, int sms) {
  FwdSplit s;
  if (p.split_buf == nullptr || p.split_parts == 1 || sms <= 0 || units <= 0) return s;
  if (p.split_parts > 1) {  // forced (tests): the last half of the tiles, a key tile per part at least
    const int split = std::max(1, units / 2);
    if (key_tiles >= p.split_parts && split * p.split_parts <= p.split_slots) s = {p.split_parts, split};
    return s;
  }
  if (2 * units <= sms) {  // all last wave, half of the SMs idle: every tile in k, the most that fit
    for (int k : {2, 4, 8}) {
      if (units * k <= sms && units * k <= p.split_slots && key_tiles >= 2 * k) s = {k, units};
    }
    return s;
  }
  // Causal CTAs differ in length and the launch ends with the shortest: a partial last wave
  // costs little.
  const int r = units % sms;
  if (r == 0 || p.causal) return s;
  // The tail's length in CTA times: 1 unsplit, ceil(r k / W) / k split in k.
  double best = 1.0;
  for (int k : {2, 4, 8}) {
    if (key_tiles < 2 * k || r * k > p.split_slots) continue;
    const double tail = static_cast<double>((r * k + sms - 1) / sms) / k;
    if (tail < best - 1e-9) best = tail, s = {k, r};
  }
  return s;
}

template <class Tr>
void launch_flash_fwd_sm90_ws_traits(const FlashFwdParams& p, cudaStream_t stream) {
  using T = typename Tr::T;
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  const int kv_heads = p.heads / p.kv_group;
  const CUtensorMap tq = make_tile_map<T>(p.q, Tr::kHeadDim, p.q_begin + p.q_len, p.heads, p.batch, p.q_row_stride,
                                          p.q_head_stride, p.q_batch_stride, Tr::kBlockM);
  const CUtensorMap tk = make_tile_map<T>(p.k, Tr::kHeadDim, p.kv_begin + p.kv_len, kv_heads, p.batch, p.kv_row_stride,
                                          p.kv_head_stride, p.kv_batch_stride, Tr::kBlockN);
  const CUtensorMap tv = make_tile_map<T>(p.v, Tr::kHeadDim, p.kv_begin + p.kv_len, kv_heads, p.batch, p.kv_row_stride,
                                          p.kv_head_stride, p.kv_batch_stride, Tr::kBlockN);
  const int m_blocks = (p.q_len + Tr::kBlockM - 1) / Tr::kBlockM;
  const dim3 grid(m_blocks, p.heads, p.batch);
  FwdSplit split;
  if (p.split_buf != nullptr) {
    int device = 0, sms = 0;
    RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
    RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    split = fwd_split_rule(p, m_blocks * p.heads * p.batch, (p.kv_len + Tr::kBlockN - 1) / Tr::kBlockN, sms);
  }
  static const bool configured = [] {  // over 48 KiB of shared memory: opt in once per instantiation
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_sm90_ws_kernel<Tr, true>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_sm90_ws_kernel<Tr, false>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    return true;
  }();
  (void)configured;
  const int units = m_blocks * p.heads * p.batch, split_from = units - split.split;
  const int split_grid = split_from + split.split * split.parts;
  if (p.causal) {
    if (split.parts > 1) {
      flash_fwd_sm90_ws_kernel<Tr, true>
          <<<split_grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, tq, tk, tv, split_from, split.parts);
    } else {
      flash_fwd_sm90_ws_kernel<Tr, true><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, tq, tk, tv, 0, 1);
    }
  } else if (split.parts > 1) {
    flash_fwd_sm90_ws_kernel<Tr, false>
        <<<split_grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, tq, tk, tv, split_from, split.parts);
  } else {
    flash_fwd_sm90_ws_kernel<Tr, false><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, tq, tk, tv, 0, 1);
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kHeadDim>
void launch_flash_fwd_sm90_ws(const FlashFwdParams& p, cudaStream_t stream) {
  launch_flash_fwd_sm90_ws_traits<Sm90WsTraits<T, kHeadDim>>(p, stream);
}

}  // namespace ringattn::detail::flash
