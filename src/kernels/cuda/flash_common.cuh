// kernels/cuda/flash_common.cuh: device helpers shared by the flash forward kernels: 16-bit
// packing, exp2, and the end of a block (finish_row).
//
// A query row is held by a quad of lanes (lane / 4 equal), each with the unnormalised output at
// columns nt * 8 + 2 (lane % 4) + {0, 1} of every n8 column tile nt, a partial row sum and the
// row max (log2 units, scaled). finish_row normalises the row and either writes the final O
// and LSE (params.out set: the task is the row's only contribution) or merges the block into
// the running fp32 state (o_acc, lse):
//   lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|))
//   o'   = o * exp(lse - lse') + o_b * exp(lse_b - lse')
// or, params.merge_out (a ring's last contribution to the rows), merges and writes o' and
// lse' as the final O and LSE, leaving the running state alone.
// Rows that saw no key (sum 0) and rows past q_len are left alone; a row whose scores
// overflowed fp32 is written as NaN. Every lane of the warp must
// call it (it shuffles and synchronises the warp).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/flash_fwd_params.hpp"

namespace ringattn::detail::flash {

// Four 8 x 8 16-bit matrices from shared memory (lane l gives row l % 8 of matrix l / 8); _trans
// transposes each.
__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  }
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 2^x for x <= 0 on the FMA and integer pipes, for a share of a tile's exponentials: the MUFU
// unit that fast_exp2 uses does 16 per clock per SM, so a backward tile's 64 x 128 of them take
// 512 cycles there when both warpgroups reach them together. x = j + f with j = round(x) (the
// 1.5 * 2^23 shift puts it in the low mantissa bits) and f in [-0.5, 0.5]; 2^f by a degree-5
// polynomial (fitted here for relative error: 2.4e-7 at most in fp32, as ex2.approx's ~2^-22),
// 2^j added to its exponent field. x below -126 gives 2^-126 or less instead of the exact
// value below it (an absolute error under 1.2e-38 in a P of at most 1), and a NaN x gives
// 2^-126 where ex2 gives NaN (fmaxf); the other exponentials of a NaN row still carry it.
__device__ __forceinline__ float poly_exp2(float x) {
  x = fmaxf(x, -126.0f);
  const float t = x + 12582912.0f;
  const float f = x - (t - 12582912.0f);
  float r = 1.32764725e-3f;
  r = fmaf(r, f, 9.67554189e-3f);
  r = fmaf(r, f, 5.55071309e-2f);
  r = fmaf(r, f, 2.40221202e-1f);
  r = fmaf(r, f, 6.93146944e-1f);
  r = fmaf(r, f, 1.00000012f);
  return __int_as_float(__float_as_int(r) + (__float_as_int(t) << 23));
}

// What one CTA of a flash forward kernel works on: its first task-relative query row m0,
// the (batch, head) it serves, q at row m0, K and V of the head's KV head (GQA: h / kv_group)
// at the task's first key, n_end, the keys its last row may see (causal: later ones are
// never loaded), and n_begin, the first key its first row may see (0 but for a band). Causal CTAs near the end of the sequence have the most keys and start first,
// so that the short ones fill the tail of the grid.
template <typename T, int kBlockM, bool kCausal>
struct CtaTask {
  int m0, h, b, n_begin, n_end;
  const T* q;
  const T* k;
  const T* v;

  // The grid's (query tile, head, batch); causal launches take their tiles last first.
  __device__ __forceinline__ explicit CtaTask(const FlashFwdParams& p)
      : CtaTask(p, kCausal ? gridDim.x - 1 - blockIdx.x : blockIdx.x, blockIdx.y, blockIdx.z) {}
  __device__ __forceinline__ CtaTask(const FlashFwdParams& p, int m_block, int head, int batch) {
    m0 = m_block * kBlockM;
    h = head;
    b = batch;
    q = static_cast<const T*>(p.q) + b * p.q_batch_stride + static_cast<std::int64_t>(p.q_begin + m0) * p.q_row_stride +
        h * p.q_head_stride;
    const std::int64_t kv_off = b * p.kv_batch_stride + static_cast<std::int64_t>(p.kv_begin) * p.kv_row_stride +
                                (h / p.kv_group) * p.kv_head_stride;
    k = static_cast<const T*>(p.k) + kv_off;
    v = static_cast<const T*>(p.v) + kv_off;
    n_end = p.kv_len;
    n_begin = 0;
    if constexpr (kCausal) {
      n_end = min(n_end, m0 + kBlockM + p.diag_offset);
      if (p.band) n_begin = max(0, m0 + p.lower_offset);
    }
  }
};

