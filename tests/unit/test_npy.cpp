#include "io/npy.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "ringattn/error.hpp"

namespace {

using ringattn::Error;
using ringattn::ErrorCode;
using ringattn::io::kNpyMaxHeaderBytes;
using ringattn::io::make_npy_header;
using ringattn::io::NpyDType;
using ringattn::io::NpyHeader;
using ringattn::io::parse_npy_header;

const std::string kPath = "data/q.npy";

// A .npy prefix as numpy lays it out: magic, version, little-endian length, dict, padding.
std::string npy_prefix(const std::string& dict, int major = 1) {
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  std::string text = dict;
  while ((8 + len_bytes + text.size() + 1) % 64 != 0) text += ' ';
  text += '\n';
  std::string out = std::string("\x93NUMPY", 6) + static_cast<char>(major) + '\0';
  for (std::size_t i = 0; i < len_bytes; ++i) out += static_cast<char>((text.size() >> (8 * i)) & 0xff);
  return out + text;
}

std::string dict_with(const std::string& descr, const std::string& fortran, const std::string& shape) {
  return "{'descr': '" + descr + "', 'fortran_order': " + fortran + ", 'shape': " + shape + ", }";
}

// Parses `bytes` as the first bytes of a file of `file_size` bytes (default: header + 1 MiB).
NpyHeader parse(const std::string& bytes, std::uint64_t file_size = 0) {
  if (file_size == 0) file_size = bytes.size() + (1u << 20);
  return parse_npy_header(bytes.data(), bytes.size(), file_size, kPath);
}

void expect_io_error(const std::string& bytes, std::uint64_t file_size, const std::string& word,
                     std::size_t prefix_len = std::string::npos) {
  try {
    parse_npy_header(bytes.data(), std::min(prefix_len, bytes.size()), file_size, kPath);
    ADD_FAILURE() << "no error; expected one containing \"" << word << "\"";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::io) << e.what();
    const std::string message = e.what();
    EXPECT_EQ(message.rfind(kPath + ": ", 0), 0u) << message;
    EXPECT_NE(message.find(word), std::string::npos) << "\"" << message << "\" lacks \"" << word << "\"";
  }
}

TEST(Npy, DTypeSizesAndNames) {
  EXPECT_EQ(ringattn::io::npy_dtype_size(NpyDType::f2), 2u);
  EXPECT_EQ(ringattn::io::npy_dtype_size(NpyDType::f4), 4u);
  EXPECT_EQ(ringattn::io::npy_dtype_size(NpyDType::f8), 8u);
  EXPECT_STREQ(ringattn::io::npy_dtype_name(NpyDType::f2), "float16");
  EXPECT_STREQ(ringattn::io::npy_dtype_name(NpyDType::f4), "float32");
  EXPECT_STREQ(ringattn::io::npy_dtype_name(NpyDType::f8), "float64");
}

TEST(Npy, RoundTrip) {
  const std::vector<std::vector<std::int64_t>> shapes = {
      {}, {5}, {0}, {2, 3}, {1001, 4, 64}, {2, 37, 3, 4}, {0, 1LL << 40}, {1LL << 20, 1LL << 20, 4096}};
  for (const NpyDType dtype : {NpyDType::f2, NpyDType::f4, NpyDType::f8}) {
    for (const auto& shape : shapes) {
      const std::string header = make_npy_header(dtype, shape);
      std::uint64_t elements = 1;
      for (const std::int64_t d : shape) elements *= static_cast<std::uint64_t>(d);
      const std::uint64_t data_bytes = elements * ringattn::io::npy_dtype_size(dtype);
      const NpyHeader h = parse_npy_header(header.data(), header.size(), header.size() + data_bytes, kPath);
      EXPECT_EQ(h.dtype, dtype);
      EXPECT_EQ(h.shape, shape);
      EXPECT_EQ(h.data_offset, header.size());
      EXPECT_EQ(h.data_offset % 64, 0u);
      EXPECT_EQ(h.data_bytes, data_bytes);
      EXPECT_EQ(header[6], '\x01');
      EXPECT_EQ(header.back(), '\n');
    }
  }
  EXPECT_NE(make_npy_header(NpyDType::f4, {5}).find("'shape': (5,), }"), std::string::npos);
  EXPECT_NE(make_npy_header(NpyDType::f4, {}).find("'shape': (), }"), std::string::npos);
  EXPECT_NE(make_npy_header(NpyDType::f8, {1, 2, 3, 4}).find("'descr': '<f8'"), std::string::npos);
}

