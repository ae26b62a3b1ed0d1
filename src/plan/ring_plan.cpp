#include "plan/ring_plan.hpp"

#include <algorithm>
#include <optional>
#include <vector>

#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  std::int64_t q = a / b;
  if ((a % b != 0) && ((a < 0) != (b < 0))) --q;
  return q;
}

// One task computing exactly the pairs of a and b, where they form one rectangle of the
// step's block with one mask: the same query rows and adjacent key rows (a's keys first, all
// of them seen by every row: a full; b full or causal), or the same key rows and adjacent query
// rows, both full. Zigzag's two segments per rank make up to four tasks a step that this folds
// into one or two, so that a step launches fewer, longer kernels (each launch pays its own
// tail wave).
std::optional<BlockTask> merge_tasks(const BlockTask& a, const BlockTask& b) {
  if (a.mask != MaskKind::full || b.mask == MaskKind::band) return std::nullopt;
  if (a.q_begin == b.q_begin && a.q_len == b.q_len && a.kv_begin + a.kv_len == b.kv_begin) {
    BlockTask t = a;
    t.kv_len += b.kv_len;
    if (b.mask == MaskKind::causal) {
      // Row i sees b's key l iff l <= i + d, i.e. merged key a.kv_len + l <= i + d + a.kv_len;
      // and all of a's keys when i + d + a.kv_len >= a.kv_len - 1, true for every row i >= 0
      // iff d >= -1.
      if (b.diag_offset < -1) return std::nullopt;
      t.mask = MaskKind::causal;
      t.diag_offset = b.diag_offset + a.kv_len;
    }
    return t;
  }
  if (b.mask == MaskKind::full && a.kv_begin == b.kv_begin && a.kv_len == b.kv_len && a.q_begin + a.q_len == b.q_begin) {
    BlockTask t = a;
    t.q_len += b.q_len;
    return t;
  }
  return std::nullopt;
}

void merge_step_tasks(std::vector<BlockTask>& tasks) {
  for (bool merged = true; merged;) {
    merged = false;
    for (std::size_t i = 0; i < tasks.size() && !merged; ++i) {
      for (std::size_t j = 0; j < tasks.size() && !merged; ++j) {
        if (i == j) continue;
        if (auto t = merge_tasks(tasks[i], tasks[j])) {
          tasks[std::min(i, j)] = *t;
          tasks.erase(tasks.begin() + static_cast<std::ptrdiff_t>(std::max(i, j)));
          merged = true;
        }
      }
    }
  }
}

}  // namespace

std::int64_t BlockTask::pairs() const {
  if (mask == MaskKind::full) return q_len * kv_len;
  // Row i sees keys max(0, i + lower_offset) .. min(kv_len - 1, i + diag_offset).
  std::int64_t n = 0;
  for (std::int64_t i = 0; i < q_len; ++i) {
    const std::int64_t lo = mask == MaskKind::band ? std::max<std::int64_t>(0, i + lower_offset) : 0;
    n += std::max<std::int64_t>(0, std::min(kv_len, i + diag_offset + 1) - lo);
  }
  return n;
}

std::optional<BlockTask> slice_keys(const BlockTask& t, std::int64_t begin, std::int64_t end) {
  if (t.mask == MaskKind::band) throw Error(ErrorCode::internal, "plan: key slices of band tasks");
  const std::int64_t lo = std::max(begin, t.kv_begin), hi = std::min(end, t.kv_begin + t.kv_len);
  if (hi <= lo) return std::nullopt;
  BlockTask s = t;
  s.kv_begin = lo;
  s.kv_len = hi - lo;
  if (t.mask == MaskKind::full) return s;
  // Key l' of the slice is key l' + x of t: row i sees it iff l' <= i + diag_offset - x.
  const std::int64_t x = lo - t.kv_begin;
  s.diag_offset = t.diag_offset - x;
  if (s.diag_offset < 0) {  // the first rows see none of these keys
    const std::int64_t skip = std::min(-s.diag_offset, s.q_len);
    s.q_begin += skip;
    s.q_len -= skip;
    s.diag_offset = 0;
    if (s.q_len == 0) return s;
  }
  if (s.diag_offset >= s.kv_len - 1) s.mask = MaskKind::full, s.diag_offset = 0;  // every row sees every key
  return s;
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
    step.held = step.send = {0, step.kv_len};  // the whole block travels on
    for (const Segment& k : layout.segments(step.kv_source)) {
      for (const Segment& q : q_segments) {
        if (auto task = classify_block(q, k, mask)) step.tasks.push_back(*task);
      }
    }
    merge_step_tasks(step.tasks);
    plan.steps.push_back(std::move(step));
  }
  plan.steps.back().send = {0, 0};  // the last step passes nothing on
  return plan;
}

