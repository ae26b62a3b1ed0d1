// Linear attention's backward pass on one GPU, the dual of linear_attention.cu (fp32, CUDA cores).
//
// With e_i = phi(q_i), f_j = phi(k_j), den_i the normaliser (elu1; 1 for identity), the
// forward output o_i = S_i^T e_i / den_i. Given dO: du_i = dO_i / den_i and
// dden_i = -(dO_i . o_i) / den_i (elu1; 0 otherwise), o_i being the forward's stored output.
//   dphi(q_i) = S_i du_i + dden_i z_i                       (forward states, walked forward)
//   dphi(k_j) = T_j v_j + t_j,  dv_j = T_j^T f_j              (dual states, walked backward)
//   T_j = sum_{i >= j} w_ij e_i du_i^T,  t_j = sum_{i >= j} w_ij dden_i e_i   (w_ij = g^(i-j))
// Passes, per (batch, head) and group of whole chunks:
//   1. lin_bwd_dual_state: walk the group forward from its incoming z: den_i, dden_i (stored),
//      and the group's dual state at its first token.
//   2. lin_bwd_group_suffix: each group's dual state of the later groups (at its end) and the
//      rank's total (at its first token).
//   [across ranks (engine): causal, the totals of the later ranks, scanned in reverse order]
//   3. lin_bwd_dkv: walk each group's chunks backward from its end: dv_j, dphi(k_j) (partial over
//      the CTA's value-column slice, summed by atomics over the two slices of D = 128).
//   4. lin_bwd_dq: walk forward as the forward pass does: dphi(q_i), partial likewise.
//   5. lin_bwd_finish: phi', the sum over the query heads of each KV head, the dtype.
// Non-causal: every row sees the total states, so the walks do not update them.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "core/cuda_check.hpp"
#include "kernels/cuda/linear_attention.hpp"
#include "kernels/cuda/linear_common.cuh"

