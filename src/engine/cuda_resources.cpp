#include "engine/cuda_resources.hpp"

#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "comm/loopback_transport.hpp"
#include "comm/nccl_transport.hpp"
#include "core/cuda_check.hpp"
#include "kernels/cudnn/cudnn_sdpa.hpp"
#include "ringattn/context.hpp"
#include "ringattn/error.hpp"
#include "core/text.hpp"

namespace ringattn::detail {

namespace {
// Bound on communicator creation (every rank must arrive).
constexpr double kInitTimeoutSeconds = 300.0;

// RINGATTN_NCCL_REGISTER: 1 registers the ring buffers with NCCL, 0 (or unset) does not. Off
// by default until the registered hops have been measured on two GPUs (docs/PERFORMANCE.md).
bool register_ring_buffers() {
  const char* env = std::getenv("RINGATTN_NCCL_REGISTER");
  if (env == nullptr || *env == '\0') return false;
  if (std::string(env) == "1") return true;
  if (std::string(env) == "0") return false;
  throw Error(ErrorCode::invalid_argument, std::string("RINGATTN_NCCL_REGISTER=") + env + ": expected 0 or 1");
}
}  // namespace

struct RingBuffer::Registrar {
  ncclComm_t comm = nullptr;
  int device = 0;
  bool owned = true;  // the context created the communicator (and aborts it on failure)
  bool alive = true;  // false after a failure, or once the communicator is about to go
  int registered = 0;  // buffers NCCL accepted (ncclCommRegister may decline: NCCL_LOCAL_REGISTER=0)
};

RingBuffer::RingBuffer(std::size_t bytes, std::shared_ptr<Registrar> registrar) : bytes_(bytes) {
  if (bytes == 0) return;
  if (!registrar || !registrar->alive) {
    RINGATTN_CUDA_CHECK(cudaMalloc(&ptr_, bytes));
    return;
  }
  RINGATTN_NCCL_CHECK(ncclMemAlloc(&ptr_, bytes));
  nccl_memory_ = true;
  try {
    RINGATTN_NCCL_CHECK(ncclCommRegister(registrar->comm, ptr_, bytes, &handle_));
  } catch (...) {
    RINGATTN_NCCL_CHECK_NOTHROW(ncclMemFree(ptr_));
    throw;
  }
  if (handle_ != nullptr) ++registrar->registered;
  registrar_ = std::move(registrar);
}

RingBuffer::~RingBuffer() {
  if (ptr_ == nullptr) return;
  if (!nccl_memory_) {
    RINGATTN_CUDA_CHECK_NOTHROW(cudaFree(ptr_));  // (waits for the device, as cudaFree does)
    return;
  }
  // After a failure on a borrowed communicator a transfer may still be stuck on the device,
  // writing into this buffer: it is left allocated (the process is expected to go down).
  if (!registrar_->alive && !registrar_->owned) return;
  // Not stream-ordered: wait until no kernel or transfer can still touch the buffer.
  int current = 0;
  RINGATTN_CUDA_CHECK_NOTHROW(cudaGetDevice(&current));
  RINGATTN_CUDA_CHECK_NOTHROW(cudaSetDevice(registrar_->device));
  RINGATTN_CUDA_CHECK_NOTHROW(cudaDeviceSynchronize());
  if (handle_ != nullptr && registrar_->alive) {
    RINGATTN_NCCL_CHECK_NOTHROW(ncclCommDeregister(registrar_->comm, handle_));
  }
  RINGATTN_NCCL_CHECK_NOTHROW(ncclMemFree(ptr_));
  RINGATTN_CUDA_CHECK_NOTHROW(cudaSetDevice(current));
}

RingBufferRef CudaResources::slot_buffer(std::shared_ptr<RingBuffer>& buffer, std::size_t bytes,
                                         const std::shared_ptr<RingBuffer::Registrar>& registrar) {
  if (!buffer || buffer->bytes() < bytes) {
    buffer.reset();  // freed here unless an engine still holds it
    RINGATTN_CUDA_CHECK(cudaSetDevice(device_));
    buffer = std::make_shared<RingBuffer>(bytes, registrar);
  }
  return RingBufferRef(buffer);
}

RingBufferRef CudaResources::ring_buffer(int slot, std::size_t bytes) {
  return slot_buffer(ring_buffers_[slot], bytes, registrar_);
}

RingBufferRef CudaResources::scratch(Scratch slot, std::size_t bytes, bool zeroed) {
  std::shared_ptr<RingBuffer>& buffer = scratch_[static_cast<int>(slot)];
  const bool fresh = !buffer || buffer->bytes() < bytes;  // as slot_buffer decides
  RingBufferRef ref = slot_buffer(buffer, bytes, nullptr);
  if (zeroed && fresh) RINGATTN_CUDA_CHECK(cudaMemsetAsync(ref.get(), 0, ref.bytes(), compute_));
  return ref;
}

bool CudaResources::ring_buffers_registered() const {
  return registrar_ != nullptr && registrar_->alive && registrar_->registered > 0;
}

void CudaResources::enable_registration(bool borrowed) {
  int ranks = 1;
  RINGATTN_NCCL_CHECK(ncclCommCount(comm_, &ranks));
  if (ranks < 2 || !register_ring_buffers()) return;
  // Where ncclMemAlloc fails outright, plain buffers, unregistered.
  void* probe = nullptr;
  if (ncclMemAlloc(&probe, std::size_t{1} << 21) != ncclSuccess) return;
  RINGATTN_NCCL_CHECK(ncclMemFree(probe));
  registrar_ = std::make_shared<RingBuffer::Registrar>();
  registrar_->comm = comm_;
  registrar_->device = device_;
  registrar_->owned = !borrowed;
}

void CudaResources::release_ring_buffers() {
  // Deregister only over a healthy communicator: one with an error (or an operation that never
  // finished enqueueing) is aborted first when owned, and its registrations go with it; on a
  // borrowed one they are left to its owner's abort.
  if (registrar_ && registrar_->alive && comm_ != nullptr) {
    ncclResult_t state = ncclSuccess;
    if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess || state != ncclSuccess) {
      registrar_->alive = false;
      if (owns_comm_ && !aborted_) {
        RINGATTN_NCCL_CHECK_NOTHROW(ncclCommAbort(comm_));
        aborted_ = true;
      }
    }
  }
  for (std::shared_ptr<RingBuffer>& buffer : ring_buffers_) buffer.reset();
  for (std::shared_ptr<RingBuffer>& buffer : scratch_) buffer.reset();
  if (registrar_) registrar_->alive = false;  // anything still held is only freed
}

