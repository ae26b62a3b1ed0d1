#include "engine/ring_forward.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "comm/collective.hpp"
#include "comm/mpi_transport.hpp"
#include "comm/mpi_util.hpp"
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
      kernel_(shape, q_len, std::max(kv_capacity, plan_.sink_len), threads) {
  blocks_[0].resize(block_bytes(kv_capacity));
  if (plan_.world > 1 && (plan_.steps.size() > 1 || !plan_.reverse_steps.empty())) {
    blocks_[1].resize(block_bytes(kv_capacity));
  }
  if (plan_.sink_len > 0) sink_block_.resize(block_bytes(plan_.sink_len));
}

std::size_t CpuRingForward::block_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

Pieces CpuRingForward::rows_of(const RowRange& rows, std::int64_t kv_len) const {
  return slab_rows(rows.begin, rows.end, kv_len, block_bytes(1) / 2 / static_cast<std::size_t>(shape_.batch),
                   2 * static_cast<std::size_t>(shape_.batch));
}

void CpuRingForward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                         const TensorView& lse, float scale, const std::function<void(int, int)>& on_step) {
  const int P = plan_.world;
  pack_dense(k, blocks_[0].data());
  pack_dense(v, blocks_[0].data() + block_bytes(q_len_) / 2);
  kernel_.load_queries(q, scale);

  MpiTransport transport(comm_, timeout_s_, peer_pids_);
  std::function<void()> poke;
  if (mpi_progress_ && P > 1) poke = [&transport] { transport.progress(); };
  const int steps = static_cast<int>(plan_.steps.size());  // P, or fewer for a sliding window
  const int reverse = static_cast<int>(plan_.reverse_steps.size());
  const int total = steps + reverse + (plan_.sink_len > 0 ? 1 : 0);
  int cur = 0;
  for (int s = 0; s < steps; ++s) {
    const RingStep& step = plan_.steps[static_cast<std::size_t>(s)];
    if (s + 1 < steps) {
      // Only the rows the next ranks' windows reach travel (all of them for the full ring).
      const RingStep& next = plan_.steps[static_cast<std::size_t>(s) + 1];
      transport.start_pieces(blocks_[cur].data(), rows_of(step.send, step.kv_len), plan_.send_to,
                             blocks_[1 - cur].data(), rows_of(next.held, next.kv_len), plan_.recv_from);
    }
    kernel_.load_kv(dtype_, blocks_[cur].data(), step.kv_len);
    kernel_.run(step.tasks, poke);
    transport.set_step(s);
    transport.wait();
    cur = 1 - cur;
    if (on_step) on_step(s + 1, total);
  }
  if (reverse > 0) {
    // Two-sided window: blocks of later ranks travel the other way, the own block first.
    pack_dense(k, blocks_[cur].data());
    pack_dense(v, blocks_[cur].data() + block_bytes(q_len_) / 2);
    std::int64_t held = q_len_;
    for (int j = -1; j < reverse; ++j) {
      // Hop j + 1 brings reverse step j + 1's block while step j computes (j = -1: the first).
      if (j + 1 < reverse) {
        // The rows the windows behind reach (the own block first: j = -1).
        const RingStep& next = plan_.reverse_steps[static_cast<std::size_t>(j + 1)];
        const RowRange& send = j < 0 ? plan_.reverse_own_send : plan_.reverse_steps[static_cast<std::size_t>(j)].send;
        transport.start_pieces(blocks_[cur].data(), rows_of(send, held), plan_.recv_from, blocks_[1 - cur].data(),
                               rows_of(next.held, next.kv_len), plan_.send_to);
        held = next.kv_len;
      }
      if (j >= 0) {
        const RingStep& step = plan_.reverse_steps[static_cast<std::size_t>(j)];
        kernel_.load_kv(dtype_, blocks_[cur].data(), step.kv_len);
        kernel_.run(step.tasks, poke);
        if (on_step) on_step(steps + j + 1, total);
      }
      transport.set_step(steps + j + 1);
      transport.wait();
      if (j + 1 < reverse) cur = 1 - cur;
    }
  }
  bytes_sent_ = transport.bytes_sent();
  if (plan_.sink_len > 0) {
    bytes_sent_ += gather_sink_rows(comm_, plan_, shape_, dtype_, k, v, sink_block_.data());
    kernel_.load_kv(dtype_, sink_block_.data(), plan_.sink_len);
    kernel_.run(plan_.sink_tasks);
    if (on_step) on_step(total, total);
  }
  kernel_.store(out, lse);
}

std::uint64_t gather_sink_rows(MPI_Comm comm, const RingPlan& plan, const AttentionShape& shape, DType dtype,
                               const TensorView& k, const TensorView& v, unsigned char* sink_block) {
  // Contiguous layout: each rank's first plan.sink_rows[r] rows are the sink tokens it owns.
  const int P = plan.world;
  const std::int64_t Hkv = shape.kv_heads, D = shape.head_dim;
  const auto row_bytes = static_cast<std::size_t>(Hkv * D) * dtype_size(dtype);
  std::vector<int> counts(static_cast<std::size_t>(P)), displs(static_cast<std::size_t>(P));
  std::int64_t begin = 0;
  for (int r = 0; r < P; ++r) {
    const std::int64_t share = plan.sink_rows[static_cast<std::size_t>(r)];
    counts[static_cast<std::size_t>(r)] = static_cast<int>(static_cast<std::size_t>(share) * row_bytes);
    displs[static_cast<std::size_t>(r)] = static_cast<int>(static_cast<std::size_t>(begin) * row_bytes);
    begin += share;
  }
  const std::int64_t own = plan.sink_rows[static_cast<std::size_t>(plan.rank)];
  const std::size_t elem = dtype_size(dtype);
  std::vector<unsigned char> rows(static_cast<std::size_t>(own) * row_bytes);
  std::uint64_t sent = 0;
  for (int which = 0; which < 2; ++which) {
    const TensorView& t = which == 0 ? k : v;
    unsigned char* half = sink_block + static_cast<std::size_t>(which) * static_cast<std::size_t>(shape.batch * plan.sink_len) * row_bytes;
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      for (std::int64_t i = 0; i < own; ++i)
        for (std::int64_t h = 0; h < Hkv; ++h)
          std::memcpy(rows.data() + static_cast<std::size_t>((i * Hkv + h) * D) * elem,
                      static_cast<const unsigned char*>(t.data) +
                          static_cast<std::size_t>(b * t.strides[0] + i * t.strides[1] + h * t.strides[2]) * elem,
                      static_cast<std::size_t>(D) * elem);
      bounded_allgatherv(comm, rows.data(), counts[static_cast<std::size_t>(plan.rank)],
                         half + static_cast<std::size_t>(b * plan.sink_len) * row_bytes, counts.data(), displs.data(),
                         "the gathering of the attention sinks' keys and values");
      sent += static_cast<std::uint64_t>(counts[static_cast<std::size_t>(plan.rank)]) * static_cast<std::uint64_t>(P - 1);
    }
  }
  return sent;
}

}  // namespace ringattn::detail
