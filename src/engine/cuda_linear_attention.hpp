// engine/cuda_linear_attention.hpp: distributed linear attention on GPUs (no ring).
//
// The CPU engine's algorithm (engine/linear_attention.hpp) with the GPU kernels of
// kernels/cuda/linear_attention.hpp, in fp32 state: each rank folds its tokens into one D x D
// state per (batch, head); then, over NCCL on the compute stream,
//   causal:     ncclAllGather of the ranks' states, and each rank scans those before it in
//               rank order (the exclusive scan, with each rank's decay over its tokens);
//   non-causal: ncclAllReduce (sum);
// and each rank computes its outputs from the state before its tokens. B*H*(D^2 + D) floats
// move per rank, independent of the sequence length. run() only enqueues.
#pragma once

#include <cstdint>
#include <vector>

#include "core/cuda_raii.hpp"
#include "engine/cuda_resources.hpp"
#include "engine/linear_attention.hpp"
#include "kernels/cuda/linear_attention.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

class CudaLinearAttention {
 public:
  // lengths: tokens per rank, in rank order (contiguous layout); n = lengths[rank].
  CudaLinearAttention(CudaResources& resources, const LinearAttentionProblem& problem,
                      const std::vector<std::int64_t>& lengths, int rank, DType dtype);

  // q (B, n, H, D), k, v (B, n, H_kv, D), out like q, on this rank's GPU.
  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out);

  // The gradients of sum(out * dout) (out: the forward's output), dq like q, dk, dv like k;
  // enqueued like run(). Scratch is allocated by the first call to allocate_backward().
  void allocate_backward();
  void backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                const TensorView& dout, const TensorView& dq, const TensorView& dk, const TensorView& dv);

  cudaStream_t stream() const { return resources_.compute_stream(); }
  // The watchdog, as CudaRingForward's.
  void set_timeout(double timeout_s) { timeout_s_ = timeout_s; }
  void wait();
  void wait(cudaEvent_t event);  // until `event` (recorded on the compute stream) has completed
  std::uint64_t bytes_sent_per_run() const { return bytes_sent_; }

 private:
  CudaResources& resources_;
  LinearAttentionProblem problem_;
  int rank_, world_;
  std::int64_t n_;
  DType dtype_;
  LinearParams params_;
  std::size_t state_floats_ = 0;  // B * H * (D^2 + D)
  std::uint64_t bytes_sent_ = 0;
  double timeout_s_ = 0.0;
  // The forward states (incoming, group prefixes) for p's tensors, across ranks.
  void forward_states(LinearParams& p, cudaStream_t stream);
  // The resources' working buffers (CudaResources::scratch, shared with any other linear
  // engine on them): every run uploads its decays and lengths before the kernels that read them.
  std::vector<float> log2_decay_host_;
  std::vector<std::int64_t> lengths_host_;
  RingBufferRef log2_decay_, group_state_, total_, incoming_, gathered_, lengths_;
  RingBufferRef den_, dden_, dual_group_, dual_total_, dual_in_, dq_acc_, dk_acc_, dv_acc_;  // backward
};

}  // namespace ringattn::detail
