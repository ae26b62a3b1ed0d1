// kernels/cuda/flash_fwd_kernel.cuh: native flash-attention forward for one plan task.
//
// Computes, for query rows [q_begin, q_begin + q_len) against key rows [kv_begin, kv_begin +
// kv_len) of the held block, softmax(scale * Q K^T) V with a running max and sum in fp32 (one
// pass over the keys), then merges the block result into the rank's running (o_acc, lse):
//   lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|))
//   o'   = o * exp(lse - lse') + o_b * exp(lse_b - lse')
// Shapes: q (B, S_q, H, D); k, v (B, S_kv, H_kv, D); o_acc (B, H, S_q, D) fp32; lse (B, H, S_q).
//
// Structure (flash-attention 2): a CTA of 4 warps owns 128 query rows (32 per warp, two m16
// tiles, so every K/V fragment read from shared memory feeds two MMAs). Q stays in shared
// memory; K and V tiles of 64 keys are loaded with cp.async so that V's load overlaps
// S = Q K^T and the next K's load overlaps O += P V. Tensor cores via mma.sync.m16n8k16
// (bf16/fp16 in, fp32 accumulate) fed by ldmatrix from XOR-swizzled shared memory (16-byte
// chunk c of row r lives at chunk c ^ (r % 8): conflict-free for ldmatrix and cp.async).
// P never leaves registers: the S accumulator's layout is the A operand's layout of the
// next MMA once packed to 16 bits.
//
// Test: tests/gpu/test_flash_fwd.cu (ctest -L gpu on a machine with a GPU).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/flash_common.cuh"
#include "kernels/cuda/flash_fwd_params.hpp"

namespace ringattn::detail::flash {

// Tile shape: kWarps warps, each owning kMTiles m16 tiles of query rows; kBlockN keys per
// tile.
// Defaults, measured on an H100 (docs/PERFORMANCE.md, kernel_bench --variant): head dim 128
// holds Q in registers with one m16 tile per warp (64-row CTAs); head dim 64 reuses K/V
// fragments over two m16 tiles per warp (128-row CTAs).
template <typename T_, int kHeadDim_, int kBlockN_ = 64, int kMTiles_ = (kHeadDim_ >= 128 ? 1 : 2), int kWarps_ = 4,
          bool kQInRegs_ = (kHeadDim_ >= 128), int kMinBlocks_ = 1, bool kFusedMerge_ = true>
struct FwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockN = kBlockN_;  // keys per tile
  static constexpr int kWarps = kWarps_;
  static constexpr int kMTiles = kMTiles_;  // m16 tiles per warp: K/V fragments feed kMTiles MMAs
  static constexpr int kBlockM = 16 * kMTiles * kWarps;  // query rows per CTA
  // Hold the warp's Q fragments in registers for the whole loop instead of re-reading them
  // from shared memory for every key tile (costs kMTiles * kHeadDim / 4 registers).
  static constexpr bool kQInRegs = kQInRegs_;
  // CTAs per SM to budget registers for (__launch_bounds__): more hides latency, fewer spills.
  static constexpr int kMinBlocks = kMinBlocks_;
  // Merge into the running (o_acc, lse) in the epilogue. Without it the epilogue overwrites
  // o_acc and lse with this block's normalised result (for a separate merge kernel; the
  // alternative kernel_bench measures, docs/PERFORMANCE.md).
  static constexpr bool kFusedMerge = kFusedMerge_;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = 16 * kMTiles;
  static constexpr int kNTilesS = kBlockN / 8;           // n8 tiles of S per m16 tile
  static constexpr int kNTilesO = kHeadDim / 8;          // n8 tiles of O per m16 tile
  static constexpr int kChunks = kHeadDim / 8;           // 16-byte chunks per row
  static constexpr int kSmemQ = kBlockM * kHeadDim;      // elements
  static constexpr int kSmemKV = kBlockN * kHeadDim;
  static constexpr int kSmemBytes = (kSmemQ + 2 * kSmemKV) * static_cast<int>(sizeof(T));
  static_assert(kHeadDim % 64 == 0, "the swizzle needs at least 8 chunks per row");
};

