// The plan property: over all ranks and steps, every (query, key) pair the mask allows is
// computed exactly once and no other pair is.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "plan/ring_plan.hpp"
#include "ringattn/error.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

void check_plan_covers_mask_once(LayoutKind kind, MaskKind mask, std::int64_t S, int P) {
  const Layout layout(kind, S, P);
  std::vector<std::uint8_t> count(static_cast<std::size_t>(S * S), 0);
  for (int r = 0; r < P; ++r) {
    const RingPlan plan = make_ring_plan(layout, mask, r);
    ASSERT_EQ(static_cast<int>(plan.steps.size()), P);
    const auto q_pos = layout.positions(r);
    for (int s = 0; s < P; ++s) {
      const RingStep& step = plan.steps[static_cast<std::size_t>(s)];
      ASSERT_EQ(step.kv_source, (r - s + P) % P);
      const auto k_pos = layout.positions(step.kv_source);
      ASSERT_EQ(step.kv_len, static_cast<std::int64_t>(k_pos.size()));
      for (const BlockTask& t : step.tasks) {
        ASSERT_GE(t.q_begin, 0);
        ASSERT_LE(t.q_begin + t.q_len, static_cast<std::int64_t>(q_pos.size()));
        ASSERT_GE(t.kv_begin, 0);
        ASSERT_LE(t.kv_begin + t.kv_len, step.kv_len);
        std::int64_t pairs = 0;
        for (std::int64_t i = 0; i < t.q_len; ++i) {
          std::int64_t row_pairs = 0;
          for (std::int64_t l = 0; l < t.kv_len; ++l) {
            if (!t.allows(i, l)) continue;
            const std::int64_t qp = q_pos[static_cast<std::size_t>(t.q_begin + i)];
            const std::int64_t kp = k_pos[static_cast<std::size_t>(t.kv_begin + l)];
            ++count[static_cast<std::size_t>(qp * S + kp)];
            ++row_pairs;
          }
          ASSERT_GT(row_pairs, 0) << "task rows must each see a key";
          pairs += row_pairs;
        }
        EXPECT_EQ(pairs, t.pairs());
      }
    }
  }
  for (std::int64_t qp = 0; qp < S; ++qp) {
    for (std::int64_t kp = 0; kp < S; ++kp) {
      const int expected = (mask == MaskKind::full || kp <= qp) ? 1 : 0;
      ASSERT_EQ(count[static_cast<std::size_t>(qp * S + kp)], expected)
          << to_string(kind) << (mask == MaskKind::causal ? " causal" : " full") << " S=" << S << " P=" << P
          << " pair (" << qp << ", " << kp << ")";
    }
  }
}

}  // namespace

TEST(RingPlan, EveryAllowedPairExactlyOnce) {
  for (LayoutKind kind : {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped}) {
    for (MaskKind mask : {MaskKind::full, MaskKind::causal}) {
      for (int P = 1; P <= 16; ++P) {
        for (std::int64_t S : {std::int64_t{P}, std::int64_t{4} * P, std::int64_t{4} * P + 3, std::int64_t{97}}) {
          if (S < P) continue;
          check_plan_covers_mask_once(kind, mask, S, P);
          if (HasFatalFailure()) return;
        }
      }
    }
  }
}

TEST(RingPlan, CausalSkipsHiddenBlocksAndZigzagBalances) {
  // Contiguous causal: rank 0 sees only its own block; all later blocks are hidden.
  const Layout contiguous(LayoutKind::contiguous, 64, 4);
  const RingPlan first = make_ring_plan(contiguous, MaskKind::causal, 0);
  EXPECT_EQ(first.steps[0].tasks.size(), 1u);
  for (int s = 1; s < 4; ++s) EXPECT_TRUE(first.steps[static_cast<std::size_t>(s)].tasks.empty());
  const RingPlan last = make_ring_plan(contiguous, MaskKind::causal, 3);
  EXPECT_EQ(last.steps[1].tasks.at(0).mask, MaskKind::full);

  // Zigzag causal: every rank computes the same number of pairs.
  const Layout zigzag(LayoutKind::zigzag, 64, 4);
  std::int64_t reference = -1;
  for (int r = 0; r < 4; ++r) {
    std::int64_t pairs = 0;
    for (const RingStep& step : make_ring_plan(zigzag, MaskKind::causal, r).steps) {
      for (const BlockTask& t : step.tasks) pairs += t.pairs();
    }
    if (reference < 0) reference = pairs;
    EXPECT_EQ(pairs, reference) << "rank " << r;
  }
}

