#include "engine/cuda_ring_backward.hpp"

#include <utility>

#include "comm/nccl_transport.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

CudaRingBackward::CudaRingBackward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                                   std::int64_t q_len, std::int64_t kv_capacity, KernelKind kernel)
    : resources_(resources), plan_(std::move(plan)), shape_(shape), dtype_(dtype), q_len_(q_len) {
  if (!flash_fwd_supports(dtype, shape.head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the CUDA backward pass supports bf16 and fp16 with head_dim "
                                                         "64 or 128, not ") +
                                                 to_string(dtype) + " with head_dim " + std::to_string(shape.head_dim));
  }
  if (kernel == KernelKind::cudnn) {
    throw Error(ErrorCode::invalid_argument,
                "--kernel cudnn: the backward pass has no cuDNN path yet; use --kernel auto or native");
  }
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  blocks_[0] = DeviceBuffer(kv_bytes(kv_capacity));
  acc_[0] = DeviceBuffer(acc_bytes(kv_capacity));
  if (plan_.world > 1) {
    blocks_[1] = DeviceBuffer(kv_bytes(kv_capacity));
    acc_[1] = DeviceBuffer(acc_bytes(kv_capacity));
  }
  const auto rows = static_cast<std::size_t>(shape.batch * shape.heads * q_len);
  dq_acc_ = DeviceBuffer(rows * static_cast<std::size_t>(shape.head_dim) * sizeof(float));
  lse2_ = DeviceBuffer(rows * sizeof(float));
  delta_ = DeviceBuffer(rows * sizeof(float));
  kernel_description_ = "native mma.sync backward kernels";
}

std::size_t CudaRingBackward::kv_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

std::size_t CudaRingBackward::acc_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * sizeof(float);
}

void CudaRingBackward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv, float scale, bool communicate) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  const cudaStream_t stream = resources_.compute_stream();
  const int P = plan_.world;
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  const bool kv_in_place = P == 1 && k.is_contiguous() && v.is_contiguous();
  if (!kv_in_place) {
    auto* own = static_cast<unsigned char*>(blocks_[0].get());
    pack_rows(k, own, stream);
    pack_rows(v, own + kv_bytes(q_len_) / 2, stream);
  }
  backward_prep(out, dout, lse, lse2_.as<float>(), delta_.as<float>(), stream);
  RINGATTN_CUDA_CHECK(cudaMemsetAsync(dq_acc_.get(), 0, static_cast<std::size_t>(B * H * q_len_ * D) * sizeof(float), stream));
  RINGATTN_CUDA_CHECK(cudaMemsetAsync(acc_[0].get(), 0, acc_bytes(q_len_), stream));

  FlashBwdParams p;
  p.q = q.data;
  p.q_batch_stride = q.strides[0];
  p.q_row_stride = q.strides[1];
  p.q_head_stride = q.strides[2];
  p.dout = dout.data;
  p.do_batch_stride = dout.strides[0];
  p.do_row_stride = dout.strides[1];
  p.do_head_stride = dout.strides[2];
  p.kv_row_stride = Hkv * D;
  p.kv_head_stride = D;
  p.lse2 = lse2_.as<float>();
  p.delta = delta_.as<float>();
  p.dq = dq_acc_.as<float>();
  p.s_q = q_len_;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.kv_group = static_cast<int>(H / Hkv);
  p.scale = scale;
  p.scale_log2 = scale * 1.4426950408889634f;

  NcclTransport kv_hop(resources_.nccl(), stream, resources_.comm_stream());
  NcclTransport acc_hop(resources_.nccl(), stream, resources_.comm_stream());
  const bool ring = communicate && P > 1;
  int cur = 0, acc = 0;
  for (int s = 0; s < P; ++s) {
    const RingStep& step = plan_.steps[static_cast<std::size_t>(s)];
    const bool kv_transfer = ring && s + 1 < P;
    if (kv_transfer) {
      const std::int64_t next_len = plan_.steps[static_cast<std::size_t>(s) + 1].kv_len;
      kv_hop.start(blocks_[cur].get(), kv_bytes(step.kv_len), plan_.send_to, blocks_[1 - cur].get(), kv_bytes(next_len),
                   plan_.recv_from);
    }
    const auto* block = static_cast<const unsigned char*>((communicate ? blocks_[cur] : blocks_[0]).get());
    p.k = kv_in_place ? k.data : block;
    p.v = kv_in_place ? v.data : block + kv_bytes(step.kv_len) / 2;
    p.kv_batch_stride = step.kv_len * Hkv * D;
    auto set_task = [&](const BlockTask& t) {
      p.q_begin = static_cast<int>(t.q_begin);
      p.q_len = static_cast<int>(t.q_len);
      p.kv_begin = static_cast<int>(t.kv_begin);
      p.kv_len = static_cast<int>(t.kv_len);
      p.causal = t.mask == MaskKind::causal;
      p.diag_offset = static_cast<int>(t.diag_offset);
    };
    for (const BlockTask& t : step.tasks) {
      set_task(t);
      flash_bwd(p, dtype_, D, stream, FlashBwdPart::dq);
    }
    if (ring && s > 0) acc_hop.wait();  // this block's accumulator has arrived
    // Without communication every step adds into the first accumulator (the same work).
    p.dk = acc_[communicate ? acc : 0].as<float>();
    p.dv = p.dk + B * Hkv * step.kv_len * D;
    p.acc_len = step.kv_len;
    for (const BlockTask& t : step.tasks) {
      set_task(t);
      flash_bwd(p, dtype_, D, stream, FlashBwdPart::dkv);
    }
    if (ring) {
      // After the last step the hop brings each accumulator to its owner.
      const std::int64_t next_len = s + 1 < P ? plan_.steps[static_cast<std::size_t>(s) + 1].kv_len : q_len_;
      acc_hop.start(acc_[acc].get(), acc_bytes(step.kv_len), plan_.send_to, acc_[1 - acc].get(), acc_bytes(next_len),
                    plan_.recv_from);
      acc = 1 - acc;
    }
    if (kv_transfer) kv_hop.wait();
    cur = 1 - cur;
  }
  if (ring) acc_hop.wait();
  bytes_sent_per_run_ = kv_hop.bytes_sent() + acc_hop.bytes_sent();
  const float* grads = acc_[ring ? acc : 0].as<float>();
  finalize_output(dq_acc_.as<float>(), nullptr, dq, TensorView{}, stream);
  finalize_output(grads, nullptr, dk, TensorView{}, stream);
  finalize_output(grads + B * Hkv * q_len_ * D, nullptr, dv, TensorView{}, stream);
}

}  // namespace ringattn::detail
