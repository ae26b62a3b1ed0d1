// Linear attention on one GPU: the chunked form, in fp32 on CUDA cores.
//
// A rank's tokens are split into G groups of whole chunks (kChunk tokens) per (batch, head),
// so that the GPU has enough CTAs for short sequences too:
//   1. linear_group_state: each group folds its keys and values into (S, z), decayed to its
//      last token (S = sum_j g^(last - j) phi(k_j) v_j^T, z = sum_j g^(last - j) phi(k_j)).
//   2. linear_group_scan: per (batch, head) and state element, the groups' exclusive prefix
//      (the state of the rank's tokens before each group) and the rank's total, in place.
//   [across ranks (engine): the totals' exclusive scan (causal) or sum (non-causal)]
//   3. linear_output: each group starts from g^(tokens before it) * incoming + its prefix
//      (causal) or from the total (non-causal) and walks its chunks: per chunk,
//        A[t][j] = g^(t - j) phi(q_t) . phi(k_j)      (j <= t; causal only)
//        o_t     = g^(t + 1) phi(q_t)^T S + sum_j A[t][j] v_j,   normaliser likewise with z
//        S       = g^L S + sum_j g^(L - 1 - j) phi(k_j) v_j^T    (L tokens in the chunk)
//      non-causal: o_t = phi(q_t)^T S_total / (phi(q_t) . z_total).
// Work per token and head: O(D^2), so time grows linearly with the sequence; states are
// D x D fp32 per (batch, head, group), independent of the sequence length.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>
#include <type_traits>

#include "core/cuda_check.hpp"
#include "kernels/cuda/linear_attention.hpp"
#include "kernels/cuda/linear_common.cuh"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace lin {

// Pass 1. grid (groups, heads, batch); state layout per (b, h, group): S (D x D, row d =
// feature d) then z (D).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) linear_group_state(const LinearParams p) {
  constexpr int kState = D * D + D;
  constexpr int kPer = D * D / kThreads;  // S elements per thread: rows r0 .. r0+kRows, cols c0 .. c0+kCols
  constexpr int kCols = 8, kRows = kPer / kCols;
  extern __shared__ float smem[];
  float* sK = smem;                 // kChunk x D (phi applied)
  float* sV = sK + kChunk * D;      // kChunk x D
  float* sW = sV + kChunk * D;      // kChunk weights g^(L - 1 - j)
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / p.kv_group;
  const float l2g = p.log2_decay[h];
  const std::int64_t begin = static_cast<std::int64_t>(g) * p.group_len;
  const std::int64_t end = min64(p.n, begin + p.group_len);
  const int tid = threadIdx.x;
  const int c0 = (tid % (D / kCols)) * kCols, r0 = (tid / (D / kCols)) * kRows;
  float s[kRows][kCols] = {};
  float z = 0.0f;  // thread tid < D: z[tid]
  for (std::int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int L = static_cast<int>(min64(kChunk, end - t0));
    __syncthreads();
    load_rows<T>(sK, D, p.k, p.k_strides, b, hk, t0, L, 0, D, p.map);
    load_rows<T>(sV, D, p.v, p.v_strides, b, hk, t0, L, 0, D, -1);
    if (tid < kChunk) sW[tid] = tid < L ? decay_pow(l2g, static_cast<float>(L - 1 - tid)) : 0.0f;
    __syncthreads();
    const float carry = decay_pow(l2g, static_cast<float>(L));
#pragma unroll
    for (int i = 0; i < kRows; ++i)
#pragma unroll
      for (int c = 0; c < kCols; ++c) s[i][c] *= carry;
    for (int j = 0; j < L; ++j) {
      float kv[kRows], vv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) kv[i] = sK[j * D + r0 + i] * sW[j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) vv[c] = sV[j * D + c0 + c];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int c = 0; c < kCols; ++c) s[i][c] = fmaf(kv[i], vv[c], s[i][c]);
    }
    if (tid < D) {
      float acc = z * carry;
      for (int j = 0; j < L; ++j) acc = fmaf(sK[j * D + tid], sW[j], acc);
      z = acc;
    }
  }
  float* out = p.group_state + ((static_cast<std::int64_t>(b) * p.heads + h) * p.groups + g) * kState;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[(r0 + i) * D + c0 + c] = s[i][c];
  if (tid < D) out[D * D + tid] = z;
}

// Pass 2. grid (ceil(state / threads), heads, batch): group_state becomes each group's
// exclusive prefix within the rank; total gets the rank's state (decayed to its last token).
__global__ void linear_group_scan(const LinearParams p, int state) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= state) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const float l2g = p.log2_decay[h];
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  float* groups = p.group_state + bh * p.groups * state;
  float acc = 0.0f;
  for (int g = 0; g < p.groups; ++g) {
    const std::int64_t len = min64(p.group_len, p.n - static_cast<std::int64_t>(g) * p.group_len);
    const float own = groups[static_cast<std::int64_t>(g) * state + e];
    groups[static_cast<std::int64_t>(g) * state + e] = acc;
    acc = fmaf(acc, decay_pow(l2g, static_cast<float>(len)), own);
  }
  p.total[bh * state + e] = acc;
}

