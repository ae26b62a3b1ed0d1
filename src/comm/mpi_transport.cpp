#include "comm/mpi_transport.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>

#include "comm/mpi_util.hpp"
#include "ringattn/error.hpp"
#include "core/text.hpp"

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

void MpiTransport::start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv,
                                const Pieces& recv_pieces, int recv_from) {
  if (!requests_.empty()) throw Error(ErrorCode::internal, "mpi transport: start() before the last wait()");
  send_to_ = send_to;
  recv_from_ = recv_from;
  // One message per piece (non-overtaking: the i-th receive matches the i-th send), pieces
  // over 1 GiB in parts: MPI counts are ints.
  auto post = [&](const Pieces& pieces, char* base, bool is_send) {
    for (std::size_t i = 0; i < pieces.count; ++i) {
      char* piece = base + pieces.offset + i * pieces.stride;
      for (std::size_t off = 0; off < pieces.bytes; off += kMaxMpiMessageBytes) {
        const int n = static_cast<int>(std::min(kMaxMpiMessageBytes, pieces.bytes - off));
        requests_.emplace_back();
        if (is_send) {
          RINGATTN_MPI_CHECK(MPI_Isend(piece + off, n, MPI_BYTE, send_to, kTag, comm_, &requests_.back()));
        } else {
          RINGATTN_MPI_CHECK(MPI_Irecv(piece + off, n, MPI_BYTE, recv_from, kTag, comm_, &requests_.back()));
        }
      }
    }
  };
  post(recv_pieces, static_cast<char*>(recv), false);
  recv_requests_ = requests_.size();
  post(send_pieces, const_cast<char*>(static_cast<const char*>(send)), true);
  bytes_sent_ += send_pieces.total();
}

void MpiTransport::progress() {
  if (requests_.empty()) return;
  int done = 0;
  RINGATTN_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE));
}

void MpiTransport::wait() {
  if (requests_.empty()) return;
  if (timeout_s_ <= 0.0) {
    RINGATTN_MPI_CHECK(MPI_Waitall(static_cast<int>(requests_.size()), requests_.data(), MPI_STATUSES_IGNORE));
    requests_.clear();
    return;
  }
  const double deadline = MPI_Wtime() + timeout_s_;
  for (;;) {
    int done = 0;
    RINGATTN_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &done, MPI_STATUSES_IGNORE));
    if (done) break;
    if (MPI_Wtime() > deadline) {
      // Completed requests are MPI_REQUEST_NULL now: a live receive means the previous rank
      // never sent; otherwise the next rank never received.
      bool receiving = false;
      for (std::size_t i = 0; i < recv_requests_; ++i) receiving = receiving || requests_[i] != MPI_REQUEST_NULL;
      int rank = 0;
      MPI_Comm_rank(comm_, &rank);
      const std::string cause = stalled_node_peers(peer_pids_, rank);
      throw Error(ErrorCode::timeout,
                  "rank " + std::to_string(rank) + ": ring step " + std::to_string(step_) + ": waited " +
                      detail::seconds_text(timeout_s_) + " s for " +
                      (receiving ? "the block from rank " + std::to_string(recv_from_)
                                 : "rank " + std::to_string(send_to_) + " to take this rank's block") +
                      " (timeout_s, --timeout); " +
                      (cause.empty() ? std::string("that rank is stopped, hung or far slower (or waits on one that is)")
                                     : cause));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  requests_.clear();
}

std::string stalled_node_peers(const std::vector<long>& peer_pids, int self) {
  std::string found;
  for (std::size_t r = 0; r < peer_pids.size(); ++r) {
    if (static_cast<int>(r) == self || peer_pids[r] < 0) continue;
    std::FILE* f = std::fopen(("/proc/" + std::to_string(peer_pids[r]) + "/stat").c_str(), "r");
    std::string state = "gone";
    if (f != nullptr) {
      char buf[512] = {0};
      const std::size_t n = std::fread(buf, 1, sizeof(buf) - 1, f);
      std::fclose(f);
      const std::string stat(buf, n);
      const auto close = stat.rfind(')');  // "pid (comm) S ...": the state follows the name
      if (close != std::string::npos && close + 2 < stat.size()) {
        const char c = stat[close + 2];
        state = (c == 'T' || c == 't') ? "stopped" : (c == 'Z' || c == 'X') ? "gone" : "";
      }
    }
    if (state.empty()) continue;
    found += (found.empty() ? "" : ", ") + std::string("rank ") + std::to_string(r) + " (pid " +
             std::to_string(peer_pids[r]) + ") is " + state;
  }
  return found;
}

}  // namespace ringattn::detail
