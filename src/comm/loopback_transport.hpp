// comm/loopback_transport.hpp: the ring hop between members of one process by device copies,
// for a LocalGroup whose members share a GPU (NCCL refuses two ranks on one device).
//
// Same contract as NcclTransport: start() returns without waiting for the GPU, wait() makes the
// compute stream wait for the hop. A hop from member a to member b: a records an event once its
// compute and communication streams have reached the start (its send buffer is filled: on
// either, as with NCCL, whose send follows the communication stream's work) and offers {buffer, pieces, event} on the channel
// (a, b, tag); b takes the offer (the host blocks until a has made it), makes its
// communication stream wait for a's event and its own, copies the pieces (cudaMemcpy2DAsync,
// peer copies where the members' devices differ), records a `copied` event and hands it back
// to a. b's wait(): its compute stream waits for the copy; a's wait(): its compute stream
// waits for the handed-back event, so a does not refill its send buffer before b has read it.
// Empty pieces are neither offered nor taken (as NCCL leaves them out on both sides). Each
// offer carries events of its own (created per hop), so no event is re-recorded while a peer
// may still be about to wait on it. Host waits are bounded by timeout_s (0: none); abort()
// wakes every waiter of the hub with an error (a member's thread failed).
#pragma once

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "comm/transport.hpp"
#include "core/cuda_span_timer.hpp"

namespace ringattn::detail {

using SharedEvent = std::shared_ptr<CUevent_st>;  // destroyed with its last owner
SharedEvent make_shared_event();

class LoopbackHub {
 public:
  explicit LoopbackHub(int members) : members_(members) {}
  int members() const { return members_; }

  struct Offer {
    const void* base = nullptr;
    Pieces pieces;
    SharedEvent ready;
  };
  void offer(int from, int to, int tag, Offer offer);
  Offer take(int from, int to, int tag, double timeout_s);  // blocks until `from` has offered
  // `to` has copied (once `copied` completes) what `from` offered it; `from` awaits that.
  void hand_back(int from, int to, int tag, SharedEvent copied);
  SharedEvent await_copied(int from, int to, int tag, double timeout_s);
  void abort();
  bool aborted();

 private:
  using Key = std::tuple<int, int, int>;
  template <class T>
  T pop(std::map<Key, std::deque<T>>& queues, const Key& key, double timeout_s, int waiter, int peer,
        const char* what);

  int members_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool aborted_ = false;
  std::map<Key, std::deque<Offer>> offers_;
  std::map<Key, std::deque<SharedEvent>> copied_;
};

class LoopbackTransport final : public Transport {
 public:
  // `tag` separates transports that run side by side (the backward's K/V and dK/dV hops).
  // With a timer (profiling), the copy of each received block is timed on the communication
  // stream, under `tag`.
  LoopbackTransport(std::shared_ptr<LoopbackHub> hub, int member, int tag, cudaStream_t compute,
                    cudaStream_t comm_stream, double timeout_s, CudaSpanTimer* timer = nullptr)
      : hub_(std::move(hub)), member_(member), tag_(tag), compute_(compute), comm_stream_(comm_stream),
        timeout_s_(timeout_s), timer_(timer) {}

  void start_pieces(const void* send, const Pieces& send_pieces, int send_to, void* recv, const Pieces& recv_pieces,
                    int recv_from) override;
  void wait() override;

 private:
  std::shared_ptr<LoopbackHub> hub_;
  int member_;
  int tag_;
  cudaStream_t compute_;
  cudaStream_t comm_stream_;
  double timeout_s_;
  CudaSpanTimer* timer_;
  bool pending_ = false;
  int sent_to_ = -1;         // the member whose copy of our offer wait() must await (-1: none)
  SharedEvent received_;     // our copy of the peer's offer (null: nothing received)
};

}  // namespace ringattn::detail
