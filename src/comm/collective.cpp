#include "comm/collective.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "comm/mpi_transport.hpp"
#include "comm/mpi_util.hpp"
#include "core/text.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

thread_local const CollectiveBound* innermost = nullptr;

// A posted collective and the buffers MPI reads and writes: owned here, so that a collective
// abandoned at its deadline can be leaked with them instead of writing into freed memory (or
// the caller's returned stack frame) when the missing rank arrives.
struct Posted {
  std::vector<unsigned char> send, recv;
  std::vector<int> counts, displs;  // MPI reads a v-collective's arrays until it completes
  MPI_Comm duplicate = MPI_COMM_NULL;
  MPI_Request requests[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};  // [1]: a send/recv pair's send
};

// Nothing more may be posted on a thread whose bound saw a collective abandoned: the
// communicator's collectives no longer line up across the ranks.
void refuse_if_abandoned(const std::string& what) {
  const CollectiveBound* bound = CollectiveBound::current();
  if (bound != nullptr && bound->abandoned()) {
    throw Error(ErrorCode::timeout, what + ": not started, an earlier collective was abandoned at its deadline");
  }
}

std::size_t bytes_of(int count, MPI_Datatype type) {
  int size = 0;
  RINGATTN_MPI_CHECK(MPI_Type_size(type, &size));
  return static_cast<std::size_t>(count) * static_cast<std::size_t>(size);
}

// Waits for the collective, bounded by the current CollectiveBound. It polls without sleeping
// for its first millisecond (ranks that arrive together finish here), then every 100 us.
void complete(std::unique_ptr<Posted>& posted, MPI_Comm comm, const std::string& what) {
  const CollectiveBound* bound = CollectiveBound::current();
  MPI_Request* requests = posted->requests;
  if (bound == nullptr || !(bound->seconds() > 0.0)) {
    RINGATTN_MPI_CHECK(MPI_Waitall(2, requests, MPI_STATUSES_IGNORE));
    return;
  }
  const double limit = std::fmax(bound->seconds(), kMinCollectiveBoundSeconds);
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    int done = 0;
    RINGATTN_MPI_CHECK(MPI_Testall(2, requests, &done, MPI_STATUSES_IGNORE));
    if (done) return;
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (waited > limit) break;
    if (waited > 1e-3) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
  posted.release();  // still posted: MPI may complete it into these buffers at any time
  bound->note_abandoned();
  const int rank = comm_rank(comm);
  const std::string cause =
      bound->peer_pids() != nullptr ? stalled_node_peers(*bound->peer_pids(), rank) : std::string();
  throw Error(ErrorCode::timeout,
              "rank " + std::to_string(rank) + ": waited " + seconds_text(limit) + " s (timeout_s, --timeout) in " + what +
                  " for the other ranks; " +
                  (cause.empty() ? std::string("a rank is stopped, hung or far slower, or did not make the same call")
                                 : cause) +
                  " (this communicator can carry no further collective)");
}

}  // namespace

CollectiveBound::CollectiveBound(double seconds, const std::vector<long>* peer_pids)
    : seconds_(std::isfinite(seconds) && seconds > 0.0 ? seconds : 0.0),
      peer_pids_(peer_pids),
      outer_(innermost),
      abandoned_(innermost != nullptr && innermost->abandoned_) {
  innermost = this;
}

CollectiveBound::~CollectiveBound() { innermost = outer_; }

const CollectiveBound* CollectiveBound::current() { return innermost; }

void CollectiveBound::note_abandoned() const {
  for (const CollectiveBound* b = this; b != nullptr; b = b->outer_) b->abandoned_ = true;
}

void bounded_allreduce(MPI_Comm comm, const void* send, void* recv, int count, MPI_Datatype type, MPI_Op op,
                       const std::string& what) {
  refuse_if_abandoned(what);
  const std::size_t bytes = bytes_of(count, type);
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send == MPI_IN_PLACE ? recv : send),
                      static_cast<const unsigned char*>(send == MPI_IN_PLACE ? recv : send) + bytes);
  posted->recv.resize(bytes);
  RINGATTN_MPI_CHECK(
      MPI_Iallreduce(posted->send.data(), posted->recv.data(), count, type, op, comm, &posted->requests[0]));
  complete(posted, comm, what);
  if (bytes > 0) std::memcpy(recv, posted->recv.data(), bytes);
}

void bounded_exscan(MPI_Comm comm, const void* send, void* recv, int count, MPI_Datatype type, MPI_Op op,
                    const std::string& what) {
  refuse_if_abandoned(what);
  const std::size_t bytes = bytes_of(count, type);
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + bytes);
  posted->recv.assign(static_cast<const unsigned char*>(recv), static_cast<const unsigned char*>(recv) + bytes);
  RINGATTN_MPI_CHECK(MPI_Iexscan(posted->send.data(), posted->recv.data(), count, type, op, comm, &posted->requests[0]));
  complete(posted, comm, what);
  if (bytes > 0) std::memcpy(recv, posted->recv.data(), bytes);
}