// Across ranks, causal: incoming = the exclusive scan of the gathered totals (world x state
// per (b, h)) in rank order: acc = g^(n_r) acc + T_r for r < rank.
__global__ void linear_rank_scan(const LinearParams p, int state, const float* gathered, const std::int64_t* lengths,
                                 int rank) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= state) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const float l2g = p.log2_decay[h];
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  const std::int64_t per_rank = static_cast<std::int64_t>(gridDim.z) * p.heads * state;
  float acc = 0.0f;
  for (int r = 0; r < rank; ++r) {
    acc = fmaf(acc, decay_pow(l2g, static_cast<float>(lengths[r])), gathered[r * per_rank + bh * state + e]);
  }
  p.incoming[bh * state + e] = acc;
}

// Pass 3. grid (groups, heads, batch * D / kSlice).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) linear_output(const LinearParams p) {
  constexpr int kState = D * D + D;
  constexpr int kSlices = D / kSlice;
  constexpr int LD = D + 1;  // padded rows: threads reading one column of Q or K hit different banks
  extern __shared__ float smem[];
  float* sS = smem;                    // D x kSlice: this CTA's columns of S
  float* sZ = sS + D * kSlice;         // D
  float* sQ = sZ + D;                  // kChunk x LD (phi applied)
  float* sK = sQ + kChunk * LD;        // kChunk x LD (phi applied)
  float* sV = sK + kChunk * LD;        // kChunk x kSlice
  float* sA = sV + kChunk * kSlice;    // kChunk x kChunk
  float* sDen = sA + kChunk * kChunk;  // kChunk: normaliser of each row
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z / kSlices, col0 = (blockIdx.z % kSlices) * kSlice;
  const int hk = h / p.kv_group, tid = threadIdx.x;
  const float l2g = p.log2_decay[h];  // 0 when non-causal
  const std::int64_t begin = static_cast<std::int64_t>(g) * p.group_len;
  const std::int64_t end = min64(p.n, begin + p.group_len);
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  const bool normalise = p.map == 0;

  // The state before the group's first token.
  {
    const float* in = p.incoming + bh * kState;  // causal: before the rank; non-causal: everything
    const float* pre = p.group_state + (bh * p.groups + g) * kState;
    const float carry = decay_pow(l2g, static_cast<float>(begin));
    for (int idx = tid; idx < D * kSlice + D; idx += kThreads) {
      const int e = idx < D * kSlice ? (idx / kSlice) * D + col0 + idx % kSlice : D * D + (idx - D * kSlice);
      smem[idx] = p.causal ? fmaf(in[e], carry, pre[e]) : in[e];
    }
  }

  // Output tile per thread: rows t, t + 8, .. (4 rows), columns cc .. cc + 2 (8 x 32 thread grid).
  const int ty = tid / 32, tx = tid % 32;
  for (std::int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int L = static_cast<int>(min64(kChunk, end - t0));
    __syncthreads();
    load_rows<T>(sQ, LD, p.q, p.q_strides, b, h, t0, L, 0, D, p.map);
    if (p.causal) {
      load_rows<T>(sK, LD, p.k, p.k_strides, b, hk, t0, L, 0, D, p.map);
      load_rows<T>(sV, kSlice, p.v, p.v_strides, b, hk, t0, L, col0, kSlice, -1);
    }
    __syncthreads();
    if (p.causal) {
      // A (kChunk x kChunk), decayed and masked: 4 entries per thread.
      for (int idx = tid; idx < kChunk * kChunk; idx += kThreads) {
        const int t = idx / kChunk, j = idx % kChunk;
        float a = 0.0f;
        if (j <= t && t < L) {
#pragma unroll 8
          for (int d = 0; d < D; ++d) a = fmaf(sQ[t * LD + d], sK[j * LD + d], a);
          a *= decay_pow(l2g, static_cast<float>(t - j));
        }
        sA[idx] = a;
      }
      __syncthreads();
    }
    // Normalisers: g^(t+1) phi(q_t) . z + sum_j A[t][j].
    if (normalise && tid < kChunk) {
      float den = 0.0f;
      for (int d = 0; d < D; ++d) den = fmaf(sQ[tid * LD + d], sZ[d], den);
      if (p.causal) {
        den *= decay_pow(l2g, static_cast<float>(tid + 1));
        for (int j = 0; j < kChunk; ++j) den += sA[tid * kChunk + j];
      }
      sDen[tid] = den + 1e-6f;
    }
    // O rows of the chunk, this CTA's columns.
    float o[4][2] = {};
    for (int d = 0; d < D; ++d) {
      const float s0 = sS[d * kSlice + 2 * tx], s1 = sS[d * kSlice + 2 * tx + 1];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float qd = sQ[(ty + 8 * i) * LD + d];
        o[i][0] = fmaf(qd, s0, o[i][0]);
        o[i][1] = fmaf(qd, s1, o[i][1]);
      }
    }
    if (p.causal) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float w = decay_pow(l2g, static_cast<float>(ty + 8 * i + 1));
        o[i][0] *= w;
        o[i][1] *= w;
      }
      for (int j = 0; j < kChunk; ++j) {
        const float v0 = sV[j * kSlice + 2 * tx], v1 = sV[j * kSlice + 2 * tx + 1];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float a = sA[(ty + 8 * i) * kChunk + j];
          o[i][0] = fmaf(a, v0, o[i][0]);
          o[i][1] = fmaf(a, v1, o[i][1]);
        }
      }
    }
    __syncthreads();  // sDen is written
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int t = ty + 8 * i;
      if (t >= L) continue;
      const float inv = normalise ? 1.0f / sDen[t] : 1.0f;
      T* dst = static_cast<T*>(p.out) + b * p.out_strides[0] + (t0 + t) * p.out_strides[1] + h * p.out_strides[2] + col0 +
               2 * tx;
      dst[0] = from_float<T>(o[i][0] * inv);
      dst[1] = from_float<T>(o[i][1] * inv);
    }
    if (p.causal) {
      // S = g^L S + sum_j g^(L-1-j) phi(k_j) v_j^T; z likewise. Each thread owns D*kSlice/256
      // elements of S: rows d = tid / 8 + 32 i, columns (tid % 8) * 8 .. + 8.
      const float carry = decay_pow(l2g, static_cast<float>(L));
      const int cs = (tid % 8) * 8;
      for (int d = tid / 8; d < D; d += kThreads / 8) {
        float acc[8];
#pragma unroll
        for (int c = 0; c < 8; ++c) acc[c] = sS[d * kSlice + cs + c] * carry;
        for (int j = 0; j < L; ++j) {
          const float w = sK[j * LD + d] * decay_pow(l2g, static_cast<float>(L - 1 - j));
#pragma unroll
          for (int c = 0; c < 8; ++c) acc[c] = fmaf(w, sV[j * kSlice + cs + c], acc[c]);
        }
#pragma unroll
        for (int c = 0; c < 8; ++c) sS[d * kSlice + cs + c] = acc[c];
      }
      if (tid < D) {
        float acc = sZ[tid] * carry;
        for (int j = 0; j < L; ++j) acc = fmaf(sK[j * LD + tid], decay_pow(l2g, static_cast<float>(L - 1 - j)), acc);
        sZ[tid] = acc;
      }
    }
  }
}

