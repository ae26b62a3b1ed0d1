// kernels/cuda/flash_bwd_sm90.cuh: the Hopper (sm_90a) flash backward for one plan task
// (FlashKernel::wgmma in flash_bwd; same contract as flash_bwd_kernel.cuh: FlashBwdParams,
// fp32 accumulators added to, one writer per accumulator row, no atomics, bitwise
// reproducible). On sm_90a the single-pass kernel (flash_bwd_fused_sm90.cuh) is the default;
// this pair serves the ring's separate dq and dkv launches: see cuda_kernels.hpp.
//
// The math is the mma.sync kernels' (P recomputed from lse2, delta = rowsum(dO * O)):
//   dV += P^T dO        dS = P * (dO V^T - delta)        dQ += scale dS K        dK += scale dS^T Q
// and so is the split into two kernels (7 of the 5 necessary matmuls, in exchange for
// determinism without atomics). What changes is how the tensor cores are fed, as in the
// warp-specialised forward (flash_fwd_sm90_ws.cuh):
//  - 384 threads: a producer warp loads tiles with TMA into 128-byte-swizzled shared memory,
//    kStages deep, signalling "full" mbarriers; two consumer warpgroups free a stage by
//    arriving on its "empty" mbarrier (one arrival per consumer warp). setmaxnreg moves
//    registers from the producer warpgroup (40) to the consumers (232).
//  - every product is a warpgroup MMA with operands the hardware reads from shared memory,
//    or, for the probabilities and dS, from registers (the accumulator repacked to 16 bits):
//      dq kernel (a warpgroup = 64 query rows, 64-key tiles):
//        S = Q K^T, dP = dO V^T          ss: Q, dO as A (K-major), K, V as B (K-major)
//        dQ += dS K                      rs: dS from registers, K as B (MN-major)
//      dkv kernel (a warpgroup = 64 keys of one KV head, 64-row query tiles of every query
//      head of the group, so GQA sums stay in registers):
//        S^T = K Q^T, dP^T = V dO^T      ss: K, V as A, Q, dO as B (K-major)
//        dV += P^T dO, dK += dS^T Q      rs: P^T, dS^T from registers, dO, Q as B (MN-major)
//  - the dq kernel overlaps within a warpgroup: the MMAs of S_j and dP_j are issued before
//    dQ += dS_{j-1} K_{j-1}, and dS_j is computed while the latter runs. The dkv kernel holds
//    dK and dV (128 fp32 registers per thread) and relies on its two warpgroups overlapping
//    each other.
// The per-row statistics of the dkv kernel's query tiles (lse2, delta) are staged in shared
// memory by the producer warp's 32 lanes, each arriving on the stage's full barrier after its
// stores (the barrier's release/acquire makes them visible to the consumers); lane 0 raises
// the barrier's transaction count and issues the tiles' TMA loads before those loads. pack_p_sm90
// (flash_fwd_sm90.cuh) turns any 64 x N accumulator into A fragments: P, P^T, dS, dS^T.
//
// Test: tests/gpu/test_flash_bwd.cpp (against the fp64 reference; ctest -L gpu).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_bwd_params.hpp"
#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_fwd_sm90.cuh"
#include "kernels/cuda/tma.cuh"
#include "kernels/cuda/wgmma.cuh"

namespace ringattn::detail::flash {

template <typename T_, int kHeadDim_>
struct Sm90BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kAtoms = kHeadDim / 64;  // 64-column atom columns of a row
  static constexpr int kThreads = 384;           // a producer warpgroup + 2 consumer warpgroups
  static constexpr int kStages = 3;
  static constexpr int kRowBytes = kHeadDim * 2;
  // dq kernel: 128 query rows per CTA, 64-key tiles.
  static constexpr int kDqRows = 128;
  static constexpr int kDqBlockN = 64;
  // dkv kernel: 128 keys per CTA, 64-row query tiles.
  static constexpr int kDkvKeys = 128;
  static constexpr int kDkvBlockQ = 64;
  // Resident tiles (Q and dO, or K and V), kStages streamed pairs, 1 KiB of alignment slack,
  // the mbarriers (one for the resident pair, full and empty per stage), and for the dkv kernel
  // the staged statistics.
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages);
  static constexpr int kDqSmem = 2 * kDqRows * kRowBytes + kStages * 2 * kDqBlockN * kRowBytes + 1024 + kBarrierBytes;
  static constexpr int kDkvSmem = 2 * kDkvKeys * kRowBytes + kStages * 2 * kDkvBlockQ * kRowBytes + 1024 +
                                  kBarrierBytes + kStages * 2 * kDkvBlockQ * static_cast<int>(sizeof(float));
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma wrappers exist for N = 64 and 128");
  static_assert(kDqBlockN == 64 && kDkvBlockQ == 64, "the S tiles are m64n64 MMAs");
  static_assert(kDqSmem <= 227 * 1024 && kDkvSmem <= 227 * 1024, "an H100/H200 CTA has at most 227 KiB");
};

