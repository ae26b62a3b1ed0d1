// kernels/cuda/flash_bwd_params.hpp: the arguments of one native flash backward launch.
//
// One launch pair computes one plan task's contribution to the gradients, for all batches and
// heads: dQ rows q_begin .. q_begin+q_len of the rank's fp32 dQ accumulator, and dK/dV rows
// kv_begin .. kv_begin+kv_len of the travelling block's fp32 accumulators. Plain data, shared
// by host code (.cpp) and the kernels (.cu); strides are in elements.
#pragma once

#include <cstdint>

namespace ringattn::detail {

struct FlashBwdParams {
  // q, dout: (B, S_q, H, D), any strides with unit head_dim stride.
  const void* q = nullptr;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  const void* dout = nullptr;
  std::int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  // k, v: the held KV block, (B, S_kv, H_kv, D).
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t kv_batch_stride = 0, kv_row_stride = 0, kv_head_stride = 0;
  // Per query row, (B, H, S_q) fp32: lse2 = LSE * log2(e) (+inf for a row that saw no key)
  // and delta = rowsum(dO * O).
  const float* lse2 = nullptr;
  const float* delta = nullptr;
  // Accumulators, fp32, added to: dq (B, H, S_q, D); dk, dv (B, H_kv, acc_len, D).
  float* dq = nullptr;
  float* dk = nullptr;
  float* dv = nullptr;
  // The single-pass kernel's dQ semaphores and ticket counter (flash_bwd_fused_sm90.cuh): at least
  // flash_bwd_semaphores(params) words, zeroed by each launch. Null: no single-pass kernel.
  unsigned int* dq_sem = nullptr;
  std::int64_t dq_sem_len = 0;
  std::int64_t s_q = 0;      // rows of lse2 / delta / dq per (batch, head)
  std::int64_t acc_len = 0;  // rows of dk / dv per (batch, kv head): the block's length

  int batch = 1, heads = 1, kv_heads = 1, kv_group = 1;  // kv head of query head h: h / kv_group
  int q_begin = 0, q_len = 0;
  int kv_begin = 0, kv_len = 0;
  int causal = 0;  // row i sees key l iff l <= i + diag_offset (task-relative)
  int diag_offset = 0;
  int band = 0;  // with causal: a sliding-window band, row i also needs l >= i + lower_offset (<= 0)
  int lower_offset = 0;
  float scale = 1.0f;       // softmax scale
  float scale_log2 = 1.0f;  // scale * log2(e)
  // dK/dV rows kv_begin .. kv_begin+kv_len are overwritten with the task's sums instead of
  // added to (rows no query sees become zero): a ring step's own sums need no zeroing first.
  // The single-pass kernel stores; the dispatcher zeroes the rows before any other kernel.
  int dkv_store = 0;
  // The single-pass kernel's head chunk (KV heads whose key blocks interleave in its launch
  // order; flash_bwd_fused_sm90.cuh): 0 takes its rule (flash_bwd_head_chunk). Tests set it.
  int head_chunk = 0;
  // The single-pass kernel's tail split (flash_bwd_fused_sm90.cuh, "The last wave"): 0 takes
  // its rule, 1 never splits, 2, 4 or 8 split the last half of the launch's key blocks (in
  // ticket order) into that many CTAs by query tiles (tests).
  int split_parts = 0;
};

}  // namespace ringattn::detail
