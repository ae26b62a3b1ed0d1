#include "engine/ring_backward.hpp"

#include <cstring>
#include <utility>

#include "comm/mpi_transport.hpp"
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
      kernel_(shape, q_len, kv_capacity, threads) {
  const std::size_t bytes = kv_bytes(kv_capacity) + dkv_floats(kv_capacity) * sizeof(float);
  blocks_[0].resize(bytes);
  if (plan_.world > 1) blocks_[1].resize(bytes);
}

std::size_t CpuRingBackward::kv_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

std::size_t CpuRingBackward::dkv_floats(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim);
}

void CpuRingBackward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                          const TensorView& dv, float scale) {
  const int P = plan_.world;
  unsigned char* own = blocks_[0].data();
  pack_dense(k, own);
  pack_dense(v, own + kv_bytes(q_len_) / 2);
  // The accumulators sit right after K, V; the float offset stays aligned (kv_bytes is a
  // multiple of 4 for every dtype since it counts an even number of 2-byte elements).
  std::memset(own + kv_bytes(q_len_), 0, dkv_floats(q_len_) * sizeof(float));
  kernel_.load_rows(q, out, dout, lse, scale);

  MpiTransport transport(comm_, timeout_s_, peer_pids_);
  int cur = 0;
  for (int s = 0; s < P; ++s) {
    const std::int64_t len = plan_.steps[static_cast<std::size_t>(s)].kv_len;
    unsigned char* block = blocks_[cur].data();
    kernel_.load_kv(dtype_, block, len);
    kernel_.run(plan_.steps[static_cast<std::size_t>(s)].tasks, reinterpret_cast<float*>(block + kv_bytes(len)));
    if (P > 1) {
      // After the last step the hop brings each block home: its owner's length.
      const std::int64_t next = s + 1 < P ? plan_.steps[static_cast<std::size_t>(s) + 1].kv_len : q_len_;
      transport.start(block, kv_bytes(len) + dkv_floats(len) * sizeof(float), plan_.send_to, blocks_[1 - cur].data(),
                      kv_bytes(next) + dkv_floats(next) * sizeof(float), plan_.recv_from);
      transport.set_step(s);
      transport.wait();
      cur = 1 - cur;
    }
  }
  const auto* grads = reinterpret_cast<const float*>(blocks_[cur].data() + kv_bytes(q_len_));
  unpack(grads, dk);
  unpack(grads + dkv_floats(q_len_) / 2, dv);
  kernel_.store_dq(dq);
}

}  // namespace ringattn::detail
