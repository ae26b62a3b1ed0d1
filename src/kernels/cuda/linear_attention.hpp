// kernels/cuda/linear_attention.hpp: linear attention kernels for one GPU (see the .cu for the
// chunked algorithm). The engine (engine/cuda_linear_attention.hpp) runs, on one stream:
// linear_local_states, then the exchange across ranks, then linear_outputs.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct LinearParams {
  // (B, n, heads, D) q and out, (B, n, kv_heads, D) k and v; element strides {batch, row, head},
  // unit head-dim stride.
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  std::int64_t q_strides[3] = {}, k_strides[3] = {}, v_strides[3] = {}, out_strides[3] = {};
  int batch = 1, heads = 1, kv_group = 1;
  std::int64_t n = 0;          // this rank's tokens
  int groups = 1;              // token groups per (batch, head), for parallelism
  std::int64_t group_len = 0;  // tokens per group (a multiple of linear_chunk()), the last may be shorter
  int map = 0;                 // 0 elu1 (normalised), 1 identity
  int causal = 0;
  const float* log2_decay = nullptr;  // per query head, device; all 0 when non-causal
  // Device scratch, fp32; state = D * D + D per (batch, head): S (row d = feature d) then z.
  float* group_state = nullptr;  // (B, H, groups, state)
  float* total = nullptr;        // (B, H, state): the rank's own state
  float* incoming = nullptr;     // (B, H, state): causal: the ranks' before it; non-causal: all

  // Backward only. dout and the forward's out like q; scratch, fp32:
  const void* dout = nullptr;
  const void* fwd_out = nullptr;
  std::int64_t dout_strides[3] = {}, fwd_out_strides[3] = {};
  float* den = nullptr;         // (B, H, n): each row's normaliser
  float* dden = nullptr;        // (B, H, n): d loss / d normaliser
  float* dual_group = nullptr;  // (B, H, groups, state): dual states, then their suffixes
  float* dual_total = nullptr;  // (B, H, state): this rank's, at its first token
  float* dual_in = nullptr;     // (B, H, state): causal: the later ranks', after its last token; else all
  float* dq_acc = nullptr;      // (B, n, H, D): dphi(q), summed over value-column slices
  float* dk_acc = nullptr;      // (B, n, H, D): dphi(k) per query head
  float* dv_acc = nullptr;      // (B, n, H, D): dv per query head
};

// Tokens per chunk (groups are whole chunks).
int linear_chunk();

bool linear_cuda_supports(std::int64_t head_dim);

// Group states, their prefixes within the rank (in place) and the rank's total.
void linear_local_states(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream);

// Causal: incoming <- exclusive scan, in rank order, of `gathered` (world x (B, H, state)),
// rank r holding lengths[r] tokens (device array).
void linear_incoming(const LinearParams& p, std::int64_t head_dim, const float* gathered, const std::int64_t* lengths,
                     int rank, cudaStream_t stream);

// The outputs, from incoming and the group prefixes.
void linear_outputs(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream);

// Backward (see linear_attention_bwd.cu), after linear_local_states and the forward exchange
// (incoming, group prefixes): per-row normalisers and the groups' dual states, their suffixes
// and this rank's total (dual_total) ...
void linear_bwd_dual_states(const LinearParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream);
// ... causal, across ranks: dual_in <- the scan, in reverse rank order, of `gathered` ...
void linear_bwd_incoming(const LinearParams& p, std::int64_t head_dim, const float* gathered,
                         const std::int64_t* lengths, int rank, int world, cudaStream_t stream);
// ... then dq, dk, dv (written in their dtypes, strides as q and k).
void linear_bwd_gradients(const LinearParams& p, DType dtype, std::int64_t head_dim, void* dq,
                          const std::int64_t (&dq_strides)[3], void* dk, const std::int64_t (&dk_strides)[3], void* dv,
                          const std::int64_t (&dv_strides)[3], cudaStream_t stream);

}  // namespace ringattn::detail