namespace ringattn::detail {

namespace lin {

__device__ __forceinline__ float dphi(float x, int map) { return map == 1 ? 1.0f : (x > 0.0f ? 1.0f : __expf(x)); }

// Pass 1. grid (groups, heads, batch).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) lin_bwd_dual_state(const LinearParams p) {
  constexpr int kState = D * D + D;
  constexpr int kCols = 8, kRows = D * D / kThreads / kCols;
  constexpr int LD = D + 1;
  extern __shared__ float smem[];
  float* sE = smem;                  // kChunk x LD: phi(q)
  float* sF = sE + kChunk * LD;      // kChunk x LD: phi(k)
  float* sU = sF + kChunk * LD;      // kChunk x D: dO, then du
  float* sO = sU + kChunk * D;       // kChunk x D: the forward's output
  float* sZ = sO + kChunk * D;       // D: z before the chunk
  float* sW = sZ + D;                // kChunk: weight of each row in the group's dual state
  float* sDd = sW + kChunk;          // kChunk: dden
  float* sA = sDd + kChunk;          // kChunk x kChunk
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z, hk = h / p.kv_group, tid = threadIdx.x;
  const float l2g = p.log2_decay[h];
  const std::int64_t begin = static_cast<std::int64_t>(g) * p.group_len;
  const std::int64_t end = min64(p.n, begin + p.group_len);
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  const bool normalise = p.map == 0;
  if (tid < D) {
    const float in = p.incoming[bh * kState + D * D + tid];
    sZ[tid] = p.causal ? fmaf(in, decay_pow(l2g, static_cast<float>(begin)),
                              p.group_state[(bh * p.groups + g) * kState + D * D + tid])
                       : in;
  }
  const int c0 = (tid % (D / kCols)) * kCols, r0 = (tid / (D / kCols)) * kRows;
  float s[kRows][kCols] = {};
  float tz = 0.0f;  // thread tid < D: t[tid]
  for (std::int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int L = static_cast<int>(min64(kChunk, end - t0));
    __syncthreads();
    load_rows<T>(sE, LD, p.q, p.q_strides, b, h, t0, L, 0, D, p.map);
    if (p.causal) load_rows<T>(sF, LD, p.k, p.k_strides, b, hk, t0, L, 0, D, p.map);
    load_rows<T>(sU, D, p.dout, p.dout_strides, b, h, t0, L, 0, D, -1);
    load_rows<T>(sO, D, p.fwd_out, p.fwd_out_strides, b, h, t0, L, 0, D, -1);
    __syncthreads();
    if (p.causal) {
      for (int idx = tid; idx < kChunk * kChunk; idx += kThreads) {
        const int t = idx / kChunk, j = idx % kChunk;
        float a = 0.0f;
        if (j <= t && t < L) {
          for (int d = 0; d < D; ++d) a = fmaf(sE[t * LD + d], sF[j * LD + d], a);
          a *= decay_pow(l2g, static_cast<float>(t - j));
        }
        sA[idx] = a;
      }
      __syncthreads();
    }
    if (tid < kChunk) {
      const int t = tid;
      float den = 1.0f, dden = 0.0f;
      if (normalise) {
        den = 0.0f;
        for (int d = 0; d < D; ++d) den = fmaf(sE[t * LD + d], sZ[d], den);
        if (p.causal) {
          den *= decay_pow(l2g, static_cast<float>(t + 1));
          for (int j = 0; j < kChunk; ++j) den += sA[t * kChunk + j];
        }
        den += 1e-6f;
        float dot = 0.0f;
        for (int c = 0; c < D; ++c) dot = fmaf(sU[t * D + c], sO[t * D + c], dot);
        dden = -dot / den;
      }
      if (t < L) {
        p.den[bh * p.n + t0 + t] = den;
        p.dden[bh * p.n + t0 + t] = dden;
      }
      sDd[t] = t < L ? dden : 0.0f;
      sW[t] = t < L ? decay_pow(l2g, static_cast<float>(t0 + t - begin)) / den : 0.0f;  // folds du = dO / den
    }
    __syncthreads();
    // The group's dual state at its first token: += sum_t g^(t - begin) e_t du_t^T, dden_t e_t.
    for (int j = 0; j < L; ++j) {
      float ev[kRows], uv[kCols];
#pragma unroll
      for (int i = 0; i < kRows; ++i) ev[i] = sE[j * LD + r0 + i] * sW[j];
#pragma unroll
      for (int c = 0; c < kCols; ++c) uv[c] = sU[j * D + c0 + c];
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int c = 0; c < kCols; ++c) s[i][c] = fmaf(ev[i], uv[c], s[i][c]);
    }
    if (tid < D) {
      float acc = tz;
      for (int j = 0; j < L; ++j) {
        const float w = decay_pow(l2g, static_cast<float>(t0 + j - begin));
        acc = fmaf(sE[j * LD + tid] * w, sDd[j], acc);
      }
      tz = acc;
      if (p.causal) {  // z through the chunk
        float z = sZ[tid] * decay_pow(l2g, static_cast<float>(L));
        for (int j = 0; j < L; ++j) z = fmaf(sF[j * LD + tid], decay_pow(l2g, static_cast<float>(L - 1 - j)), z);
        sZ[tid] = z;
      }
    }
  }
  float* out = p.dual_group + (bh * p.groups + g) * kState;
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int c = 0; c < kCols; ++c) out[(r0 + i) * D + c0 + c] = s[i][c];
  if (tid < D) out[D * D + tid] = tz;
}

