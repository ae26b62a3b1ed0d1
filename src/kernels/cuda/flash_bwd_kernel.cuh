// kernels/cuda/flash_bwd_kernel.cuh: native flash-attention backward for one plan task.
//
// With P = exp(scale * Q K^T - LSE) recomputed from the forward pass's final LSE, and
// delta = rowsum(dO * O):
//   dV += P^T dO        dS = P * (dO V^T - delta)        dQ += scale * dS K        dK += scale * dS^T Q
// Two kernels, so that every accumulator has exactly one writer per launch and the result
// does not depend on scheduling (bitwise reproducible, no atomics):
//   dq kernel:  a CTA of 4 warps owns 64 query rows (16 per warp) and walks the task's key
//               tiles (S, dP, then dQ += dS K), like the forward kernel;
//   dkv kernel: a CTA of 4 warps owns 64 keys of one KV head (16 per warp) and walks the
//               query tiles of every query head that shares it (GQA), holding dK and dV in
//               registers (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q).
// The dq kernel recomputes S and dP, so the pair does 7 of the 5 necessary matmuls (1.4x).
// Both use mma.sync.m16n8k16 (fp32 accumulate) fed by ldmatrix from XOR-swizzled shared
// memory, with the streamed operand double-buffered through cp.async. Causal tiles that see
// no key are skipped; the rest are masked element by element.
//
// Test: tests/gpu/test_flash_bwd.cpp (against the fp64 reference; ctest -L gpu).
#pragma once

#include "kernels/cuda/flash_bwd_params.hpp"
#include "kernels/cuda/flash_fwd_kernel.cuh"

namespace ringattn::detail::flash {

// kBlockQ: query rows per tile of the dkv kernel (its registers grow with it).
template <typename T_, int kHeadDim_, int kBlockQ_ = 64>
struct BwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRows = 16 * kWarps;  // dq kernel: query rows per CTA; dkv kernel: keys per CTA
  static constexpr int kBlockN = 64;         // dq kernel: keys per tile
  static constexpr int kBlockQ = kBlockQ_;   // dkv kernel: query rows per tile
  static constexpr int kChunks = kHeadDim / 8;
  static constexpr int kNTilesD = kHeadDim / 8;
  static constexpr int kSmemDq = (2 * kRows + 4 * kBlockN) * kHeadDim * static_cast<int>(sizeof(T));
  static constexpr int kSmemDkv =
      (2 * kRows + 4 * kBlockQ) * kHeadDim * static_cast<int>(sizeof(T)) + 4 * kBlockQ * static_cast<int>(sizeof(float));
  static_assert(kHeadDim % 64 == 0, "the swizzle needs at least 8 chunks per row");
};

