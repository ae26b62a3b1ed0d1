#include "comm/loopback_transport.hpp"

#include <chrono>
#include <string>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"
#include "core/text.hpp"

namespace ringattn::detail {

SharedEvent make_shared_event() {
  cudaEvent_t event = nullptr;
  RINGATTN_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  return SharedEvent(event, [](cudaEvent_t e) { RINGATTN_CUDA_CHECK_NOTHROW(cudaEventDestroy(e)); });
}

template <class T>
T LoopbackHub::pop(std::map<Key, std::deque<T>>& queues, const Key& key, double timeout_s, int waiter, int peer,
                   const char* what) {
  std::unique_lock<std::mutex> lock(mutex_);
  auto ready = [&] { return aborted_ || !queues[key].empty(); };
  if (timeout_s > 0.0) {
    if (!changed_.wait_for(lock, std::chrono::duration<double>(timeout_s), ready)) {
      throw Error(ErrorCode::timeout, "local group: member " + std::to_string(waiter) + " waited " +
                                          detail::seconds_text(timeout_s) + " s (timeout_s, --timeout) for " + what +
                                          " from member " + std::to_string(peer));
    }
  } else {
    changed_.wait(lock, ready);
  }
  if (aborted_) throw Error(ErrorCode::internal, "local group: another member failed; this one stops");
  std::deque<T>& queue = queues[key];
  T item = std::move(queue.front());
  queue.pop_front();
  return item;
}

void LoopbackHub::offer(int from, int to, int tag, Offer offer) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    offers_[Key{from, to, tag}].push_back(std::move(offer));
  }
  changed_.notify_all();
}

LoopbackHub::Offer LoopbackHub::take(int from, int to, int tag, double timeout_s) {
  return pop(offers_, Key{from, to, tag}, timeout_s, to, from, "a block");
}

void LoopbackHub::hand_back(int from, int to, int tag, SharedEvent copied) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    copied_[Key{from, to, tag}].push_back(std::move(copied));
  }
  changed_.notify_all();
}

SharedEvent LoopbackHub::await_copied(int from, int to, int tag, double timeout_s) {
  return pop(copied_, Key{from, to, tag}, timeout_s, from, to, "the receipt of a block");
}

void LoopbackHub::abort() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
  }
  changed_.notify_all();
}

bool LoopbackHub::aborted() {
  std::lock_guard<std::mutex> lock(mutex_);
  return aborted_;
}

void LoopbackTransport::start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv,
                                     const Pieces& recv_pieces, int recv_from) {
  if (pending_) throw Error(ErrorCode::internal, "loopback transport: start() before the last wait()");
  // This member's buffers are ready (the send buffer filled, the receive buffer no longer read)
  // once its compute stream and its communication stream have reached this point: a send
  // buffer may be filled on either (the own block's first copy is packed on the latter, as
  // NCCL's send would follow it there).
  SharedEvent ready = make_shared_event();
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready.get(), compute_));
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready.get(), 0));
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready.get(), comm_stream_));
  sent_to_ = -1;
  received_.reset();
  if (send_pieces.total() > 0) {
    hub_->offer(member_, send_to, tag_, LoopbackHub::Offer{send, send_pieces, ready});
    sent_to_ = send_to;
  }
  if (recv_pieces.total() > 0) {
    const LoopbackHub::Offer in = hub_->take(recv_from, member_, tag_, timeout_s_);
    if (in.pieces.bytes != recv_pieces.bytes || in.pieces.count != recv_pieces.count) {
      throw Error(ErrorCode::internal, "loopback transport: member " + std::to_string(recv_from) + " sends " +
                                           std::to_string(in.pieces.count) + " x " + std::to_string(in.pieces.bytes) +
                                           " bytes, member " + std::to_string(member_) + " expects " +
                                           std::to_string(recv_pieces.count) + " x " +
                                           std::to_string(recv_pieces.bytes));
    }
    RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, ready.get(), 0));
    RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm_stream_, in.ready.get(), 0));
    auto copy = [&] {
      RINGATTN_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(recv) + recv_pieces.offset, recv_pieces.stride,
                                            static_cast<const char*>(in.base) + in.pieces.offset, in.pieces.stride,
                                            in.pieces.bytes, in.pieces.count, cudaMemcpyDefault, comm_stream_));
    };
    if (timer_ != nullptr) {
      timer_->span(tag_, comm_stream_, copy);
    } else {
      copy();
    }
    received_ = make_shared_event();
    RINGATTN_CUDA_CHECK(cudaEventRecord(received_.get(), comm_stream_));
    hub_->hand_back(recv_from, member_, tag_, received_);
  }
  bytes_sent_ += send_pieces.total();
  bytes_received_ += recv_pieces.total();
  pending_ = true;
}

void LoopbackTransport::wait() {
  if (!pending_) return;
  pending_ = false;
  if (received_) RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(compute_, received_.get(), 0));
  if (sent_to_ >= 0) {
    const SharedEvent copied = hub_->await_copied(member_, sent_to_, tag_, timeout_s_);
    RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(compute_, copied.get(), 0));
  }
  received_.reset();
  sent_to_ = -1;
}

}  // namespace ringattn::detail
