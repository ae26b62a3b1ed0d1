// engine/ring_backward.hpp: the ring loop of the backward pass on CPU.
//
// Q, O, dO and LSE stay home; K and V travel with their fp32 dK, dV accumulators:
//   block[0] = own K, V | dK = dV = 0
//   for step s = 0 .. P-1:
//     add this rank's contributions to the held block's dK, dV and to its own dQ
//     pass the block on to r+1 and take the next from r-1   (P > 1)
//   after P hops every block is home with all ranks' contributions: write dK, dV, dQ
// The accumulators are updated by the step's compute, so a block can only travel once that
// compute is done: on CPUs the hop follows the compute (the GPU path will overlap K/V).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "kernels/cpu/cpu_backward.hpp"
#include "comm/mpi_transport.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

class CpuRingBackward {
 public:
  CpuRingBackward(MPI_Comm comm, RingPlan plan, const AttentionShape& shape, DType dtype, std::int64_t q_len,
                  std::int64_t kv_capacity, int threads);

  // Bound on each wait for a transfer (seconds; 0 = none): see MpiTransport.
  void set_timeout(double seconds, std::vector<long> peer_pids = {}) {
    timeout_s_ = seconds;
    peer_pids_ = std::move(peer_pids);
  }

  void run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
           const TensorView& dv, float scale);

 private:
  std::size_t kv_bytes(std::int64_t kv_len) const;   // packed K then V, storage dtype
  std::size_t dkv_floats(std::int64_t kv_len) const;  // dK then dV, fp32
  // One pass of the ring (the plan's steps, or its reverse steps), ending with every block's
  // accumulators back at their owner; returns the buffer holding this rank's.
  int pass(MpiTransport& transport, const std::vector<RingStep>& steps, bool reverse, int step0, const TensorView& k,
           const TensorView& v);

  MPI_Comm comm_;
  double timeout_s_ = 0.0;  // bound on each transfer wait; 0 = none
  std::vector<long> peer_pids_;
  RingPlan plan_;
  AttentionShape shape_;
  DType dtype_;
  std::int64_t q_len_;
  CpuBackwardKernel kernel_;
  // Each holds one travelling block: K, V (storage dtype) then dK, dV (fp32), for kv_len rows.
  std::vector<unsigned char> blocks_[2];
  // Sliding window: the sink tokens' K, V and their gradient sums; this rank's dK, dV while
  // the reverse pass and the sinks add to them.
  std::vector<unsigned char> sink_block_;
  std::vector<float> home_;
};

}  // namespace ringattn::detail