// --- PTX wrappers ----------------------------------------------------------------------------

__device__ __forceinline__ std::uint32_t smem_u32(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  // src-size 0 zero-fills the destination: rows past the end read as zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Element offset of (row, 8-aligned col) in a swizzled tile with kChunks chunks per row.
template <int kChunks>
__device__ __forceinline__ int swz(int row, int col) {
  return row * kChunks * 8 + (((col >> 3) ^ (row & 7)) << 3);
}

// Copies rows [0, kRows) of a (rows, D) global tile into swizzled shared memory; rows at or
// past `valid_rows` are zero-filled.
template <class Tr, int kRows>
__device__ __forceinline__ void load_tile(typename Tr::T* smem, const typename Tr::T* gmem, std::int64_t row_stride,
                                          int valid_rows, int tid) {
  constexpr int kTotal = kRows * Tr::kChunks;
  static_assert(kTotal % Tr::kThreads == 0, "tile must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kTotal / Tr::kThreads; ++i) {
    const int idx = tid + i * Tr::kThreads;
    const int row = idx / Tr::kChunks;
    const int chunk = idx % Tr::kChunks;
    const bool valid = row < valid_rows;
    const typename Tr::T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    cp_async_16(smem_u32(smem + swz<Tr::kChunks>(row, chunk * 8)), src, valid);
  }
}

// --- the kernel --------------------------------------------------------------------------------

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, Tr::kMinBlocks) flash_fwd_kernel(const FlashFwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kBlockM, BN = Tr::kBlockN, MT = Tr::kMTiles;
  constexpr int NS = Tr::kNTilesS, NO = Tr::kNTilesO, CH = Tr::kChunks;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + Tr::kSmemQ;
  T* sV = sK + Tr::kSmemKV;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const CtaTask<T, BM, kCausal> task(p);
  const int m0 = task.m0, h = task.h, b = task.b, n_end = task.n_end;
  const T* q = task.q;
  const T* k = task.k;
  const T* v = task.v;
  const int n_tiles = (n_end + BN - 1) / BN;
  const int j0 = task.n_begin / BN;  // a band's first tile

  load_tile<Tr, BM>(sQ, q, p.q_row_stride, p.q_len - m0, tid);
  load_tile<Tr, BN>(sK, k + static_cast<std::int64_t>(j0) * BN * p.kv_row_stride, p.kv_row_stride, n_end - j0 * BN, tid);
  cp_async_commit();

  float o[MT][NO][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NO; ++nt) o[mt][nt][0] = o[mt][nt][1] = o[mt][nt][2] = o[mt][nt][3] = 0.0f;
  float row_max[MT][2], row_sum[MT][2];  // max in scaled log2 units; per-thread partial sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) row_max[mt][0] = row_max[mt][1] = -INFINITY, row_sum[mt][0] = row_sum[mt][1] = 0.0f;

  const int warp_row = warp * Tr::kRowsPerWarp;
  std::uint32_t q_frag[Tr::kQInRegs ? MT : 1][Tr::kQInRegs ? D / 16 : 1][4];
  if constexpr (Tr::kQInRegs) {
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
        ldmatrix_x4(q_frag[mt][ks], smem_u32(sQ + swz<CH>(warp_row + mt * 16 + (lane % 16), ks * 16 + (lane / 16) * 8)));
  }

  for (int j = j0; j < n_tiles; ++j) {
    const int n0 = j * BN;
    load_tile<Tr, BN>(sV, v + static_cast<std::int64_t>(n0) * p.kv_row_stride, p.kv_row_stride, n_end - n0, tid);
    cp_async_commit();
    cp_async_wait<1>();  // Q and K_j have landed
    __syncthreads();

    // S = Q K_j^T
    float s[MT][NS][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NS; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      std::uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[mt][ks][e];
        } else {
          ldmatrix_x4(a[mt], smem_u32(sQ + swz<CH>(warp_row + mt * 16 + (lane % 16), ks * 16 + (lane / 16) * 8)));
        }
      }
#pragma unroll
      for (int np = 0; np < NS / 2; ++np) {
        std::uint32_t bk[4];
        ldmatrix_x4(bk, smem_u32(sK + swz<CH>(np * 16 + (lane / 16) * 8 + (lane % 8), ks * 16 + ((lane / 8) % 2) * 8)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(s[mt][2 * np], a[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // Mask keys past the block and, on tiles that cross the diagonal, keys after the query;
    // on tiles that cross a band's lower edge, keys before the query's window.
    const bool past_end = n0 + BN > p.kv_len;
    const bool crosses = kCausal && n0 + BN - 1 > m0 + p.diag_offset;
    const bool crosses_low = kCausal && p.band && n0 < m0 + BM - 1 + p.lower_offset;
    if (past_end || crosses || crosses_low) {
      const int lower = crosses_low ? p.lower_offset : -(1 << 30);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NS; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m0 + warp_row + mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
            const int col = n0 + nt * 8 + (lane % 4) * 2 + (e & 1);
            if (col >= p.kv_len || (kCausal && (col > row + p.diag_offset || col < row + lower))) {
              s[mt][nt][e] = -INFINITY;
            }
          }
    }

    // Online softmax (log2 units): rescale what came before by 2^(old max - new max).
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hr], s[mt][nt][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[mt][hr], mx * p.scale_log2);
        const float base = new_max == -INFINITY ? 0.0f : new_max;  // a row with no key yet
        const float correction = fast_exp2(row_max[mt][hr] - base);
        row_max[mt][hr] = new_max;
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < NS; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pe = fast_exp2(fmaf(s[mt][nt][2 * hr + e], p.scale_log2, -base));
            s[mt][nt][2 * hr + e] = pe;
            sum += pe;
          }
        }
        row_sum[mt][hr] = row_sum[mt][hr] * correction + sum;
#pragma unroll
        for (int nt = 0; nt < NO; ++nt) {
          o[mt][nt][2 * hr] *= correction;
          o[mt][nt][2 * hr + 1] *= correction;
        }
      }
    }

    cp_async_wait<0>();  // V_j has landed
    __syncthreads();     // and every warp is done with K_j
    if (j + 1 < n_tiles) {
      load_tile<Tr, BN>(sK, k + static_cast<std::int64_t>(n0 + BN) * p.kv_row_stride, p.kv_row_stride,
                        n_end - n0 - BN, tid);
      cp_async_commit();
    }

    // O += P V_j: two adjacent n8 tiles of S form one k16 A fragment.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      std::uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < NO / 2; ++dp) {
        std::uint32_t bv[4];
        ldmatrix_x4_trans(bv, smem_u32(sV + swz<CH>(kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8), dp * 16 + (lane / 16) * 8)));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_16816<T>(o[mt][2 * dp], a[mt], bv[0], bv[1]);
          mma_16816<T>(o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
    __syncthreads();  // before the next V overwrites this one
  }

  // Epilogue: normalise, then write or merge into the running (o_acc, lse) in fp32.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float vals[NO][2];
#pragma unroll
      for (int nt = 0; nt < NO; ++nt) vals[nt][0] = o[mt][nt][2 * hr], vals[nt][1] = o[mt][nt][2 * hr + 1];
      finish_row<T, D, Tr::kFusedMerge>(p, b, h, m0 + warp_row + mt * 16 + lane / 4 + hr * 8, lane, row_max[mt][hr],
                                         row_sum[mt][hr], vals);
    }
  }
}

}  // namespace ringattn::detail::flash
