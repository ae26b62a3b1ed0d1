// engine/ring_forward.hpp: the ring loop of the forward pass on CPU.
//
//   pack own K,V into buf[0]
//   for step s = 0 .. P-1:
//     post send of buf[cur] to r+1 and receive of the next block into buf[1-cur]  (s < P-1)
//     fold buf[cur] into the running (o, lse) with this step's tasks, poking MPI meanwhile
//     wait for both transfers; cur = 1 - cur
//   sliding window with sinks: gather the sink tokens' K,V to every rank, fold them in
//   write o and lse
// A sliding-window plan has fewer steps than ranks: the ring stops once every window is
// covered.
// Construction allocates everything, so the caller can agree on allocation failures across
// ranks before the first transfer.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_forward.hpp"
#include "comm/transport.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// Sliding window with sinks: the sink block, the first plan.sink_len tokens' K then V (each
// (B, sink_len, H_kv, D) in the storage dtype), gathered from their owners (contiguous layout:
// rank r's first plan.sink_rows[r] rows) into `sink_block` on every rank. Collective; returns
// the bytes this rank sent.
std::uint64_t gather_sink_rows(MPI_Comm comm, const RingPlan& plan, const AttentionShape& shape, DType dtype,
                               const TensorView& k, const TensorView& v, unsigned char* sink_block);

class CpuRingForward {
 public:
  CpuRingForward(MPI_Comm comm, RingPlan plan, const AttentionShape& shape, DType dtype, std::int64_t q_len,
                 std::int64_t kv_capacity, int threads, bool mpi_progress_from_kernel);

  // q: (B, S_local, H, D); k, v: (B, S_local, H_kv, D); out like q; lse (B, H, S_local) or no data.
  // Bound on each wait for a transfer (seconds; 0 = none): see MpiTransport.
  void set_timeout(double seconds, std::vector<long> peer_pids = {}) {
    timeout_s_ = seconds;
    peer_pids_ = std::move(peer_pids);
  }

  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, float scale, const std::function<void(int, int)>& on_step);

  std::uint64_t bytes_sent() const { return bytes_sent_; }

 private:
  std::size_t block_bytes(std::int64_t kv_len) const;
  // The rows of a packed block of kv_len rows that travel (see RingStep::held, send).
  Pieces rows_of(const RowRange& rows, std::int64_t kv_len) const;

  MPI_Comm comm_;
  double timeout_s_ = 0.0;  // bound on each transfer wait; 0 = none
  std::vector<long> peer_pids_;
  RingPlan plan_;
  AttentionShape shape_;
  DType dtype_;
  std::int64_t q_len_;
  bool mpi_progress_;
  CpuForwardKernel kernel_;
  std::vector<unsigned char> blocks_[2];  // packed K then V, storage dtype, double-buffered
  std::vector<unsigned char> sink_block_;  // packed K then V of the sink tokens
  std::uint64_t bytes_sent_ = 0;
};

}  // namespace ringattn::detail
