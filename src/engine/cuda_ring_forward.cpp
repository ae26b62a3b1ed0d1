#include "engine/cuda_ring_forward.hpp"

#include <utility>

#include "comm/nccl_transport.hpp"
#include "kernels/cuda/cuda_kernels.hpp"

namespace ringattn::detail {

CudaRingForward::CudaRingForward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                                 std::int64_t q_len, std::int64_t kv_capacity)
    : resources_(resources), plan_(std::move(plan)), shape_(shape), dtype_(dtype), q_len_(q_len) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  blocks_[0] = DeviceBuffer(block_bytes(kv_capacity));
  if (plan_.world > 1) blocks_[1] = DeviceBuffer(block_bytes(kv_capacity));
  const auto rows = static_cast<std::size_t>(shape.batch * shape.heads * q_len);
  o_acc_ = DeviceBuffer(rows * static_cast<std::size_t>(shape.head_dim) * sizeof(float));
  lse_acc_ = DeviceBuffer(rows * sizeof(float));
}

std::size_t CudaRingForward::block_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

void CudaRingForward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, float scale, bool communicate) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  const cudaStream_t stream = resources_.compute_stream();
  const int P = plan_.world;
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  auto* own = static_cast<unsigned char*>(blocks_[0].get());
  pack_rows(k, own, stream);
  pack_rows(v, own + block_bytes(q_len_) / 2, stream);
  // One step with one task covering every row (P = 1): the kernel writes the final output
  // itself, with no fp32 running state to initialise, merge or convert.
  const bool single_task = P == 1 && plan_.steps[0].tasks.size() == 1 && plan_.steps[0].tasks[0].q_begin == 0 &&
                           plan_.steps[0].tasks[0].q_len == q_len_;
  if (!single_task) fill_neg_inf(lse_acc_.as<float>(), B * H * q_len_, stream);

  NcclTransport transport(resources_.nccl(), stream, resources_.comm_stream());
  FlashFwdParams p;
  p.q = q.data;
  p.q_batch_stride = q.strides[0];
  p.q_row_stride = q.strides[1];
  p.q_head_stride = q.strides[2];
  p.kv_row_stride = Hkv * D;
  p.kv_head_stride = D;
  p.o_acc = o_acc_.as<float>();
  p.lse = lse_acc_.as<float>();
  p.s_q = q_len_;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_group = static_cast<int>(H / Hkv);
  p.scale_log2 = scale * 1.4426950408889634f;
  if (single_task) {
    p.out = out.data;
    p.out_batch_stride = out.strides[0];
    p.out_row_stride = out.strides[1];
    p.out_head_stride = out.strides[2];
    if (lse.data != nullptr) {
      p.lse_out = static_cast<float*>(lse.data);
      p.lse_batch_stride = lse.strides[0];
      p.lse_head_stride = lse.strides[1];
      p.lse_row_stride = lse.strides[2];
    }
  }

  int cur = 0;
  for (int s = 0; s < P; ++s) {
    const RingStep& step = plan_.steps[static_cast<std::size_t>(s)];
    const bool transfer = communicate && s + 1 < P;
    if (transfer) {
      const std::int64_t next_len = plan_.steps[static_cast<std::size_t>(s) + 1].kv_len;
      transport.start(blocks_[cur].get(), block_bytes(step.kv_len), plan_.send_to, blocks_[1 - cur].get(),
                      block_bytes(next_len), plan_.recv_from);
    }
    const auto* block = static_cast<const unsigned char*>((communicate ? blocks_[cur] : blocks_[0]).get());
    p.k = block;
    p.v = block + block_bytes(step.kv_len) / 2;
    p.kv_batch_stride = step.kv_len * Hkv * D;
    for (const BlockTask& t : step.tasks) {
      p.q_begin = static_cast<int>(t.q_begin);
      p.q_len = static_cast<int>(t.q_len);
      p.kv_begin = static_cast<int>(t.kv_begin);
      p.kv_len = static_cast<int>(t.kv_len);
      p.causal = t.mask == MaskKind::causal;
      p.diag_offset = static_cast<int>(t.diag_offset);
      flash_fwd(p, dtype_, D, stream);
    }
    if (transfer) transport.wait();
    cur = 1 - cur;
  }
  bytes_sent_per_run_ = transport.bytes_sent();
  if (!single_task) finalize_output(o_acc_.as<float>(), lse_acc_.as<float>(), out, lse, stream);
}

}  // namespace ringattn::detail
