// api/prepared_forward.hpp: forward() in two halves, for callers that run the same shapes
// many times (the benchmark): prepare once (validate, agree, plan, allocate: collective),
// then run as often as needed without re-agreeing.
#pragma once

#include <functional>
#include <memory>

#include "comm/collective.hpp"
#include "engine/ring_forward.hpp"
#include "ringattn/attention.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "engine/cuda_linear_attention.hpp"
#include "engine/cuda_ring_backward.hpp"
#include "engine/cuda_ring_forward.hpp"
#endif
#include "engine/linear_attention.hpp"
#include "engine/ring_backward.hpp"

namespace ringattn::detail {

struct PreparedForward {
  float scale = 1.0f;
  // Linear attention (no ring): what linear_attention_cpu needs.
  struct Linear {
    MPI_Comm comm;
    LinearAttentionProblem problem;
    int threads;
  };
  std::unique_ptr<Linear> linear;
  std::unique_ptr<CpuRingForward> cpu;
  // After a failure mid-ring: the CPU engine's MPI transfers may still be in flight (a
  // cancelled request can still complete into its buffer), so the engine, its buffers and
  // requests are never freed. The context refuses further calls (Context::failure()).
  void abandon() { (void)cpu.release(); }
  // Whether run() holds host collectives besides its transfers (linear attention's scan, the
  // sinks' gather): a rank that fails in run() may leave the others inside one, where its
  // next call's agreement would meet it, so the failure abandons the context's collectives.
  bool host_collectives = false;
#ifdef RINGATTN_HAVE_CUDA
  std::unique_ptr<CudaRingForward> cuda;
  std::unique_ptr<CudaLinearAttention> cuda_linear;
  // The stream the GPU work is enqueued on; nullptr on CPUs.
  cudaStream_t cuda_stream() const {
    return cuda ? cuda->stream() : (cuda_linear ? cuda_linear->stream() : nullptr);
  }
  // Blocks until the GPU work has finished (or, given one, until `event` on the compute stream
  // has), under the watchdog (options.timeout_s).
  void wait_cuda(cudaEvent_t event = nullptr) {
    if (cuda) event != nullptr ? cuda->wait(event) : cuda->wait();
    if (cuda_linear) event != nullptr ? cuda_linear->wait(event) : cuda_linear->wait();
  }
#endif

  // Collective on the CPU; on GPUs it enqueues on the context's compute stream and returns.
  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, const std::function<void(int, int)>& on_step = {});
};

// Refuses, on this rank and communicating nothing, a context that cannot take a call: moved
// from, or one whose communicator holds an abandoned collective.
void check_usable(const Context& ctx);

// Runs fn, a call's host collectives, each wait bounded by timeout_s (comm/collective.hpp). A
// collective abandoned at its deadline marks the context (collectives_abandoned) before the
// error leaves.
template <class Fn>
decltype(auto) bounded_call(Context& ctx, double timeout_s, Fn&& fn) {
  CollectiveBound bound(timeout_s, &ctx.node_peer_pids());
  try {
    return fn();
  } catch (const std::exception& e) {
    if (bound.abandoned()) ctx.mark_collectives_abandoned(e.what());
    throw;
  }
}

// The plan of `member` (rank or device): a sliding window's, or the full ring's.
RingPlan plan_for(const Layout& layout, const AttentionOptions& options, int member);

// Linear attention's problem from the options (one decay per query head).
LinearAttentionProblem linear_problem(const AttentionShape& shape, const AttentionOptions& options);
#ifdef RINGATTN_HAVE_CUDA
// The GPU linear-attention engine of `member` (rank or device) of the layout's group.
std::unique_ptr<CudaLinearAttention> make_cuda_linear(CudaResources& resources, const LinearAttentionProblem& lp,
                                                      const Layout& layout, int member, DType dtype,
                                                      const AttentionOptions& options);
#endif

// One rank's (or one device's) checks of forward()'s arguments; throws Error.
void validate_forward_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const AttentionOptions& options);

// The same for backward(): forward()'s checks, then lse required and the gradients' views.
void validate_backward_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                              const TensorView& lse, const TensorView& dout, const TensorView& dq,
                              const TensorView& dk, const TensorView& dv, const AttentionOptions& options);

PreparedForward prepare_forward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& out, const TensorView& lse, const AttentionOptions& options);

// The backward pass, prepared: checked, agreed and allocated (collective).
struct PreparedBackward {
  float scale = 1.0f;
  std::unique_ptr<PreparedForward::Linear> linear;  // linear attention (CPU)
  std::unique_ptr<CpuRingBackward> cpu;
  void abandon() { (void)cpu.release(); }  // as PreparedForward::abandon
  bool host_collectives = false;           // as PreparedForward::host_collectives (the sinks' sums too)
#ifdef RINGATTN_HAVE_CUDA
  std::unique_ptr<CudaRingBackward> cuda;
  std::unique_ptr<CudaLinearAttention> cuda_linear;
  cudaStream_t cuda_stream() const {
    return cuda ? cuda->stream() : (cuda_linear ? cuda_linear->stream() : nullptr);
  }
  void wait_cuda() {
    if (cuda) cuda->wait();
    if (cuda_linear) cuda_linear->wait();
  }
#endif

  // Collective on the CPU; on GPUs it enqueues on the context's compute stream and returns.
  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
           const TensorView& dv);
};

PreparedBackward prepare_backward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView& lse, const TensorView& dout,
                                  const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                  const AttentionOptions& options);

}  // namespace ringattn::detail
