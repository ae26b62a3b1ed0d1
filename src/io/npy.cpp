#include "io/npy.hpp"

#include <algorithm>
#include <cstring>
#include <string_view>

#include "ringattn/error.hpp"

namespace ringattn::io {

namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr std::size_t kMagicLen = 6;
constexpr std::size_t kAlign = 64;  // numpy aligns the data to 64 bytes since 1.14

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::io, path + ": " + what);
}

// Untrusted header bytes shown in a message: printable ASCII only, bounded in length.
std::string excerpt(std::string_view s, std::size_t max_len = 80) {
  std::string out;
  for (std::size_t i = 0; i < s.size() && i < max_len; ++i) {
    const auto c = static_cast<unsigned char>(s[i]);
    out += (c >= 0x20 && c < 0x7f) ? static_cast<char>(c) : '?';
  }
  if (s.size() > max_len) out += "...";
  return out;
}

const char* descr_of(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::f2: return "<f2";
    case NpyDType::f4: return "<f4";
    case NpyDType::f8: return "<f8";
  }
  throw Error(ErrorCode::internal, "invalid NpyDType");
}

// Recursive-descent parser for the header's dict literal. Every access is checked against the
// text's end, and every loop consumes input, so any byte string terminates with a result or
// an Error.
class DictParser {
 public:
  DictParser(std::string_view text, const std::string& path) : text_(text), path_(path) {}

  void parse(NpyHeader& out) {
    std::string_view descr;
    bool fortran = false;
    unsigned seen = 0;  // bit per key, in kKeys order
    static constexpr std::string_view kKeys[] = {"descr", "fortran_order", "shape"};
    expect('{');
    while (!eat('}')) {
      const std::string_view key = string_literal("a quoted key");
      const auto it = std::find(std::begin(kKeys), std::end(kKeys), key);
      if (it == std::end(kKeys)) fail(path_, "unexpected key '" + excerpt(key) + "' in the header");
      const unsigned bit = 1u << (it - std::begin(kKeys));
      if (seen & bit) fail(path_, "duplicate key '" + std::string(key) + "' in the header");
      seen |= bit;
      expect(':');
      if (bit == 1) descr = string_literal("a string for 'descr' (structured dtypes are not supported)");
      if (bit == 2) fortran = boolean();
      if (bit == 4) out.shape = tuple();
      if (!eat(',')) {
        expect('}');
        break;
      }
    }
    skip_ws();
    if (pos_ != text_.size()) syntax("unexpected text after '}'");
    for (std::size_t i = 0; i < std::size(kKeys); ++i) {
      if (!(seen & (1u << i))) fail(path_, "header has no '" + std::string(kKeys[i]) + "' key");
    }
    out.dtype = dtype_of(descr);
    if (fortran) fail(path_, "Fortran-order arrays are not supported; save with np.ascontiguousarray");
  }

 private:
  void skip_ws() {
    auto space = [](char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; };
    while (pos_ < text_.size() && space(text_[pos_])) ++pos_;
  }
  bool eat(char c) {
    skip_ws();
    if (pos_ < text_.size() && text_[pos_] == c) return ++pos_, true;
    return false;
  }
  void expect(char c) {
    if (!eat(c)) syntax(std::string("expected '") + c + "'");
  }

  [[noreturn]] void syntax(const std::string& what) const {
    const std::size_t from = pos_ > 30 ? pos_ - 30 : 0;
    std::string_view near = text_.substr(from, 60);
    while (!near.empty() && (near.back() == ' ' || near.back() == '\n')) near.remove_suffix(1);
    fail(path_, "malformed header: " + what + " at byte " + std::to_string(pos_) + " of the dict, near \"" +
                    excerpt(near) + "\"");
  }

  std::string_view string_literal(const char* what) {
    skip_ws();
    if (pos_ >= text_.size() || (text_[pos_] != '\'' && text_[pos_] != '"')) {
      syntax(std::string("expected ") + what);
    }
    const char quote = text_[pos_++];
    const std::size_t start = pos_;
    while (pos_ < text_.size() && text_[pos_] != quote) {
      if (text_[pos_] == '\\') syntax("escape sequences in strings are not supported");
      ++pos_;
    }
    if (pos_ >= text_.size()) syntax("unterminated string");
    return text_.substr(start, pos_++ - start);
  }

