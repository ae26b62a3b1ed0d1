#include "comm/nccl_transport.hpp"

#include <chrono>
#include <string>
#include <thread>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

void nccl_settle(ncclComm_t comm, double timeout_s) {
  const auto start = std::chrono::steady_clock::now();
  for (int polls = 0;; ++polls) {
    ncclResult_t state = ncclSuccess;
    RINGATTN_NCCL_CHECK(ncclCommGetAsyncError(comm, &state));
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) {
      throw Error(ErrorCode::nccl, std::string("NCCL: ") + ncclGetErrorString(state) + " (" + ncclGetLastError(comm) + ")");
    }
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeout_s > 0.0 && waited > timeout_s) {
      throw Error(ErrorCode::timeout, "NCCL: an operation was still being enqueued after " +
                                          std::to_string(static_cast<int>(timeout_s)) + " s (--timeout)");
    }
    if (polls > 100) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void NcclTransport::start(const void* send, std::size_t send_bytes, int send_to, void* recv, std::size_t recv_bytes,
                          int recv_from) {
  if (pending_) throw Error(ErrorCode::internal, "nccl transport: start() before the last wait()");
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_, 0));
  RINGATTN_NCCL_CHECK(ncclGroupStart());
  RINGATTN_NCCL_CHECK(ncclSend(send, send_bytes, ncclUint8, send_to, comm_, comm_stream_));
  RINGATTN_NCCL_CHECK(ncclRecv(recv, recv_bytes, ncclUint8, recv_from, comm_, comm_stream_));
  RINGATTN_NCCL_CHECK(ncclGroupEnd());
  nccl_settle(comm_, timeout_s_);
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
