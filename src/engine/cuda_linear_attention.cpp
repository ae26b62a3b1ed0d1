#include "engine/cuda_linear_attention.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

CudaLinearAttention::CudaLinearAttention(CudaResources& resources, const LinearAttentionProblem& problem,
                                         const std::vector<std::int64_t>& lengths, int rank, DType dtype)
    : resources_(resources),
      problem_(problem),
      rank_(rank),
      world_(static_cast<int>(lengths.size())),
      n_(lengths[static_cast<std::size_t>(rank)]),
      dtype_(dtype) {
  const std::int64_t B = problem.batch, H = problem.heads, D = problem.head_dim;
  if (!linear_cuda_supports(D)) {
    throw Error(ErrorCode::invalid_argument,
                "linear attention (--attention linear) on GPUs supports head_dim 64 and 128, not " + std::to_string(D));
  }
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  // Enough groups per (batch, head) that the output pass has ~4 CTAs per SM, whole chunks each.
  int sms = 0;
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, resources_.device()));
  const std::int64_t chunk = linear_chunk();
  const std::int64_t chunks = std::max<std::int64_t>(1, (n_ + chunk - 1) / chunk);
  const std::int64_t ctas_per_group = B * H * (D / 64);
  const std::int64_t want = std::clamp<std::int64_t>((4 * sms + ctas_per_group - 1) / ctas_per_group, 1, chunks);
  params_.group_len = ((chunks + want - 1) / want) * chunk;
  params_.groups = static_cast<int>(std::max<std::int64_t>(1, (n_ + params_.group_len - 1) / params_.group_len));
  params_.batch = static_cast<int>(B);
  params_.heads = static_cast<int>(H);
  params_.kv_group = static_cast<int>(H / problem.kv_heads);
  params_.n = n_;
  params_.map = problem.feature_map == FeatureMap::identity ? 1 : 0;
  params_.causal = problem.causal ? 1 : 0;

  const auto state = static_cast<std::size_t>(D * D + D);
  state_floats_ = static_cast<std::size_t>(B * H) * state;
  std::vector<float> l2g(static_cast<std::size_t>(H), 0.0f);
  for (std::int64_t h = 0; h < H; ++h) {
    const double g = problem.decay.empty() ? 1.0 : problem.decay[static_cast<std::size_t>(h)];
    if (problem.causal) l2g[static_cast<std::size_t>(h)] = static_cast<float>(std::log2(g));
  }
  log2_decay_host_ = std::move(l2g);
  lengths_host_ = lengths;
  log2_decay_ = resources_.scratch(Scratch::lin_decay, log2_decay_host_.size() * sizeof(float));
  group_state_ =
      resources_.scratch(Scratch::lin_group_state, state_floats_ * static_cast<std::size_t>(params_.groups) * sizeof(float));
  total_ = resources_.scratch(Scratch::lin_total, state_floats_ * sizeof(float));
  incoming_ = resources_.scratch(Scratch::lin_incoming, state_floats_ * sizeof(float));
  if (problem.causal && world_ > 1) {
    gathered_ = resources_.scratch(Scratch::lin_gathered, state_floats_ * static_cast<std::size_t>(world_) * sizeof(float));
  }
  lengths_ = resources_.scratch(Scratch::lin_lengths, lengths_host_.size() * sizeof(std::int64_t));
  params_.log2_decay = log2_decay_.as<float>();
  params_.group_state = group_state_.as<float>();
  params_.total = total_.as<float>();
  params_.incoming = incoming_.as<float>();
}

void CudaLinearAttention::forward_states(LinearParams& p, cudaStream_t stream) {
  const std::int64_t D = problem_.head_dim;
  // This engine's constants, into buffers another engine may have used since (stream-ordered;
  // pageable host memory is staged before the call returns).
  RINGATTN_CUDA_CHECK(cudaMemcpyAsync(log2_decay_.get(), log2_decay_host_.data(),
                                      log2_decay_host_.size() * sizeof(float), cudaMemcpyHostToDevice, stream));
  RINGATTN_CUDA_CHECK(cudaMemcpyAsync(lengths_.get(), lengths_host_.data(), lengths_host_.size() * sizeof(std::int64_t),
                                      cudaMemcpyHostToDevice, stream));
  if (n_ > 0) {
    linear_local_states(p, dtype_, D, stream);
  } else {
    RINGATTN_CUDA_CHECK(cudaMemsetAsync(total_.get(), 0, state_floats_ * sizeof(float), stream));
  }
  bytes_sent_ = 0;
  if (problem_.causal) {
    const float* gathered = total_.as<float>();
    if (world_ > 1) {
      RINGATTN_NCCL_CHECK(ncclAllGather(total_.get(), gathered_.get(), state_floats_, ncclFloat, resources_.nccl(), stream));
      resources_.settle(timeout_s_);
      gathered = gathered_.as<float>();
      bytes_sent_ = state_floats_ * sizeof(float) * static_cast<std::uint64_t>(world_ - 1);
    }
    linear_incoming(p, D, gathered, static_cast<const std::int64_t*>(lengths_.get()), rank_, stream);
  } else if (world_ > 1) {
    RINGATTN_NCCL_CHECK(
        ncclAllReduce(total_.get(), incoming_.get(), state_floats_, ncclFloat, ncclSum, resources_.nccl(), stream));
    resources_.settle(timeout_s_);
    bytes_sent_ = state_floats_ * sizeof(float) * 2 * static_cast<std::uint64_t>(world_ - 1) / world_;
  } else {
    RINGATTN_CUDA_CHECK(
        cudaMemcpyAsync(incoming_.get(), total_.get(), state_floats_ * sizeof(float), cudaMemcpyDeviceToDevice, stream));
  }
}

