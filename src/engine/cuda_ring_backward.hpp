// engine/cuda_ring_backward.hpp: the ring loop of the backward pass on GPUs.
//
// Q, O, dO and LSE stay home; K and V travel as in the forward pass, and the fp32 dK/dV
// accumulators of each block travel one hop behind them:
//   delta = rowsum(dO * O), lse2 = LSE log2(e); dq_acc = 0; acc[0] = 0     (compute stream)
//   for step s = 0 .. P-1 (block b_s, owned by rank r - s):
//     post K,V send block[cur] -> r+1, recv block[1-cur] <- r-1             (s < P-1)
//     per task: dQ (native dq kernel, or cuDNN's fused backward into scratch, added to
//       dq_acc); before the first dK/dV: wait for b_s's accumulator from r-1 (s > 0;
//       it left r-1 after its step s-1); dK/dV (native dkv kernel, or cuDNN's added from
//       scratch) into that accumulator
//     post accumulator send -> r+1, recv b_{s+1}'s <- r-1 (after the last step the hop
//       brings every accumulator home; without a reverse pass or sinks those sums are final,
//       so they travel rounded to the dtype: half the bytes; from 8,192 rows in two pieces,
//       the last step's keys of the first piece computed first, so that it travels while
//       the kernels compute the rest; dQ is rounded while the second is in flight)
//     compute stream waits for the K,V transfer; cur = 1 - cur
//   dq, dk, dv <- dq_acc, acc (in the tensors' dtype and strides)
// The accumulator hop runs while the next step computes dQ; the K,V hop runs as in the
// forward pass. One rank with one task (P = 1) lets cuDNN write dq, dk, dv directly. With
// several tasks the native kernels run unless --kernel cudnn asks for cuDNN, whose task
// gradients come in the 16-bit dtype (rounded before joining the fp32 sums); cuDNN runs the
// tasks it supports (see cudnn_sdpa_backward_unsupported_reason), the native kernels the rest. All allocations happen at construction; run() does not sync the host.
#pragma once

#include <cstdint>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>
#include <tuple>

#include "core/cuda_raii.hpp"
#include "engine/cuda_resources.hpp"
#include "core/cuda_span_timer.hpp"
#include "kernels/cpu/cpu_forward.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct CudnnSdpaProblem;