CudaResources::CudaResources(Context& ctx) {
  const ContextOptions& options = ctx.options();
  // Pick and open the device; a node with more ranks than GPUs fails every rank.
  agree_on(ctx.comm(), [&] {
    const int count = cuda_device_count();
    if (count == 0) throw Error(ErrorCode::cuda, "device cuda: no CUDA device is visible on " + ctx.hostname());
    device_ = options.cuda_device >= 0 ? options.cuda_device : ctx.local_rank();
    if (device_ >= count) {
      throw Error(ErrorCode::invalid_argument,
                  options.cuda_device >= 0
                      ? "device cuda: cuda_device " + std::to_string(device_) + " does not exist on " + ctx.hostname() +
                            " (" + std::to_string(count) + " GPUs)"
                      : "device cuda: " + ctx.hostname() + " runs " + std::to_string(ctx.local_size()) +
                            " ranks but has only " + std::to_string(count) + " GPUs (one rank per GPU)");
    }
    RINGATTN_CUDA_CHECK(cudaSetDevice(device_));
    cudaDeviceProp prop{};
    RINGATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
    device_name_ = prop.name;
    if (options.cuda_stream != nullptr) {
      compute_ = static_cast<cudaStream_t>(options.cuda_stream);
    } else {
      RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
      owns_compute_ = true;
    }
    int least = 0, greatest = 0;  // numerically lower = higher priority
    RINGATTN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    RINGATTN_CUDA_CHECK(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, greatest));
  });

  if (options.nccl_comm != nullptr) {
    comm_ = static_cast<ncclComm_t>(options.nccl_comm);
    int nranks = 0, rank = 0;
    RINGATTN_NCCL_CHECK(ncclCommCount(comm_, &nranks));
    RINGATTN_NCCL_CHECK(ncclCommUserRank(comm_, &rank));
    agree_on(ctx.comm(), [&] {
      if (nranks != ctx.size() || rank != ctx.rank()) {
        throw Error(ErrorCode::invalid_argument,
                    "the borrowed NCCL communicator has rank " + std::to_string(rank) + " of " + std::to_string(nranks) +
                        " but the MPI communicator has rank " + std::to_string(ctx.rank()) + " of " +
                        std::to_string(ctx.size()) + ": they must span the same ranks in the same order");
      }
      enable_registration(true);
    });
    agree_on_registration(ctx);
    return;
  }
  ncclUniqueId id{};
  if (ctx.rank() == 0) RINGATTN_NCCL_CHECK(ncclGetUniqueId(&id));
  bounded_bcast(ctx.comm(), &id, static_cast<int>(sizeof(id)), MPI_BYTE, 0, "the sharing of the NCCL id");
  agree_on(ctx.comm(), [&] {
    // Non-blocking, so that no NCCL call can hang the host and ncclCommAbort can always run.
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    RINGATTN_NCCL_CHECK(ncclCommInitRankConfig(&comm_, ctx.size(), id, ctx.rank(), &config));
    owns_comm_ = true;
    settle(kInitTimeoutSeconds);
    enable_registration(false);
  });
  agree_on_registration(ctx);
}

