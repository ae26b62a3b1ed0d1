// kernels/cpu/cpu_forward.hpp: the CPU block kernel of the forward pass.
//
// Holds one rank's running result in fp32 and folds KV blocks into it, one ring step at a
// time, with a blockwise (flash-style) online softmax:
//   load_queries(q)                q: (B, S_q, H, D) any dtype -> fp32, pre-scaled
//   load_kv(block)                 block: packed K then V, each (B, S_kv, H_kv, D), storage dtype
//   run(tasks)                     for each task: scores, softmax and P@V tile by tile, then
//                                  merge_block_into the running (o, lse)
//   store(out, lse)                o -> out's dtype, lse (natural log) -> fp32
// Tiles of 16 query rows x 64 keys keep the key tile in L1 across the rows; OpenMP threads
// share the (batch, head, row tile) items of each task dynamically, since causal tiles vary
// in cost.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "plan/ring_plan.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct AttentionShape {
  std::int64_t batch = 1;
  std::int64_t heads = 1;     // H: query heads
  std::int64_t kv_heads = 1;  // H_kv: key/value heads; query head h reads kv head h / (H / H_kv)
  std::int64_t head_dim = 1;  // D
};

class CpuForwardKernel {
 public:
  static constexpr std::int64_t kMaxHeadDim = 256;

  // q_len: this rank's S_local; kv_capacity: the largest KV block it will hold.
  CpuForwardKernel(const AttentionShape& shape, std::int64_t q_len, std::int64_t kv_capacity, int threads);

  // Starts a pass: resets the running (o, lse) and loads the queries.
  void load_queries(const TensorView& q, float scale);
  void load_kv(DType dtype, const void* block, std::int64_t kv_len);
  // `poke`, when set, is called between tiles by OpenMP thread 0 (the thread that called
  // run), so that MPI can make progress on the next transfer while the kernel computes.
  void run(const std::vector<BlockTask>& tasks, const std::function<void()>& poke = {});
  void store(const TensorView& out, const TensorView& lse) const;

 private:
  void run_tile(const BlockTask& task, std::int64_t b, std::int64_t h, std::int64_t row0, std::int64_t rows);

  AttentionShape shape_;
  std::int64_t q_len_;
  std::int64_t kv_capacity_;
  std::int64_t kv_len_ = 0;
  int threads_;
  std::vector<float> q_;    // (B, H, S_q, D), times scale * log2(e): scores come out in log2 units
  std::vector<float> k_t_;  // (B, H_kv, D, S_kv): transposed so score loops run over keys
  std::vector<float> v_;    // (B, H_kv, S_kv, D)
  std::vector<float> o_;    // (B, H, S_q, D) running normalised output
  std::vector<float> lse_;  // (B, H, S_q) running log-sum-exp, natural log; -inf = no key yet
};

}  // namespace ringattn::detail
