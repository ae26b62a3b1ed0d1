#include "ringattn/context.hpp"

#include <sched.h>

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <unistd.h>
#include <functional>
#include <utility>

#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "engine/cuda_resources.hpp"
#else
namespace ringattn::detail {
class CudaResources {};  // never created without the CUDA backend
}  // namespace ringattn::detail
#endif
#include "ringattn/error.hpp"

namespace ringattn {

Context::Context(MPI_Comm comm, ContextOptions options) : options_(options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) throw Error(ErrorCode::invalid_argument, "ringattn::Context: MPI is not initialised");
  if (comm == MPI_COMM_NULL) throw Error(ErrorCode::invalid_argument, "ringattn::Context: the communicator is MPI_COMM_NULL");
  // Our own duplicate: the ring's messages cannot collide with the caller's, and errors on it
  // are returned to us instead of aborting the caller's job.
  comm_ = detail::bounded_comm_dup(comm, "the creation of a Context");
  RINGATTN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  rank_ = detail::comm_rank(comm_);
  size_ = detail::comm_size(comm_);

  MPI_Comm node = MPI_COMM_NULL;
  RINGATTN_MPI_CHECK(MPI_Comm_split_type(comm_, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL, &node));
  local_rank_ = detail::comm_rank(node);
  local_size_ = detail::comm_size(node);
  MPI_Comm_free(&node);

  int provided = MPI_THREAD_SINGLE;
  RINGATTN_MPI_CHECK(MPI_Query_thread(&provided));
  thread_level_ = provided;

  if (options.cpu_threads > 0) {
    cpu_threads_ = options.cpu_threads;
  } else if (const char* env = std::getenv("OMP_NUM_THREADS"); env != nullptr && std::atoi(env) > 0) {
    cpu_threads_ = std::atoi(env);
  } else {
    // mpirun usually binds each rank to its own cores (Open MPI: one core per rank for np <= 2,
    // a socket otherwise): use exactly those. Unbound ranks share the node's cores.
    const int hw = std::max(1, static_cast<int>(std::thread::hardware_concurrency()));
    cpu_set_t allowed;
    CPU_ZERO(&allowed);
    const int usable = sched_getaffinity(0, sizeof(allowed), &allowed) == 0 ? CPU_COUNT(&allowed) : hw;
    cpu_threads_ = usable < hw ? std::max(1, usable) : std::max(1, hw / local_size_);
  }
  hostname_ = detail::host_name();
  // Who runs where, for naming a stopped or vanished peer when a wait times out.
  const long mine[2] = {static_cast<long>(getpid()), static_cast<long>(std::hash<std::string>{}(hostname_))};
  std::vector<long> all(2 * static_cast<std::size_t>(size_));
  detail::bounded_allgather(comm_, mine, 2, MPI_LONG, all.data(), "the creation of a Context");
  node_peer_pids_.assign(static_cast<std::size_t>(size_), -1);
  for (int r = 0; r < size_; ++r) {
    if (all[2 * static_cast<std::size_t>(r) + 1] == mine[1]) node_peer_pids_[static_cast<std::size_t>(r)] = all[2 * static_cast<std::size_t>(r)];
  }
}

bool Context::mpi_progress_from_threads() const {
  if (thread_level_ >= MPI_THREAD_SERIALIZED) return true;
  int is_main = 0;
  MPI_Is_thread_main(&is_main);
  return thread_level_ == MPI_THREAD_FUNNELED && is_main != 0;
}

Context::~Context() {
  cuda_.reset();  // before the communicator: tearing NCCL down may still use it
  int finalized = 0;
  MPI_Finalized(&finalized);
  // After a failure mid-ring the abandoned engine's requests are still active on the
  // communicator (failure()): it is left to MPI_Finalize rather than freed under them.
  if (comm_ != MPI_COMM_NULL && !finalized && failure_.empty()) MPI_Comm_free(&comm_);
}

Context::Context(Context&& other) noexcept { *this = std::move(other); }

Context& Context::operator=(Context&& other) noexcept {
  if (this != &other) {
    cuda_.reset();
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (comm_ != MPI_COMM_NULL && !finalized && failure_.empty()) MPI_Comm_free(&comm_);  // as ~Context
    comm_ = std::exchange(other.comm_, MPI_COMM_NULL);
    rank_ = other.rank_;
    size_ = other.size_;
    local_rank_ = other.local_rank_;
    local_size_ = other.local_size_;
    cpu_threads_ = other.cpu_threads_;
    thread_level_ = other.thread_level_;
    hostname_ = std::move(other.hostname_);
    node_peer_pids_ = std::move(other.node_peer_pids_);
    options_ = other.options_;
    cuda_ = std::move(other.cuda_);
    failure_ = std::move(other.failure_);
    collectives_abandoned_ = other.collectives_abandoned_;
  }
  return *this;
}

detail::CudaResources& Context::cuda() {
#ifdef RINGATTN_HAVE_CUDA
  if (!cuda_) cuda_ = std::make_unique<detail::CudaResources>(*this);
  return *cuda_;
#else
  throw Error(ErrorCode::invalid_argument, "device cuda: this build of ringattn has no CUDA backend "
                                           "(configure with RINGATTN_WITH_CUDA=ON on a machine with the CUDA toolkit)");
#endif
}

}  // namespace ringattn
