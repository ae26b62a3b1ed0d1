// kernels/cuda/flash_fwd_sm90.cuh: the Hopper (sm_90a) flash forward kernel for one plan task.
//
// Same contract as flash_fwd_kernel.cuh (FlashFwdParams: one task, online softmax in fp32,
// the merge into the running (o_acc, lse) or the direct write fused into the epilogue), built
// on warpgroup MMAs instead of mma.sync:
//  - a CTA of kWarpGroups warpgroups owns 64 query rows per warpgroup; Q stays in shared
//    memory and feeds S = Q K^T as the A operand through a descriptor, so no registers hold Q
//    and no ldmatrix runs in the loop;
//  - K and V tiles of kBlockN keys are loaded with cp.async into 128-byte-swizzled shared
//    memory (the layout wgmma reads), two stages deep: the loads for tile j+2 run while tiles
//    j+1 and j are computed;
//  - S (64 x kBlockN per warpgroup, fp32) is one chain of D/16 wgmma; the softmax runs on
//    the accumulator; P is packed to 16 bits in registers and is the A operand of
//    O += P V (V read transposed from shared memory by the hardware);
//  - rescaling is lazy, as in the warp-specialised kernel (softmax_tile_sm90's kLazy). H100,
//    head dim 64, forward alone, same call: within the noise (16k 391 / 368 TFLOP/s full /
//    causal against 391 / 362, 64k 402-404 / 392-394 against 405 / 393); kept for the one
//    softmax code path, and the head-dim-128 instantiation spills less (36-52 bytes, from 64-68).
// The two MMAs of a warpgroup are asynchronous, so one warpgroup's softmax overlaps the other's
// MMAs on the SM's tensor cores.
//
// Test: tests/gpu/test_flash_fwd.cpp runs it against the fp64 reference on Hopper GPUs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_fwd_params.hpp"
#include "kernels/cuda/wgmma.cuh"

namespace ringattn::detail::flash {

// Defaults measured on an H100 (docs/PERFORMANCE.md, kernel_bench variants 16-18): 64-key
// tiles and two CTAs of two warpgroups per SM beat 128-key tiles at one CTA per SM (more
// warpgroups to overlap one's softmax with another's MMAs), despite a few spilled registers.
template <typename T_, int kHeadDim_, int kBlockN_ = 64, int kWarpGroups_ = 2, int kMinBlocks_ = 2>
struct Sm90Traits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpGroups = kWarpGroups_;
  static constexpr int kMinBlocks = kMinBlocks_;
  static constexpr int kBlockM = 64 * kWarpGroups;
  static constexpr int kThreads = 128 * kWarpGroups;
  static constexpr int kStages = 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKVBytes = kBlockN * kHeadDim * 2;  // one K or one V tile
  // + 1 KiB so that the tiles can be aligned to the swizzle's 1024-byte period.
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kKVBytes + 1024;
  static_assert(kHeadDim % 64 == 0 && kBlockN % 64 == 0, "tiles are whole 64-element swizzle atoms");
  static_assert(kBlockN == 64 || kBlockN == 128, "wgmma wrappers exist for N = 64 and 128");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "wgmma wrappers exist for N = 64 and 128");
};

// Byte offset of (row, 16-byte chunk) in a 128-byte-swizzled tile of kRows rows.
template <int kRows>
__device__ __forceinline__ std::uint32_t sw128_offset(int row, int chunk) {
  return static_cast<std::uint32_t>((chunk >> 3) * kRows * 128 + row * 128 + (((chunk & 7) ^ (row & 7)) << 4));
}

// cp.async of rows [0, kRows) of a (rows, D) global tile into a 128-byte-swizzled tile; rows at
// or past valid_rows are zero-filled.
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile_sw128(std::uint32_t smem, const typename Tr::T* gmem, std::int64_t row_stride,
                                                int valid_rows, int tid) {
  constexpr int kChunks = Tr::kHeadDim / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll
  for (int i = 0; i < (kTotal + Tr::kThreads - 1) / Tr::kThreads; ++i) {
    const int idx = tid + i * Tr::kThreads;
    if (kTotal % Tr::kThreads != 0 && idx >= kTotal) break;
    const int row = idx / kChunks;
    const int chunk = idx % kChunks;
    const bool valid = row < valid_rows;
    const typename Tr::T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem + sw128_offset<kRows>(row, chunk)),
                 "l"(src), "r"(valid ? 16 : 0));
  }
}

