// comm/nccl_transport.hpp: the ring hop over NCCL (device buffers), without host syncs.
//
// start(): the communication stream waits for an event recorded on the compute stream (the
// send buffer is filled and the receive buffer is no longer read), then posts a grouped
// ncclSend/ncclRecv and records `done`. wait(): the compute stream waits for `done`. The
// host never blocks, so the transfer for step s+1 runs while step s computes.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include "comm/transport.hpp"
#include "core/cuda_raii.hpp"

namespace ringattn::detail {

class NcclTransport final : public Transport {
 public:
  NcclTransport(ncclComm_t comm, cudaStream_t compute, cudaStream_t comm_stream)
      : comm_(comm), compute_(compute), comm_stream_(comm_stream) {}

  void start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
             int recv_from) override;
  void wait() override;

 private:
  ncclComm_t comm_;
  cudaStream_t compute_;
  cudaStream_t comm_stream_;
  CudaEvent ready_;
  CudaEvent done_;
  bool pending_ = false;
};

}  // namespace ringattn::detail