TEST(RingPlan, ZigzagStepsFoldIntoFewTasks) {
  // A zigzag rank holds two chunks (the middle rank's adjacent pair is one segment): four
  // segment pairs a step, which the plan folds into one task where the mask is full and into
  // at most two where it is causal (the diagonal chunk, and the rectangle of keys before it
  // merged with the next diagonal). EveryAllowedPairExactlyOnce checks the pairs.
  for (int P : {2, 3, 4, 8}) {
    const Layout zigzag(LayoutKind::zigzag, 64 * P, P);
    for (int r = 0; r < P; ++r) {
      for (const RingStep& step : make_ring_plan(zigzag, MaskKind::full, r).steps) {
        EXPECT_EQ(step.tasks.size(), 1u) << "P=" << P << " rank " << r;
      }
      for (const RingStep& step : make_ring_plan(zigzag, MaskKind::causal, r).steps) {
        EXPECT_LE(step.tasks.size(), 2u) << "P=" << P << " rank " << r;
      }
    }
  }
  // P = 2, rank 0 (chunks 0 and 3 of 4), own block: chunk 0's diagonal, and chunk 3's rows
  // against keys 0 .. 31 (chunk 0, all seen) and 32 .. 63 (chunk 3, causal) as one task.
  const RingPlan r0 = make_ring_plan(Layout(LayoutKind::zigzag, 128, 2), MaskKind::causal, 0);
  ASSERT_EQ(r0.steps[0].tasks.size(), 2u);
  const BlockTask& wide = r0.steps[0].tasks[1];
  EXPECT_EQ(wide.q_begin, 32);
  EXPECT_EQ(wide.q_len, 32);
  EXPECT_EQ(wide.kv_begin, 0);
  EXPECT_EQ(wide.kv_len, 64);
  EXPECT_EQ(wide.mask, MaskKind::causal);
  EXPECT_EQ(wide.diag_offset, 32);
}

TEST(RingPlan, ClassifyTrimsCausalBlocks) {
  // Queries at 10..19 against keys at 15..24: query 10+i sees key 15+l iff l <= i - 5.
  const auto t = classify_block({0, 10, 10, 1}, {0, 15, 10, 1}, MaskKind::causal);
  ASSERT_TRUE(t.has_value());
  EXPECT_EQ(t->q_begin, 5);   // queries 10..14 see none of these keys
  EXPECT_EQ(t->q_len, 5);
  EXPECT_EQ(t->kv_len, 5);    // keys 20..24 are seen by no query
  EXPECT_EQ(t->mask, MaskKind::causal);
  EXPECT_EQ(t->diag_offset, 0);
  EXPECT_FALSE(classify_block({0, 0, 10, 1}, {0, 10, 10, 1}, MaskKind::causal).has_value());
  EXPECT_EQ(classify_block({0, 10, 10, 1}, {0, 0, 10, 1}, MaskKind::causal)->mask, MaskKind::full);
}