TEST(Npy, MakeRejectsNegativeDimension) {
  try {
    make_npy_header(NpyDType::f4, {3, -1});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::invalid_argument);
  }
}

TEST(Npy, ParsesNumpyBytes) {
  // np.save of np.zeros((2, 3), np.float32): header length 0x76 = 118, data at offset 128.
  const std::string numpy = std::string("\x93NUMPY\x01\x00\x76\x00", 10) +
                            "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }" +
                            std::string(58, ' ') + "\n";
  ASSERT_EQ(numpy.size(), 128u);
  const NpyHeader h = parse(numpy, 128 + 24);
  EXPECT_EQ(h.dtype, NpyDType::f4);
  EXPECT_EQ(h.shape, (std::vector<std::int64_t>{2, 3}));
  EXPECT_EQ(h.data_offset, 128u);
  EXPECT_EQ(h.data_bytes, 24u);
  EXPECT_EQ(make_npy_header(NpyDType::f4, {2, 3}), numpy);
}

TEST(Npy, AcceptsDictVariants) {
  const std::vector<std::string> dicts = {
      "{'shape': (7, 3), 'fortran_order': False, 'descr': '<f2'}",
      "{\"descr\":\"<f2\",\"fortran_order\":False,\"shape\":(7,3)}",
      "{ 'descr' : '<f2' ,\n 'fortran_order' : False , 'shape' : ( 7 , 3 , ) , }",
      "{'descr': '<f2', 'fortran_order': False, 'shape': (7L, 3L), }",
  };
  for (const std::string& dict : dicts) {
    for (const int major : {1, 2, 3}) {
      SCOPED_TRACE(dict + " v" + std::to_string(major));
      const std::string bytes = npy_prefix(dict, major);
      const NpyHeader h = parse(bytes);
      EXPECT_EQ(h.dtype, NpyDType::f2);
      EXPECT_EQ(h.shape, (std::vector<std::int64_t>{7, 3}));
      EXPECT_EQ(h.data_bytes, 42u);
      EXPECT_EQ(h.data_offset, bytes.size());
    }
  }
}

