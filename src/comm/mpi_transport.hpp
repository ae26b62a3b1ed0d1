// comm/mpi_transport.hpp: the ring hop over MPI point-to-point (host buffers).
//
// wait() is bounded: with a timeout (seconds, > 0) it polls the requests and, when the bound
// passes, throws Error(timeout) naming this rank, the step and the peer it is still waiting
// on (the receive from the previous rank, or the send to the next). MPI has no timeout of its
// own, and a stopped or hung peer would otherwise hold this rank forever.
#pragma once

#include <mpi.h>

#include <string>
#include <utility>
#include <vector>

#include "comm/transport.hpp"

namespace ringattn::detail {

class MpiTransport final : public Transport {
 public:
  // peer_pids: each rank's pid where it runs on this node, else -1 (Context::node_peer_pids):
  // on a timeout, same-node ranks that are stopped or gone are named as the cause.
  explicit MpiTransport(MPI_Comm comm, double timeout_s = 0.0, std::vector<long> peer_pids = {})
      : comm_(comm), timeout_s_(timeout_s), peer_pids_(std::move(peer_pids)) {}
  ~MpiTransport() override;
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;

  void start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv, const Pieces& recv_pieces,
                    int recv_from) override;
  void progress() override;
  void wait() override;
  // Counted by the caller: which ring step the next wait() belongs to (for the message).
  void set_step(int step) { step_ = step; }

 private:
  static constexpr int kTag = 0x5241;  // "RA": the library's communicator carries only ring hops
  MPI_Comm comm_;
  double timeout_s_ = 0.0;
  std::vector<long> peer_pids_;
  int step_ = 0;
  int send_to_ = -1, recv_from_ = -1;
  std::size_t recv_requests_ = 0;  // requests_ starts with the receives
  std::vector<MPI_Request> requests_;
};

// Same-node ranks (pids from Context::node_peer_pids) that are stopped (SIGSTOP, a debugger)
// or no longer exist, as "rank 1 (pid 123) is stopped", or "" when none is found.
std::string stalled_node_peers(const std::vector<long>& peer_pids, int self);

}  // namespace ringattn::detail
