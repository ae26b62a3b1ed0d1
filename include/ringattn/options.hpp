// ringattn/options.hpp: what to compute.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ringattn/layout.hpp"

namespace ringattn {

// The GPU kernel that computes each block. automatic: the faster of the two where measured:
// on H100/H200 the native warp-specialised kernel runs the forward blocks where it beats
// cuDNN (head dim 128: every block of a ring, a rank's only block from 4096 rows and keys,
// sliding-window blocks only where the band is 4096+ keys wide; head dim 64: ring blocks of up
// to 2048 rows), the other forward blocks run on cuDNN's fused attention where the build has
// cuDNN and it supports them, else natively; the backward pass of a ring stays native (cuDNN
// would round every step's gradients to the 16-bit dtype). cudnn: cuDNN wherever it supports
// the block (sub-blocks it cannot run, such as causal ones whose first row sees no key, still
// run natively). native: ringattn's own kernel only. Ignored for CPU tensors.
enum class KernelKind : std::uint8_t { automatic, cudnn, native };
const char* to_string(KernelKind kind);
KernelKind parse_kernel(const std::string& name);  // "auto", "cudnn", "native"

// What attention computes. softmax: softmax(scale Q K^T) V, over the ring. linear: kernelised
// linear attention (Katharopoulos et al.), no ring: each rank folds its keys and values into a
// D x D state per head, and the ranks combine states with one exclusive prefix scan (causal)
// or one all-reduce (non-causal).
enum class AttentionKind : std::uint8_t { softmax, linear };
const char* to_string(AttentionKind kind);
AttentionKind parse_attention(const std::string& name);  // "softmax", "linear"

// Linear attention's feature map phi. elu1: phi(x) = elu(x) + 1, outputs normalised,
//   o_i = phi(q_i)^T S_i / (phi(q_i) . z_i + 1e-6), S_i = sum_j w_ij phi(k_j) v_j^T,
//   z_i = sum_j w_ij phi(k_j).
// identity: phi(x) = x, unnormalised (RetNet / gated linear attention style), o_i = q_i^T S_i.
// Causal: j <= i with weight w_ij = decay_h^(i - j); non-causal: every j, weight 1.
enum class FeatureMap : std::uint8_t { elu1, identity };
const char* to_string(FeatureMap map);
FeatureMap parse_feature_map(const std::string& name);  // "elu1", "identity"

// The largest softmax scale accepted: the GPU kernels fold log2(e) into it in fp32, and above
// this the product is inf (the native kernel then wrote finite but wrong outputs).
inline constexpr double kMaxScale = 3.4028234663852886e38 / 1.4426950408889634;  // ~2.36e38

struct AttentionOptions {
  bool causal = false;                 // query at position i attends keys at positions <= i
  std::optional<double> scale;         // softmax scale in (0, kMaxScale], not 0 in fp32; default 1/sqrt(head_dim); none with linear
  LayoutKind layout = LayoutKind::contiguous;
  KernelKind kernel = KernelKind::automatic;
  std::int64_t seq_len = 0;            // global S; 0 = the sum of the ranks' local lengths
  // Sliding-window attention (softmax, contiguous layout; CPU and GPU, forward and backward): query i attends keys
  // in [i - window, i] (causal) or [i - window, i + window] (non-causal), plus the first
  // `sinks` tokens always (StreamingLLM's attention sinks; causal: those up to i). window < 0:
  // no window. The ring then moves K and V only as far as the windows reach (both ways when
  // two-sided), and the sink tokens are gathered to every rank once.
  std::int64_t window = -1;
  std::int64_t sinks = 0;
  AttentionKind attention = AttentionKind::softmax;
  FeatureMap feature_map = FeatureMap::elu1;  // linear attention only
  // Linear attention, causal only: per-head decay in (0, 1]; empty = no decay, one value =
  // every head, else one per query head.
  std::vector<double> decay;
  // Bound, in seconds, on each wait for a ring transfer on the CPU (MPI), on the GPU ring's
  // progress (no transfer or step completing for this long; the library's NCCL communicator is
  // then aborted), and on each host collective of the call (its agreements, at least 1 s: a rank
  // that never makes the call no longer blocks the others); 0 waits forever. So it also bounds
  // how far apart the ranks may enter a call: a rank that arrives later than this (writing a
  // checkpoint, say) times the others out. On expiry the call throws
  // Error(ErrorCode::timeout) naming the step or collective and the peer. The context then
  // refuses further calls (Context::failure(), Context::collectives_abandoned()). The Context
  // constructor's collectives are bounded only by a detail::CollectiveBound the caller holds
  // (the CLI does); otherwise they wait as MPI's do.
  double timeout_s = 300.0;
  // Called on every rank after each ring step with (steps done, steps in all). If it throws,
  // the ring still finishes on this rank, then the call rethrows that exception here.
  std::function<void(int, int)> on_step;
};

}  // namespace ringattn
