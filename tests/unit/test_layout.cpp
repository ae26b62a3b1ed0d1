#include <gtest/gtest.h>

#include <algorithm>
#include <set>

#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

using namespace ringattn;

namespace {

const LayoutKind kKinds[] = {LayoutKind::contiguous, LayoutKind::zigzag, LayoutKind::striped};

}  // namespace

TEST(Layout, EveryPositionOwnedOnceAndIndexedConsistently) {
  for (LayoutKind kind : kKinds) {
    for (int P = 1; P <= 9; ++P) {
      for (std::int64_t S : {std::int64_t{P}, std::int64_t{P} + 1, std::int64_t{2} * P - 1, std::int64_t{37},
                             std::int64_t{64}, std::int64_t{1001}}) {
        if (S < P) continue;
        const Layout layout(kind, S, P);
        std::vector<int> seen(static_cast<std::size_t>(S), 0);
        for (int r = 0; r < P; ++r) {
          const auto pos = layout.positions(r);
          ASSERT_EQ(static_cast<std::int64_t>(pos.size()), layout.local_length(r));
          ASSERT_GE(pos.size(), 1u) << to_string(kind) << " P=" << P << " S=" << S << " rank " << r;
          ASSERT_TRUE(std::is_sorted(pos.begin(), pos.end()));
          for (std::size_t i = 0; i < pos.size(); ++i) {
            ++seen[static_cast<std::size_t>(pos[i])];
            EXPECT_EQ(layout.owner(pos[i]), r);
            EXPECT_EQ(layout.local_index(pos[i]), static_cast<std::int64_t>(i));
          }
        }
        for (int c : seen) ASSERT_EQ(c, 1) << to_string(kind) << " P=" << P << " S=" << S;
      }
    }
  }
}

TEST(Layout, UnevenSplitDiffersByAtMostOnePerChunk) {
  const Layout contiguous(LayoutKind::contiguous, 10, 4);  // 3 3 2 2
  EXPECT_EQ(contiguous.local_length(0), 3);
  EXPECT_EQ(contiguous.local_length(1), 3);
  EXPECT_EQ(contiguous.local_length(2), 2);
  EXPECT_EQ(contiguous.local_length(3), 2);
  EXPECT_EQ(contiguous.positions(2), (std::vector<std::int64_t>{6, 7}));

  // zigzag, S = 10, P = 2: chunks of 3 3 2 2; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2.
  const Layout zigzag(LayoutKind::zigzag, 10, 2);
  EXPECT_EQ(zigzag.positions(0), (std::vector<std::int64_t>{0, 1, 2, 8, 9}));
  EXPECT_EQ(zigzag.positions(1), (std::vector<std::int64_t>{3, 4, 5, 6, 7}));

  const Layout striped(LayoutKind::striped, 10, 4);
  EXPECT_EQ(striped.positions(1), (std::vector<std::int64_t>{1, 5, 9}));
  EXPECT_EQ(striped.positions(3), (std::vector<std::int64_t>{3, 7}));
}

TEST(Layout, RejectsFewerTokensThanRanks) {
  EXPECT_THROW(Layout(LayoutKind::contiguous, 3, 4), Error);
  EXPECT_THROW(Layout(LayoutKind::zigzag, 10, 0), Error);
  EXPECT_EQ(parse_layout("zigzag"), LayoutKind::zigzag);
  EXPECT_THROW(parse_layout("ring"), Error);
}