// acc rows row0 and row0 + 8 (this thread's two accumulator rows) += factor * frag, for rows
// below `valid`; row_ptr(r) is row r's first fp32 element.
// store: overwrite instead (acc = factor * frag).
// The thread's 2 x D / 8 loads are all issued before its first store: a load after a store
// through a pointer that may alias it cannot be hoisted, so load, add, store in turn waited out
// the round trips one by one (inferred, not read off the SASS: the single-pass backward's
// epilogue, dK then dV, took ~45,000 cycles per CTA, 22% of a CTA at S = 2048 on an H100, and
// this order made P = 1 fwd+bwd 17% faster there).
template <int D, class RowPtr>
__device__ __forceinline__ void add_acc_rows_sm90(const float (&frag)[D / 2], int row0, int valid, float factor, int lane,
                                                  RowPtr row_ptr, bool store = false) {
  float2* dst[2];
  float2 cur[2][D / 8];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    dst[hr] = reinterpret_cast<float2*>(row_ptr(row0 + hr * 8) + (lane % 4) * 2);
    const bool load = !store && row0 + hr * 8 < valid;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) cur[hr][t] = load ? dst[hr][t * 4] : make_float2(0.0f, 0.0f);
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    if (row0 + hr * 8 >= valid) continue;
#pragma unroll
    for (int t = 0; t < D / 8; ++t) {
      cur[hr][t].x = fmaf(frag[4 * t + 2 * hr], factor, cur[hr][t].x);
      cur[hr][t].y = fmaf(frag[4 * t + 2 * hr + 1], factor, cur[hr][t].y);
      dst[hr][t * 4] = cur[hr][t];
    }
  }
}

// S = A B^T for a 64-row slice of A (a tile of kRowsA rows, starting at row a_row) and all
// BN rows of B (a tile of BN rows), both K-major over D, 128-byte swizzled.
// kStepA = false rebuilds A's descriptors from their addresses (the single-pass backward's
// full-mask kernel at head dim 128: stepped, they made ptxas spill 16 bytes there).
template <typename T, int D, int kRowsA, int BN, bool kStepA = true>
__device__ __forceinline__ void issue_abt_sm90(float (&s)[BN / 2], std::uint32_t sA, int a_row, std::uint32_t sB) {
  const SmemDescSw128 da(sA + a_row * 128, 16, 1024), db(sB, 16, 1024);
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const std::uint32_t a_off = (ks / 4) * kRowsA * 128 + (ks % 4) * 32;
    Wgmma<T, BN>::ss(s, kStepA ? da.at(a_off) : smem_desc_sw128(sA + a_row * 128 + a_off, 16, 1024),
                     db.at((ks / 4) * BN * 128 + (ks % 4) * 32), ks > 0);
  }
}

