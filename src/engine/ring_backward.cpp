#include "engine/ring_backward.hpp"

#include <algorithm>
#include <cstring>
#include <utility>

#include "comm/collective.hpp"
#include "comm/mpi_transport.hpp"
#include "comm/mpi_util.hpp"
#include "engine/ring_forward.hpp"
#include "core/dtype.hpp"
#include "core/tensor_copy.hpp"

namespace ringattn::detail {

namespace {

// Writes a dense fp32 (B, S, H_kv, D) buffer into a view of any dtype.
void unpack(const float* src, const TensorView& t) {
  std::int64_t n = 0;
  for (std::int64_t b = 0; b < t.shape[0]; ++b)
    for (std::int64_t s = 0; s < t.shape[1]; ++s)
      for (std::int64_t h = 0; h < t.shape[2]; ++h) {
        const std::int64_t to = b * t.strides[0] + s * t.strides[1] + h * t.strides[2];
        for (std::int64_t d = 0; d < t.shape[3]; ++d) store_f32(t.dtype, t.data, to + d, src[n++]);
      }
}

}  // namespace

CpuRingBackward::CpuRingBackward(MPI_Comm comm, RingPlan plan, const AttentionShape& shape, DType dtype,
                                 std::int64_t q_len, std::int64_t kv_capacity, int threads)
    : comm_(comm),
      plan_(std::move(plan)),
      shape_(shape),
      dtype_(dtype),
      q_len_(q_len),
      kernel_(shape, q_len, std::max(kv_capacity, plan_.sink_len), threads) {
  const std::size_t bytes = kv_bytes(kv_capacity) + dkv_floats(kv_capacity) * sizeof(float);
  blocks_[0].resize(bytes);
  if (plan_.world > 1) blocks_[1].resize(bytes);
  if (plan_.sink_len > 0) sink_block_.resize(kv_bytes(plan_.sink_len) + dkv_floats(plan_.sink_len) * sizeof(float));
  if (!plan_.reverse_steps.empty() || plan_.sink_len > 0) home_.resize(dkv_floats(q_len));
}

std::size_t CpuRingBackward::kv_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

std::size_t CpuRingBackward::dkv_floats(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim);
}

int CpuRingBackward::pass(MpiTransport& transport, const std::vector<RingStep>& steps, bool reverse, int step0,
                          const TensorView& k, const TensorView& v) {
  // The own block first (K, V and zeroed accumulators); each hop passes the held block with its
  // accumulators on (the other way for the reverse pass), and a last exchange sends every
  // block's accumulators straight back to its owner, `hops` ranks away.
  const int P = plan_.world;
  const int to = reverse ? plan_.recv_from : plan_.send_to, from = reverse ? plan_.send_to : plan_.recv_from;
  int cur = 0;
  unsigned char* own = blocks_[0].data();
  pack_dense(k, own);
  pack_dense(v, own + kv_bytes(q_len_) / 2);
  std::memset(own + kv_bytes(q_len_), 0, dkv_floats(q_len_) * sizeof(float));
  std::int64_t held = q_len_;
  // Forward pass: steps[0] is the own block. Reverse pass: steps[j] holds the block j + 1 ranks on.
  const int first = reverse ? -1 : 0;
  const int n = static_cast<int>(steps.size());
  for (int s = first; s < n; ++s) {
    if (s >= 0) {
      unsigned char* block = blocks_[cur].data();
      kernel_.load_kv(dtype_, block, held);
      kernel_.run(steps[static_cast<std::size_t>(s)].tasks, reinterpret_cast<float*>(block + kv_bytes(held)));
    }
    if (s + 1 < n) {
      const std::int64_t next = steps[static_cast<std::size_t>(s) + 1].kv_len;
      transport.start(blocks_[cur].data(), kv_bytes(held) + dkv_floats(held) * sizeof(float), to,
                      blocks_[1 - cur].data(), kv_bytes(next) + dkv_floats(next) * sizeof(float), from);
      transport.set_step(step0 + s + 1);
      transport.wait();
      cur = 1 - cur;
      held = next;
    }
  }
  const int hops = reverse ? n : n - 1;  // how far the last held block is from its owner
  if (P > 1 && hops > 0) {
    const int owner = reverse ? (plan_.rank + hops) % P : (plan_.rank - hops % P + P) % P;
    const int mine = reverse ? (plan_.rank - hops % P + P) % P : (plan_.rank + hops) % P;
    transport.start(blocks_[cur].data() + kv_bytes(held), dkv_floats(held) * sizeof(float), owner,
                    blocks_[1 - cur].data() + kv_bytes(q_len_), dkv_floats(q_len_) * sizeof(float), mine);
    transport.set_step(step0 + n);
    transport.wait();
    cur = 1 - cur;
  }
  return cur;
}