// Whether task-relative query row `row` sees any key of the task under its mask (as the
// kernels mask: key l is visible iff l < kv_len and, when causal, l <= row + diag_offset and,
// for a band, l >= row + lower_offset).
__device__ __forceinline__ bool sees_a_key(const FlashFwdParams& p, int row) {
  if (p.kv_len <= 0) return false;
  if (!p.causal) return true;
  const int first = p.band ? max(0, row + p.lower_offset) : 0;
  return first <= min(p.kv_len - 1, row + p.diag_offset);
}

// kFusedMerge false: overwrite (o_acc, lse) with this block's normalised result instead of
// merging (for a separate merge kernel; kernel_bench measures the alternative).
template <typename T, int D, bool kFusedMerge = true>
__device__ __forceinline__ void finish_row(const FlashFwdParams& p, int b, int h, int row, int lane, float row_max,
                                           float sum, const float (&vals)[D / 8][2]) {
  constexpr float kLn2 = 0.6931471805599453f;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  // sum == 0: no key of this block is visible to the row. A row that sees a key sums to at
  // least 1 (its largest score's exponential), unless its scaled maximum left fp32
  // (|q.k| * scale * log2(e) > FLT_MAX: every exponential against an infinite maximum is 0);
  // such a row, and a NaN sum (inf - inf in an exponent), are written as NaN, so that the
  // output shows the overflow instead of keeping whatever the buffer held (zeros, or an
  // earlier block's result). The check costs nothing in the loop over key tiles.
  if (sum == 0.0f && row < p.q_len && sees_a_key(p, row)) sum = __int_as_float(0x7fc00000);
  const bool live = row < p.q_len && !(sum <= 0.0f);
  const std::int64_t idx = (static_cast<std::int64_t>(b) * p.heads + h) * p.s_q + p.q_begin + row;
  float merged = 0.0f;
  if (live && p.out != nullptr && !p.merge_out) {
    const float inv = 1.0f / sum;
    T* orow = static_cast<T*>(p.out) + b * p.out_batch_stride + static_cast<std::int64_t>(p.q_begin + row) * p.out_row_stride +
              h * p.out_head_stride;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      *reinterpret_cast<std::uint32_t*>(orow + nt * 8 + (lane % 4) * 2) = pack2<T>(vals[nt][0] * inv, vals[nt][1] * inv);
    }
    if (p.lse_out != nullptr && lane % 4 == 0) {
      p.lse_out[b * p.lse_batch_stride + h * p.lse_head_stride + (p.q_begin + row) * p.lse_row_stride] =
          (row_max + __log2f(sum)) * kLn2;
    }
  } else if (live) {
    const float lse_b = (row_max + __log2f(sum)) * kLn2;
    const float old = kFusedMerge ? p.lse[idx] : -INFINITY;
    float w_old = 0.0f, w_b = 1.0f / sum;
    merged = lse_b;
    if (old != -INFINITY) {
      merged = fmaxf(old, lse_b) + log1pf(__expf(-fabsf(old - lse_b)));
      w_old = __expf(old - merged);
      w_b *= __expf(lse_b - merged);
    }
    float* orow = p.o_acc + idx * D;
    T* out_row = p.merge_out ? static_cast<T*>(p.out) + b * p.out_batch_stride +
                                   static_cast<std::int64_t>(p.q_begin + row) * p.out_row_stride + h * p.out_head_stride
                             : nullptr;
    // The running row is read whole before anything is stored: a load after a store through a
    // pointer that may alias it (out) could not be hoisted, and the loads would wait out their
    // round trips one by one.
    float2 prev[D / 8];
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      prev[nt] = old != -INFINITY ? *reinterpret_cast<const float2*>(orow + nt * 8 + (lane % 4) * 2)
                                  : make_float2(0.0f, 0.0f);
    }
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      float2* dst = reinterpret_cast<float2*>(orow + nt * 8 + (lane % 4) * 2);
      float2 acc = make_float2(vals[nt][0] * w_b, vals[nt][1] * w_b);
      if (old != -INFINITY) {
        acc.x = fmaf(prev[nt].x, w_old, acc.x);
        acc.y = fmaf(prev[nt].y, w_old, acc.y);
      }
      if (out_row != nullptr) {  // merge_out: the merged row is final
        *reinterpret_cast<std::uint32_t*>(out_row + nt * 8 + (lane % 4) * 2) = pack2<T>(acc.x, acc.y);
      } else {
        *dst = acc;
      }
    }
    if (p.merge_out && p.lse_out != nullptr && lane % 4 == 0) {
      p.lse_out[b * p.lse_batch_stride + h * p.lse_head_stride + (p.q_begin + row) * p.lse_row_stride] = merged;
    }
  }
  __syncwarp();  // every lane of the quad has read the old lse
  if (live && p.out == nullptr && lane % 4 == 0) p.lse[idx] = merged;
}

}  // namespace ringattn::detail::flash
