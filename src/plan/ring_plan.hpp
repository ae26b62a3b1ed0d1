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

// band: causal with a lower bound as well (sliding-window attention).
enum class MaskKind : std::uint8_t { full, causal, band };

// Rows q_begin + i (0 <= i < q_len) of the local queries against rows kv_begin + l
// (0 <= l < kv_len) of the held KV block. For causal tasks, row i sees key l iff
// l <= i + diag_offset; the planner guarantees diag_offset >= 0 (every row sees a key) and
// diag_offset < kv_len - 1 (otherwise the task would be full). Band tasks (CPU kernel only)
// also need l >= i + lower_offset; every row sees at least one key.
struct BlockTask {
  std::int64_t q_begin = 0;
  std::int64_t q_len = 0;
  std::int64_t kv_begin = 0;
  std::int64_t kv_len = 0;
  MaskKind mask = MaskKind::full;
  std::int64_t diag_offset = 0;
  std::int64_t lower_offset = 0;  // band only

  bool allows(std::int64_t i, std::int64_t l) const {
    if (mask == MaskKind::full) return true;
    return l <= i + diag_offset && (mask != MaskKind::band || l >= i + lower_offset);
  }
  // Number of (query, key) pairs computed.
  std::int64_t pairs() const;
};

// A range of rows of a KV block, [begin, end).
struct RowRange {
  std::int64_t begin = 0;
  std::int64_t end = 0;
  std::int64_t length() const { return end - begin; }
  bool contains(const RowRange& other) const {
    return other.length() <= 0 || (begin <= other.begin && other.end <= end);
  }
};

struct RingStep {
  int kv_source = 0;       // whose KV block is held during this step
  std::int64_t kv_len = 0; // rows in that block
  std::vector<BlockTask> tasks;
  // Rows of the block this rank receives for this step (its tasks and every later rank's that
  // the block reaches through it): all of them but for sliding windows, where only the rows
  // some window reaches travel. Task rows stay relative to the whole block; a receiver keeps
  // the block's full-size layout and leaves other rows unset. The CPU backward ignores these
  // and moves whole blocks (K, V and the dK/dV sums share its buffer).
  RowRange held;
  // Rows passed on to send_to after this step: the next rank's `held` at the next step.
  RowRange send;
};

struct RingPlan {
  int rank = 0;
  int world = 1;
  int send_to = 0;    // next rank in the ring
  int recv_from = 0;  // previous rank in the ring
  std::vector<RingStep> steps;  // P steps, fewer for a sliding window
  // Two-sided (non-causal) sliding window: after `steps` (blocks of earlier ranks, arriving
  // from recv_from), blocks of later ranks travel the other way (from send_to): step j holds
  // the block of rank + j, j = 1, 2, ...
  std::vector<RingStep> reverse_steps;
  // The rows of this rank's own block that start the reverse pass (sent to recv_from, which
  // holds them at its first reverse step).
  RowRange reverse_own_send;
  // Sliding window with attention sinks: the sink block (the first sink_len tokens, gathered
  // from their owners to every rank after the ring) and this rank's tasks against it.
  std::int64_t sink_len = 0;
  std::vector<BlockTask> sink_tasks;
  std::vector<std::int64_t> sink_rows;  // per rank: how many of its first rows are sink tokens
};

// The sub-block of query segment q against key segment k that `mask` allows, or nothing.
// Both segments must have the same stride (true of every layout).
std::optional<BlockTask> classify_block(const Segment& q, const Segment& k, MaskKind mask);

RingPlan make_ring_plan(const Layout& layout, MaskKind mask, int rank);

// The keys of task t that lie in rows [begin, end) of the held block, as a task of their own
// (the same pairs: every (query, key) pair of t whose key is in the range, no other), or
// nothing where t has no key there. Its kv rows are exactly those of t in the range, so a
// kernel in store mode writes all of them; query rows that see none of those keys are left
// out (q_len may be 0: no pair, rows to zero). A causal slice that every row sees whole
// becomes full. Full and causal tasks only (band: Error).
std::optional<BlockTask> slice_keys(const BlockTask& t, std::int64_t begin, std::int64_t end);

// Sliding-window attention on the contiguous layout: query p sees keys t with
// p - window <= t <= p (causal) or |p - t| <= window (two-sided), and the first `sinks`
// tokens always (causal: those with t <= p). The ring runs only as many steps as the
// farthest window reaches over all ranks (every rank runs the same number), in both
// directions when two-sided; keys of the sinks outside a query's window come from the sink
// block. Each hop carries only the rows of its block that the windows of the ranks it travels
// to reach (RingStep::held / send): a suffix going forward, a prefix going back.
RingPlan make_window_plan(const Layout& layout, std::int64_t window, std::int64_t sinks, int rank,
                          bool causal = true);

}  // namespace ringattn::detail