// acc (64 x D) += X B: X (64 x kInner) as A fragments, B a tile of kInner rows x D, read
// MN-major (transposed) by the hardware.
template <typename T, int D, int kInner>
__device__ __forceinline__ void issue_xb_sm90(float (&acc)[D / 2], const std::uint32_t (&x)[kInner / 16][4],
                                              std::uint32_t sB) {
  const SmemDescSw128 db(sB, kInner * 128, 1024);
#pragma unroll
  for (int kk = 0; kk < kInner / 16; ++kk) Wgmma<T, D>::rs_tn(acc, x[kk], db.at(kk * 16 * 128));
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_dq_sm90_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap tm_q,
                             const __grid_constant__ CUtensorMap tm_do, const __grid_constant__ CUtensorMap tm_k,
                             const __grid_constant__ CUtensorMap tm_v) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kDqRows, BN = Tr::kDqBlockN, NST = Tr::kStages;
  constexpr int NS = BN / 2, NO = D / 2;
  constexpr int kRowsBytes = BM * Tr::kRowBytes, kTile = BN * Tr::kRowBytes;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t sQ = (static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const std::uint32_t sdO = sQ + kRowsBytes;
  const std::uint32_t sK = sdO + kRowsBytes;  // NST stages of K, then NST of V
  const std::uint32_t sV = sK + NST * kTile;
  const std::uint32_t bars = sV + NST * kTile;
  const std::uint32_t q_full = bars;
  auto kv_full = [&](int s) { return bars + 8u * (1 + s); };
  auto kv_empty = [&](int s) { return bars + 8u * (1 + NST + s); };

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // long causal rows first
  const int m0 = m_block * BM, h = blockIdx.y, b = blockIdx.z;
  int n_begin = 0, n_end = p.kv_len;
  if constexpr (kCausal) {
    n_end = min(n_end, m0 + BM + p.diag_offset);
    if (p.band) n_begin = max(0, m0 + p.lower_offset);  // key tiles before the band are skipped
  }
  const int j0 = n_begin / BN;
  const int n_tiles = n_end > n_begin ? (n_end + BN - 1) / BN - j0 : 0;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < NST; ++s) {
      mbar_init(kv_full(s), 1);
      mbar_init(kv_empty(s), 8);  // one arrival per consumer warp
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  if (n_tiles <= 0) return;  // no row of this CTA sees a key of the task

  if (warp < 4) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == 0 && lane == 0) {
      const int kv_head = h / p.kv_group;
      mbar_expect_tx(q_full, 2 * kRowsBytes);
      tma_load_tile<BM, Tr::kAtoms>(sQ, &tm_q, q_full, p.q_begin + m0, h, b);
      tma_load_tile<BM, Tr::kAtoms>(sdO, &tm_do, q_full, p.q_begin + m0, h, b);
      for (int it = 0; it < n_tiles; ++it) {
        const int s = it % NST;
        const std::uint32_t phase = static_cast<std::uint32_t>(it / NST) & 1u;
        const int row = p.kv_begin + (j0 + it) * BN;
        mbar_wait(kv_empty(s), phase ^ 1u);
        mbar_expect_tx(kv_full(s), 2 * kTile);
        tma_load_tile<BN, Tr::kAtoms>(sK + s * kTile, &tm_k, kv_full(s), row, kv_head, b);
        tma_load_tile<BN, Tr::kAtoms>(sV + s * kTile, &tm_v, kv_full(s), row, kv_head, b);
      }
    }
    return;
  }

  // The consumers: warpgroup wg owns query rows m0 + 64 wg .. + 63.
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int wg = warp / 4 - 1, warp_in_wg = warp % 4;
  const int wg_row = m0 + wg * 64;
  const int row0 = wg_row + warp_in_wg * 16 + lane / 4;  // this thread's rows: row0, row0 + 8
  const std::int64_t stat_base = (static_cast<std::int64_t>(b) * p.heads + h) * p.s_q + p.q_begin;
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + hr * 8;
    lse2[hr] = r < p.q_len ? p.lse2[stat_base + r] : INFINITY;  // +inf: P = 0
    delta[hr] = r < p.q_len ? p.delta[stat_base + r] : 0.0f;
  }

  float dq[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) dq[i] = 0.0f;
  float s[NS], dp[NS];
  std::uint32_t a[BN / 16][4];

  auto issue_s_dp = [&](int st) {
    issue_abt_sm90<T, D, BM, BN>(s, sQ, wg * 64, sK + st * kTile);
    issue_abt_sm90<T, D, BM, BN>(dp, sdO, wg * 64, sV + st * kTile);
  };
  // dS of tile j into s: P from the scores (masked: keys past the block, and with kCausal keys
  // after the row or before its band), times dP - delta.
  // (The mask is a block of its own after the exponentials, as in dkv_step_sm90: tests inside
  // the loop are predicated and paid on every tile.)
  auto compute_ds = [&](int j) {
    const int n0 = j * BN;
    const bool crosses_low = kCausal && p.band && n0 < wg_row + 63 + p.lower_offset;
    const bool masked = n0 + BN > p.kv_len || (kCausal && n0 + BN - 1 > wg_row + p.diag_offset) || crosses_low;
#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] = fast_exp2(fmaf(s[i], p.scale_log2, -lse2[(i % 4) >= 2 ? 1 : 0]));
    if (masked) {
      const int lower = crosses_low ? p.lower_offset : -(1 << 30);
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const int row = row0 + ((i % 4) >= 2 ? 8 : 0);
        const int col = n0 + (i / 4) * 8 + (lane % 4) * 2 + (i & 1);
        if (col >= p.kv_len || (kCausal && (col > row + p.diag_offset || col < row + lower))) s[i] = 0.0f;
      }
    }