// Pass 2. grid (ceil(state / 256), heads, batch): dual_group[g] becomes the dual state of the
// later groups at group g's end; dual_total the rank's at its first token.
__global__ void lin_bwd_group_suffix(const LinearParams p, int state) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= state) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const float l2g = p.log2_decay[h];
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  float* groups = p.dual_group + bh * p.groups * state;
  float acc = 0.0f;
  for (int g = p.groups - 1; g >= 0; --g) {
    const std::int64_t len = min64(p.group_len, p.n - static_cast<std::int64_t>(g) * p.group_len);
    const float own = groups[static_cast<std::int64_t>(g) * state + e];
    groups[static_cast<std::int64_t>(g) * state + e] = acc;
    acc = fmaf(acc, decay_pow(l2g, static_cast<float>(len)), own);
  }
  p.dual_total[bh * state + e] = acc;
}

// Across ranks, causal: dual_in = the later ranks' dual state after this rank's last token:
// acc = T_r + g^(n_r) acc for r = world - 1 down to rank + 1.
__global__ void lin_bwd_rank_scan(const LinearParams p, int state, const float* gathered, const std::int64_t* lengths,
                                  int rank, int world) {
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= state) return;
  const int h = blockIdx.y, b = blockIdx.z;
  const float l2g = p.log2_decay[h];
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  const std::int64_t per_rank = static_cast<std::int64_t>(gridDim.z) * p.heads * state;
  float acc = 0.0f;
  for (int r = world - 1; r > rank; --r) {
    acc = fmaf(acc, decay_pow(l2g, static_cast<float>(lengths[r])), gathered[r * per_rank + bh * state + e]);
  }
  p.dual_in[bh * state + e] = acc;
}

