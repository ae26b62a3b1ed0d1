// kernels/cpu/cpu_backward.hpp: the CPU block kernel of the backward pass.
//
// For one held KV block and the step's tasks, with P = exp(scale * q.k - lse) recomputed from
// the forward's LSE and delta = rowsum(dout * out):
//   dV_l += sum_i P_il dout_i              dS_il = P_il (dout_i . v_l - delta_i)
//   dK_l += scale sum_i dS_il q_i          dQ_i += scale sum_l dS_il k_l
// in two passes so that every accumulator has one writer and a fixed summation order (the
// result is bitwise reproducible for a given rank count): pass A owns key tiles (dK, dV),
// pass B owns query tiles (dQ). Shared KV heads (GQA) sum over their query heads. Sums over
// a whole block are taken in fp32 chunks joined in fp64, so that their error does not grow
// with the block length.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/cpu/cpu_forward.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

class CpuBackwardKernel {
 public:
  CpuBackwardKernel(const AttentionShape& shape, std::int64_t q_len, std::int64_t kv_capacity, int threads);

  // q, out, dout: (B, S_q, H, D); lse: (B, H, S_q) fp32 from the forward pass. Resets dQ.
  void load_rows(const TensorView& q, const TensorView& out, const TensorView& dout, const TensorView& lse,
                 float scale);
  // block: packed K then V, each (B, S_kv, H_kv, D), storage dtype.
  void load_kv(DType dtype, const void* block, std::int64_t kv_len);
  // Adds the tasks' contributions to dQ and to dkv: fp32, dK then dV, each (B, S_kv, H_kv, D)
  // for the loaded block.
  void run(const std::vector<BlockTask>& tasks, float* dkv);
  void store_dq(const TensorView& dq) const;

 private:
  AttentionShape shape_;
  std::int64_t q_len_, kv_capacity_, kv_len_ = 0;
  int threads_;
  float scale_ = 1.0f;
  std::vector<float> q_, dout_, lse_, delta_, dq_;  // (B, H, S_q, D) / (B, H, S_q)
  std::vector<float> k_, v_;                         // (B, H_kv, S_kv, D)
};

}  // namespace ringattn::detail