#pragma unroll
    for (int i = 0; i < NS; ++i) s[i] *= dp[i] - delta[(i % 4) >= 2 ? 1 : 0];
  };
  auto release = [&](std::uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  mbar_wait(q_full, 0);
  mbar_wait(kv_full(0), 0);
  wgmma_fence();
  issue_s_dp(0);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(s);
  fence_regs(dp);
  compute_ds(j0);
  pack_p_sm90<T, BN>(a, s);
  for (int it = 1; it < n_tiles; ++it) {
    const int st = it % NST, prev = (it - 1) % NST;
    mbar_wait(kv_full(st), static_cast<std::uint32_t>(it / NST) & 1u);
    wgmma_fence();
    issue_s_dp(st);  // S_j and dP_j ...
    wgmma_commit();
    issue_xb_sm90<T, D, BN>(dq, a, sK + prev * kTile);  // ... then dQ += dS_{j-1} K_{j-1}
    wgmma_commit();
    wgmma_wait<1>();  // S_j and dP_j have landed; dS_j overlaps the dQ MMAs
    fence_regs(s);
    fence_regs(dp);
    compute_ds(j0 + it);
    wgmma_wait<0>();
    fence_regs(dq);
    fence_regs_u32(a);
    release(kv_empty(prev));
    pack_p_sm90<T, BN>(a, s);
  }
  const int last = (n_tiles - 1) % NST;
  wgmma_fence();
  issue_xb_sm90<T, D, BN>(dq, a, sK + last * kTile);
  wgmma_commit();
  wgmma_wait<0>();
  fence_regs(dq);
  fence_regs_u32(a);
  release(kv_empty(last));

  float* dq_base = p.dq + stat_base * D;
  add_acc_rows_sm90<D>(dq, row0, p.q_len, p.scale, lane,
                       [&](int r) { return dq_base + static_cast<std::int64_t>(r) * D; });
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: the dispatcher never launches it then
#endif
}

// The dkv walk of a CTA of BN keys from task key n0: the query tiles it visits are
// [dkv_first_tile, dkv_first_tile + dkv_tile_count) (BQ rows each), for every query head of
// its group. Causal: row m sees key n iff n <= m + diag_offset, so rows before n0 - diag_offset
// see none of its keys; with a band, rows after n0 + BN - 1 - lower_offset see none either.
// (The single-pass kernel's semaphore counts rely on dkv_first_tile growing with n0.)
template <bool kCausal, int BQ>
__device__ __forceinline__ int dkv_first_tile(const FlashBwdParams& p, int n0) {
  return kCausal ? max(0, n0 - p.diag_offset) / BQ : 0;
}
template <bool kCausal, int BN, int BQ>
__device__ __forceinline__ int dkv_tile_count(const FlashBwdParams& p, int n0) {
  const int m_end = kCausal && p.band ? min(p.q_len, n0 + BN - p.lower_offset) : p.q_len;
  return (m_end + BQ - 1) / BQ - dkv_first_tile<kCausal, BQ>(p, n0);
}