class CudaRingBackward {
 public:
  CudaRingBackward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                   std::int64_t q_len, std::int64_t kv_capacity, KernelKind kernel = KernelKind::automatic);

  // Shapes as in backward(); all on this rank's GPU. communicate = false: every step works on
  // the rank's own block (the overlap baseline of `ringattn bench --backward`).
  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
           const TensorView& dv, float scale, bool communicate = true);

  std::uint64_t bytes_sent_per_run() const { return bytes_sent_per_run_; }
  // The watchdog, as CudaRingForward's.
  void set_timeout(double timeout_s, std::vector<long> peer_pids) {
    timeout_s_ = timeout_s;
    peer_pids_ = std::move(peer_pids);
  }
  void wait();
  const std::string& kernel_description() const { return kernel_description_; }
  cudaStream_t stream() const { return resources_.compute_stream(); }

  // Where the time of a run goes, on this rank's compute stream (as CudaRingForward's): each
  // computed step's block kernels (the ring's steps, then the reverse pass's, then the sink
  // tasks as one more entry), the other work run() enqueues (packing K/V, the preparation
  // kernel, zeroing, adding the step sums, rounding and copying the gradients), and the rest
  // of the run's span: waits for transfers and launch gaps. With profiling on, run() records
  // timing events around these; the breakdown of the last such run is read after wait().
  struct Breakdown {
    double total_ms = 0.0, other_ms = 0.0;
    std::vector<double> step_kernel_ms;
    double kernel_ms() const {
      double sum = 0.0;
      for (double ms : step_kernel_ms) sum += ms;
      return sum;
    }
    double wait_ms() const { return total_ms - kernel_ms() - other_ms; }
    // The hops on the communication stream: K/V blocks, and the dK/dV sums (the last one home).
    TransferProfile kv, sums;
  };
  void set_profiling(bool on) {
    timer_.set_enabled(on);
    transfer_timer_.set_enabled(on);
  }
  Breakdown breakdown() const;

 private:
  std::size_t kv_bytes(std::int64_t kv_len) const;   // K and V of a block, dtype
  std::size_t acc_bytes(std::int64_t kv_len) const;  // dK and dV of a block, fp32
  bool task_uses_cudnn(const BlockTask& t, std::int64_t step_kv_len) const;
  // The cuDNN problem of one task; direct: cuDNN writes dq, dk, dv (else dense task blocks).
  CudnnSdpaProblem task_problem(const BlockTask& t, std::int64_t step_kv_len, const TensorView& q,
                                const TensorView& out, const TensorView& dout, const TensorView& dq,
                                const TensorView& dk, bool direct) const;
  // P = 1, one task, on cuDNN with a plan for these strides: cuDNN will write the gradients.
  bool will_write_direct(const TensorView& q, const TensorView& out, const TensorView& dout, const TensorView& dq,
                         const TensorView& dk, const TensorView& dv) const;
  // Runs one task on cuDNN and adds its gradients to the accumulators (calling await_acc
  // before touching dK/dV); false when cuDNN refuses the task's strides.
  bool run_cudnn_task(const BlockTask& t, std::int64_t step_kv_len, const TensorView& q, const void* k, const void* v,
                      const TensorView& out, const TensorView& lse, const TensorView& dout, const TensorView& dq,
                      const TensorView& dk, const TensorView& dv, float scale, float* dk_acc, float* dv_acc,
                      const std::function<void()>& await_acc);

  CudaResources& resources_;
  RingPlan plan_;
  AttentionShape shape_;
  DType dtype_;
  std::int64_t q_len_;
  // The resources' ring buffers 0, 1 (shared with the forward engine) and 2, 3.
  RingBufferRef blocks_[2];  // packed K then V, (B, S_kv, H_kv, D) each, double-buffered
  RingBufferRef acc_[2];     // dK then dV, (B, H_kv, S_kv, D) fp32 each, double-buffered
  RingBufferRef dq_acc_;     // (B, H, S_local, D) fp32
  RingBufferRef lse2_;       // (B, H, S_local) fp32
  RingBufferRef delta_;      // (B, H, S_local) fp32
  // The single-pass native backward (FlashKernel::wgmma_fused): its dQ semaphores, and, in a
  // ring, the step's dK/dV sums (B, H_kv, S_kv, D) fp32 each, computed before the travelling
  // accumulator has arrived and added to it after (the pair instead runs its dq kernel first).
  bool fused_ = false;
  RingBufferRef dq_sem_;
  RingBufferRef step_acc_;
  bool one_task_ = false;   // P = 1 and one task covers every row
  double timeout_s_ = 0.0;
  std::vector<long> peer_pids_;
  CudaEvent pack_ready_;  // pack_own_on_comm
  std::vector<CudaEvent> step_events_;  // the watchdog's milestones: one per computed step of the last run()
  int milestones_ = 0;
  bool direct_ = false;     // this run's cuDNN task wrote dq, dk, dv itself
  CudnnSdpa* cudnn_ = nullptr;  // set when cuDNN computes (some of) the tasks
  // The tasks whose cuDNN plan was built: (q_begin, q_len, kv_begin, kv_len, mask, diag_offset,
  // step kv_len).
  std::set<std::tuple<std::int64_t, std::int64_t, std::int64_t, std::int64_t, int, std::int64_t, std::int64_t>>
      cudnn_tasks_;
  RingBufferRef home_;         // sliding window: this rank's dK, dV sums while the reverse pass runs
  RingBufferRef sink_block_;   // sliding window with sinks: the sink tokens' K, V
  RingBufferRef sink_acc_;     // and their dK, dV sums
  RingBufferRef dq_block_;     // cuDNN's task results: dQ (B, q_len, H, D) in dtype,
  RingBufferRef dkv_block_;    // dK then dV (B, kv_len, H_kv, D) in dtype,
  RingBufferRef stats_block_;  // and its LSE rows (B, H, q_len) fp32
  std::uint64_t bytes_sent_per_run_ = 0;
  std::string kernel_description_;
  // Profiling (set_profiling): the last run's spans, tagged by step (-1: the other work).
  CudaSpanTimer timer_;
  CudaSpanTimer transfer_timer_;  // the hops, on the communication stream: tag 0 K/V, 1 the sums
  double kv_bytes_received_ = 0.0, sums_bytes_received_ = 0.0;
  int profiled_steps_ = 0;
};

}  // namespace ringattn::detail
