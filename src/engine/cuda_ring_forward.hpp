// engine/cuda_ring_forward.hpp: the ring loop of the forward pass on GPUs.
//
//   lse_acc = -inf                                                      (compute stream)
//   own K,V into block[0]: dense ones by the copy engines on the NCCL stream (the first
//     step reads them in place), others packed on the compute stream
//   [sliding window with sinks: owners broadcast the sink tokens' K,V]
//   for step s = 0 .. P-1 (a sliding window: only as many as its reach):
//     post send block[cur] -> r+1, recv block[1-cur] <- r-1 on the NCCL stream  (s < P-1)
//     launch this step's tasks on block[cur]: the native flash kernel (merge fused into its
//       epilogue) or cuDNN's fused attention into a scratch block, then a merge kernel
//     compute stream waits for the transfer's event; cur = 1 - cur
//   [two-sided window: the same with blocks of later ranks, travelling the other way]
//   [sinks: the sink tasks on the sink block]
//   out, lse <- o_acc, lse_acc (unless the last step is one full native task over every
//     row, whose epilogue writes the merged rows to out and lse: FlashFwdParams::merge_out)
// Nothing here synchronises the host: run() returns once everything is enqueued on the
// compute stream. Construction allocates everything, so that allocation failures can be
// agreed across ranks before the first transfer.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "comm/transport.hpp"
#include "core/cuda_raii.hpp"
#include "engine/cuda_resources.hpp"
#include "core/cuda_span_timer.hpp"
#include "kernels/cudnn/cudnn_sdpa.hpp"
#include "kernels/cpu/cpu_forward.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// The cuDNN problem of one task: q rows from a (B, S_local, H, D) tensor with q's strides, K/V
// rows from the packed block of the step (step_kv_len rows), the result to o's strides; the
// task's mask (causal offset, band).
CudnnSdpaProblem cudnn_task_problem(const BlockTask& t, std::int64_t step_kv_len, const AttentionShape& shape,
                                    DType dtype, const std::int64_t (&q_strides)[3], const std::int64_t (&o_strides)[3]);

// Sliding window with sinks: fills `sink_block` (K then V of the first plan.sink_len tokens,
// (B, sink_len, H_kv, D) each) on `stream`: this rank's rows from `own_block` (its packed K then
// V, own_len rows), the others broadcast by their owners when communicating (then settled
// under timeout_s). Returns the bytes this rank sent.
std::uint64_t gather_sink_block(CudaResources& resources, const RingPlan& plan, const AttentionShape& shape, DType dtype,
                                const void* own_block, std::int64_t own_len, void* sink_block, bool communicate,
                                double timeout_s, cudaStream_t stream);

// The own block packed for its first hop by the copy engines, on the communication stream:
// with K and V dense, (B, S, H_kv, D) each, the packed halves are their bytes. The copies follow
// the compute stream's work so far (`ready` recorded there) and precede the hop posted later
// on the communication stream, so the packing leaves the compute stream, whose kernels read
// K and V in place.
void pack_own_on_comm(const TensorView& k, const TensorView& v, void* block, cudaStream_t compute,
                      cudaStream_t comm, cudaEvent_t ready);

