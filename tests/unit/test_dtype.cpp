#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/dtype.hpp"
#include "ringattn/error.hpp"

using namespace ringattn;
using namespace ringattn::detail;

TEST(DType, Fp16RoundTripsEveryFiniteValue) {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const float f = f16_to_f32(h);
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(f16_to_f32(f32_to_f16(f))));
      continue;
    }
    ASSERT_EQ(f32_to_f16(f), h) << "bits " << bits;
  }
}

TEST(DType, Fp16KnownValuesAndRounding) {
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x0001), 0x1p-24f);           // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);           // largest finite
  EXPECT_EQ(f32_to_f16(1.0f + 0x1p-11f), 0x3c00);    // tie: rounds to even (down)
  EXPECT_EQ(f32_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);  // tie: rounds to even (up)
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);           // overflows to inf
  EXPECT_EQ(f32_to_f16(0x1p-25f), 0x0000);           // tie with zero: even
  EXPECT_EQ(f32_to_f16(0x1.8p-25f), 0x0001);
}

TEST(DType, Bf16RoundsToNearestEven) {
  EXPECT_EQ(bf16_to_f32(f32_to_bf16(1.0f)), 1.0f);
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1p-8f), 0x3f80);        // tie: even (down)
  EXPECT_EQ(f32_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);    // tie: even (up)
  EXPECT_EQ(f32_to_bf16(1.0f + 0x1.8p-8f), 0x3f81);      // above the tie: up
  EXPECT_TRUE(std::isnan(bf16_to_f32(f32_to_bf16(NAN))));
}

TEST(DType, ParseNamesAndReject) {
  EXPECT_EQ(parse_dtype("bf16"), DType::bf16);
  EXPECT_EQ(parse_dtype("float16"), DType::f16);
  EXPECT_EQ(parse_dtype("FP32"), DType::f32);
  EXPECT_THROW(parse_dtype("int8"), ringattn::Error);
}
