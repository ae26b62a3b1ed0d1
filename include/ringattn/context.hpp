// ringattn/context.hpp: who this process is in the ring.
//
// A Context duplicates the caller's communicator (with MPI_ERRORS_RETURN on the copy, so MPI
// failures become ringattn::Error instead of aborting the job) and frees only that copy.
// MPI must be initialised before and finalised after the Context's lifetime; MPI_THREAD_FUNNELED
// or better lets the CPU kernel drive MPI progress while it computes.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>
#include <vector>

namespace ringattn {

namespace detail {
class CudaResources;
}

struct ContextOptions {
  // Threads for the CPU kernel; 0 = OMP_NUM_THREADS when set, else the cores this process is
  // bound to, else (unbound) the node's hardware threads divided by the ranks on the node.
  int cpu_threads = 0;
  // GPU ring (CUDA builds). The device this rank uses: -1 = its rank among the ranks on its
  // node (an error when a node has more ranks than GPUs).
  int cuda_device = -1;
  // Handles borrowed from an embedding program, used as they are and never destroyed. They
  // are void* so that this header needs neither CUDA nor NCCL headers. A borrowed communicator
  // is not touched when the Context is destroyed, unless RINGATTN_NCCL_REGISTER=1 asks the GPU
  // ring to register its buffers with its communicator (ncclCommRegister: zero-copy
  // send/recv): a borrowed communicator must then outlive the Context, which
  // deregisters them while it is healthy. After a timeout or NCCL error ringattn leaves a
  // borrowed communicator as it is: destroy the Context, then abort it (ncclCommAbort).
  void* nccl_comm = nullptr;    // an ncclComm_t over the same ranks, in the same order
  // A cudaStream_t: forward() and backward() are ordered on it and return without waiting for
  // the device.
  void* cuda_stream = nullptr;
};

class Context {
 public:
  explicit Context(MPI_Comm comm = MPI_COMM_WORLD, ContextOptions options = {});
  ~Context();
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Context(Context&& other) noexcept;
  Context& operator=(Context&& other) noexcept;

  int rank() const { return rank_; }
  int size() const { return size_; }
  int local_rank() const { return local_rank_; }  // rank among the processes on this node
  int local_size() const { return local_size_; }
  int cpu_threads() const { return cpu_threads_; }
  // Whether the CPU kernel, running on the calling thread and its OpenMP team, may call MPI
  // (from the calling thread only) to progress transfers: MPI_THREAD_SERIALIZED or better, or
  // FUNNELED when called from the thread that initialised MPI.
  bool mpi_progress_from_threads() const;
  const std::string& hostname() const { return hostname_; }
  // The library's own duplicate of the caller's communicator.
  MPI_Comm comm() const { return comm_; }
  const ContextOptions& options() const { return options_; }

  // For diagnostics: the process id of each rank on this node, -1 for ranks elsewhere.
  const std::vector<long>& node_peer_pids() const { return node_peer_pids_; }

  // Set when a call failed after its ring had started (a timeout, a transfer error): messages
  // of that call may still be in flight on this context's communicator, so every later call
  // refuses to run (create a new Context). Empty while the context is usable.
  const std::string& failure() const { return failure_; }
  void mark_failed(const std::string& why) {
    if (failure_.empty()) failure_ = why;
  }
  // Set (with failure()) when a host collective on the communicator was abandoned at its
  // deadline (a rank never arrived), or a call failed on this rank while the others may be in
  // a host collective of it (linear attention's scan, the sinks' sums): a later collective
  // would meet that one on the ranks that did not take part, so every later call fails on
  // this rank at once, communicating nothing.
  bool collectives_abandoned() const { return collectives_abandoned_; }
  void mark_collectives_abandoned(const std::string& why) {
    mark_failed(why);
    collectives_abandoned_ = true;
  }

  // GPU resources (device, NCCL communicator, streams), created by the first CUDA forward:
  // collective. Throws where the build has no CUDA backend.
  detail::CudaResources& cuda();

 private:
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
  int local_rank_ = 0;
  int local_size_ = 1;
  int cpu_threads_ = 1;
  int thread_level_ = MPI_THREAD_SINGLE;
  std::string hostname_;
  std::vector<long> node_peer_pids_;
  ContextOptions options_;
  std::unique_ptr<detail::CudaResources> cuda_;
  std::string failure_;
  bool collectives_abandoned_ = false;
};

}  // namespace ringattn