namespace {

void bind(LinearParams& p, const TensorView& q, const TensorView& k, const TensorView& v) {
  p.q = q.data;
  p.k = k.data;
  p.v = v.data;
  for (int i = 0; i < 3; ++i) {
    p.q_strides[i] = q.strides[i];
    p.k_strides[i] = k.strides[i];
    p.v_strides[i] = v.strides[i];
  }
}

}  // namespace

void CudaLinearAttention::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  resources_.usable();
  const cudaStream_t stream = resources_.compute_stream();
  LinearParams p = params_;
  bind(p, q, k, v);
  p.out = out.data;
  for (int i = 0; i < 3; ++i) p.out_strides[i] = out.strides[i];
  forward_states(p, stream);
  if (n_ > 0) linear_outputs(p, dtype_, problem_.head_dim, stream);
}

void CudaLinearAttention::allocate_backward() {
  if (den_.get() != nullptr) return;
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  const std::int64_t B = problem_.batch, H = problem_.heads, D = problem_.head_dim;
  const auto rows = static_cast<std::size_t>(B * H * std::max<std::int64_t>(n_, 1));
  den_ = resources_.scratch(Scratch::lin_den, rows * sizeof(float));
  dden_ = resources_.scratch(Scratch::lin_dden, rows * sizeof(float));
  dual_group_ = resources_.scratch(Scratch::lin_dual_group, group_state_.bytes());
  dual_total_ = resources_.scratch(Scratch::lin_dual_total, total_.bytes());
  dual_in_ = resources_.scratch(Scratch::lin_dual_in, incoming_.bytes());
  const std::size_t acc = rows * static_cast<std::size_t>(D) * sizeof(float);
  dq_acc_ = resources_.scratch(Scratch::lin_dq_acc, acc);
  dk_acc_ = resources_.scratch(Scratch::lin_dk_acc, acc);
  dv_acc_ = resources_.scratch(Scratch::lin_dv_acc, acc);
}

void CudaLinearAttention::backward(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                                   const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                   const TensorView& dv) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  resources_.usable();
  allocate_backward();
  const cudaStream_t stream = resources_.compute_stream();
  const std::int64_t D = problem_.head_dim;
  LinearParams p = params_;
  bind(p, q, k, v);
  p.dout = dout.data;
  p.fwd_out = out.data;
  for (int i = 0; i < 3; ++i) {
    p.dout_strides[i] = dout.strides[i];
    p.fwd_out_strides[i] = out.strides[i];
  }
  p.den = den_.as<float>();
  p.dden = dden_.as<float>();
  p.dual_group = dual_group_.as<float>();
  p.dual_total = dual_total_.as<float>();
  p.dual_in = dual_in_.as<float>();
  p.dq_acc = dq_acc_.as<float>();
  p.dk_acc = dk_acc_.as<float>();
  p.dv_acc = dv_acc_.as<float>();
  // 1. The forward states, as run() computes them.
  forward_states(p, stream);
  // 2. Normalisers and dual states; the later ranks' (causal) or everyone's dual state.
  if (n_ > 0) {
    linear_bwd_dual_states(p, dtype_, D, stream);
  } else {
    RINGATTN_CUDA_CHECK(cudaMemsetAsync(dual_total_.get(), 0, state_floats_ * sizeof(float), stream));
  }
  if (problem_.causal) {
    const float* gathered = dual_total_.as<float>();
    if (world_ > 1) {
      RINGATTN_NCCL_CHECK(
          ncclAllGather(dual_total_.get(), gathered_.get(), state_floats_, ncclFloat, resources_.nccl(), stream));
      resources_.settle(timeout_s_);
      gathered = gathered_.as<float>();
    }
    linear_bwd_incoming(p, D, gathered, static_cast<const std::int64_t*>(lengths_.get()), rank_, world_, stream);
  } else if (world_ > 1) {
    RINGATTN_NCCL_CHECK(ncclAllReduce(dual_total_.get(), dual_in_.get(), state_floats_, ncclFloat, ncclSum,
                                      resources_.nccl(), stream));
    resources_.settle(timeout_s_);
  } else {
    RINGATTN_CUDA_CHECK(cudaMemcpyAsync(dual_in_.get(), dual_total_.get(), state_floats_ * sizeof(float),
                                        cudaMemcpyDeviceToDevice, stream));
  }
  // 3. The gradients.
  if (n_ > 0) {
    const std::int64_t dqs[3] = {dq.strides[0], dq.strides[1], dq.strides[2]};
    const std::int64_t dks[3] = {dk.strides[0], dk.strides[1], dk.strides[2]};
    const std::int64_t dvs[3] = {dv.strides[0], dv.strides[1], dv.strides[2]};
    linear_bwd_gradients(p, dtype_, D, dq.data, dqs, dk.data, dks, dv.data, dvs, stream);
  }
}

void CudaLinearAttention::wait() {
  CudaEvent finished;
  RINGATTN_CUDA_CHECK(cudaEventRecord(finished, resources_.compute_stream()));
  wait(finished);
}

void CudaLinearAttention::wait(cudaEvent_t event) {
  resources_.wait(event, timeout_s_, [this] {
    return "rank " + std::to_string(rank_) + ": linear attention (the exchange of the ranks' states over NCCL)";
  });
}

}  // namespace ringattn::detail