// The dkv walk's mbarriers at `bars` (thread 0, before a __syncthreads): kv_full, then NST
// full barriers (the producer warp's 32 lanes arrive) and NST empty ones (one arrival per
// consumer warp).
template <int NST>
__device__ __forceinline__ void init_dkv_barriers_sm90(std::uint32_t bars) {
  mbar_init(bars, 1);
  for (int s = 0; s < NST; ++s) {
    mbar_init(bars + 8u * (1 + s), 32);
    mbar_init(bars + 8u * (1 + NST + s), 8);
  }
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The walk's end: this thread's dK (times the softmax scale) and dV rows key0 and key0 + 8
// (task-relative) added to the block's fp32 sums, rows below kv_len.
template <int D>
__device__ __forceinline__ void add_dkv_sums_sm90(const FlashBwdParams& p, const float (&dk)[D / 2],
                                                  const float (&dv)[D / 2], int b, int kvh, int key0, int lane,
                                                  bool store = false) {
  const std::int64_t acc_base = ((static_cast<std::int64_t>(b) * p.kv_heads + kvh) * p.acc_len + p.kv_begin) * D;
  add_acc_rows_sm90<D>(
      dk, key0, p.kv_len, p.scale, lane, [&](int r) { return p.dk + acc_base + static_cast<std::int64_t>(r) * D; },
      store);
  add_acc_rows_sm90<D>(
      dv, key0, p.kv_len, 1.0f, lane, [&](int r) { return p.dv + acc_base + static_cast<std::int64_t>(r) * D; },
      store);
}

// dK and dV rows n0 .. n0 + rows - 1 (task-relative) of (batch b, kv head kvh) <- 0, by all
// `threads` threads: a store-mode CTA whose keys no query of the task sees.
template <int D>
__device__ __forceinline__ void zero_dkv_rows_sm90(const FlashBwdParams& p, int b, int kvh, int n0, int rows, int tid,
                                                   int threads) {
  const std::int64_t base = ((static_cast<std::int64_t>(b) * p.kv_heads + kvh) * p.acc_len + p.kv_begin + n0) * D;
  const int n = max(0, min(rows, p.kv_len - n0)) * D / 4;
  for (int i = tid; i < n; i += threads) {
    reinterpret_cast<float4*>(p.dk + base)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    reinterpret_cast<float4*>(p.dv + base)[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// The dkv walk's loads, by one producer warp: K and V of the CTA's BN keys once (kv_full,
// the mbarrier at `bars`), then for each iteration `it` the Q and dO tiles of query head
// kvh * group + tile_of(it).x, rows from tile_of(it).y, into stage it % NST (full barrier
// bars + 8 (1 + stage), empty bars + 8 (1 + NST + stage)), with their per-row statistics in
// s_lse2 / s_delta. Lane 0 raises the stage's transaction count and issues the loads before
// any arrival; each lane then arrives after its own statistics stores.
template <class Tr, int BN, int BQ, class TileOf>
__device__ __forceinline__ void load_dkv_tiles_sm90(const FlashBwdParams& p, const CUtensorMap* tm_q,
                                                    const CUtensorMap* tm_do, const CUtensorMap* tm_k,
                                                    const CUtensorMap* tm_v, std::uint32_t sK, std::uint32_t sV,
                                                    std::uint32_t sQ, std::uint32_t sdO, std::uint32_t bars,
                                                    float* s_lse2, float* s_delta, int n0, int kvh, int b, int iters,
                                                    int lane, TileOf tile_of) {
  constexpr int NST = Tr::kStages, kKeysBytes = BN * Tr::kRowBytes, kTile = BQ * Tr::kRowBytes;
  const std::uint32_t kv_full = bars;
  if (lane == 0) {
    mbar_expect_tx(kv_full, 2 * kKeysBytes);
    tma_load_tile<BN, Tr::kAtoms>(sK, tm_k, kv_full, p.kv_begin + n0, kvh, b);
    tma_load_tile<BN, Tr::kAtoms>(sV, tm_v, kv_full, p.kv_begin + n0, kvh, b);
  }
  for (int it = 0; it < iters; ++it) {
    const int s = it % NST;
    const std::uint32_t phase = static_cast<std::uint32_t>(it / NST) & 1u;
    const std::uint32_t full = bars + 8u * (1 + s), empty = bars + 8u * (1 + NST + s);
    const int2 tile = tile_of(it);
    const int hq = kvh * p.kv_group + tile.x, m0 = tile.y;
    mbar_wait(empty, phase ^ 1u);
    if (lane == 0) {
      mbar_expect_tx_only(full, 2 * kTile);
      tma_load_tile<BQ, Tr::kAtoms>(sQ + s * kTile, tm_q, full, p.q_begin + m0, hq, b);
      tma_load_tile<BQ, Tr::kAtoms>(sdO + s * kTile, tm_do, full, p.q_begin + m0, hq, b);
    }
    const std::int64_t stat = (static_cast<std::int64_t>(b) * p.heads + hq) * p.s_q + p.q_begin + m0;
    for (int i = lane; i < BQ; i += 32) {
      const bool valid = m0 + i < p.q_len;
      s_lse2[s * BQ + i] = valid ? p.lse2[stat + i] : INFINITY;  // +inf: P = 0
      s_delta[s * BQ + i] = valid ? p.delta[stat + i] : 0.0f;
    }
    mbar_arrive(full);
  }
}

// One query tile of the dkv walk for warpgroup wg (keys key_wg .. key_wg + 63 of a CTA of BN
// keys; this thread's key0 and key0 + 8) and the BQ-row tile at m0 (l_tile, d_tile: its lse2
// and delta): S^T = K Q^T and dP^T = V dO^T; P^T (masked by the task) while the dP^T MMAs
// run; dS^T = P^T * (dP^T - delta); both packed into ap and ads, and dV += P^T dO and
// dK += dS^T Q issued as one group, left in flight (the caller waits; ap and ads stay live
// until then). With kDkByCaller only dV is issued: the single-pass kernel issues dK itself,
// after its dQ MMAs, and stores dQ while dK's run (register A, so they leave shared memory
// half idle; before, the store ran under the next tile's S^T MMAs, which read shared memory
// at its full rate: H100, 64k causal fwd+bwd 497-500 -> 504-511 TFLOP/s, full unchanged).
// Measured and dropped (H100, 64k): issuing dV as soon as P^T is packed, so that it runs
// while dS^T is computed (-1.5% full, -1% causal; with dK issued by the caller as well it
// spills: P^T in fp32 and packed, and dP^T, live at once); the causal mask as two thresholds
// per element (3 unpredicated instructions each, on every tile: nothing gained; the mask's
// own block below is what cut most of it).
template <typename T, int D, int BN, int BQ, bool kCausal, bool kDkByCaller = false>
__device__ __forceinline__ void dkv_step_sm90(float (&dk)[D / 2], float (&dv)[D / 2], std::uint32_t (&ap)[BQ / 16][4],
                                              std::uint32_t (&ads)[BQ / 16][4], const FlashBwdParams& p,
                                              std::uint32_t sK, std::uint32_t sV, std::uint32_t q_tile,
                                              std::uint32_t do_tile, const float* l_tile, const float* d_tile, int wg,
                                              int key_wg, int key0, int m0, int lane) {
  float s[BQ / 2], dp[BQ / 2];
  wgmma_fence();
  constexpr bool kStepA = kCausal || D != 128;
  issue_abt_sm90<T, D, BN, BQ, kStepA>(s, sK, wg * 64, q_tile);  // S^T = K Q^T (callers leave no group in flight)
  wgmma_commit();
  issue_abt_sm90<T, D, BN, BQ, kStepA>(dp, sV, wg * 64, do_tile);  // dP^T = V dO^T
  wgmma_commit();
  wgmma_wait<1>();  // S^T has landed; P^T overlaps the dP^T MMAs
  fence_regs(s);
  float2 d2[BQ / 8];  // delta, read here: after the mask's branch its loads would wait on their latency
#pragma unroll
  for (int t = 0; t < BQ / 8; ++t) d2[t] = *reinterpret_cast<const float2*>(d_tile + t * 8 + (lane % 4) * 2);
#pragma unroll
  for (int t = 0; t < BQ / 8; ++t) {
    const float2 l2 = *reinterpret_cast<const float2*>(l_tile + t * 8 + (lane % 4) * 2);
    // At head dim 128 a quarter of the exponentials run on the FMA pipe (poly_exp2): MUFU does
    // 16 per clock per SM, 512 cycles of a tile's ~4,200 when both warpgroups get here at once.
    // H100, fused kernel, 64k fwd+bwd: +1.5% full, +0.7% causal (half of them: -4.5%, the FMA
    // pipe then the busier one); at head dim 64 the pair lost 4% with it, so it keeps MUFU only.
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float x = fmaf(s[4 * t + e], p.scale_log2, -((e & 1) ? l2.y : l2.x));
      s[4 * t + e] = D == 128 && e == 3 ? poly_exp2(x) : fast_exp2(x);
    }
  }
  if constexpr (kCausal) {
    // The mask, on the few tiles the diagonal or the band's lower edge crosses, as a block of
    // its own after the exponentials (a real branch in the SASS): with the tests inside the loop
    // above, ptxas predicated them and every tile paid for them. A warpgroup whose keys all
    // follow the tile's rows (or precede its band) gets P = 0 here and adds zeros, where the
    // callers used to branch around the whole step. Single-pass kernel, H100, 16k causal,
    // consumer cycles per tile (globaltimer/clock64 probes): 4,790 before, 4,524 with no mask
    // code at all, 4,281 without the branch as well, 4,477 as here; a full tile 4,180.
    // The condition is the same in every lane, but ptxas cannot tell (it depends on the warp
    // index): a plain `if` made a divergent branch, its BSSY/BSYNC region spanning the S^T and
    // dP^T issue and the exponentials. Through a vote it is a uniform branch, no reconvergence
    // region (cuobjdump). H100, 64k causal fwd+bwd, three runs each, same call: 526.2-528.0
    // against 518.4-527.2 TFLOP/s; 16k causal 520.1 against 511.9; full unchanged.
    const bool crosses = key_wg + 63 > m0 + p.diag_offset;
    const bool crosses_low = p.band && key_wg < m0 + BQ - 1 + p.lower_offset;
    if (__any_sync(0xffffffffu, crosses || crosses_low)) {
      const int lower = crosses_low ? p.lower_offset : -(1 << 30);
#pragma unroll
      for (int t = 0; t < BQ / 8; ++t) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = key0 + (e >= 2 ? 8 : 0);
          const int row = m0 + t * 8 + (lane % 4) * 2 + (e & 1);
          if (key > row + p.diag_offset || key < row + lower) s[4 * t + e] = 0.0f;
        }
      }
    }
  }
  wgmma_wait<0>();  // dP^T has landed
  fence_regs(dp);
#pragma unroll
  for (int t = 0; t < BQ / 8; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[4 * t + e] = s[4 * t + e] * (dp[4 * t + e] - ((e & 1) ? d2[t].y : d2[t].x));  // dS^T
  }
  pack_p_sm90<T, BQ>(ap, s);
  pack_p_sm90<T, BQ>(ads, dp);
  fence_regs(dv);
  fence_regs(dk);
  wgmma_fence();
  issue_xb_sm90<T, D, BQ>(dv, ap, do_tile);  // dV += P^T dO
  if constexpr (!kDkByCaller) issue_xb_sm90<T, D, BQ>(dk, ads, q_tile);  // dK += dS^T Q
  wgmma_commit();
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_dkv_sm90_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap tm_q,
                              const __grid_constant__ CUtensorMap tm_do, const __grid_constant__ CUtensorMap tm_k,
                              const __grid_constant__ CUtensorMap tm_v) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BN = Tr::kDkvKeys, BQ = Tr::kDkvBlockQ, NST = Tr::kStages;
  constexpr int NO = D / 2;
  constexpr int kKeysBytes = BN * Tr::kRowBytes, kTile = BQ * Tr::kRowBytes;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t smem_u32_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  const std::uint32_t pad = ((smem_u32_base + 1023u) & ~1023u) - smem_u32_base;
  const std::uint32_t sK = smem_u32_base + pad;
  const std::uint32_t sV = sK + kKeysBytes;
  const std::uint32_t sQ = sV + kKeysBytes;  // NST stages of Q, then NST of dO
  const std::uint32_t sdO = sQ + NST * kTile;
  const std::uint32_t bars = sdO + NST * kTile;
  const std::uint32_t kv_full = bars;
  auto qdo_full = [&](int s) { return bars + 8u * (1 + s); };
  auto qdo_empty = [&](int s) { return bars + 8u * (1 + NST + s); };
  // NST stages of lse2, then NST of delta, BQ floats each (generic addressing).
  float* s_lse2 = reinterpret_cast<float*>(smem_raw + pad + (bars + Tr::kBarrierBytes - sK));
  float* s_delta = s_lse2 + NST * BQ;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n0 = blockIdx.x * BN, kvh = blockIdx.y, b = blockIdx.z;
  const int m_first = dkv_first_tile<kCausal, BQ>(p, n0);
  const int q_tiles = dkv_tile_count<kCausal, BN, BQ>(p, n0);
  const int iters = q_tiles > 0 ? q_tiles * p.kv_group : 0;

  if (tid == 0) init_dkv_barriers_sm90<NST>(bars);
  __syncthreads();
  if (iters <= 0) return;  // no row of the task sees a key of this CTA

  if (warp < 4) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp != 0) return;
    load_dkv_tiles_sm90<Tr, BN, BQ>(p, &tm_q, &tm_do, &tm_k, &tm_v, sK, sV, sQ, sdO, bars, s_lse2, s_delta, n0, kvh, b,
                                    iters, lane,
                                    [&](int it) { return make_int2(it / q_tiles, (m_first + it % q_tiles) * BQ); });
    return;
  }

  // The consumers: warpgroup wg owns keys n0 + 64 wg .. + 63 (task-relative).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int wg = warp / 4 - 1, warp_in_wg = warp % 4;
  const int key_wg = n0 + wg * 64;
  const int key0 = key_wg + warp_in_wg * 16 + lane / 4;  // this thread's keys: key0, key0 + 8

  float dk[NO], dv[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) dk[i] = dv[i] = 0.0f;

  mbar_wait(kv_full, 0);
  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = (m_first + it % q_tiles) * BQ;
    mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u);
    {  // (a warpgroup that sees none of the tile adds zeros: dkv_step_sm90's mask)
      const std::uint32_t q_tile = sQ + st * kTile, do_tile = sdO + st * kTile;
      std::uint32_t ap[BQ / 16][4], ads[BQ / 16][4];
      dkv_step_sm90<T, D, BN, BQ, kCausal>(dk, dv, ap, ads, p, sK, sV, q_tile, do_tile, s_lse2 + st * BQ,
                                           s_delta + st * BQ, wg, key_wg, key0, m0, lane);
      wgmma_wait<0>();
      fence_regs(dv);
      fence_regs(dk);
      fence_regs_u32(ap);
      fence_regs_u32(ads);
    }
    __syncwarp();
    if (lane == 0) mbar_arrive(qdo_empty(st));
  }

  add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

