// engine/linear_attention.hpp: distributed linear attention on CPUs (no ring).
//
// Every rank holds a contiguous run of tokens. It folds its keys and values into one state per
// (batch, query head): S = sum_j w_j phi(k_j) v_j^T (D x D) and z = sum_j w_j phi(k_j), with
// the weights decayed to its last token. Then, in fp64:
//   causal:     one MPI_Exscan with the associative, non-commutative combine
//               (S_a, n_a) . (S_b, n_b) = (decay^(n_b) S_a + S_b, n_a + n_b)
//               hands each rank the state of every token before its own;
//   non-causal: one MPI_Allreduce (sum) hands every rank the state of all tokens.
// Each rank then walks its tokens once (S = decay S + phi(k_i) v_i^T, o_i = phi(q_i)^T S,
// normalised by phi(q_i) . z for elu1). O(S D^2 / P) work per rank and H D^2 doubles of
// communication, independent of S. The definitions are in ringattn/options.hpp (FeatureMap).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <vector>

#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct LinearAttentionProblem {
  std::int64_t batch = 1, heads = 1, kv_heads = 1, head_dim = 1;
  bool causal = false;
  FeatureMap feature_map = FeatureMap::elu1;
  std::vector<double> decay;  // one per query head (1 = none)
};

// Added to phi(q) . z before dividing (elu1), as in Katharopoulos et al.
inline constexpr double kLinearAttentionEps = 1e-6;

double linear_feature(FeatureMap map, double x);

// Collective over comm, whose ranks hold consecutive token runs in rank order. q, k, v, out
// as in forward() on the CPU; out is written in its dtype.
void linear_attention_cpu(MPI_Comm comm, const LinearAttentionProblem& problem, const TensorView& q,
                          const TensorView& k, const TensorView& v, const TensorView& out, int threads);

// The gradients of sum(O * dout) (collective, same layout rules): dq like q, dk and dv like k
// and v, written in their dtypes. Recomputes the forward states (one scan as forward()), then
// runs the dual states through one scan in reverse rank order (causal) or an all-reduce.
void linear_attention_backward_cpu(MPI_Comm comm, const LinearAttentionProblem& problem, const TensorView& q,
                                   const TensorView& k, const TensorView& v, const TensorView& dout,
                                   const TensorView& dq, const TensorView& dk, const TensorView& dv, int threads);

}  // namespace ringattn::detail