// Pass 3. grid (groups, heads, batch * D / kSlice): dv (the slice's columns) and the slice's
// share of dphi(k), walking the group's chunks from its end.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) lin_bwd_dkv(const LinearParams p) {
  constexpr int kState = D * D + D;
  constexpr int kSlices = D / kSlice;
  constexpr int LD = D + 1;
  extern __shared__ float smem[];
  float* sT = smem;                   // D x kSlice: the dual state's columns after the chunk
  float* st = sT + D * kSlice;        // D: t after the chunk
  float* sE = st + D;                 // kChunk x LD
  float* sF = sE + kChunk * LD;       // kChunk x LD
  float* sV = sF + kChunk * LD;       // kChunk x kSlice
  float* sU = sV + kChunk * kSlice;   // kChunk x kSlice: du
  float* sB = sU + kChunk * kSlice;   // kChunk x kChunk: [i][j] g^(i-j) e_i . f_j (j <= i)
  float* sM = sB + kChunk * kChunk;   // kChunk x kChunk: [i][j] g^(i-j) du_i . v_j (slice)
  float* sDd = sM + kChunk * kChunk;  // kChunk: dden
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z / kSlices, col0 = (blockIdx.z % kSlices) * kSlice;
  const int hk = h / p.kv_group, tid = threadIdx.x;
  const bool first_slice = col0 == 0;
  const float l2g = p.log2_decay[h];
  const std::int64_t begin = static_cast<std::int64_t>(g) * p.group_len;
  const std::int64_t end = min64(p.n, begin + p.group_len);
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  {
    const float* in = p.dual_in + bh * kState;
    const float* suf = p.dual_group + (bh * p.groups + g) * kState;
    const float carry = decay_pow(l2g, static_cast<float>(p.n - end));
    for (int idx = tid; idx < D * kSlice + D; idx += kThreads) {
      const int e = idx < D * kSlice ? (idx / kSlice) * D + col0 + idx % kSlice : D * D + (idx - D * kSlice);
      smem[idx] = p.causal ? fmaf(in[e], carry, suf[e]) : in[e];
    }
  }
  const std::int64_t chunks = (end - begin + kChunk - 1) / kChunk;
  for (std::int64_t ci = chunks - 1; ci >= 0; --ci) {
    const std::int64_t t0 = begin + ci * kChunk;
    const int L = static_cast<int>(min64(kChunk, end - t0));
    __syncthreads();
    load_rows<T>(sF, LD, p.k, p.k_strides, b, hk, t0, L, 0, D, p.map);
    load_rows<T>(sV, kSlice, p.v, p.v_strides, b, hk, t0, L, col0, kSlice, -1);
    if (p.causal) {
      load_rows<T>(sE, LD, p.q, p.q_strides, b, h, t0, L, 0, D, p.map);
      load_rows<T>(sU, kSlice, p.dout, p.dout_strides, b, h, t0, L, col0, kSlice, -1);
      if (tid < kChunk) sDd[tid] = tid < L ? p.dden[bh * p.n + t0 + tid] : 0.0f;
    }
    __syncthreads();
    if (p.causal) {
      for (int idx = tid; idx < kChunk * kSlice; idx += kThreads) {  // du = dO / den
        const int i = idx / kSlice;
        if (i < L) sU[idx] /= p.den[bh * p.n + t0 + i];
      }
      __syncthreads();
      for (int idx = tid; idx < kChunk * kChunk; idx += kThreads) {
        const int i = idx / kChunk, j = idx % kChunk;
        float bij = 0.0f, mij = 0.0f;
        if (j <= i && i < L) {
          for (int d = 0; d < D; ++d) bij = fmaf(sE[i * LD + d], sF[j * LD + d], bij);
          for (int c = 0; c < kSlice; ++c) mij = fmaf(sU[i * kSlice + c], sV[j * kSlice + c], mij);
          const float w = decay_pow(l2g, static_cast<float>(i - j));
          bij *= w;
          mij *= w;
        }
        sB[idx] = bij;
        sM[idx] = mij;
      }
      __syncthreads();
    }
    // dv_j (this slice's columns): g^(L-j) T^T f_j + sum_i B[i][j] du_i. 32 rows x 64 columns.
    for (int idx = tid; idx < kChunk * kSlice; idx += kThreads) {
      const int j = idx / kSlice, c = idx % kSlice;
      if (j >= L) continue;
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc = fmaf(sT[d * kSlice + c], sF[j * LD + d], acc);
      if (p.causal) {
        acc *= decay_pow(l2g, static_cast<float>(L - j));
        for (int i = j; i < L; ++i) acc = fmaf(sB[i * kChunk + j], sU[i * kSlice + c], acc);
      }
      p.dv_acc[((static_cast<std::int64_t>(b) * p.n + t0 + j) * p.heads + h) * D + col0 + c] = acc;
    }
    // dphi(k_j), this slice's share: g^(L-j) (T v_j)[d] + sum_i M[i][j] e_i[d]; the first slice
    // adds g^(L-j) t[d] + sum_i g^(i-j) dden_i e_i[d].
    for (int idx = tid; idx < kChunk * D; idx += kThreads) {
      const int j = idx / D, d = idx % D;
      if (j >= L) continue;
      float acc = 0.0f;
      for (int c = 0; c < kSlice; ++c) acc = fmaf(sT[d * kSlice + c], sV[j * kSlice + c], acc);
      if (first_slice) acc += st[d];
      if (p.causal) {
        acc *= decay_pow(l2g, static_cast<float>(L - j));
        for (int i = j; i < L; ++i) {
          float w = sM[i * kChunk + j];
          if (first_slice) w = fmaf(decay_pow(l2g, static_cast<float>(i - j)), sDd[i], w);
          acc = fmaf(w, sE[i * LD + d], acc);
        }
      }
      atomicAdd(&p.dk_acc[((static_cast<std::int64_t>(b) * p.n + t0 + j) * p.heads + h) * D + d], acc);
    }
    if (p.causal) {
      __syncthreads();  // sT and st are read above
      // The dual state at the chunk's start: g^L T + sum_i g^i e_i du_i^T; t likewise.
      const float carry = decay_pow(l2g, static_cast<float>(L));
      for (int idx = tid; idx < D * kSlice; idx += kThreads) {
        const int d = idx / kSlice, c = idx % kSlice;
        float acc = sT[idx] * carry;
        for (int i = 0; i < L; ++i) acc = fmaf(sE[i * LD + d] * decay_pow(l2g, static_cast<float>(i)), sU[i * kSlice + c], acc);
        sT[idx] = acc;
      }
      if (tid < D) {
        float acc = st[tid] * carry;
        for (int i = 0; i < L; ++i) acc = fmaf(sE[i * LD + tid] * decay_pow(l2g, static_cast<float>(i)), sDd[i], acc);
        st[tid] = acc;
      }
    }
  }
}

