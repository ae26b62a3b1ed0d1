// engine/cuda_resources.hpp: what a rank needs to run the ring on its GPU.
//
// The device (the rank's index among the ranks of its node, unless the caller chose one),
// an NCCL communicator over the context's ranks (rank 0's ncclUniqueId broadcast over MPI),
// the compute stream forward() is ordered on, and a higher-priority stream for NCCL so that
// its kernels are scheduled as soon as an SM frees up. Borrowed handles are used as they are
// and never destroyed.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <functional>
#include <memory>
#include <string>

#include "comm/transport.hpp"
#include "core/cuda_raii.hpp"
#include "core/cuda_span_timer.hpp"

namespace ringattn {
class Context;
}

namespace ringattn::detail {

class CudnnSdpa;
class LoopbackHub;

// Device memory the ring's hops send from and receive into: plain cudaMalloc, or, with
// RINGATTN_NCCL_REGISTER=1 over an NCCL communicator of more than one rank (not yet measured
// on two GPUs, so not the default), ncclMemAlloc registered with the communicator
// (ncclCommRegister): NCCL's intra-node send/recv between registered buffers copy straight
// from the sender's buffer into the receiver's instead of staging every byte through the
// connection's FIFO, which the receiver would then copy out (a third of the memory traffic,
// none of the receiver's copy work). Freed after the device is idle; deregistered only over
// a healthy, live communicator (an aborted one has dropped its registrations).
class RingBuffer {
 public:
  struct Registrar;  // the communicator and whether it is still alive
  RingBuffer(std::size_t bytes, std::shared_ptr<Registrar> registrar);
  ~RingBuffer();
  RingBuffer(const RingBuffer&) = delete;
  RingBuffer& operator=(const RingBuffer&) = delete;
  void* get() const { return ptr_; }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
  void* handle_ = nullptr;  // ncclCommRegister's
  bool nccl_memory_ = false;
  std::shared_ptr<Registrar> registrar_;
};

// An engine's hold on one of its resources' ring buffers (DeviceBuffer's interface).
class RingBufferRef {
 public:
  RingBufferRef() = default;
  explicit RingBufferRef(std::shared_ptr<RingBuffer> buffer) : buffer_(std::move(buffer)) {}
  void* get() const { return buffer_ ? buffer_->get() : nullptr; }
  template <typename T>
  T* as() const { return static_cast<T*>(get()); }
  std::size_t bytes() const { return buffer_ ? buffer_->bytes() : 0; }

 private:
  std::shared_ptr<RingBuffer> buffer_;
};

// The engines' working buffers besides the ring's (fp32 accumulators, statistics, cuDNN's
// block results, the dQ semaphores), one slot each, kept by the resources across calls like
// the ring buffers: an engine built per call (forward(), backward()) would otherwise
// cudaMalloc them each time and cudaFree them at its end, and cudaFree waits for the whole
// device, so every call would return only once the GPU had finished (no CPU running ahead on
// a borrowed stream). Every engine of one resources runs on its compute stream, so a slot
// reused by the next engine is ordered after the last one's work. Forward and backward slots
// are distinct: a caller may hold a prepared forward and a prepared backward at once.
enum class Scratch : int {
  fwd_o_acc,
  fwd_lse_acc,
  fwd_o_block,
  fwd_lse_block,
  fwd_sink_block,
  fwd_split,
  bwd_dq_acc,
  bwd_lse2,
  bwd_delta,
  bwd_dq_sem,
  bwd_step_acc,
  bwd_home,
  bwd_dq_block,
  bwd_dkv_block,
  bwd_stats_block,
  bwd_sink_block,
  bwd_sink_acc,
  lin_decay,
  lin_lengths,
  lin_group_state,
  lin_total,
  lin_incoming,
  lin_gathered,
  lin_den,
  lin_dden,
  lin_dual_group,
  lin_dual_total,
  lin_dual_in,
  lin_dq_acc,
  lin_dk_acc,
  lin_dv_acc,
  count
};

class CudaResources {
 public:
  explicit CudaResources(Context& ctx);  // collective over ctx
  // One GPU of a single-process group (LocalGroup): the device and its communicator from
  // ncclCommInitAll, which this object then owns; streams of its own.
  CudaResources(int device, ncclComm_t comm);
  // One member of a single-process group whose members may share a GPU: no communicator; the
  // ring's hops are device copies through `hub` (LoopbackTransport). Collectives (the
  // broadcast of sink tokens, linear attention's scan) are not available: loopback() tells.
  CudaResources(int device, std::shared_ptr<LoopbackHub> hub, int member);
  ~CudaResources();
  CudaResources(const CudaResources&) = delete;
  CudaResources& operator=(const CudaResources&) = delete;

