// ringattn/options.hpp: what to compute.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "ringattn/layout.hpp"

namespace ringattn {

// The GPU kernel that computes each block. automatic: cuDNN's fused attention where the
// build has cuDNN and it supports the block, else the native kernel. cudnn: cuDNN wherever it
// supports the block (sub-blocks it cannot run, such as causal ones whose first row sees no
// key, still run natively). native: ringattn's own kernel only. Ignored for CPU tensors.
enum class KernelKind : std::uint8_t { automatic, cudnn, native };
const char* to_string(KernelKind kind);
KernelKind parse_kernel(const std::string& name);  // "auto", "cudnn", "native"

struct AttentionOptions {
  bool causal = false;                 // query at position i attends keys at positions <= i
  std::optional<double> scale;         // softmax scale; default 1/sqrt(head_dim)
  LayoutKind layout = LayoutKind::contiguous;
  KernelKind kernel = KernelKind::automatic;
  std::int64_t seq_len = 0;            // global S; 0 = the sum of the ranks' local lengths
  // Called on every rank after each ring step with (steps done, steps in all).
  std::function<void(int, int)> on_step;
};

}  // namespace ringattn