// Pass 4. grid (groups, heads, batch * D / kSlice): this slice's share of dphi(q_t) =
// g^(t+1) (S du_t + dden_t z) + sum_{j <= t} g^(t-j) (du_t . v_j + dden_t) f_j, walking forward.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) lin_bwd_dq(const LinearParams p) {
  constexpr int kState = D * D + D;
  constexpr int kSlices = D / kSlice;
  constexpr int LD = D + 1;
  extern __shared__ float smem[];
  float* sS = smem;                   // D x kSlice
  float* sZ = sS + D * kSlice;        // D
  float* sF = sZ + D;                 // kChunk x LD
  float* sV = sF + kChunk * LD;       // kChunk x kSlice
  float* sU = sV + kChunk * kSlice;   // kChunk x kSlice: du
  float* sN = sU + kChunk * kSlice;   // kChunk x kChunk: [t][j] g^(t-j) (du_t . v_j + [first] dden_t)
  float* sDd = sN + kChunk * kChunk;  // kChunk
  const int g = blockIdx.x, h = blockIdx.y, b = blockIdx.z / kSlices, col0 = (blockIdx.z % kSlices) * kSlice;
  const int hk = h / p.kv_group, tid = threadIdx.x;
  const bool first_slice = col0 == 0;
  const float l2g = p.log2_decay[h];
  const std::int64_t begin = static_cast<std::int64_t>(g) * p.group_len;
  const std::int64_t end = min64(p.n, begin + p.group_len);
  const std::int64_t bh = static_cast<std::int64_t>(b) * p.heads + h;
  {
    const float* in = p.incoming + bh * kState;
    const float* pre = p.group_state + (bh * p.groups + g) * kState;
    const float carry = decay_pow(l2g, static_cast<float>(begin));
    for (int idx = tid; idx < D * kSlice + D; idx += kThreads) {
      const int e = idx < D * kSlice ? (idx / kSlice) * D + col0 + idx % kSlice : D * D + (idx - D * kSlice);
      smem[idx] = p.causal ? fmaf(in[e], carry, pre[e]) : in[e];
    }
  }
  for (std::int64_t t0 = begin; t0 < end; t0 += kChunk) {
    const int L = static_cast<int>(min64(kChunk, end - t0));
    __syncthreads();
    load_rows<T>(sU, kSlice, p.dout, p.dout_strides, b, h, t0, L, col0, kSlice, -1);
    if (p.causal) {
      load_rows<T>(sF, LD, p.k, p.k_strides, b, hk, t0, L, 0, D, p.map);
      load_rows<T>(sV, kSlice, p.v, p.v_strides, b, hk, t0, L, col0, kSlice, -1);
    }
    if (tid < kChunk) sDd[tid] = tid < L ? p.dden[bh * p.n + t0 + tid] : 0.0f;
    __syncthreads();
    for (int idx = tid; idx < kChunk * kSlice; idx += kThreads) {
      const int i = idx / kSlice;
      if (i < L) sU[idx] /= p.den[bh * p.n + t0 + i];
    }
    __syncthreads();
    if (p.causal) {
      for (int idx = tid; idx < kChunk * kChunk; idx += kThreads) {
        const int t = idx / kChunk, j = idx % kChunk;
        float n = 0.0f;
        if (j <= t && t < L) {
          for (int c = 0; c < kSlice; ++c) n = fmaf(sU[t * kSlice + c], sV[j * kSlice + c], n);
          if (first_slice) n += sDd[t];
          n *= decay_pow(l2g, static_cast<float>(t - j));
        }
        sN[idx] = n;
      }
      __syncthreads();
    }
    for (int idx = tid; idx < kChunk * D; idx += kThreads) {
      const int t = idx / D, d = idx % D;
      if (t >= L) continue;
      float acc = 0.0f;
      for (int c = 0; c < kSlice; ++c) acc = fmaf(sS[d * kSlice + c], sU[t * kSlice + c], acc);
      if (first_slice) acc = fmaf(sDd[t], sZ[d], acc);
      if (p.causal) {
        acc *= decay_pow(l2g, static_cast<float>(t + 1));
        for (int j = 0; j <= t; ++j) acc = fmaf(sN[t * kChunk + j], sF[j * LD + d], acc);
      }
      atomicAdd(&p.dq_acc[((static_cast<std::int64_t>(b) * p.n + t0 + t) * p.heads + h) * D + d], acc);
    }
    if (p.causal) {
      __syncthreads();  // sS and sZ are read above
      const float carry = decay_pow(l2g, static_cast<float>(L));
      for (int idx = tid; idx < D * kSlice; idx += kThreads) {
        const int d = idx / kSlice, c = idx % kSlice;
        float acc = sS[idx] * carry;
        for (int j = 0; j < L; ++j) {
          acc = fmaf(sF[j * LD + d] * decay_pow(l2g, static_cast<float>(L - 1 - j)), sV[j * kSlice + c], acc);
        }
        sS[idx] = acc;
      }
      if (tid < D) {
        float acc = sZ[tid] * carry;
        for (int j = 0; j < L; ++j) acc = fmaf(sF[j * LD + tid], decay_pow(l2g, static_cast<float>(L - 1 - j)), acc);
        sZ[tid] = acc;
      }
    }
  }
}

