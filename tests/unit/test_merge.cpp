#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "kernels/cpu/merge.hpp"

using ringattn::detail::merge_block_into;

TEST(Merge, TwoHalvesEqualTheWhole) {
  // Softmax over scores {a0, a1 | b0} with values {1, 2 | 5} (D = 1), merged from two halves.
  const double a0 = 0.3, a1 = -1.2, b0 = 2.0;
  const double whole_lse = std::log(std::exp(a0) + std::exp(a1) + std::exp(b0));
  const double whole_o = (std::exp(a0) * 1 + std::exp(a1) * 2 + std::exp(b0) * 5) / std::exp(whole_lse);
  float o = static_cast<float>((std::exp(a0) * 1 + std::exp(a1) * 2) / (std::exp(a0) + std::exp(a1)));
  float lse = static_cast<float>(std::log(std::exp(a0) + std::exp(a1)));
  const float o_b = 5.0f;
  lse = merge_block_into(&o, lse, &o_b, 1.0f, static_cast<float>(b0), 1);
  EXPECT_NEAR(lse, whole_lse, 1e-6);
  EXPECT_NEAR(o, whole_o, 1e-6);
}

TEST(Merge, FullyMaskedRowsStayExactWithoutNaN) {
  std::vector<float> o = {0.0f, 0.0f};
  const std::vector<float> none = {0.0f, 0.0f};
  // Nothing merged into nothing: still (0, -inf).
  float lse = merge_block_into(o.data(), -INFINITY, none.data(), 1.0f, -INFINITY, 2);
  EXPECT_EQ(lse, -INFINITY);
  EXPECT_EQ(o[0], 0.0f);
  EXPECT_FALSE(std::isnan(o[1]));
  // A real block into an empty row: exactly the block (scaled by o_b_scale).
  const std::vector<float> block = {2.0f, -4.0f};
  lse = merge_block_into(o.data(), lse, block.data(), 0.5f, 1.25f, 2);
  EXPECT_EQ(lse, 1.25f);
  EXPECT_EQ(o[0], 1.0f);
  EXPECT_EQ(o[1], -2.0f);
  // An empty block into a real row changes nothing.
  lse = merge_block_into(o.data(), lse, none.data(), 1.0f, -INFINITY, 2);
  EXPECT_EQ(lse, 1.25f);
  EXPECT_EQ(o[0], 1.0f);
}

TEST(Merge, LargeLseGapsDoNotOverflow) {
  float o = 1.0f;
  const float o_b = 3.0f;
  const float lse = merge_block_into(&o, 1000.0f, &o_b, 1.0f, -1000.0f, 1);
  EXPECT_FLOAT_EQ(lse, 1000.0f);
  EXPECT_FLOAT_EQ(o, 1.0f);
}
