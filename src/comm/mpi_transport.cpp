#include "comm/mpi_transport.hpp"

#include <algorithm>

#include "comm/mpi_util.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

MpiTransport::~MpiTransport() {
  // A transfer still in flight means an exception unwound the ring; cancel rather than wait.
  for (MPI_Request& r : requests_) {
    if (r != MPI_REQUEST_NULL) {
      MPI_Cancel(&r);
      MPI_Request_free(&r);
    }
  }
}

void MpiTransport::start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
                         int recv_from) {
  if (!requests_.empty()) throw Error(ErrorCode::internal, "mpi transport: start() before the last wait()");
  // Messages over 1 GiB travel in pieces: MPI counts are ints.
  const auto* s = static_cast<const char*>(send);
  auto* r = static_cast<char*>(recv);
  for (std::size_t off = 0; off < recv_bytes; off += kMaxMpiMessageBytes) {
    const int n = static_cast<int>(std::min(kMaxMpiMessageBytes, recv_bytes - off));
    requests_.emplace_back();
    RINGATTN_MPI_CHECK(MPI_Irecv(r + off, n, MPI_BYTE, recv_from, kTag, comm_, &requests_.back()));
  }
  for (std::size_t off = 0; off < send_bytes; off += kMaxMpiMessageBytes) {
    const int n = static_cast<int>(std::min(kMaxMpiMessageBytes, send_bytes - off));
    requests_.emplace_back();
    RINGATTN_MPI_CHECK(MPI_Isend(s + off, n, MPI_BYTE, send_to, kTag, comm_, &requests_.back()));
  }
  bytes_sent_ += send_bytes;
}

void MpiTransport::progress() {
  if (requests_.empty()) return;
  int done = 0;
  RINGATTN_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE));
}

void MpiTransport::wait() {
  if (requests_.empty()) return;
  RINGATTN_MPI_CHECK(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
  requests_.clear();
}

}  // namespace ringattn::detail