// Masks a warpgroup's 64 x BN tile of scores (the wgmma accumulator layout; keys n0 ..
// n0 + BN - 1; this thread's rows row0 and row0 + 8, the warpgroup's first wg_row): keys past
// the block, and with kCausal keys after the query or, for a band, before its window. Then
// the online softmax in log2 units: s becomes the probabilities against the updated row
// maxima, row_sum is rescaled and grows, and rescale(hr, c) is told, per row hr, the factor
// c = 2^(old max - new max) for the output so far. Returns whether it was (see kLazy).
template <int BN, bool kCausal, bool kLazy = false, class Rescale>
__device__ __forceinline__ bool softmax_tile_sm90(float (&s)[BN / 2], const FlashFwdParams& p, int n0, int wg_row,
                                                  int row0, int lane, float (&row_max)[2], float (&row_sum)[2],
                                                  Rescale&& rescale) {
  const bool past_end = n0 + BN > p.kv_len;
  const bool crosses = kCausal && n0 + BN - 1 > wg_row + p.diag_offset;
  const bool crosses_low = kCausal && p.band && n0 < wg_row + 63 + p.lower_offset;
  if (past_end || crosses || crosses_low) {
    const int lower = crosses_low ? p.lower_offset : -(1 << 30);
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) {
      const int row = row0 + ((i % 4) >= 2 ? 8 : 0);
      const int col = n0 + (i / 4) * 8 + (lane % 4) * 2 + (i & 1);
      if (col >= p.kv_len || (kCausal && (col > row + p.diag_offset || col < row + lower))) s[i] = -INFINITY;
    }
  }
  float mx[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    mx[hr] = -INFINITY;
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) mx[hr] = fmaxf(mx[hr], fmaxf(s[4 * t + 2 * hr], s[4 * t + 2 * hr + 1]));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 1));
    mx[hr] = fmaxf(mx[hr], __shfl_xor_sync(0xffffffffu, mx[hr], 2));
    mx[hr] *= p.scale_log2;
  }
  // With kLazy the maxima stay where they are while no row of the warp grows past its own by
  // more than 8 (probabilities up to 2^8, exact all the same: the output and the sum share the
  // base), and the output is rescaled only when one does: the vote makes the branch uniform.
  bool update = true;
  if constexpr (kLazy) update = __any_sync(0xffffffffu, mx[0] > row_max[0] + 8.0f || mx[1] > row_max[1] + 8.0f);
  if (update) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const float new_max = fmaxf(row_max[hr], mx[hr]);
      const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row with no key yet
      const float correction = fast_exp2(row_max[hr] - base);
      row_max[hr] = new_max;
      row_sum[hr] *= correction;
      rescale(hr, correction);
    }
  }
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const float base = row_max[hr] == -INFINITY ? 0.0f : row_max[hr];
    float sum = 0.0f;
#pragma unroll
    for (int t = 0; t < BN / 8; ++t) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float pe = fast_exp2(fmaf(s[4 * t + 2 * hr + e], p.scale_log2, -base));
        s[4 * t + 2 * hr + e] = pe;
        sum += pe;
      }
    }
    row_sum[hr] += sum;
  }
  return update;
}

