// ringattn/layout.hpp: how a global sequence of S tokens is sharded over P ranks.
//
//   contiguous  rank r holds one run of consecutive tokens, in rank order.
//   zigzag      the sequence is cut into 2P chunks; rank r holds chunks r and 2P-1-r, so
//               every rank has an early and a late chunk and causal work is balanced.
//   striped     token t lives on rank t mod P.
//
// Uneven lengths: when n tokens are split into k parts (k = P for contiguous, 2P chunks for
// zigzag), part i gets floor(n/k) + 1 tokens if i < n mod k, else floor(n/k). Any S >= P
// gives every rank at least one token. Striped needs no rule: rank r holds the t = r mod P.
//
// Local order is always increasing global position. positions(r) gives each local row's
// global position, which is what an embedder needs for RoPE or its own masks.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ringattn {

enum class LayoutKind : std::uint8_t { contiguous, zigzag, striped };

const char* to_string(LayoutKind kind);
LayoutKind parse_layout(const std::string& name);

// A run of local rows whose global positions form an arithmetic progression:
// local row local_begin + i holds global position global_begin + i * stride, 0 <= i < length.
struct Segment {
  std::int64_t local_begin = 0;
  std::int64_t global_begin = 0;
  std::int64_t length = 0;
  std::int64_t stride = 1;
};

class Layout {
 public:
  // Throws Error(invalid_argument) unless 1 <= world and world <= seq_len.
  Layout(LayoutKind kind, std::int64_t seq_len, int world);

  LayoutKind kind() const { return kind_; }
  std::int64_t seq_len() const { return seq_len_; }
  int world() const { return world_; }

  std::int64_t local_length(int rank) const;
  std::int64_t max_local_length() const;
  // Non-empty segments of `rank`, in local order.
  std::vector<Segment> segments(int rank) const;
  // Global position of every local row of `rank`.
  std::vector<std::int64_t> positions(int rank) const;
  // The rank holding global position `pos`, and its local row there.
  int owner(std::int64_t pos) const;
  std::int64_t local_index(std::int64_t pos) const;

 private:
  LayoutKind kind_;
  std::int64_t seq_len_;
  int world_;
};

}  // namespace ringattn