namespace {

// The sliding-window plan: every pair with p - window <= t <= p, or t < sinks and t <= p, is
// computed exactly once (ring steps plus the sink tasks) and no other pair; the ring makes no
// more steps than the farthest window needs.
void check_window_plan(std::int64_t S, int P, std::int64_t window, std::int64_t sinks, bool causal = true) {
  SCOPED_TRACE("S=" + std::to_string(S) + " P=" + std::to_string(P) + " W=" + std::to_string(window) +
               " sinks=" + std::to_string(sinks) + (causal ? " causal" : " two-sided"));
  const Layout layout(LayoutKind::contiguous, S, P);
  std::vector<std::uint8_t> count(static_cast<std::size_t>(S * S), 0);
  std::size_t steps = 0, reverse = 0;
  for (int r = 0; r < P; ++r) {
    const RingPlan plan = make_window_plan(layout, window, sinks, r, causal);
    if (r > 0) ASSERT_EQ(plan.steps.size(), steps) << "every rank runs the same steps";
    if (r > 0) ASSERT_EQ(plan.reverse_steps.size(), reverse) << "every rank runs the same steps";
    steps = plan.steps.size();
    reverse = plan.reverse_steps.size();
    const auto q_pos = layout.positions(r);
    auto visit = [&](const BlockTask& t, const std::vector<std::int64_t>& k_pos, std::int64_t kv_len) {
      ASSERT_GE(t.q_begin, 0);
      ASSERT_LE(t.q_begin + t.q_len, static_cast<std::int64_t>(q_pos.size()));
      ASSERT_GE(t.kv_begin, 0);
      ASSERT_LE(t.kv_begin + t.kv_len, kv_len);
      std::int64_t pairs = 0;
      for (std::int64_t i = 0; i < t.q_len; ++i) {
        std::int64_t row_pairs = 0;
        for (std::int64_t l = 0; l < t.kv_len; ++l) {
          if (!t.allows(i, l)) continue;
          const std::int64_t qp = q_pos[static_cast<std::size_t>(t.q_begin + i)];
          const std::int64_t kp = k_pos[static_cast<std::size_t>(t.kv_begin + l)];
          ++count[static_cast<std::size_t>(qp * S + kp)];
          ++row_pairs;
        }
        ASSERT_GT(row_pairs, 0) << "task rows must each see a key";
        pairs += row_pairs;
      }
      EXPECT_EQ(pairs, t.pairs());
    };
    for (std::size_t s = 0; s < plan.steps.size(); ++s) {
      const RingStep& step = plan.steps[s];
      const auto k_pos = layout.positions(step.kv_source);
      for (const BlockTask& t : step.tasks) {
        visit(t, k_pos, step.kv_len);
        ASSERT_TRUE(step.held.contains({t.kv_begin, t.kv_begin + t.kv_len})) << "step " << s << ": task keys not held";
      }
      // What travels: the own block whole at step 0; later, rows within the block; what this
      // rank sends is exactly what the next one holds at the next step, and a part of its own.
      ASSERT_TRUE(RowRange({0, step.kv_len}).contains(step.held));
      if (s == 0) {
        ASSERT_EQ(step.held.begin, 0);
        ASSERT_EQ(step.held.end, step.kv_len);
      }
      if (s + 1 < plan.steps.size()) {
        const RingStep& next = make_window_plan(layout, window, sinks, (r + 1) % P, causal).steps[s + 1];
        ASSERT_EQ(next.kv_source, step.kv_source);
        ASSERT_EQ(step.send.begin, next.held.begin) << "step " << s;
        ASSERT_EQ(step.send.end, next.held.end) << "step " << s;
        ASSERT_TRUE(step.held.contains(step.send)) << "step " << s << ": sends rows it does not hold";
      }
    }
    const RingPlan before = make_window_plan(layout, window, sinks, (r - 1 + P) % P, causal);
    if (!plan.reverse_steps.empty()) {  // the own block starts the reverse pass
      ASSERT_EQ(plan.reverse_own_send.begin, before.reverse_steps[0].held.begin);
      ASSERT_EQ(plan.reverse_own_send.end, before.reverse_steps[0].held.end);
    }
    for (std::size_t j = 0; j < plan.reverse_steps.size(); ++j) {
      const RingStep& step = plan.reverse_steps[j];
      ASSERT_EQ(step.kv_source, (r + static_cast<int>(j) + 1) % P);
      const auto k_pos = layout.positions(step.kv_source);
      for (const BlockTask& t : step.tasks) {
        visit(t, k_pos, step.kv_len);
        ASSERT_TRUE(step.held.contains({t.kv_begin, t.kv_begin + t.kv_len})) << "reverse " << j << ": keys not held";
      }
      ASSERT_TRUE(RowRange({0, step.kv_len}).contains(step.held));
      if (j + 1 < plan.reverse_steps.size()) {  // passed on to the previous rank
        const RingStep& next = before.reverse_steps[j + 1];
        ASSERT_EQ(next.kv_source, step.kv_source);
        ASSERT_EQ(step.send.begin, next.held.begin) << "reverse " << j;
        ASSERT_EQ(step.send.end, next.held.end) << "reverse " << j;
        ASSERT_TRUE(step.held.contains(step.send)) << "reverse " << j << ": sends rows it does not hold";
      }
    }
    std::vector<std::int64_t> sink_pos(static_cast<std::size_t>(plan.sink_len));
    for (std::int64_t t = 0; t < plan.sink_len; ++t) sink_pos[static_cast<std::size_t>(t)] = t;
    for (const BlockTask& t : plan.sink_tasks) visit(t, sink_pos, plan.sink_len);
  }
  // The steps: one more than the hops from the farthest rank's first query back to its
  // window's first key.
  int hops = 0, ahead = 0;
  for (int r = 0; r < P; ++r) {
    const std::int64_t first = layout.positions(r).front(), last = layout.positions(r).back();
    hops = std::max(hops, r - layout.owner(std::max<std::int64_t>(0, first - window)));
    ahead = std::max(ahead, layout.owner(std::min(S - 1, last + window)) - r);
  }
  EXPECT_EQ(steps, static_cast<std::size_t>(hops + 1));
  EXPECT_EQ(reverse, causal ? 0u : static_cast<std::size_t>(ahead));
  for (std::int64_t qp = 0; qp < S; ++qp) {
    for (std::int64_t kp = 0; kp < S; ++kp) {
      const bool in_window = causal ? (kp <= qp && kp >= qp - window) : (kp >= qp - window && kp <= qp + window);
      const bool allowed = in_window || (kp < sinks && (!causal || kp <= qp));
      ASSERT_EQ(count[static_cast<std::size_t>(qp * S + kp)], allowed ? 1 : 0) << "pair (" << qp << ", " << kp << ")";
    }
  }
}

}  // namespace