// --- host side ---

// TMA's constraints (16-byte aligned bases, strides multiples of 8 elements) for q, dout, k, v.
inline bool sm90_bwd_supports(const FlashBwdParams& p) {
  return tma_aligned(p.q) && tma_aligned(p.dout) && tma_aligned(p.k) && tma_aligned(p.v) &&
         tma_stride_ok(p.q_row_stride) && tma_stride_ok(p.q_head_stride) && tma_stride_ok(p.do_row_stride) &&
         tma_stride_ok(p.do_head_stride) && tma_stride_ok(p.kv_row_stride) && tma_stride_ok(p.kv_head_stride) &&
         (p.batch <= 1 || (tma_stride_ok(p.q_batch_stride) && tma_stride_ok(p.do_batch_stride) &&
                           tma_stride_ok(p.kv_batch_stride)));
}

template <class Tr>
void launch_flash_bwd_sm90_traits(const FlashBwdParams& p, cudaStream_t stream, bool dq, bool dkv) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  static const bool configured = [] {  // over 48 KiB of shared memory: opt in once per instantiation
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dq_sm90_kernel<Tr, true>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDqSmem));
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dq_sm90_kernel<Tr, false>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDqSmem));
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dkv_sm90_kernel<Tr, true>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDkvSmem));
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_dkv_sm90_kernel<Tr, false>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kDkvSmem));
    return true;
  }();
  (void)configured;
  const std::int64_t q_rows = p.q_begin + p.q_len, kv_rows = p.kv_begin + p.kv_len;
  // The tensor maps of one kernel: its resident and streamed tiles differ in rows per box.
  auto maps = [&](int q_box, int kv_box) {
    struct {
      CUtensorMap q, dout, k, v;
    } m{make_tile_map<T>(p.q, D, q_rows, p.heads, p.batch, p.q_row_stride, p.q_head_stride, p.q_batch_stride, q_box),
        make_tile_map<T>(p.dout, D, q_rows, p.heads, p.batch, p.do_row_stride, p.do_head_stride, p.do_batch_stride,
                         q_box),
        make_tile_map<T>(p.k, D, kv_rows, p.kv_heads, p.batch, p.kv_row_stride, p.kv_head_stride, p.kv_batch_stride,
                         kv_box),
        make_tile_map<T>(p.v, D, kv_rows, p.kv_heads, p.batch, p.kv_row_stride, p.kv_head_stride, p.kv_batch_stride,
                         kv_box)};
    return m;
  };
  if (dq) {
    const auto m = maps(Tr::kDqRows, Tr::kDqBlockN);
    const dim3 grid((p.q_len + Tr::kDqRows - 1) / Tr::kDqRows, p.heads, p.batch);
    if (p.causal) {
      flash_bwd_dq_sm90_kernel<Tr, true><<<grid, Tr::kThreads, Tr::kDqSmem, stream>>>(p, m.q, m.dout, m.k, m.v);
    } else {
      flash_bwd_dq_sm90_kernel<Tr, false><<<grid, Tr::kThreads, Tr::kDqSmem, stream>>>(p, m.q, m.dout, m.k, m.v);
    }
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  }
  if (dkv) {
    const auto m = maps(Tr::kDkvBlockQ, Tr::kDkvKeys);
    const dim3 grid((p.kv_len + Tr::kDkvKeys - 1) / Tr::kDkvKeys, p.kv_heads, p.batch);
    if (p.causal) {
      flash_bwd_dkv_sm90_kernel<Tr, true><<<grid, Tr::kThreads, Tr::kDkvSmem, stream>>>(p, m.q, m.dout, m.k, m.v);
    } else {
      flash_bwd_dkv_sm90_kernel<Tr, false><<<grid, Tr::kThreads, Tr::kDkvSmem, stream>>>(p, m.q, m.dout, m.k, m.v);
    }
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  }
}

template <typename T, int kHeadDim>
void launch_flash_bwd_sm90(const FlashBwdParams& p, cudaStream_t stream, bool dq, bool dkv) {
  launch_flash_bwd_sm90_traits<Sm90BwdTraits<T, kHeadDim>>(p, stream, dq, dkv);
}

}  // namespace ringattn::detail::flash
