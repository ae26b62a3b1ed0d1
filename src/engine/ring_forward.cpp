#include "engine/ring_forward.hpp"

#include <utility>

#include "comm/mpi_transport.hpp"
#include "core/dtype.hpp"
#include "core/tensor_copy.hpp"

namespace ringattn::detail {

CpuRingForward::CpuRingForward(MPI_Comm comm, RingPlan plan, const AttentionShape& shape, DType dtype,
                               std::int64_t q_len, std::int64_t kv_capacity, int threads,
                               bool mpi_progress_from_kernel)
    : comm_(comm),
      plan_(std::move(plan)),
      shape_(shape),
      dtype_(dtype),
      q_len_(q_len),
      mpi_progress_(mpi_progress_from_kernel),
      kernel_(shape, q_len, kv_capacity, threads) {
  blocks_[0].resize(block_bytes(kv_capacity));
  if (plan_.world > 1) blocks_[1].resize(block_bytes(kv_capacity));
}

std::size_t CpuRingForward::block_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

void CpuRingForward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                         const TensorView& lse, float scale, const std::function<void(int, int)>& on_step) {
  const int P = plan_.world;
  pack_dense(k, blocks_[0].data());
  pack_dense(v, blocks_[0].data() + block_bytes(q_len_) / 2);
  kernel_.load_queries(q, scale);

  MpiTransport transport(comm_);
  std::function<void()> poke;
  if (mpi_progress_ && P > 1) poke = [&transport] { transport.progress(); };
  int cur = 0;
  for (int s = 0; s < P; ++s) {
    const RingStep& step = plan_.steps[static_cast<std::size_t>(s)];
    if (s + 1 < P) {
      const std::int64_t next_len = plan_.steps[static_cast<std::size_t>(s) + 1].kv_len;
      transport.start(blocks_[cur].data(), block_bytes(step.kv_len), plan_.send_to, blocks_[1 - cur].data(),
                      block_bytes(next_len), plan_.recv_from);
    }
    kernel_.load_kv(dtype_, blocks_[cur].data(), step.kv_len);
    kernel_.run(step.tasks, poke);
    transport.wait();
    cur = 1 - cur;
    if (on_step) on_step(s + 1, P);
  }
  bytes_sent_ = transport.bytes_sent();
  kernel_.store(out, lse);
}

}  // namespace ringattn::detail
