// comm/nccl_transport.hpp: the ring hop over NCCL (device buffers), without host syncs.
//
// start(): the communication stream waits for an event recorded on the compute stream (the
// send buffer is filled and the receive buffer is no longer read), then posts a grouped
// ncclSend/ncclRecv, waits until NCCL has enqueued them (non-blocking communicators) and
// records `done`. wait(): the compute stream waits for `done`. The
// host never blocks, so the transfer for step s+1 runs while step s computes. With a timer
// (profiling), each start's send/recv is timed on the communication stream, from the moment
// the compute stream reached the start to the end of NCCL's kernel: how long the transfer
// took beside the compute, under `tag`.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "comm/transport.hpp"
#include "core/cuda_raii.hpp"
#include "core/cuda_span_timer.hpp"

namespace ringattn::detail {

// Non-blocking communicators may return from a call before its work is enqueued: waits until
// ncclCommGetAsyncError reports success (throws on an NCCL error, or Error(timeout) after
// timeout_s; 0 = no bound). Immediate on blocking communicators.
void nccl_settle(ncclComm_t comm, double timeout_s);

class NcclTransport final : public Transport {
 public:
  NcclTransport(ncclComm_t comm, cudaStream_t compute, cudaStream_t comm_stream, double timeout_s = 0.0,
                CudaSpanTimer* timer = nullptr, int tag = 0)
      : comm_(comm), compute_(compute), comm_stream_(comm_stream), timeout_s_(timeout_s), timer_(timer), tag_(tag) {}

  void start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv, const Pieces& recv_pieces,
                    int recv_from) override;
  void wait() override;

 private:
  ncclComm_t comm_;
  cudaStream_t compute_;
  cudaStream_t comm_stream_;
  double timeout_s_;
  CudaSpanTimer* timer_;
  int tag_;
  CudaEvent ready_;
  CudaEvent done_;
  bool pending_ = false;
};

}  // namespace ringattn::detail