  int device() const { return device_; }
  const std::string& device_name() const { return device_name_; }
  ncclComm_t nccl() const { return comm_; }
  bool loopback() const { return hub_ != nullptr; }
  // The ring's hop for work ordered on `compute`: NCCL send/recv, or device copies between the
  // members of a loopback group. `tag` tells apart hops that run side by side (loopback) and
  // files the transfers' times under it in `timer` (profiling; on the communication stream).
  std::unique_ptr<Transport> hop(cudaStream_t compute, double timeout_s, int tag = 0,
                                 CudaSpanTimer* timer = nullptr) const;
  cudaStream_t compute_stream() const { return compute_; }
  cudaStream_t comm_stream() const { return comm_stream_; }
  // cuDNN's attention with its plan cache and workspace, created on first use; nullptr in
  // builds without cuDNN.
  CudnnSdpa* cudnn();
  // Ring buffer `slot` (0 and 1: the travelling K/V blocks, 2 and 3: the backward's dK/dV
  // sums) of at least `bytes`, kept across calls so that each is allocated and registered
  // once: the engines of one context take turns on one compute stream, so they share them. A
  // larger request replaces the slot's buffer; engines holding the old one keep it alive.
  RingBufferRef ring_buffer(int slot, std::size_t bytes);
  // A working buffer of at least `bytes` (never registered with NCCL), kept across calls. With
  // `zeroed`, a buffer allocated by this call is cleared on the compute stream first (for users
  // that leave it as they found it: the forward split's counts).
  RingBufferRef scratch(Scratch slot, std::size_t bytes, bool zeroed = false);
  // Whether the ring buffers are registered with NCCL (for reports).
  bool ring_buffers_registered() const;

  // The watchdog. NCCL communicators the library creates are non-blocking: a call may return
  // while its work is still being enqueued, and settle() waits (bounded) until it has been.
  // wait() blocks until `event` has completed, polling it and the communicator's asynchronous
  // error; after timeout_s without progress (0: no bound) or on an NCCL error it aborts the
  // communicator (when owned; never a blocking destroy) and throws Error(timeout or nccl)
  // whose message ends with stalled(), the caller's account of what was pending. progress(),
  // when given, counts the milestones reached so far (ring steps computed, transfers done):
  // each new one restarts the clock, so the bound is on one step, not on the whole ring. After
  // an abort every further use throws (usable()).
  void settle(double timeout_s) const;
  void wait(cudaEvent_t event, double timeout_s, const std::function<std::string()>& stalled,
            const std::function<int()>& progress = {});
  void usable() const;
  bool aborted() const { return aborted_; }

 private:
  int device_ = 0;
  std::string device_name_;
  ncclComm_t comm_ = nullptr;
  bool owns_comm_ = false;
  cudaStream_t compute_ = nullptr;
  bool owns_compute_ = false;
  cudaStream_t comm_stream_ = nullptr;
  bool aborted_ = false;
  std::shared_ptr<LoopbackHub> hub_;
  int member_ = 0;
  std::shared_ptr<CudnnSdpa> cudnn_;  // shared_ptr: no destructor needed where cuDNN is absent
  // Over a communicator of two or more ranks, with RINGATTN_NCCL_REGISTER=1 (owned or borrowed).
  void enable_registration(bool borrowed);
  void release_ring_buffers();  // deregistered over a healthy communicator, else only freed
  // The buffer of a slot, replaced by a new one (registered with `registrar` when given) when
  // it is smaller than `bytes`.
  RingBufferRef slot_buffer(std::shared_ptr<RingBuffer>& buffer, std::size_t bytes,
                            const std::shared_ptr<RingBuffer::Registrar>& registrar);
  void agree_on_registration(Context& ctx);  // collective: registered on every rank or on none
  std::shared_ptr<RingBuffer::Registrar> registrar_;  // null: no registration
  std::shared_ptr<RingBuffer> ring_buffers_[4];
  std::shared_ptr<RingBuffer> scratch_[static_cast<int>(Scratch::count)];
};

}  // namespace ringattn::detail