void CudaResources::agree_on_registration(Context& ctx) {
  // NCCL leaves a send/recv between a registered and an unregistered buffer undefined: all
  // ranks register, or none (RINGATTN_NCCL_REGISTER set differently across ranks).
  int mine = registrar_ ? 1 : 0, all = 0;
  bounded_allreduce(ctx.comm(), &mine, &all, 1, MPI_INT, MPI_MIN, "the agreement on NCCL registration");
  if (all == 0) registrar_.reset();
}

void CudaResources::settle(double timeout_s) const {
  if (comm_ != nullptr) nccl_settle(comm_, timeout_s);
}

std::unique_ptr<Transport> CudaResources::hop(cudaStream_t compute, double timeout_s, int tag,
                                              CudaSpanTimer* timer) const {
  if (hub_) return std::make_unique<LoopbackTransport>(hub_, member_, tag, compute, comm_stream_, timeout_s, timer);
  return std::make_unique<NcclTransport>(comm_, compute, comm_stream_, timeout_s, timer, tag);
}

void CudaResources::usable() const {
  if (aborted_ || (registrar_ && !registrar_->alive)) {
    throw Error(ErrorCode::nccl, "cuda:" + std::to_string(device_) +
                                     ": this context's NCCL communicator was aborted after an earlier failure; create a "
                                     "new Context");
  }
}