void bounded_allgather(MPI_Comm comm, const void* send, int count, MPI_Datatype type, void* recv,
                       const std::string& what) {
  refuse_if_abandoned(what);
  const std::size_t bytes = bytes_of(count, type);
  const std::size_t total = bytes * static_cast<std::size_t>(comm_size(comm));
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + bytes);
  posted->recv.resize(total);
  RINGATTN_MPI_CHECK(MPI_Iallgather(posted->send.data(), count, type, posted->recv.data(), count, type, comm,
                                    &posted->requests[0]));
  complete(posted, comm, what);
  if (total > 0) std::memcpy(recv, posted->recv.data(), total);
}

void bounded_allgatherv(MPI_Comm comm, const void* send, int count, void* recv, const int* counts,
                        const int* displs, const std::string& what) {
  refuse_if_abandoned(what);
  const int world = comm_size(comm);
  std::size_t total = 0;
  for (int r = 0; r < world; ++r) {
    total = std::max(total, static_cast<std::size_t>(displs[r]) + static_cast<std::size_t>(counts[r]));
  }
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + count);
  posted->recv.assign(static_cast<const unsigned char*>(recv), static_cast<const unsigned char*>(recv) + total);
  posted->counts.assign(counts, counts + world);
  posted->displs.assign(displs, displs + world);
  RINGATTN_MPI_CHECK(MPI_Iallgatherv(posted->send.data(), count, MPI_BYTE, posted->recv.data(), posted->counts.data(),
                                     posted->displs.data(), MPI_BYTE, comm, &posted->requests[0]));
  complete(posted, comm, what);
  if (total > 0) std::memcpy(recv, posted->recv.data(), total);
}

void bounded_bcast(MPI_Comm comm, void* buffer, int count, MPI_Datatype type, int root, const std::string& what) {
  refuse_if_abandoned(what);
  const std::size_t bytes = bytes_of(count, type);
  auto posted = std::make_unique<Posted>();
  posted->recv.assign(static_cast<const unsigned char*>(buffer), static_cast<const unsigned char*>(buffer) + bytes);
  RINGATTN_MPI_CHECK(MPI_Ibcast(posted->recv.data(), count, type, root, comm, &posted->requests[0]));
  complete(posted, comm, what);
  if (bytes > 0) std::memcpy(buffer, posted->recv.data(), bytes);
}

void bounded_gather(MPI_Comm comm, const void* send, int count, MPI_Datatype type, void* recv, int root,
                    const std::string& what) {
  refuse_if_abandoned(what);
  const std::size_t bytes = bytes_of(count, type);
  const bool is_root = comm_rank(comm) == root;
  const std::size_t total = is_root ? bytes * static_cast<std::size_t>(comm_size(comm)) : 0;
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + bytes);
  posted->recv.resize(total);
  RINGATTN_MPI_CHECK(MPI_Igather(posted->send.data(), count, type, is_root ? posted->recv.data() : nullptr, count,
                                 type, root, comm, &posted->requests[0]));
  complete(posted, comm, what);
  if (total > 0) std::memcpy(recv, posted->recv.data(), total);
}

void bounded_barrier(MPI_Comm comm, const std::string& what) {
  refuse_if_abandoned(what);
  auto posted = std::make_unique<Posted>();
  RINGATTN_MPI_CHECK(MPI_Ibarrier(comm, &posted->requests[0]));
  complete(posted, comm, what);
}

void bounded_sendrecv(MPI_Comm comm, const void* send, std::size_t bytes, void* recv, int peer, int tag,
                      const std::string& what) {
  refuse_if_abandoned(what);
  if (bytes > static_cast<std::size_t>(std::numeric_limits<int>::max())) {
    throw Error(ErrorCode::internal, what + ": " + std::to_string(bytes) + " bytes is more than one message carries");
  }
  auto posted = std::make_unique<Posted>();
  posted->send.assign(static_cast<const unsigned char*>(send), static_cast<const unsigned char*>(send) + bytes);
  posted->recv.resize(bytes);
  const int n = static_cast<int>(bytes);
  RINGATTN_MPI_CHECK(MPI_Irecv(posted->recv.data(), n, MPI_BYTE, peer, tag, comm, &posted->requests[0]));
  RINGATTN_MPI_CHECK(MPI_Isend(posted->send.data(), n, MPI_BYTE, peer, tag, comm, &posted->requests[1]));
  complete(posted, comm, what);
  if (bytes > 0) std::memcpy(recv, posted->recv.data(), bytes);
}

MPI_Comm bounded_comm_dup(MPI_Comm comm, const std::string& what) {
  refuse_if_abandoned(what);
  auto posted = std::make_unique<Posted>();
  RINGATTN_MPI_CHECK(MPI_Comm_idup(comm, &posted->duplicate, &posted->requests[0]));
  complete(posted, comm, what);
  return posted->duplicate;
}

}  // namespace ringattn::detail