// slice_keys (the backward's last step computed in two key ranges): the slices of a task at
// any cut hold exactly its pairs, each once, and exactly its key rows (a store-mode kernel
// writes all of them), for full and causal tasks with every diagonal offset the plan makes.
TEST(RingPlan, KeySlicesHoldTheTasksPairsAndRows) {
  int checked = 0;
  for (MaskKind mask : {MaskKind::full, MaskKind::causal}) {
    for (std::int64_t q_len : {1, 5, 16}) {
      for (std::int64_t kv_len : {1, 7, 16}) {
        for (std::int64_t diag = 0; diag < (mask == MaskKind::full ? 1 : kv_len - 1); ++diag) {
          const BlockTask t{3, q_len, 2, kv_len, mask, diag};
          for (std::int64_t cut = 0; cut <= kv_len + 4; ++cut) {
            std::vector<int> seen(static_cast<std::size_t>(q_len * kv_len), 0);
            std::vector<int> rows(static_cast<std::size_t>(kv_len), 0);
            for (const auto& [begin, end] : {std::pair<std::int64_t, std::int64_t>{0, cut},
                                             std::pair<std::int64_t, std::int64_t>{cut, kv_len + 10}}) {
              const std::optional<BlockTask> s = slice_keys(t, begin, end);
              const std::int64_t lo = std::max(begin, t.kv_begin), hi = std::min(end, t.kv_begin + kv_len);
              if (hi <= lo) {
                EXPECT_FALSE(s.has_value()) << "cut " << cut;
                continue;
              }
              ASSERT_TRUE(s.has_value()) << "cut " << cut;
              EXPECT_EQ(s->kv_begin, lo);
              EXPECT_EQ(s->kv_len, hi - lo);
              EXPECT_GE(s->diag_offset, 0);
              EXPECT_GE(s->q_begin, t.q_begin);
              EXPECT_LE(s->q_begin + s->q_len, t.q_begin + q_len);
              for (std::int64_t l = 0; l < s->kv_len; ++l) ++rows[static_cast<std::size_t>(s->kv_begin + l - t.kv_begin)];
              for (std::int64_t i = 0; i < s->q_len; ++i) {
                for (std::int64_t l = 0; l < s->kv_len; ++l) {
                  if (!s->allows(i, l)) continue;
                  const std::int64_t ti = s->q_begin + i - t.q_begin, tl = s->kv_begin + l - t.kv_begin;
                  EXPECT_TRUE(t.allows(ti, tl)) << "a pair the task does not have, cut " << cut;
                  ++seen[static_cast<std::size_t>(ti * kv_len + tl)];
                }
              }
              EXPECT_EQ(s->pairs(), [&] {
                std::int64_t n = 0;
                for (std::int64_t i = 0; i < s->q_len; ++i)
                  for (std::int64_t l = 0; l < s->kv_len; ++l) n += s->allows(i, l) ? 1 : 0;
                return n;
              }());
            }
            for (std::int64_t i = 0; i < q_len; ++i) {
              for (std::int64_t l = 0; l < kv_len; ++l) {
                ASSERT_EQ(seen[static_cast<std::size_t>(i * kv_len + l)], t.allows(i, l) ? 1 : 0)
                    << "pair (" << i << ", " << l << ") of diag " << diag << ", cut " << cut;
              }
            }
            for (int r : rows) ASSERT_EQ(r, 1) << "every key row in exactly one slice, cut " << cut;
            ++checked;
          }
        }
      }
    }
  }
  EXPECT_GT(checked, 300);
  const BlockTask band{0, 4, 0, 8, MaskKind::band, 2, -2};
  EXPECT_THROW(slice_keys(band, 0, 4), Error);
}