void CudaResources::wait(cudaEvent_t event, double timeout_s, const std::function<std::string()>& stalled,
                         const std::function<int()>& progress) {
  auto start = std::chrono::steady_clock::now();
  int reached = -1;
  for (int polls = 0;; ++polls) {
    const cudaError_t rc = cudaEventQuery(event);
    if (rc == cudaSuccess) return;
    if (rc != cudaErrorNotReady) RINGATTN_CUDA_CHECK(rc);
    if (progress && polls % 64 == 0) {  // a milestone reached: the clock starts again
      const int now = progress();
      if (now > reached) {
        reached = now;
        start = std::chrono::steady_clock::now();
      }
    }
    ncclResult_t state = ncclSuccess;
    if (comm_ != nullptr) RINGATTN_NCCL_CHECK(ncclCommGetAsyncError(comm_, &state));
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const bool failed = state != ncclSuccess && state != ncclInProgress;
    if (failed || (timeout_s > 0.0 && waited > timeout_s)) {
      const std::string pending = stalled ? stalled() : std::string("the GPU work");
      const std::string nccl_error =
          failed ? std::string(ncclGetErrorString(state)) + " (" + ncclGetLastError(comm_) + ")" : std::string();
      if (owns_comm_ && !aborted_) {
        RINGATTN_NCCL_CHECK_NOTHROW(ncclCommAbort(comm_));
        aborted_ = true;
      }
      // No deregistration after this: the abort released the registrations, and on a borrowed
      // communicator it would wait for a peer's proxy thread, which may be the stopped one.
      if (registrar_) registrar_->alive = false;
      const std::string what = comm_ == nullptr ? ""
                               : owns_comm_     ? "; NCCL communicator aborted"
                                                : " (the borrowed communicator is left as it is)";
      if (failed) throw Error(ErrorCode::nccl, "cuda:" + std::to_string(device_) + ": NCCL failed: " + nccl_error + "; " + pending + what);
      throw Error(ErrorCode::timeout, "cuda:" + std::to_string(device_) + ": waited " +
                                          detail::seconds_text(timeout_s) + " s (timeout_s, --timeout) for " + pending + what);
    }
    // Spin briefly (short waits stay short), then poll every 100 us.
    if (polls > 1000) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

CudaResources::CudaResources(int device, std::shared_ptr<LoopbackHub> hub, int member)
    : CudaResources(device, nullptr) {
  owns_comm_ = false;
  hub_ = std::move(hub);
  member_ = member;
}

CudaResources::CudaResources(int device, ncclComm_t comm) : device_(device), comm_(comm), owns_comm_(true) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(device_));
  if (comm_ != nullptr) enable_registration(false);
  cudaDeviceProp prop{};
  RINGATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device_));
  device_name_ = prop.name;
  RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&compute_, cudaStreamNonBlocking));
  owns_compute_ = true;
  int least = 0, greatest = 0;
  RINGATTN_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  RINGATTN_CUDA_CHECK(cudaStreamCreateWithPriority(&comm_stream_, cudaStreamNonBlocking, greatest));
}

CudnnSdpa* CudaResources::cudnn() {
#ifdef RINGATTN_HAVE_CUDNN
  if (!cudnn_) {
    RINGATTN_CUDA_CHECK(cudaSetDevice(device_));
    cudnn_ = std::make_shared<CudnnSdpa>();
  }
  return cudnn_.get();
#else
  return nullptr;
#endif
}

CudaResources::~CudaResources() {
  cudnn_.reset();
  release_ring_buffers();  // before the communicator goes
  // An aborted communicator is already released. Otherwise finalize (bounded), then destroy;
  // a communicator that cannot finalize is aborted rather than destroyed, which could block.
  if (owns_comm_ && comm_ != nullptr && !aborted_) {
    try {
      RINGATTN_NCCL_CHECK(ncclCommFinalize(comm_));
      settle(30.0);
      RINGATTN_NCCL_CHECK_NOTHROW(ncclCommDestroy(comm_));
    } catch (const std::exception&) {
      RINGATTN_NCCL_CHECK_NOTHROW(ncclCommAbort(comm_));
    }
  }
  if (comm_stream_ != nullptr) RINGATTN_CUDA_CHECK_NOTHROW(cudaStreamDestroy(comm_stream_));
  if (owns_compute_ && compute_ != nullptr) RINGATTN_CUDA_CHECK_NOTHROW(cudaStreamDestroy(compute_));
}

}  // namespace ringattn::detail