// Tile product C (16 rows of A) += A B^T over D: A rows from a swizzled [row][D] tile starting
// at a_row, B rows (kCols of them) from a swizzled [col][D] tile.
template <class Tr, int kCols>
__device__ __forceinline__ void mma_abt(float (&c)[kCols / 8][4], const typename Tr::T* sA, int a_row,
                                        const typename Tr::T* sB, int lane) {
  using T = typename Tr::T;
  constexpr int CH = Tr::kChunks;
#pragma unroll
  for (int ks = 0; ks < Tr::kHeadDim / 16; ++ks) {
    std::uint32_t a[4];
    ldmatrix_x4(a, smem_u32(sA + swz<CH>(a_row + (lane % 16), ks * 16 + (lane / 16) * 8)));
#pragma unroll
    for (int np = 0; np < kCols / 16; ++np) {
      std::uint32_t b[4];
      ldmatrix_x4(b, smem_u32(sB + swz<CH>(np * 16 + (lane / 16) * 8 + (lane % 8), ks * 16 + ((lane / 8) % 2) * 8)));
      mma_16816<T>(c[2 * np], a, b[0], b[1]);
      mma_16816<T>(c[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x D) += X B, X (16 x kInner) held as accumulator fragments, B a swizzled [kInner][D]
// tile read transposed.
template <class Tr, int kInner>
__device__ __forceinline__ void mma_xb(float (&acc)[Tr::kNTilesD][4], const float (&x)[kInner / 8][4],
                                       const typename Tr::T* sB, int lane) {
  using T = typename Tr::T;
  constexpr int CH = Tr::kChunks;
#pragma unroll
  for (int kk = 0; kk < kInner / 16; ++kk) {
    std::uint32_t a[4];
    a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
    a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
    a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int dp = 0; dp < Tr::kNTilesD / 2; ++dp) {
      std::uint32_t b[4];
      ldmatrix_x4_trans(b, smem_u32(sB + swz<CH>(kk * 16 + ((lane / 8) % 2) * 8 + (lane % 8), dp * 16 + (lane / 16) * 8)));
      mma_16816<T>(acc[2 * dp], a, b[0], b[1]);
      mma_16816<T>(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// acc[row][col] += factor * frag, for the 16 rows of a warp's accumulator (row0 + lane / 4
// and +8), rows at or past `valid` skipped; `row_ptr(r)` is row r's first element.
template <class Tr, class RowPtr>
__device__ __forceinline__ void add_rows(const float (&frag)[Tr::kNTilesD][4], int row0, int valid, float factor,
                                         int lane, RowPtr row_ptr) {
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = row0 + lane / 4 + hr * 8;
    if (r >= valid) continue;
    float* dst = row_ptr(r);
#pragma unroll
    for (int nt = 0; nt < Tr::kNTilesD; ++nt) {
      float2* d2 = reinterpret_cast<float2*>(dst + nt * 8 + (lane % 4) * 2);
      float2 cur = *d2;
      cur.x = fmaf(frag[nt][2 * hr], factor, cur.x);
      cur.y = fmaf(frag[nt][2 * hr + 1], factor, cur.y);
      *d2 = cur;
    }
  }
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 2) flash_bwd_dq_kernel(const FlashBwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BM = Tr::kRows, BN = Tr::kBlockN;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;  // two stages of K, then two of V
  T* sV = sK + 2 * BN * D;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m_block = kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // long causal rows first
  const int m0 = m_block * BM, h = blockIdx.y, b = blockIdx.z;
  int n_end = p.kv_len, n_begin = 0;
  if constexpr (kCausal) {
    n_end = min(n_end, m0 + BM + p.diag_offset);
    if (p.band) n_begin = max(0, m0 + p.lower_offset);  // key tiles before the band are skipped
  }
  if (n_end <= 0 || n_begin >= n_end) return;  // no row of this CTA sees a key of the task
  const int n_tiles = (n_end + BN - 1) / BN;
  const int j0 = n_begin / BN;

  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + static_cast<std::int64_t>(p.q_begin + m0) * p.q_row_stride +
               h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                  static_cast<std::int64_t>(p.q_begin + m0) * p.do_row_stride + h * p.do_head_stride;
  const std::int64_t kv_off =
      b * p.kv_batch_stride + static_cast<std::int64_t>(p.kv_begin) * p.kv_row_stride + (h / p.kv_group) * p.kv_head_stride;
  const T* k = static_cast<const T*>(p.k) + kv_off;
  const T* v = static_cast<const T*>(p.v) + kv_off;

  load_tile<Tr, BM>(sQ, q, p.q_row_stride, p.q_len - m0, tid);
  load_tile<Tr, BM>(sdO, dout, p.do_row_stride, p.q_len - m0, tid);
  load_tile<Tr, BN>(sK + (j0 & 1) * BN * D, k + static_cast<std::int64_t>(j0) * BN * p.kv_row_stride, p.kv_row_stride,
                    n_end - j0 * BN, tid);
  load_tile<Tr, BN>(sV + (j0 & 1) * BN * D, v + static_cast<std::int64_t>(j0) * BN * p.kv_row_stride, p.kv_row_stride,
                    n_end - j0 * BN, tid);
  cp_async_commit();

  const int warp_row = warp * 16;
  const std::int64_t stat_base = (static_cast<std::int64_t>(b) * p.heads + h) * p.s_q + p.q_begin;
  float lse2[2], delta[2];
#pragma unroll
  for (int hr = 0; hr < 2; ++hr) {
    const int r = m0 + warp_row + lane / 4 + hr * 8;
    lse2[hr] = r < p.q_len ? p.lse2[stat_base + r] : INFINITY;  // +inf: P = 0
    delta[hr] = r < p.q_len ? p.delta[stat_base + r] : 0.0f;
  }
  float dq[Tr::kNTilesD][4];
#pragma unroll
  for (int nt = 0; nt < Tr::kNTilesD; ++nt) dq[nt][0] = dq[nt][1] = dq[nt][2] = dq[nt][3] = 0.0f;

  for (int j = j0; j < n_tiles; ++j) {
    const int n0 = j * BN, stage = j & 1;
    if (j + 1 < n_tiles) {
      const int nxt = (j + 1) & 1;
      load_tile<Tr, BN>(sK + nxt * BN * D, k + static_cast<std::int64_t>(n0 + BN) * p.kv_row_stride, p.kv_row_stride,
                        n_end - n0 - BN, tid);
      load_tile<Tr, BN>(sV + nxt * BN * D, v + static_cast<std::int64_t>(n0 + BN) * p.kv_row_stride, p.kv_row_stride,
                        n_end - n0 - BN, tid);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* k_tile = sK + stage * BN * D;
    const T* v_tile = sV + stage * BN * D;

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.0f;
    mma_abt<Tr, BN>(s, sQ, warp_row, k_tile, lane);
    mma_abt<Tr, BN>(dp, sdO, warp_row, v_tile, lane);

    const bool low = kCausal && p.band && n0 < m0 + BM - 1 + p.lower_offset;  // crosses the band's lower edge
    const bool masked = n0 + BN > p.kv_len || (kCausal && n0 + BN - 1 > m0 + p.diag_offset) || low;
    const int lower = low ? p.lower_offset : -(1 << 30);
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = fast_exp2(fmaf(s[nt][e], p.scale_log2, -lse2[e >> 1]));
        if (masked) {
          const int row = m0 + warp_row + lane / 4 + (e >= 2 ? 8 : 0);
          const int col = n0 + nt * 8 + (lane % 4) * 2 + (e & 1);
          if (col >= p.kv_len || (kCausal && (col > row + p.diag_offset || col < row + lower))) pe = 0.0f;
        }
        s[nt][e] = pe * (dp[nt][e] - delta[e >> 1]);  // dS
      }
    mma_xb<Tr, BN>(dq, s, k_tile, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  float* dq_base = p.dq + stat_base * D;
  add_rows<Tr>(dq, m0 + warp_row, p.q_len, p.scale, lane,
               [&](int r) { return dq_base + static_cast<std::int64_t>(r) * D; });
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 2) flash_bwd_dkv_kernel(const FlashBwdParams p) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BN = Tr::kRows, BQ = Tr::kBlockQ;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;        // two stages of Q, then two of dO
  T* sdO = sQ + 2 * BQ * D;
  float* sL = reinterpret_cast<float*>(sdO + 2 * BQ * D);  // two stages of lse2, then two of delta
  float* sDelta = sL + 2 * BQ;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int n0 = blockIdx.x * BN, kvh = blockIdx.y, b = blockIdx.z;
  // Causal: row m sees key n iff n <= m + diag_offset, so rows before n0 - diag_offset see
  // none of this CTA's keys.
  const int m_first = kCausal ? max(0, n0 - p.diag_offset) / BQ : 0;
  // A band: rows after n0 + BN - 1 - lower_offset see none of them either.
  const int m_end = kCausal && p.band ? min(p.q_len, n0 + BN - p.lower_offset) : p.q_len;
  const int q_tiles = (m_end + BQ - 1) / BQ - m_first;
  if (q_tiles <= 0) return;
  const int iters = q_tiles * p.kv_group;

  const std::int64_t kv_off = b * p.kv_batch_stride + static_cast<std::int64_t>(p.kv_begin + n0) * p.kv_row_stride +
                              kvh * p.kv_head_stride;
  load_tile<Tr, BN>(sK, static_cast<const T*>(p.k) + kv_off, p.kv_row_stride, p.kv_len - n0, tid);
  load_tile<Tr, BN>(sV, static_cast<const T*>(p.v) + kv_off, p.kv_row_stride, p.kv_len - n0, tid);

  // Iteration it: query head kvh * group + it / q_tiles, rows from (m_first + it % q_tiles) * BQ.
  auto load_q_tile = [&](int it, int stage) {
    const int h = kvh * p.kv_group + it / q_tiles;
    const int m0 = (m_first + it % q_tiles) * BQ;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride +
                 static_cast<std::int64_t>(p.q_begin + m0) * p.q_row_stride + h * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + b * p.do_batch_stride +
                    static_cast<std::int64_t>(p.q_begin + m0) * p.do_row_stride + h * p.do_head_stride;
    load_tile<Tr, BQ>(sQ + stage * BQ * D, q, p.q_row_stride, p.q_len - m0, tid);
    load_tile<Tr, BQ>(sdO + stage * BQ * D, dout, p.do_row_stride, p.q_len - m0, tid);
    const std::int64_t stat = (static_cast<std::int64_t>(b) * p.heads + h) * p.s_q + p.q_begin + m0;
    for (int i = tid; i < BQ; i += Tr::kThreads) {
      const bool valid = m0 + i < p.q_len;
      sL[stage * BQ + i] = valid ? p.lse2[stat + i] : INFINITY;  // +inf: P = 0
      sDelta[stage * BQ + i] = valid ? p.delta[stat + i] : 0.0f;
    }
  };
  load_q_tile(0, 0);
  cp_async_commit();

  float dk[Tr::kNTilesD][4], dv[Tr::kNTilesD][4];
#pragma unroll
  for (int nt = 0; nt < Tr::kNTilesD; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[nt][e] = dv[nt][e] = 0.0f;
  const int warp_key = warp * 16;

  for (int it = 0; it < iters; ++it) {
    const int stage = it & 1;
    const int m0 = (m_first + it % q_tiles) * BQ;
    if (it + 1 < iters) {
      load_q_tile(it + 1, (it + 1) & 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* q_tile = sQ + stage * BQ * D;
    const T* do_tile = sdO + stage * BQ * D;
    const float* l_tile = sL + stage * BQ;
    const float* d_tile = sDelta + stage * BQ;

    float st[BQ / 8][4], dpt[BQ / 8][4];
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = dpt[nt][e] = 0.0f;
    mma_abt<Tr, BQ>(st, sK, warp_key, q_tile, lane);
    mma_abt<Tr, BQ>(dpt, sV, warp_key, do_tile, lane);

    const bool low = kCausal && p.band && n0 < m0 + BQ - 1 + p.lower_offset;  // crosses the band's lower edge
    const bool masked = (kCausal && n0 + BN - 1 > m0 + p.diag_offset) || low;
    const int lower = low ? p.lower_offset : -(1 << 30);
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + (lane % 4) * 2 + (e & 1);  // query row within the tile
        float pe = fast_exp2(fmaf(st[nt][e], p.scale_log2, -l_tile[col]));
        if (masked) {
          const int key = n0 + warp_key + lane / 4 + (e >= 2 ? 8 : 0);
          if (key > m0 + col + p.diag_offset || key < m0 + col + lower) pe = 0.0f;
        }
        st[nt][e] = pe;
        dpt[nt][e] = pe * (dpt[nt][e] - d_tile[col]);  // dS^T
      }
    mma_xb<Tr, BQ>(dv, st, do_tile, lane);
    mma_xb<Tr, BQ>(dk, dpt, q_tile, lane);
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  const std::int64_t acc_base = ((static_cast<std::int64_t>(b) * p.kv_heads + kvh) * p.acc_len + p.kv_begin + n0) * D;
  const int valid = p.kv_len - n0;
  add_rows<Tr>(dk, warp_key, valid, p.scale, lane,
               [&](int r) { return p.dk + acc_base + static_cast<std::int64_t>(r) * D; });
  add_rows<Tr>(dv, warp_key, valid, 1.0f, lane,
               [&](int r) { return p.dv + acc_base + static_cast<std::int64_t>(r) * D; });
}

}  // namespace ringattn::detail::flash