TEST(RingPlan, SlidingWindowExactlyTheBandOnce) {
  for (int P = 1; P <= 8; ++P) {
    for (std::int64_t S : {std::int64_t{P}, std::int64_t{5} * P + 3, std::int64_t{61}}) {
      if (S < P) continue;
      for (std::int64_t window : {0, 1, 3, 7, 20, 100}) {
        for (std::int64_t sinks : {0, 1, 4, 30}) {
          for (bool causal : {true, false}) {
            check_window_plan(S, P, window, sinks, causal);
            if (HasFatalFailure()) return;
          }
        }
      }
    }
  }
}

// A window (or sink count) past the sequence reaches every key: the plan is the one for S, not
// one whose positions +- window overflowed (a causal window of 2^63 - 1 dropped every key).
TEST(RingPlan, SlidingWindowPastTheSequenceIsTheWholeOne) {
  const std::int64_t huge = std::numeric_limits<std::int64_t>::max();
  for (int P = 1; P <= 4; ++P) {
    const Layout layout(LayoutKind::contiguous, 61, P);
    for (bool causal : {true, false}) {
      for (int r = 0; r < P; ++r) {
        const RingPlan a = make_window_plan(layout, huge, huge, r, causal);
        const RingPlan b = make_window_plan(layout, 61, 61, r, causal);
        auto same = [&](const std::vector<RingStep>& x, const std::vector<RingStep>& y) {
          ASSERT_EQ(x.size(), y.size());
          for (std::size_t s = 0; s < x.size(); ++s) {
            EXPECT_EQ(x[s].kv_len, y[s].kv_len);
            ASSERT_EQ(x[s].tasks.size(), y[s].tasks.size());
            for (std::size_t t = 0; t < x[s].tasks.size(); ++t) {
              const BlockTask &u = x[s].tasks[t], &v = y[s].tasks[t];
              EXPECT_EQ(std::tie(u.q_begin, u.q_len, u.kv_begin, u.kv_len, u.mask, u.diag_offset, u.lower_offset),
                        std::tie(v.q_begin, v.q_len, v.kv_begin, v.kv_len, v.mask, v.diag_offset, v.lower_offset))
                  << "P " << P << " rank " << r << " step " << s << " task " << t;
            }
          }
        };
        same(a.steps, b.steps);
        same(a.reverse_steps, b.reverse_steps);
        RingStep sa, sb;  // the sink tasks, compared as one step's
        sa.tasks = a.sink_tasks;
        sb.tasks = b.sink_tasks;
        same({sa}, {sb});
        EXPECT_EQ(a.sink_len, b.sink_len);
      }
    }
  }
}

TEST(RingPlan, SlidingWindowNeedsFewSteps) {
  // S = 262,144 over 8 ranks (32k each) with a 4k window: one hop, not seven.
  const Layout layout(LayoutKind::contiguous, 262144, 8);
  const RingPlan plan = make_window_plan(layout, 4096, 0, 5);
  EXPECT_EQ(plan.steps.size(), 2u);
  // The hop carries the 4,096 rows the window reaches, not the whole 32k block.
  EXPECT_EQ(plan.steps[0].send.begin, 32768 - 4096);
  EXPECT_EQ(plan.steps[0].send.end, 32768);
  EXPECT_EQ(plan.steps[1].held.length(), 4096);
  // The full ring moves whole blocks.
  const RingPlan ring = make_ring_plan(Layout(LayoutKind::zigzag, 1000, 4), MaskKind::causal, 1);
  for (std::size_t s = 0; s + 1 < ring.steps.size(); ++s) {
    EXPECT_EQ(ring.steps[s].send.length(), ring.steps[s].kv_len);
    EXPECT_EQ(ring.steps[s + 1].held.length(), ring.steps[s + 1].kv_len);
  }
  EXPECT_THROW(make_window_plan(Layout(LayoutKind::zigzag, 64, 2), 4, 0, 0), Error);
}
