#include "plan/ring_plan.hpp"

#include <algorithm>

#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  std::int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

}  // namespace

std::int64_t BlockTask::pairs() const {
  if (mask == MaskKind::full) return q_len * kv_len;
  // Row i sees min(kv_len, i + diag_offset + 1) keys.
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < q_len; ++i) n += std::min(kv_len, i + diag_offset + 1);
  return n;
}

std::optional<BlockTask> classify_block(const Segment& q, const Segment& k, MaskKind mask) {
  if (q.length <= 0 || k.length <= 0) return std::nullopt;
  BlockTask t{q.local_begin, q.length, k.local_begin, k.length, MaskKind::full, 0};
  if (mask == MaskKind::full) return t;
  if (q.stride != k.stride) throw Error(ErrorCode::internal, "plan: segments with different strides");

  // Query i sits at q.global_begin + i*s, key l at k.global_begin + l*s (same stride s), so
  // key <= query  <=>  l <= i + floor((q.global_begin - k.global_begin) / s).
  const std::int64_t offset = floor_div(q.global_begin - k.global_begin, q.stride);
  const std::int64_t first_row = std::max<std::int64_t>(0, -offset);  // earlier rows see no key
  if (first_row >= q.length) return std::nullopt;
  const std::int64_t keys = std::min(k.length, q.length + offset);     // later keys are never seen
  t.q_begin += first_row;
  t.q_len -= first_row;
  t.kv_len = keys;
  t.diag_offset = offset + first_row;
  t.mask = t.diag_offset >= keys - 1 ? MaskKind::full : MaskKind::causal;
  if (t.mask == MaskKind::full) t.diag_offset = 0;
  return t;
}

RingPlan make_ring_plan(const Layout& layout, MaskKind mask, int rank) {
  const int P = layout.world();
  RingPlan plan;
  plan.rank = rank;
  plan.world = P;
  plan.send_to = (rank + 1) % P;
  plan.recv_from = (rank + P - 1) % P;
  const std::vector<Segment> q_segments = layout.segments(rank);
  for (int s = 0; s < P; ++s) {
    RingStep step;
    step.kv_source = (rank - s + P) % P;
    step.kv_len = layout.local_length(step.kv_source);
    for (const Segment& k : layout.segments(step.kv_source)) {
      for (const Segment& q : q_segments) {
        if (auto task = classify_block(q, k, mask)) step.tasks.push_back(*task);
      }
    }
    plan.steps.push_back(std::move(step));
  }
  return plan;
}

}  // namespace ringattn::detail