namespace {

// The smallest row range covering `span` (empty: length 0) and the keys of task t.
RowRange join(const RowRange& span, const BlockTask& t) {
  if (span.length() <= 0) return {t.kv_begin, t.kv_begin + t.kv_len};
  return {std::min(span.begin, t.kv_begin), std::max(span.end, t.kv_begin + t.kv_len)};
}

// The sub-block of contiguous query run q against contiguous key run k where
// q_pos - left <= k_pos <= q_pos + right (a negative bound: none on that side), or nothing.
std::optional<BlockTask> band_block(const Segment& q, const Segment& k, std::int64_t left, std::int64_t right) {
  if (q.length <= 0 || k.length <= 0) return std::nullopt;
  const std::int64_t off = q.global_begin - k.global_begin;  // key l, query i: same position iff l == i + off
  // No bound on a side: a bound no (row, key) pair of the block reaches.
  const std::int64_t hi = right >= 0 ? off + right : k.length;    // l <= i + hi
  const std::int64_t lo = left >= 0 ? off - left : -q.length;     // l >= i + lo
  const std::int64_t first_row = std::max<std::int64_t>(0, -hi);
  const std::int64_t last_row = std::min(q.length - 1, k.length - 1 - lo);
  if (first_row > last_row) return std::nullopt;
  const std::int64_t k_begin = std::max<std::int64_t>(0, first_row + lo);
  const std::int64_t k_end = std::min(k.length, last_row + hi + 1);
  if (k_begin >= k_end) return std::nullopt;
  BlockTask t;
  t.q_begin = q.local_begin + first_row;
  t.q_len = last_row - first_row + 1;
  t.kv_begin = k.local_begin + k_begin;
  t.kv_len = k_end - k_begin;
  t.diag_offset = hi + first_row - k_begin;
  t.lower_offset = lo + first_row - k_begin;
  const bool upper_binds = t.diag_offset < t.kv_len - 1;       // row 0 misses a later key
  const bool lower_binds = t.lower_offset + (t.q_len - 1) > 0;  // the last row misses key 0
  t.mask = lower_binds ? MaskKind::band : (upper_binds ? MaskKind::causal : MaskKind::full);
  if (t.mask == MaskKind::full) t.diag_offset = 0;
  if (t.mask != MaskKind::band) t.lower_offset = 0;
  return t;
}

}  // namespace