  bool boolean() {
    skip_ws();
    for (const bool value : {true, false}) {
      const std::string_view word = value ? "True" : "False";
      if (text_.substr(pos_, word.size()) == word) return pos_ += word.size(), value;
    }
    syntax("expected True or False for 'fortran_order'");
  }

  std::int64_t integer() {
    skip_ws();
    const bool negative = pos_ < text_.size() && text_[pos_] == '-';
    if (negative) ++pos_;
    if (pos_ >= text_.size() || text_[pos_] < '0' || text_[pos_] > '9') {
      syntax("expected a non-negative integer dimension in 'shape'");
    }
    std::int64_t value = 0;
    while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') {
      const int digit = text_[pos_] - '0';
      if (__builtin_mul_overflow(value, 10, &value) || __builtin_add_overflow(value, digit, &value)) {
        syntax("dimension too large in 'shape'");
      }
      ++pos_;
    }
    if (negative) fail(path_, "negative dimension -" + std::to_string(value) + " in 'shape'");
    if (pos_ < text_.size() && text_[pos_] == 'L') ++pos_;  // Python 2 longs, as in old numpy files
    return value;
  }

  std::vector<std::int64_t> tuple() {
    skip_ws();
    if (pos_ >= text_.size() || text_[pos_] != '(') syntax("expected a tuple for 'shape'");
    ++pos_;
    std::vector<std::int64_t> dims;
    while (!eat(')')) {
      dims.push_back(integer());
      if (eat(',')) continue;
      if (dims.size() == 1) syntax("expected ',' ('shape' of one dimension is written (n,))");
      expect(')');
      break;
    }
    return dims;
  }

  NpyDType dtype_of(std::string_view descr) const {
    const std::string shown = "'" + excerpt(descr) + "'";
    if (descr.size() == 3 && descr[1] == 'f' && (descr[2] == '2' || descr[2] == '4' || descr[2] == '8')) {
      if (descr[0] == '>') {
        fail(path_,
             "big-endian dtype " + shown + " is not supported; save with arr.astype('<f" + descr[2] + "')");
      }
      if (descr[0] == '<') {
        return descr[2] == '2' ? NpyDType::f2 : descr[2] == '4' ? NpyDType::f4 : NpyDType::f8;
      }
    }
    fail(path_, "unsupported dtype " + shown + "; only little-endian floats <f2, <f4, <f8 are supported");
  }

  std::string_view text_;
  const std::string& path_;
  std::size_t pos_ = 0;
};

std::uint64_t read_le(const unsigned char* p, std::size_t n) {
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | p[i];
  return v;
}

std::string describe(const NpyHeader& h) {
  std::string dims;
  for (const std::int64_t d : h.shape) dims += (dims.empty() ? "" : "x") + std::to_string(d);
  return (h.shape.empty() ? std::string("scalar") : dims) + " " + npy_dtype_name(h.dtype);
}

}  // namespace

std::size_t npy_dtype_size(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::f2: return 2;
    case NpyDType::f4: return 4;
    case NpyDType::f8: return 8;
  }
  throw Error(ErrorCode::internal, "invalid NpyDType");
}

const char* npy_dtype_name(NpyDType dtype) {
  switch (dtype) {
    case NpyDType::f2: return "float16";
    case NpyDType::f4: return "float32";
    case NpyDType::f8: return "float64";
  }
  throw Error(ErrorCode::internal, "invalid NpyDType");
}

