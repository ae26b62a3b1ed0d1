// kernels/cuda/flash_fwd_params.hpp: the arguments of one native flash forward launch.
//
// One launch computes one plan task (query rows x key rows, mask) for all batches and heads,
// and merges its result into the rank's running fp32 (o, lse). Plain data, shared by host
// code (.cpp) and the kernels (.cu); strides are in elements.
#pragma once

#include <cstdint>

namespace ringattn::detail {

struct FlashFwdParams {
  // q: (B, S_q, H, D), any strides with unit head_dim stride; rows q_begin .. q_begin+q_len.
  const void* q = nullptr;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  // k, v: the held KV block, (B, S_kv, H_kv, D); rows kv_begin .. kv_begin+kv_len.
  const void* k = nullptr;
  const void* v = nullptr;
  std::int64_t kv_batch_stride = 0, kv_row_stride = 0, kv_head_stride = 0;
  // Running result, fp32: o_acc (B, H, S_q, D) normalised, lse (B, H, S_q) natural log,
  // -inf where no key was seen yet (then o_acc is not read).
  float* o_acc = nullptr;
  float* lse = nullptr;
  std::int64_t s_q = 0;  // rows of o_acc / lse per (batch, head)
  // When out is set, the launch is the only contribution to its rows (one step, one task):
  // the epilogue writes the final O (q's dtype, out's strides) and, when lse_out is set, the
  // LSE (B, H, S_q) straight away; o_acc and lse are then neither read nor written.
  void* out = nullptr;
  std::int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;
  float* lse_out = nullptr;
  std::int64_t lse_batch_stride = 0, lse_head_stride = 0, lse_row_stride = 0;
  // With out set: the launch is the last contribution to its rows, every one of which sees a
  // key of the task (a ring's last step): the epilogue merges its result with the running
  // (o_acc, lse) and writes the merged rows to out and lse_out, leaving o_acc and lse as
  // they were (no finalize pass after the ring).
  int merge_out = 0;

  int batch = 1, heads = 1, kv_group = 1;  // kv head of query head h: h / kv_group
  int q_begin = 0, q_len = 0;
  int kv_begin = 0, kv_len = 0;
  int causal = 0;        // row i sees key l iff l <= i + diag_offset (task-relative)
  int diag_offset = 0;
  // With causal: a sliding-window band, row i also needs l >= i + lower_offset (<= 0). Key
  // tiles wholly before a CTA's band are never loaded.
  int band = 0;
  int lower_offset = 0;
  float scale_log2 = 1.0f;  // softmax scale * log2(e)

  // The warp-specialised kernel's split of query tiles over key-tile shares (flash_fwd_sm90_ws.cuh,
  // "The last wave"): split_buf holds a count per split query tile and split_slots parts'
  // online-softmax states; flash_fwd_split_bytes gives its size. It must be zeroed before its
  // first launch (every launch leaves its counts zero). nullptr: never split.
  float* split_buf = nullptr;
  int split_slots = 0;
  // 0 takes the rule (flash_fwd_split), 1 never splits, 2, 4 or 8 split the last half of the
  // launch's query tiles into that many CTAs by key tiles (tests).
  int split_parts = 0;
};

}  // namespace ringattn::detail
