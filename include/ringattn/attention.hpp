// ringattn/attention.hpp: distributed attention over the ring.
#pragma once

#include "ringattn/context.hpp"
#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

// Exact softmax attention of this rank's queries against the whole sequence's keys and values.
//   q:   (B, S_local, H, D)      k, v: (B, S_local, H_kv, D), H % H_kv == 0 (GQA/MQA)
//   out: (B, S_local, H, D), q's dtype      lse: (B, H, S_local) fp32, natural log; may be
//   a view with data == nullptr when the caller does not want it.
// S_local must be the length that options.layout assigns to this rank. Collective over the
// context's communicator: every rank calls it, and every rank throws the same Error when any
// rank's inputs are bad or the ranks disagree on shapes and options.
// Tensors on cuda (device_index = the context's GPU; bf16/fp16, head_dim 64 or 128) run the
// NCCL ring. With a stream borrowed through ContextOptions::cuda_stream the work is enqueued
// on it and forward() returns at once; otherwise it starts after the legacy default stream's
// work and returns with the result ready.
void forward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v,
             const TensorView& out, const TensorView& lse, const AttentionOptions& options = {});

// Gradients of sum(out * dout) for this rank's shard: Q, O, dO and LSE stay home while K and
// V travel around the ring with fp32 dK/dV accumulators that come back to their owner.
//   q, out, dout, dq: (B, S_local, H, D)     k, v, dk, dv: (B, S_local, H_kv, D)
//   lse: (B, H, S_local) fp32, from forward() with the same options (required).
// Gradients have their input's dtype and are accumulated in fp32; a shared KV head (GQA)
// receives the sum over its query heads. CPU or GPU tensors (bf16/fp16, head dim 64 or 128
// on GPUs; KernelKind as in forward(), see the README for what auto picks). Bitwise
// reproducible for a given rank count on CPUs and with the native GPU kernels; cuDNN's
// backward (one task per rank under auto, or --kernel cudnn) sums dQ with atomics and is
// not promised to be. Collective, with the same agreement on bad inputs as forward().
void backward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const AttentionOptions& options = {});

}  // namespace ringattn