NpyHeader parse_npy_header(const void* prefix, std::size_t prefix_len, std::uint64_t file_size,
                           const std::string& path) {
  const auto* p = static_cast<const unsigned char*>(prefix);
  const std::size_t avail = static_cast<std::size_t>(std::min<std::uint64_t>(prefix_len, file_size));
  if (file_size == 0) fail(path, "empty file (0 bytes), not a .npy file");
  if (avail > 0 && std::memcmp(p, kMagic, std::min(avail, kMagicLen)) != 0) {
    fail(path, "not a .npy file (bad magic: the file does not start with \\x93NUMPY)");
  }
  if (file_size < kMagicLen + 4) {
    fail(path, "truncated: the file has " + std::to_string(file_size) + " bytes, too few for a .npy header");
  }
  if (avail < kMagicLen + 2) {
    fail(path, "truncated header: only " + std::to_string(avail) + " bytes were read");
  }

  const unsigned major = p[kMagicLen];
  const unsigned minor = p[kMagicLen + 1];
  if (major < 1 || major > 3) {
    fail(path, "unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                   " (supported: 1.x, 2.x, 3.x)");
  }
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  const std::size_t prefix_size = kMagicLen + 2 + len_bytes;
  if (file_size < prefix_size) {
    fail(path, "truncated: the file has " + std::to_string(file_size) + " bytes, too few for a version " +
                   std::to_string(major) + " .npy header");
  }
  if (avail < prefix_size) fail(path, "truncated header: only " + std::to_string(avail) + " bytes were read");

  const std::uint64_t header_len = read_le(p + kMagicLen + 2, len_bytes);
  NpyHeader h;
  h.data_offset = prefix_size + header_len;
  if (h.data_offset > file_size) {
    fail(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" +
                   std::to_string(file_size) + " bytes)");
  }
  if (h.data_offset > kNpyMaxHeaderBytes) {
    fail(path, "header of " + std::to_string(h.data_offset) + " bytes is over the limit of " +
                   std::to_string(kNpyMaxHeaderBytes));
  }
  if (h.data_offset > avail) {
    fail(path, "truncated header: it needs " + std::to_string(h.data_offset) + " bytes but only " +
                   std::to_string(avail) + " were read");
  }
  DictParser(std::string_view(reinterpret_cast<const char*>(p) + prefix_size, header_len), path).parse(h);

  // A zero dimension makes the product 0 even when the other dimensions alone would overflow.
  std::uint64_t elements = 1;
  bool overflow = false;
  for (const std::int64_t d : h.shape) {
    overflow |= __builtin_mul_overflow(elements, static_cast<std::uint64_t>(d), &elements);
  }
  if (std::find(h.shape.begin(), h.shape.end(), 0) != h.shape.end()) elements = 0, overflow = false;
  std::uint64_t end = 0;
  if (overflow || __builtin_mul_overflow(elements, npy_dtype_size(h.dtype), &h.data_bytes) ||
      __builtin_add_overflow(h.data_offset, h.data_bytes, &end)) {
    fail(path, "shape " + describe(h) + " is too large (its byte size overflows 64 bits)");
  }
  if (file_size < end) {
    fail(path, "truncated: header says " + describe(h) + " (" + std::to_string(h.data_bytes) +
                   " bytes of data from offset " + std::to_string(h.data_offset) + ") but the file has " +
                   std::to_string(file_size) + " bytes");
  }
  return h;
}

std::string make_npy_header(NpyDType dtype, const std::vector<std::int64_t>& shape) {
  std::string dict = std::string("{'descr': '") + descr_of(dtype) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] < 0) {
      throw Error(ErrorCode::invalid_argument,
                  "make_npy_header: negative dimension " + std::to_string(shape[i]));
    }
    dict += (i > 0 ? ", " : "") + std::to_string(shape[i]);
  }
  dict += shape.size() == 1 ? ",), }" : "), }";

  // Version 1.0 stores the header length in 16 bits; fall back to 2.0 only when it cannot.
  auto padded = [&](std::size_t prefix_size) {
    return (prefix_size + dict.size() + 1 + kAlign - 1) / kAlign * kAlign;
  };
  std::size_t prefix_size = kMagicLen + 4;
  if (padded(prefix_size) - prefix_size > 0xffff) prefix_size = kMagicLen + 6;
  const std::size_t total = padded(prefix_size);
  const std::uint64_t header_len = total - prefix_size;

  std::string out(kMagic, kMagicLen);
  out += static_cast<char>(prefix_size == kMagicLen + 4 ? 1 : 2);
  out += '\0';
  for (std::size_t i = 0; i < prefix_size - kMagicLen - 2; ++i) {
    out += static_cast<char>((header_len >> (8 * i)) & 0xff);
  }
  out += dict;
  out.append(total - out.size() - 1, ' ');
  out += '\n';
  return out;
}

}  // namespace ringattn::io