RingPlan make_window_plan(const Layout& layout, std::int64_t window, std::int64_t sinks, int rank, bool causal) {
  if (layout.kind() != LayoutKind::contiguous) {
    throw Error(ErrorCode::invalid_argument, "a sliding window needs the contiguous layout");
  }
  if (window < 0 || sinks < 0) throw Error(ErrorCode::invalid_argument, "window and sinks must be >= 0");
  // A window that spans the sequence reaches every key: the same plan as a window of S, and
  // positions +- window stay far from overflowing.
  window = std::min(window, layout.seq_len());
  sinks = std::min(sinks, layout.seq_len());
  const int P = layout.world();
  const std::int64_t right = causal ? 0 : window;
  // Hops the ring must make each way: the farthest any rank's window reaches.
  int back = 0, ahead = 0;
  for (int r = 0; r < P; ++r) {
    const std::vector<Segment> seg = layout.segments(r);
    if (seg.empty()) continue;
    const std::int64_t first = seg.front().global_begin, last = seg.back().global_begin + seg.back().length - 1;
    back = std::max(back, r - layout.owner(std::max<std::int64_t>(0, first - window)));
    ahead = std::max(ahead, layout.owner(std::min(layout.seq_len() - 1, last + right)) - r);
  }
  RingPlan plan;
  plan.rank = rank;
  plan.world = P;
  plan.send_to = (rank + 1) % P;
  plan.recv_from = (rank + P - 1) % P;
  const std::vector<Segment> q_segments = layout.segments(rank);
  // The band tasks of rank r against the block of `source` (none for a block that wrapped
  // around the ring: it lies on the other side of r, which the other pass or nobody covers).
  auto tasks_of = [&](int r, int source, bool wrapped) {
    std::vector<BlockTask> tasks;
    if (wrapped) return tasks;
    for (const Segment& k : layout.segments(source)) {
      for (const Segment& q : layout.segments(r)) {
        if (auto task = band_block(q, k, window, right)) tasks.push_back(*task);
      }
    }
    return tasks;
  };
  auto add_step = [&](std::vector<RingStep>& steps, int source, bool wrapped) {
    RingStep step;
    step.kv_source = source;
    step.kv_len = layout.local_length(source);
    step.tasks = tasks_of(rank, source, wrapped);
    step.held = step.send = {0, step.kv_len};
    steps.push_back(std::move(step));
  };
  for (int s = 0; s <= back; ++s) add_step(plan.steps, (rank - s + P) % P, rank - s < 0);
  // Forward steps carry only the rows some window reaches: at step s the block of r - s is
  // needed by r and by the ranks it travels on to (r + k at step s + k, for the remaining
  // steps), so it holds the span of their tasks' keys. Windows reach back from a rank's first
  // row, so the ranks further on need a suffix of what this one needs: the spans nest.
  auto held_at = [&](int r, int s) {
    const int source = ((r - s) % P + P) % P;
    RowRange span{0, 0};
    for (int k = 0; s + k <= back; ++k) {
      const int rk = r + k;
      if (rk >= P) break;  // past the last rank the block has wrapped: nobody else needs it
      for (const BlockTask& t : tasks_of(rk, source, rk - (s + k) < 0)) span = join(span, t);
    }
    return span;
  };
  for (int s = 1; s <= back; ++s) plan.steps[static_cast<std::size_t>(s)].held = held_at(rank, s);
  for (int s = 0; s < back; ++s) plan.steps[static_cast<std::size_t>(s)].send = held_at(rank + 1, s + 1);
  if (!plan.steps.empty()) plan.steps.back().send = {0, 0};
  if (!causal) {
    for (int j = 1; j <= ahead; ++j) add_step(plan.reverse_steps, (rank + j) % P, rank + j >= P);
    // The same the other way: reverse step j of rank r holds the block of r + j + 1, which
    // travels on to r - 1, r - 2, ...; windows reach ahead from a rank's last row, so those
    // ranks need a prefix of what this one needs.
    auto held_back = [&](int r, int j) {
      RowRange span{0, 0};
      const int source = ((r + j + 1) % P + P) % P;
      for (int k = 0; j + k < ahead; ++k) {
        const int rk = r - k;
        if (rk < 0) break;  // before rank 0 the block has wrapped: nobody else needs it
        for (const BlockTask& t : tasks_of(rk, source, r + j + 1 >= P)) span = join(span, t);
      }
      return span;
    };
    for (int j = 0; j < ahead; ++j) plan.reverse_steps[static_cast<std::size_t>(j)].held = held_back(rank, j);
    for (int j = 0; j + 1 < ahead; ++j) plan.reverse_steps[static_cast<std::size_t>(j)].send = held_back(rank - 1, j + 1);
    if (ahead > 0) {
      plan.reverse_steps.back().send = {0, 0};
      plan.reverse_own_send = held_back(rank - 1, 0);
    }
  }
  // Sinks: keys t < sinks outside a query's window. Before it (t <= p - window - 1): a block
  // whose keys are shifted window + 1 later and seen up to the query; two-sided, after it too
  // (t >= p + window + 1): keys shifted window + 1 earlier and seen from the query on.
  plan.sink_len = std::min(sinks, layout.seq_len());
  if (plan.sink_len > 0) {
    for (int r = 0; r < P; ++r) {
      const std::vector<Segment> seg = layout.segments(r);
      const std::int64_t begin = seg.empty() ? plan.sink_len : seg.front().global_begin;
      plan.sink_rows.push_back(std::clamp<std::int64_t>(plan.sink_len - begin, 0, layout.local_length(r)));
    }
    const Segment before{0, window + 1, plan.sink_len, 1};
    const Segment after{0, -(window + 1), plan.sink_len, 1};
    for (const Segment& q : q_segments) {
      if (auto task = band_block(q, before, -1, 0)) plan.sink_tasks.push_back(*task);
      if (!causal) {
        if (auto task = band_block(q, after, 0, -1)) plan.sink_tasks.push_back(*task);
      }
    }
  }
  return plan;
}

}  // namespace ringattn::detail
