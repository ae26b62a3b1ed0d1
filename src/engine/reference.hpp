// engine/reference.hpp: the fp64 reference that every result is checked against.
//
// Plain two-pass softmax in double precision, one query row at a time, no blocking, no
// merging: deliberately nothing in common with the ring's kernels.
#pragma once

#include <cstdint>
#include <vector>

#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct ReferenceProblem {
  std::int64_t batch = 1;
  std::int64_t seq_len = 1;  // S: keys and values cover global positions 0 .. S-1
  std::int64_t heads = 1;
  std::int64_t kv_heads = 1;
  std::int64_t head_dim = 1;
  bool causal = false;
  double scale = 1.0;
  std::int64_t window = -1;  // sliding window: keys within window of pos (causal: before it); -1 none
  std::int64_t sinks = 0;    // with a window: the first `sinks` keys are always seen
};

// q: (B, n, H, D) values as stored, for the query rows at global `positions` (n of them);
// k, v: (B, S, H_kv, D) for the whole sequence in natural order.
// out: (B, n, H, D); lse: (B, H, n), natural log.
void reference_forward(const ReferenceProblem& problem, const std::vector<std::int64_t>& positions,
                       const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                       std::vector<double>& out, std::vector<double>& lse);

// Linear attention (see ringattn/options.hpp, FeatureMap) by its definition: every output as
// a weighted sum over the keys, O(S^2), no state. map: 0 elu1, 1 identity; decay: one per
// query head (1 = none); q (B, n, H, D) at `positions`, k, v (B, S, H_kv, D) -> out (B, n, H, D).
void reference_linear(const ReferenceProblem& problem, int map, const std::vector<double>& decay,
                      const std::vector<std::int64_t>& positions, const std::vector<float>& q,
                      const std::vector<float>& k, const std::vector<float>& v, std::vector<double>& out);

// Gradients of sum(O * dout) of linear attention (as reference_linear, whole sequence in
// natural order), in fp64 from the definition (O(S^2), no state): q, dout (B, S, H, D); k, v
// (B, S, H_kv, D) -> dq, dk, dv.
void reference_linear_backward(const ReferenceProblem& problem, int map, const std::vector<double>& decay,
                               const std::vector<float>& q, const std::vector<float>& k, const std::vector<float>& v,
                               const std::vector<float>& dout, std::vector<double>& dq, std::vector<double>& dk,
                               std::vector<double>& dv);

// Gradients of sum(O * dout) for the whole sequence in natural order, in fp64:
// q, dout: (B, S, H, D); k, v: (B, S, H_kv, D) -> dq (B, S, H, D), dk, dv (B, S, H_kv, D).
// Shared KV heads receive the sum over their query heads.
void reference_backward(const ReferenceProblem& problem, const std::vector<float>& q, const std::vector<float>& k,
                        const std::vector<float>& v, const std::vector<float>& dout, std::vector<double>& dq,
                        std::vector<double>& dk, std::vector<double>& dv);

}  // namespace ringattn::detail

namespace ringattn::detail {

// |result - reference| <= atol + rtol * |reference| element by element.
struct Tolerance {
  double atol;
  double rtol;
};

// For O in `dtype`: the storage rounding of O (half an ulp: 2^-24, 2^-11, 2^-8 relative) with
// a margin of 4x as rtol; as atol, fp32 accumulation error plus what rounding P to the
// storage precision costs where a GPU kernel feeds P to tensor cores in 16 bits: at most one
// unit roundoff of sum_j p_j |v_j| <= max|V|. max_abs_v = the largest |V| element.
Tolerance output_tolerance(DType dtype, double max_abs_v);
// Gradients, relative to the largest reference gradient: the storage rounding of the
// gradients and of O (which enters delta = rowsum(dO * O)) with a margin of 8 unit roundoffs;
// fp32 allows 1e-5 of accumulation noise.
double gradient_tolerance(DType dtype);

// LSE is always fp32: accumulation error only.
Tolerance lse_tolerance();

}  // namespace ringattn::detail
