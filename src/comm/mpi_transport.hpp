// comm/mpi_transport.hpp: the ring hop over MPI point-to-point (host buffers).
#pragma once

#include <mpi.h>

#include <vector>

#include "comm/transport.hpp"

namespace ringattn::detail {

class MpiTransport final : public Transport {
 public:
  explicit MpiTransport(MPI_Comm comm) : comm_(comm) {}
  ~MpiTransport() override;
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;

  void start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
             int recv_from) override;
  void progress() override;
  void wait() override;

 private:
  static constexpr int kTag = 0x5241;  // "RA": the library's communicator carries only ring hops
  MPI_Comm comm_;
  std::vector<MPI_Request> requests_;
};

}  // namespace ringattn::detail
