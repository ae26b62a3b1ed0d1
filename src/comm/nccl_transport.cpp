#include "comm/nccl_transport.hpp"

#include <chrono>
#include <string>
#include <thread>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"
#include "core/text.hpp"

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
                                          detail::seconds_text(timeout_s) + " s (timeout_s, --timeout)");
    }
    if (polls > 100) std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

void NcclTransport::start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv,
                                 const Pieces& recv_pieces, int recv_from) {
  if (pending_) throw Error(ErrorCode::internal, "nccl transport: start() before the last wait()");
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready_, compute_));
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready_, 0));
  // One send and one receive per piece in one group (NCCL matches them in order per peer);
  // empty pieces are left out on both sides.
  auto post = [&] {
    RINGATTN_NCCL_CHECK(ncclGroupStart());
    for (std::size_t i = 0; i < send_pieces.count && send_pieces.bytes > 0; ++i) {
      const char* piece = static_cast<const char*>(send) + send_pieces.offset + i * send_pieces.stride;
      RINGATTN_NCCL_CHECK(ncclSend(piece, send_pieces.bytes, ncclUint8, send_to, comm_, comm_stream_));
    }
    for (std::size_t i = 0; i < recv_pieces.count && recv_pieces.bytes > 0; ++i) {
      char* piece = static_cast<char*>(recv) + recv_pieces.offset + i * recv_pieces.stride;
      RINGATTN_NCCL_CHECK(ncclRecv(piece, recv_pieces.bytes, ncclUint8, recv_from, comm_, comm_stream_));
    }
    RINGATTN_NCCL_CHECK(ncclGroupEnd());
    nccl_settle(comm_, timeout_s_);
  };
  if (timer_ != nullptr) {
    timer_->span(tag_, comm_stream_, post);
  } else {
    post();
  }
  RINGATTN_CUDA_CHECK(cudaEventRecord(done_, comm_stream_));
  bytes_sent_ += send_pieces.total();
  bytes_received_ += recv_pieces.total();
  pending_ = true;
}

void NcclTransport::wait() {
  if (!pending_) return;
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(compute_, done_, 0));
  pending_ = false;
}

}  // namespace ringattn::detail