void CpuRingBackward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, float scale) {
  kernel_.load_rows(q, out, dout, lse, scale);
  MpiTransport transport(comm_, timeout_s_, peer_pids_);
  const int steps = static_cast<int>(plan_.steps.size());
  int cur = pass(transport, plan_.steps, false, 0, k, v);
  const float* grads = reinterpret_cast<const float*>(blocks_[cur].data() + kv_bytes(q_len_));
  if (!home_.empty()) {
    std::copy(grads, grads + dkv_floats(q_len_), home_.begin());
    grads = home_.data();
  }
  if (!plan_.reverse_steps.empty()) {
    // Two-sided window: blocks of later ranks travel the other way with fresh accumulators.
    cur = pass(transport, plan_.reverse_steps, true, steps, k, v);
    const float* back = reinterpret_cast<const float*>(blocks_[cur].data() + kv_bytes(q_len_));
    for (std::size_t i = 0; i < home_.size(); ++i) home_[i] += back[i];
  }
  if (plan_.sink_len > 0) {
    // Every rank's share of the sink tokens' gradients, summed over the ranks; each owner
    // keeps its rows.
    gather_sink_rows(comm_, plan_, shape_, dtype_, k, v, sink_block_.data());
    auto* sink_acc = reinterpret_cast<float*>(sink_block_.data() + kv_bytes(plan_.sink_len));
    const std::size_t n = dkv_floats(plan_.sink_len);
    std::fill_n(sink_acc, n, 0.0f);
    kernel_.load_kv(dtype_, sink_block_.data(), plan_.sink_len);
    kernel_.run(plan_.sink_tasks, sink_acc);
    bounded_allreduce(comm_, MPI_IN_PLACE, sink_acc, static_cast<int>(n), MPI_FLOAT, MPI_SUM,
                      "the sum of the sinks' gradients");
    std::int64_t begin = 0;
    for (int r = 0; r < plan_.rank; ++r) begin += plan_.sink_rows[static_cast<std::size_t>(r)];
    const std::int64_t own = plan_.sink_rows[static_cast<std::size_t>(plan_.rank)];
    const std::int64_t B = shape_.batch, row = shape_.kv_heads * shape_.head_dim;
    for (int which = 0; which < 2; ++which) {  // dK, then dV: (B, rows, H_kv, D) each
      for (std::int64_t b = 0; b < B; ++b) {
        const float* src = sink_acc + static_cast<std::size_t>(which) * n / 2 +
                           static_cast<std::size_t>((b * plan_.sink_len + begin) * row);
        float* dst = home_.data() + static_cast<std::size_t>(which) * home_.size() / 2 +
                     static_cast<std::size_t>(b * q_len_ * row);
        for (std::int64_t i = 0; i < own * row; ++i) dst[i] += src[i];
      }
    }
  }
  unpack(grads, dk);
  unpack(grads + dkv_floats(q_len_) / 2, dv);
  kernel_.store_dq(dq);
}

}  // namespace ringattn::detail