TEST(Npy, RejectsMalformedFiles) {
  const std::string good = npy_prefix(dict_with("<f4", "False", "(2, 3)"));  // 128 bytes
  const std::uint64_t big = 1u << 20;
  std::string bad_magic = good;
  bad_magic[5] = 'X';
  std::string version4 = good;
  version4[6] = 4;
  std::string long_header = good;
  long_header[8] = '\xff';
  long_header[9] = '\x7f';
  std::string v2_huge = npy_prefix(dict_with("<f4", "False", "(2, 3)"), 2);
  v2_huge[8] = 0;
  v2_huge[9] = 0;
  v2_huge[10] = 2;  // a 131072-byte header
  v2_huge[11] = 0;
  std::string with_nul = good;
  with_nul[20] = '\0';
  const std::string scalar = npy_prefix(dict_with("<f8", "False", "()"));

  struct Case {
    const char* name;
    std::string bytes;
    std::uint64_t file_size;
    std::string word;
    std::size_t prefix_len = std::string::npos;
  };
  const std::vector<Case> cases = {
      {"bad magic", bad_magic, big, "bad magic"},
      {"garbage", std::string(200, 'x'), 200, "bad magic"},
      {"unsupported version", version4, big, "version 4.0"},
      {"header past end of file", long_header, 4000, "past the end of the file"},
      {"header over limit", v2_huge, 1u << 20, "over the limit"},
      {"truncated header", good, big, "truncated header", 100},
      {"prefix of 7 bytes", good, big, "truncated header", 7},
      {"missing key", npy_prefix("{'descr': '<f4', 'fortran_order': False}"), big, "no 'shape' key"},
      {"duplicate key", npy_prefix("{'descr': '<f4', 'descr': '<f4'}"), big, "duplicate key 'descr'"},
      {"unknown key", npy_prefix("{'descr': '<f4', 'order': 'C'}"), big, "unexpected key 'order'"},
      {"int dtype", npy_prefix(dict_with("<i4", "False", "(2, 3)")), big, "unsupported dtype '<i4'"},
      {"big-endian", npy_prefix(dict_with(">f4", "False", "(2, 3)")), big, "big-endian dtype '>f4'"},
      {"no byte order", npy_prefix(dict_with("|f4", "False", "(2, 3)")), big, "unsupported dtype '|f4'"},
      {"structured", npy_prefix("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }"), big,
       "structured dtypes"},
      {"fortran order", npy_prefix(dict_with("<f4", "True", "(2, 3)")), big, "Fortran-order"},
      {"fortran lowercase", npy_prefix(dict_with("<f4", "true", "(2, 3)")), big, "True or False"},
      {"negative dim", npy_prefix(dict_with("<f4", "False", "(2, -3)")), big, "negative dimension -3"},
      {"non-numeric dim", npy_prefix(dict_with("<f4", "False", "(2, a)")), big, "integer dimension"},
      {"float dim", npy_prefix(dict_with("<f4", "False", "(2.5, 3)")), big, "expected ','"},
      {"not a tuple", npy_prefix(dict_with("<f4", "False", "[2, 3]")), big, "expected a tuple"},
      {"(5) is not a tuple", npy_prefix(dict_with("<f4", "False", "(5)")), big, "(n,)"},
      {"dim over int64", npy_prefix(dict_with("<f4", "False", "(99999999999999999999,)")), big, "too large"},
      {"product overflow", npy_prefix(dict_with("<f4", "False", "(4294967296, 4294967296, 16)")), big,
       "too large"},
      {"bytes overflow", npy_prefix(dict_with("<f8", "False", "(4611686018427387904,)")), big, "too large"},
      {"unterminated string", npy_prefix("{'descr': '<f4"), big, "unterminated string"},
      {"escape", npy_prefix("{'des\\cr': '<f4'}"), big, "escape"},
      {"no brace", npy_prefix("'descr': '<f4'"), big, "expected '{'"},
      {"trailing text", npy_prefix(dict_with("<f4", "False", "(2, 3)") + " x"), big, "after '}'"},
      {"unclosed dict", npy_prefix("{'descr': '<f4'"), big, "expected '}'"},
      {"nul in header", with_nul, big, "malformed header"},
      {"data truncated", good, 148,
       "truncated: header says 2x3 float32 (24 bytes of data from offset 128) but the file has 148 bytes"},
      {"scalar truncated", scalar, scalar.size() + 7, "header says scalar float64"},
      {"empty file", "", 0, "empty file"},
      {"5-byte npy start", std::string("\x93NUMP", 5), 5, "truncated"},
      {"5-byte garbage", "hello", 5, "bad magic"},
      {"9-byte file", good.substr(0, 9), 9, "truncated"},
      {"11-byte v2 file", v2_huge.substr(0, 11), 11, "too few for a version 2"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    expect_io_error(c.bytes, c.file_size, c.word, c.prefix_len);
  }
}

// Mutated and truncated headers must parse or throw Error(io): never crash, hang or read past
// the prefix (run under ASan/valgrind to check the latter).
TEST(Npy, MutationsFailCleanly) {
  const std::string base = make_npy_header(NpyDType::f4, {1001, 4, 64});
  const char alphabet[] = "{}()[]',:\" -0123456789LTrueFalsdcpfh<>|\n\t\x93\x01\x00\xff";
  std::mt19937 rng(12345);
  int parsed = 0;
  for (int iter = 0; iter < 20000; ++iter) {
    std::string bytes = base;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % bytes.size();
      const char c = alphabet[rng() % (sizeof(alphabet) - 1)];
      switch (rng() % 3) {
        case 0: bytes[at] = c; break;
        case 1: bytes.insert(bytes.begin() + static_cast<std::ptrdiff_t>(at), c); break;
        default: bytes.erase(at, 1 + rng() % 8); break;
      }
      if (bytes.empty()) bytes = "\x93";
    }
    // An exact-size heap copy lets ASan flag any read past the prefix.
    const std::size_t len = rng() % 4 == 0 ? rng() % (bytes.size() + 1) : bytes.size();
    const std::vector<char> prefix(bytes.begin(), bytes.begin() + static_cast<std::ptrdiff_t>(len));
    const std::uint64_t file_size = rng() % 2 ? bytes.size() + (rng() % (1u << 22)) : rng() % 300;
    try {
      parse_npy_header(prefix.data(), prefix.size(), file_size, kPath);
      ++parsed;
    } catch (const Error& e) {
      ASSERT_EQ(e.code(), ErrorCode::io) << e.what();
      ASSERT_EQ(std::string(e.what()).rfind(kPath + ": ", 0), 0u) << e.what();
    }
  }
  EXPECT_GT(parsed, 0);
}

}  // namespace
