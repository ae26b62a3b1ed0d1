// comm/transport.hpp: moving a KV block one hop around the ring.
//
// start() (start_pieces()) posts this step's send to the next rank and receive from the previous one and
// returns at once; the kernel computes; wait() completes both. progress() may be called
// while computing to let the transport move data (MPI progresses only inside MPI calls).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ringattn::detail {

// Parts of a buffer that travel: `count` runs of `bytes` bytes, the first `offset` bytes in,
// each `stride` bytes after the one before (rows [begin, end) of every (K or V, batch) slab of
// a packed block). Sender and receiver must describe runs of the same sizes.
struct Pieces {
  std::size_t offset = 0;
  std::size_t bytes = 0;
  std::size_t stride = 0;
  std::size_t count = 1;
  std::size_t total() const { return bytes * count; }
  static Pieces whole(std::size_t n) { return {0, n, n, 1}; }
};

// Rows [begin, end) of each of `slabs` slabs of `len` rows of `row_bytes` bytes, laid out one
// after another (a packed K/V block: K then V, each batch's rows together: 2 x batch slabs).
// All rows: the whole buffer as one piece.
inline Pieces slab_rows(std::int64_t begin, std::int64_t end, std::int64_t len, std::size_t row_bytes,
                        std::size_t slabs) {
  const auto rows = static_cast<std::size_t>(end > begin ? end - begin : 0);
  const auto slab = static_cast<std::size_t>(len) * row_bytes;
  if (begin == 0 && end == len) return Pieces::whole(slab * slabs);
  return {static_cast<std::size_t>(begin) * row_bytes, rows * row_bytes, slab, rows > 0 ? slabs : 0};
}

class Transport {
 public:
  virtual ~Transport() = default;
  // Sends the pieces of `send` to send_to and receives those of `recv` from recv_from.
  virtual void start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv,
                            const Pieces& recv_pieces, int recv_from) = 0;
  void start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
             int recv_from) {
    start_pieces(send, Pieces::whole(send_bytes), send_to, recv, Pieces::whole(recv_bytes), recv_from);
  }
  virtual void progress() {}
  virtual void wait() = 0;
  std::uint64_t bytes_sent() const { return bytes_sent_; }
  // The bytes this rank received (the pieces of every start).
  std::uint64_t bytes_received() const { return bytes_received_; }

 protected:
  std::uint64_t bytes_sent_ = 0;
  std::uint64_t bytes_received_ = 0;
};

}  // namespace ringattn::detail
