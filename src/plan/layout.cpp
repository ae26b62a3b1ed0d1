#include "ringattn/layout.hpp"

#include <algorithm>
#include <utility>

#include "ringattn/error.hpp"

namespace ringattn {

namespace {

// Part i of n items split into k parts: the first n mod k parts get one extra item.
struct Part {
  std::int64_t begin;
  std::int64_t length;
};

Part part(std::int64_t n, std::int64_t k, std::int64_t i) {
  const std::int64_t base = n / k;
  const std::int64_t rem = n % k;
  return {i * base + std::min(i, rem), base + (i < rem ? 1 : 0)};
}

std::int64_t part_of(std::int64_t n, std::int64_t k, std::int64_t pos) {
  const std::int64_t base = n / k;
  const std::int64_t rem = n % k;
  const std::int64_t long_span = rem * (base + 1);
  if (pos < long_span) return pos / (base + 1);
  return rem + (pos - long_span) / base;
}

}  // namespace

const char* to_string(LayoutKind kind) {
  switch (kind) {
    case LayoutKind::contiguous: return "contiguous";
    case LayoutKind::zigzag: return "zigzag";
    case LayoutKind::striped: return "striped";
  }
  return "?";
}

LayoutKind parse_layout(const std::string& name) {
  if (name == "contiguous") return LayoutKind::contiguous;
  if (name == "zigzag") return LayoutKind::zigzag;
  if (name == "striped") return LayoutKind::striped;
  throw Error(ErrorCode::invalid_argument,
              "unknown layout '" + name + "' (expected contiguous, zigzag or striped)");
}

Layout::Layout(LayoutKind kind, std::int64_t seq_len, int world) : kind_(kind), seq_len_(seq_len), world_(world) {
  if (world < 1) throw Error(ErrorCode::invalid_argument, "layout: world size must be >= 1");
  if (seq_len < world) {
    throw Error(ErrorCode::invalid_argument, "sequence length " + std::to_string(seq_len) +
                                                 " is shorter than the " + std::to_string(world) +
                                                 " ranks: every rank needs at least one token");
  }
}

std::vector<Segment> Layout::segments(int rank) const {
  if (rank < 0 || rank >= world_) throw Error(ErrorCode::invalid_argument, "layout: rank out of range");
  const std::int64_t P = world_;
  std::vector<Segment> out;
  switch (kind_) {
    case LayoutKind::contiguous: {
      const Part p = part(seq_len_, P, rank);
      out.push_back({0, p.begin, p.length, 1});
      break;
    }
    case LayoutKind::zigzag: {
      const Part early = part(seq_len_, 2 * P, rank);
      const Part late = part(seq_len_, 2 * P, 2 * P - 1 - rank);
      if (early.length > 0) out.push_back({0, early.begin, early.length, 1});
      if (late.length > 0) {
        // The middle rank's two chunks (and P = 1's) are adjacent: one segment, one task.
        if (!out.empty() && early.begin + early.length == late.begin) {
          out.back().length += late.length;
        } else {
          out.push_back({early.length, late.begin, late.length, 1});
        }
      }
      break;
    }
    case LayoutKind::striped:
      out.push_back({0, rank, (seq_len_ - rank + P - 1) / P, P});
      break;
  }
  return out;
}

std::int64_t Layout::local_length(int rank) const {
  std::int64_t n = 0;
  for (const Segment& s : segments(rank)) n += s.length;
  return n;
}

std::int64_t Layout::max_local_length() const {
  std::int64_t m = 0;
  for (int r = 0; r < world_; ++r) m = std::max(m, local_length(r));
  return m;
}

std::vector<std::int64_t> Layout::positions(int rank) const {
  std::vector<std::int64_t> pos;
  pos.reserve(static_cast<std::size_t>(local_length(rank)));
  for (const Segment& s : segments(rank)) {
    for (std::int64_t i = 0; i < s.length; ++i) pos.push_back(s.global_begin + i * s.stride);
  }
  return pos;
}

int Layout::owner(std::int64_t pos) const {
  if (pos < 0 || pos >= seq_len_) throw Error(ErrorCode::invalid_argument, "layout: position out of range");
  const std::int64_t P = world_;
  switch (kind_) {
    case LayoutKind::contiguous: return static_cast<int>(part_of(seq_len_, P, pos));
    case LayoutKind::zigzag: {
      const std::int64_t chunk = part_of(seq_len_, 2 * P, pos);
      return static_cast<int>(chunk < P ? chunk : 2 * P - 1 - chunk);
    }
    case LayoutKind::striped: return static_cast<int>(pos % P);
  }
  return 0;
}

std::int64_t Layout::local_index(std::int64_t pos) const {
  const int r = owner(pos);
  for (const Segment& s : segments(r)) {
    const std::int64_t off = pos - s.global_begin;
    if (off >= 0 && off % s.stride == 0 && off / s.stride < s.length) return s.local_begin + off / s.stride;
  }
  throw Error(ErrorCode::internal, "layout: position not found on its owner");
}

}  // namespace ringattn