// Pass 5. One thread per (b, token, kv head, d) for dk, dv and per (b, token, head, d) for dq.
template <typename T, int D>
__global__ void lin_bwd_finish(const LinearParams p, T* dq, std::int64_t dq0, std::int64_t dq1, std::int64_t dq2, T* dk,
                               std::int64_t dk0, std::int64_t dk1, std::int64_t dk2, T* dv, std::int64_t dv0,
                               std::int64_t dv1, std::int64_t dv2) {
  const std::int64_t idx = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t per_b = p.n * p.heads * D;
  if (idx >= p.batch * per_b) return;
  const int d = static_cast<int>(idx % D);
  const int h = static_cast<int>((idx / D) % p.heads);
  const std::int64_t t = (idx / (D * p.heads)) % p.n;
  const int b = static_cast<int>(idx / per_b);
  const T* q = static_cast<const T*>(p.q) + b * p.q_strides[0] + t * p.q_strides[1] + h * p.q_strides[2] + d;
  dq[b * dq0 + t * dq1 + h * dq2 + d] = from_float<T>(p.dq_acc[idx] * dphi(to_float<T>(*q), p.map));
  if (h % p.kv_group != 0) return;  // the first query head of each KV head sums the group
  const int hk = h / p.kv_group;
  float sk = 0.0f, sv = 0.0f;
  for (int i = 0; i < p.kv_group; ++i) {
    sk += p.dk_acc[idx + static_cast<std::int64_t>(i) * D];
    sv += p.dv_acc[idx + static_cast<std::int64_t>(i) * D];
  }
  const T* k = static_cast<const T*>(p.k) + b * p.k_strides[0] + t * p.k_strides[1] + hk * p.k_strides[2] + d;
  dk[b * dk0 + t * dk1 + hk * dk2 + d] = from_float<T>(sk * dphi(to_float<T>(*k), p.map));
  dv[b * dv0 + t * dv1 + hk * dv2 + d] = from_float<T>(sv);
}