class CudaRingForward {
 public:
  // kernel: which kernel computes the blocks (see KernelKind). cuDNN plans for every task of
  // the plan are built here (dense q and out assumed; other strides build their plan on first
  // use), so that a refusal surfaces before the ring starts.
  CudaRingForward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                  std::int64_t q_len, std::int64_t kv_capacity, KernelKind kernel = KernelKind::automatic);

  // q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D); out like q; lse (B, H, S_local) or
  // no data; all on this rank's GPU. With communicate = false every step computes on the
  // rank's own block instead (the same kernels on the same shapes, no transfers): the
  // baseline of the overlap efficiency that `ringattn bench` reports.
  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, float scale, bool communicate = true);

  std::uint64_t bytes_sent_per_run() const { return bytes_sent_per_run_; }

  // Where the time of a run goes, on this rank's compute stream: the block kernels (cuDNN's
  // attention or the native kernel, whose merge is fused), separate merge kernels (after
  // cuDNN), copies (packing K/V, the running state's initialisation and final conversion, the
  // sink tokens), and the rest of the run's span: waits for transfers and launch gaps. With
  // profiling on, run() records timing events around each of these (a few per task); the
  // breakdown of the last such run is read after it has finished (wait()).
  struct Breakdown {
    double total_ms = 0.0, kernel_ms = 0.0, merge_ms = 0.0, copy_ms = 0.0;
    int steps = 0;  // ring steps of the run (both directions)
    double wait_ms() const { return total_ms - kernel_ms - merge_ms - copy_ms; }
    TransferProfile kv;  // the K/V hops on the communication stream
  };
  void set_profiling(bool on) {
    timer_.set_enabled(on);
    transfer_timer_.set_enabled(on);
  }
  Breakdown breakdown() const;

  // The watchdog's bound on every wait (0: none) and the pids of this node's ranks (to name a
  // stopped one). wait() blocks until everything run() enqueued has finished; on expiry it
  // names the first ring step whose transfer had not completed (see CudaResources::wait).
  void set_timeout(double timeout_s, std::vector<long> peer_pids) {
    timeout_s_ = timeout_s;
    peer_pids_ = std::move(peer_pids);
  }
  void wait();
  void wait(cudaEvent_t event);  // until `event` (recorded on the compute stream) has completed
  // What computes the blocks, in words ("cuDNN 9.19.0 fused attention", "native wgmma_ws
  // kernel", ...), with the reason where cuDNN was wanted but does not run, or which tasks
  // --kernel auto gives the native kernel for speed.
  const std::string& kernel_description() const { return kernel_description_; }
  cudaStream_t stream() const { return resources_.compute_stream(); }

 private:
  std::size_t block_bytes(std::int64_t kv_len) const;
  // The rows of a packed block of kv_len rows that travel (see RingStep::held, send).
  Pieces rows_of(const RowRange& rows, std::int64_t kv_len) const;
  bool task_uses_cudnn(const BlockTask& t) const;
  bool auto_prefers_native(const BlockTask& t) const;  // see auto_native_
  // fn(task, rows of the block it reads) for every task of the plan: ring, reverse, sinks.
  template <class Fn>
  void for_each_task(Fn&& fn) const;
  // Sliding window with sinks: fills sink_block_ (own rows copied, the others broadcast by
  // their owners when communicating) on `stream`; returns the bytes this rank sent.
  std::uint64_t gather_sinks(const void* own_block, bool communicate, cudaStream_t stream);

  CudaResources& resources_;
  RingPlan plan_;
  AttentionShape shape_;
  DType dtype_;
  std::int64_t q_len_;
  bool one_task_ = false;   // P = 1 and one task covers every row: results go straight to out
  // Packed K then V, (B, S_kv, H_kv, D) each, double-buffered: the resources' ring buffers 0, 1.
  RingBufferRef blocks_[2];
  RingBufferRef o_acc_;      // (B, H, S_local, D) fp32
  RingBufferRef lse_acc_;    // (B, H, S_local) fp32
  RingBufferRef split_buf_;  // the native kernel's last-wave split (FlashFwdParams::split_buf)
  int split_slots_ = 0;
  // What the last run() is waiting on, for the watchdog: one event per transfer (recorded on
  // the communication stream after it) and per step's computation (on the compute stream),
  // in the order they were enqueued, and what each was.
  struct Hop {
    std::string what;
  };
  std::string stalled() const;
  int milestones() const;  // events of the last run() that have completed
  void record_hop(std::string what, cudaStream_t stream = nullptr);  // default: the communication stream
  std::vector<CudaEvent> hop_events_;
  std::vector<Hop> hops_;
  CudaEvent pack_ready_;  // pack_own_on_comm
  double timeout_s_ = 0.0;
  std::vector<long> peer_pids_;
  RingBufferRef sink_block_;  // sliding window with sinks: K then V of the sink tokens
  std::uint64_t bytes_sent_per_run_ = 0;
  CudnnSdpa* cudnn_ = nullptr;  // set when cuDNN computes (some of) the tasks
  // --kernel auto: tasks where the native kernel is measured faster run on it even when cuDNN
  // is set (flash_fwd_auto_prefers_native).
  bool auto_native_ = false;
  bool cudnn_band_ = true;      // whether it computes band tasks too (else: native kernel)
  RingBufferRef o_block_;    // cuDNN's block result: (B, q_len, H, D) in dtype
  RingBufferRef lse_block_;  // (B, H, q_len) fp32
  std::string kernel_description_;
  // Profiling (set_profiling): the last run's spans, tagged by category.
  enum class Span { kernel, merge, copy };
  CudaSpanTimer timer_;
  CudaSpanTimer transfer_timer_;  // the K/V hops, on the communication stream
  double kv_bytes_received_ = 0.0;
  int profiled_steps_ = 0;
};

}  // namespace ringattn::detail