// P (16-bit) from the probabilities, as the A operand of O += P V: one k16 slice per 16 keys.
template <typename T, int BN>
__device__ __forceinline__ void pack_p_sm90(std::uint32_t (&a)[BN / 16][4], const float (&s)[BN / 2]) {
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    a[kk][0] = pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
    a[kk][1] = pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
    a[kk][2] = pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
    a[kk][3] = pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// The epilogue of a thread's two rows (row0, row0 + 8): the fp32 accumulator has the mma.sync
// layout, so the shared row finisher applies.
template <typename T, int D>
__device__ __forceinline__ void finish_rows_sm90(const FlashFwdParams& p, int b, int h, int row0, int lane,
                                                 const float (&o)[D / 2], const float (&row_max)[2],
                                                 const float (&row_sum)[2]) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    float vals[D / 8][2];
#pragma unroll
    for (int t = 0; t < D / 8; ++t) vals[t][0] = o[4 * t + 2 * hr], vals[t][1] = o[4 * t + 2 * hr + 1];
    finish_row<T, D>(p, b, h, row0 + hr * 8, lane, row_max[hr], row_sum[hr], vals);
  }
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) flash_fwd_sm90_kernel(const FlashFwdParams p) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN;
  constexpr int NS = BN / 2;  // S accumulator registers per thread (64 x BN per warpgroup)
  constexpr int NO = D / 2;   // O accumulator registers per thread
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t smem_base = (static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const std::uint32_t sQ = smem_base;
  const std::uint32_t sK = sQ + Tr::kQBytes;                        // kStages K tiles
  const std::uint32_t sV = sK + Tr::kStages * Tr::kKVBytes;         // kStages V tiles

  const int tid = threadIdx.x, lane = tid % 32;
  const int wg = tid / 128, warp_in_wg = (tid % 128) / 32;
  const CtaTask<T, BM, kCausal> task(p);
  const int m0 = task.m0, h = task.h, b = task.b, n_end = task.n_end;
  const T* q = task.q;
  const T* k = task.k;
  const T* v = task.v;
  const int n_tiles = (n_end + BN - 1) / BN;
  const int j0 = task.n_begin / BN;  // a band's first tile

  auto load_kv = [&](int tile) {
    if (tile < n_tiles) {
      const int n0 = tile * BN;
      const std::uint32_t stage = static_cast<std::uint32_t>(tile % Tr::kStages) * Tr::kKVBytes;
      load_tile_sw128<Tr, BN>(sK + stage, k + static_cast<std::int64_t>(n0) * p.kv_row_stride, p.kv_row_stride, n_end - n0,
                              tid);
      load_tile_sw128<Tr, BN>(sV + stage, v + static_cast<std::int64_t>(n0) * p.kv_row_stride, p.kv_row_stride, n_end - n0,
                              tid);
    }
    asm volatile("cp.async.commit_group;\n" ::);  // one group per tile, empty past the end
  };
  load_tile_sw128<Tr, BM>(sQ, q, p.q_row_stride, p.q_len - m0, tid);
  load_kv(j0);
  load_kv(j0 + 1);

  float o[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) o[i] = 0.0f;
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  // First task-relative query row of this thread's two rows (the second is 8 further).
  const int row0 = m0 + wg * 64 + warp_in_wg * 16 + lane / 4;

  for (int j = j0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    const std::uint32_t stage = static_cast<std::uint32_t>(j % Tr::kStages) * Tr::kKVBytes;
    asm volatile("cp.async.wait_group 1;\n" ::);  // Q and tile j have landed (tile j+1 may not)
    fence_proxy_async();
    __syncthreads();

    // A warpgroup whose rows all precede the tile's first key (causal), or whose bands all
    // start after its last key, has nothing to do.
    const int wg_row = m0 + wg * 64;  // the warpgroup's first row
    if (!kCausal || (n0 <= wg_row + 63 + p.diag_offset && (!p.band || n0 + BN - 1 >= wg_row + p.lower_offset))) {
      // S = Q K_j^T: D/16 k-slices; Q rows of this warpgroup, all BN keys.
      float s[NS];
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const std::uint32_t a_addr = sQ + (ks / 4) * BM * 128 + wg * 64 * 128 + (ks % 4) * 32;
        const std::uint32_t b_addr = sK + stage + (ks / 4) * BN * 128 + (ks % 4) * 32;
        Wgmma<T, BN>::ss(s, smem_desc_sw128(a_addr, 16, 1024), smem_desc_sw128(b_addr, 16, 1024), ks > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(s);

      // Masks, online softmax; the output so far is rescaled by 2^(old max - new max), lazily
      // (only when a row of the warp outgrows its maximum by more than 2^8).
      softmax_tile_sm90<BN, kCausal, true>(s, p, n0, wg_row, row0, lane, row_max, row_sum, [&](int hr, float correction) {
#pragma unroll
        for (int t = 0; t < D / 8; ++t) {
          o[4 * t + 2 * hr] *= correction;
          o[4 * t + 2 * hr + 1] *= correction;
        }
      });

      // O += P V_j: P (16-bit) from registers, one k16 slice per 16 keys.
      std::uint32_t a[BN / 16][4];
      pack_p_sm90<T, BN>(a, s);
      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        Wgmma<T, D>::rs_tn(o, a[kk], smem_desc_sw128(sV + stage + kk * 16 * 128, BN * 128, 1024));
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
    }

    __syncthreads();  // every warpgroup is done with stage j % 2
    load_kv(j + 2);
  }
  asm volatile("cp.async.wait_group 0;\n" ::);

  finish_rows_sm90<T, D>(p, b, h, row0, lane, o, row_max, row_sum);
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: the dispatcher never launches it then
#endif
}

}  // namespace ringattn::detail::flash