template <int D>
constexpr std::size_t dual_state_smem() {
  return (2 * kChunk * (D + 1) + 2 * kChunk * D + D + 2 * kChunk + kChunk * kChunk) * sizeof(float);
}
template <int D>
constexpr std::size_t dkv_smem() {
  return (D * kSlice + D + 2 * kChunk * (D + 1) + 2 * kChunk * kSlice + 2 * kChunk * kChunk + kChunk) * sizeof(float);
}
template <int D>
constexpr std::size_t dq_smem() {
  return (D * kSlice + D + kChunk * (D + 1) + 2 * kChunk * kSlice + kChunk * kChunk + kChunk) * sizeof(float);
}

template <class K>
void allow_smem(K kernel, std::size_t bytes) {
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace lin

void linear_bwd_dual_states(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream) {
  lin::dispatch(dtype, head_dim, [&](auto t, auto dim) {
    using T = decltype(t);
    constexpr int D = decltype(dim)::value;
    lin::allow_smem(lin::lin_bwd_dual_state<T, D>, lin::dual_state_smem<D>());
    lin::lin_bwd_dual_state<T, D><<<dim3(p.groups, p.heads, p.batch), lin::kThreads, lin::dual_state_smem<D>(), stream>>>(p);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  });
  const int state = static_cast<int>(head_dim * head_dim + head_dim);
  lin::lin_bwd_group_suffix<<<dim3((state + 255) / 256, p.heads, p.batch), 256, 0, stream>>>(p, state);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void linear_bwd_incoming(const LinearParams& p, std::int64_t head_dim, const float* gathered,
                         const std::int64_t* lengths, int rank, int world, cudaStream_t stream) {
  const int state = static_cast<int>(head_dim * head_dim + head_dim);
  lin::lin_bwd_rank_scan<<<dim3((state + 255) / 256, p.heads, p.batch), 256, 0, stream>>>(p, state, gathered, lengths,
                                                                                           rank, world);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void linear_bwd_gradients(const LinearParams& p, DType dtype, std::int64_t head_dim, void* dq,
                          const std::int64_t (&dq_strides)[3], void* dk, const std::int64_t (&dk_strides)[3], void* dv,
                          const std::int64_t (&dv_strides)[3], cudaStream_t stream) {
  const std::size_t acc = static_cast<std::size_t>(p.batch * p.n * p.heads * head_dim) * sizeof(float);
  RINGATTN_CUDA_CHECK(cudaMemsetAsync(p.dq_acc, 0, acc, stream));
  RINGATTN_CUDA_CHECK(cudaMemsetAsync(p.dk_acc, 0, acc, stream));
  lin::dispatch(dtype, head_dim, [&](auto t, auto dim) {
    using T = decltype(t);
    constexpr int D = decltype(dim)::value;
    const dim3 grid(p.groups, p.heads, p.batch * (D / lin::kSlice));
    lin::allow_smem(lin::lin_bwd_dkv<T, D>, lin::dkv_smem<D>());
    lin::lin_bwd_dkv<T, D><<<grid, lin::kThreads, lin::dkv_smem<D>(), stream>>>(p);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
    lin::allow_smem(lin::lin_bwd_dq<T, D>, lin::dq_smem<D>());
    lin::lin_bwd_dq<T, D><<<grid, lin::kThreads, lin::dq_smem<D>(), stream>>>(p);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
    const std::int64_t total = p.batch * p.n * p.heads * D;
    lin::lin_bwd_finish<T, D><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(
        p, static_cast<T*>(dq), dq_strides[0], dq_strides[1], dq_strides[2], static_cast<T*>(dk), dk_strides[0],
        dk_strides[1], dk_strides[2], static_cast<T*>(dv), dv_strides[0], dv_strides[1], dv_strides[2]);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace ringattn::detail