template <int D>
constexpr std::size_t output_smem() {
  return (D * kSlice + D + 2 * kChunk * (D + 1) + kChunk * kSlice + kChunk * kChunk + kChunk) * sizeof(float);
}

template <typename T, int D>
void run_states(const LinearParams& p, cudaStream_t stream) {
  constexpr std::size_t smem = (2 * kChunk * D + kChunk) * sizeof(float);
  linear_group_state<T, D><<<dim3(p.groups, p.heads, p.batch), kThreads, smem, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int D>
void run_output(const LinearParams& p, cudaStream_t stream) {
  constexpr std::size_t smem = output_smem<D>();
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(linear_output<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
  linear_output<T, D><<<dim3(p.groups, p.heads, p.batch * (D / kSlice)), kThreads, smem, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace lin

int linear_chunk() { return lin::kChunk; }

bool linear_cuda_supports(std::int64_t head_dim) { return head_dim == 64 || head_dim == 128; }


void linear_local_states(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream) {
  lin::dispatch(dtype, head_dim, [&](auto t, auto d) { lin::run_states<decltype(t), decltype(d)::value>(p, stream); });
  const int state = static_cast<int>(head_dim * head_dim + head_dim);
  lin::linear_group_scan<<<dim3((state + 255) / 256, p.heads, p.batch), 256, 0, stream>>>(p, state);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void linear_incoming(const LinearParams& p, std::int64_t head_dim, const float* gathered, const std::int64_t* lengths,
                     int rank, cudaStream_t stream) {
  const int state = static_cast<int>(head_dim * head_dim + head_dim);
  lin::linear_rank_scan<<<dim3((state + 255) / 256, p.heads, p.batch), 256, 0, stream>>>(p, state, gathered, lengths,
                                                                                          rank);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void linear_outputs(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream) {
  lin::dispatch(dtype, head_dim, [&](auto t, auto d) { lin::run_output<decltype(t), decltype(d)::value>(p, stream); });
}

}  // namespace ringattn::detail
