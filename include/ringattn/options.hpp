// ringattn/options.hpp: what to compute.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>

#include "ringattn/layout.hpp"

namespace ringattn {

struct AttentionOptions {
  bool causal = false;                 // query at position i attends keys at positions <= i
  std::optional<double> scale;         // softmax scale; default 1/sqrt(head_dim)
  LayoutKind layout = LayoutKind::contiguous;
  std::int64_t seq_len = 0;            // global S; 0 = the sum of the ranks' local lengths
  // Called on every rank after each ring step with (steps done, steps in all).
  std::function<void(int, int)> on_step;
};

}  // namespace ringattn
