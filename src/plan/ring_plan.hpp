// plan/ring_plan.hpp: which keys each rank attends to at each step of the ring.
//
// Pure data: no MPI, no device. At step s of P, rank r holds the KV block of rank
// (r - s) mod P, sends it on to r + 1 and receives the next from r - 1. For each step the
// plan lists the sub-blocks (tasks) to compute: a range of local query rows against a range
// of the held block's rows, with a mask. Sub-blocks the mask hides entirely are left out,
// and causal sub-blocks are trimmed to the rows and keys that see something.
//
// Property (tests/unit/test_ring_plan.cpp): over all ranks and steps, every (query, key) pair
// the mask allows is computed exactly once, and no other pair is.
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "ringattn/layout.hpp"

namespace ringattn::detail {

enum class MaskKind : std::uint8_t { full, causal };

// Rows q_begin + i (0 <= i < q_len) of the local queries against rows kv_begin + l
// (0 <= l < kv_len) of the held KV block. For causal tasks, row i sees key l iff
// l <= i + diag_offset; the planner guarantees diag_offset >= 0 (every row sees a key) and
// diag_offset < kv_len - 1 (otherwise the task would be full).
struct BlockTask {
  std::int64_t q_begin = 0;
  std::int64_t q_len = 0;
  std::int64_t kv_begin = 0;
  std::int64_t kv_len = 0;
  MaskKind mask = MaskKind::full;
  std::int64_t diag_offset = 0;

  bool allows(std::int64_t i, std::int64_t l) const { return mask == MaskKind::full || l <= i + diag_offset; }
  // Number of (query, key) pairs computed.
  std::int64_t pairs() const;
};

struct RingStep {
  int kv_source = 0;       // whose KV block is held during this step
  std::int64_t kv_len = 0; // rows in that block
  std::vector<BlockTask> tasks;
};

struct RingPlan {
  int rank = 0;
  int world = 1;
  int send_to = 0;    // next rank in the ring
  int recv_from = 0;  // previous rank in the ring
  std::vector<RingStep> steps;
};

// The sub-block of query segment q against key segment k that `mask` allows, or nothing.
// Both segments must have the same stride (true of every layout).
std::optional<BlockTask> classify_block(const Segment& q, const Segment& k, MaskKind mask);

RingPlan make_ring_plan(const Layout& layout, MaskKind mask, int rank);

}  // namespace ringattn::detail
