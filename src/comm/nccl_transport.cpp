#include "comm/nccl_transport.hpp"

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

void NcclTransport::start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
                          int recv_from) {
  if (pending_) throw Error(ErrorCode::internal, "nccl transport: start() before the last wait()");
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_, 0));
  RINGATTN_NCCL_CHECK(ncclGroupStart());
  RINGATTN_NCCL_CHECK(ncclSend(send, send_bytes, ncclUint8, send_to, comm_, comm_stream_));
  RINGATTN_NCCL_CHECK(ncclRecv(recv, recv_bytes, ncclUint8, recv_from, comm_, comm_stream_));
  RINGATTN_NCCL_CHECK(ncclGroupEnd());
  RINGATTN_CUDA_CHECK(cudaEventRecord(done_, comm_stream_));
  bytes_sent_ += send_bytes;
  pending_ = true;
}

void NcclTransport::wait() {
  if (!pending_) return;
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
  pending_ = false;
}

}  // namespace ringattn::detail
