// comm/transport.hpp: moving a KV block one hop around the ring.
//
// start() posts this step's send to the next rank and receive from the previous one and
// returns at once; the kernel computes; wait() completes both. progress() may be called
// while computing to let the transport move data (MPI progresses only inside MPI calls).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ringattn::detail {

class Transport {
 public:
  virtual ~Transport() = default;
  virtual void start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
                     int recv_from) = 0;
  virtual void progress() {}
  virtual void wait() = 0;
  std::uint64_t bytes_sent() const { return bytes_sent_; }

 protected:
  std::uint64_t bytes_sent_ = 0;
};

}  // namespace ringattn::detail
