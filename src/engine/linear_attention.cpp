#include "engine/linear_attention.hpp"

#include <algorithm>
#include <cmath>

#include "comm/mpi_util.hpp"
#include "core/dtype.hpp"

namespace ringattn::detail {

namespace {

// The scan record: a header {tokens, heads, head_dim, batch}, the per-head decays, then per
// (batch, head) the state S (D x D, row d of phi(k) times v) and z (D).
constexpr int kHeader = 4;

struct RecordShape {
  std::int64_t heads, dim, batch;
  std::size_t state_offset(std::int64_t bh) const {
    return static_cast<std::size_t>(kHeader + heads + bh * (dim * dim + dim));
  }
  std::size_t size() const { return state_offset(batch * heads); }
};

RecordShape shape_of(const double* record) {
  return {static_cast<std::int64_t>(record[1]), static_cast<std::int64_t>(record[2]),
          static_cast<std::int64_t>(record[3])};
}

// MPI user function: inout = in . inout, where `in` holds the earlier tokens.
void combine(void* in_v, void* inout_v, int* len, MPI_Datatype*) {
  for (int r = 0; r < *len; ++r) {
    const auto* in = static_cast<const double*>(in_v);
    auto* inout = static_cast<double*>(inout_v);
    const RecordShape shape = shape_of(inout);
    in += r * shape.size();
    inout += r * shape.size();
    const double later = inout[0];
    for (std::int64_t b = 0; b < shape.batch; ++b) {
      for (std::int64_t h = 0; h < shape.heads; ++h) {
        const double carry = std::pow(inout[kHeader + h], later);
        const std::size_t at = shape.state_offset(b * shape.heads + h);
        for (std::int64_t e = 0; e < shape.dim * shape.dim + shape.dim; ++e) {
          inout[at + static_cast<std::size_t>(e)] = carry * in[at + static_cast<std::size_t>(e)] + inout[at + static_cast<std::size_t>(e)];
        }
      }
    }
    inout[0] = in[0] + later;
  }
}

double load(const TensorView& t, std::int64_t b, std::int64_t s, std::int64_t h, std::int64_t d) {
  return load_f32(t.dtype, t.data, b * t.strides[0] + s * t.strides[1] + h * t.strides[2] + d);
}

}  // namespace

double linear_feature(FeatureMap map, double x) {
  if (map == FeatureMap::identity) return x;
  return x > 0.0 ? x + 1.0 : std::exp(x);  // elu(x) + 1
}

void linear_attention_cpu(MPI_Comm comm, const LinearAttentionProblem& p, const TensorView& q, const TensorView& k,
                          const TensorView& v, const TensorView& out, int threads) {
  const std::int64_t B = p.batch, H = p.heads, D = p.head_dim, n = q.shape[1];
  const std::int64_t group = H / p.kv_heads;
  const RecordShape shape{H, D, B};
  std::vector<double> local(shape.size(), 0.0), before(shape.size(), 0.0);
  local[0] = static_cast<double>(n);
  local[1] = static_cast<double>(H);
  local[2] = static_cast<double>(D);
  local[3] = static_cast<double>(B);
  for (std::int64_t h = 0; h < H; ++h) local[static_cast<std::size_t>(kHeader + h)] = p.decay[static_cast<std::size_t>(h)];
  before = local;

  // 1. This rank's own state, decayed to its last token.
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = p.decay[static_cast<std::size_t>(h)];
      double* S = &local[shape.state_offset(b * H + h)];
      double* z = S + D * D;
      std::vector<double> fk(static_cast<std::size_t>(D)), vi(static_cast<std::size_t>(D));
      for (std::int64_t i = 0; i < n; ++i) {
        for (std::int64_t d = 0; d < D; ++d) {
          fk[static_cast<std::size_t>(d)] = linear_feature(p.feature_map, load(k, b, i, h / group, d));
          vi[static_cast<std::size_t>(d)] = load(v, b, i, h / group, d);
        }
        if (g != 1.0) {
          for (std::int64_t e = 0; e < D * D + D; ++e) S[e] *= g;
        }
        for (std::int64_t d = 0; d < D; ++d) {
          const double f = fk[static_cast<std::size_t>(d)];
          z[d] += f;
          double* row = S + d * D;
#pragma omp simd
          for (std::int64_t e = 0; e < D; ++e) row[e] += f * vi[static_cast<std::size_t>(e)];
        }
      }
    }
  }

  // 2. The states of the tokens this rank's rows see besides its own.
  const std::size_t body = shape.size() - static_cast<std::size_t>(kHeader + H);
  std::vector<double> incoming(body, 0.0);
  if (p.causal) {
    MPI_Datatype record;
    RINGATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(shape.size()), MPI_DOUBLE, &record));
    RINGATTN_MPI_CHECK(MPI_Type_commit(&record));
    MPI_Op op;
    RINGATTN_MPI_CHECK(MPI_Op_create(&combine, /*commute=*/0, &op));
    const int status = MPI_Exscan(local.data(), before.data(), 1, record, op, comm);
    MPI_Op_free(&op);
    MPI_Type_free(&record);
    RINGATTN_MPI_CHECK(status);
    int rank = 0;
    RINGATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    if (rank > 0) std::copy(before.begin() + kHeader + H, before.end(), incoming.begin());  // rank 0: nothing before
  } else {
    RINGATTN_MPI_CHECK(MPI_Allreduce(local.data() + kHeader + H, incoming.data(), static_cast<int>(body), MPI_DOUBLE,
                                     MPI_SUM, comm));
  }

  // 3. The outputs: walk the tokens from the incoming state (causal), or read the total.
  const bool normalise = p.feature_map == FeatureMap::elu1;
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = p.decay[static_cast<std::size_t>(h)];
      const std::size_t at = static_cast<std::size_t>((b * H + h) * (D * D + D));
      std::vector<double> S(incoming.begin() + static_cast<std::ptrdiff_t>(at),
                            incoming.begin() + static_cast<std::ptrdiff_t>(at + static_cast<std::size_t>(D * D + D)));
      double* z = S.data() + D * D;
      std::vector<double> fk(static_cast<std::size_t>(D)), vi(static_cast<std::size_t>(D)), o(static_cast<std::size_t>(D));
      for (std::int64_t i = 0; i < n; ++i) {
        if (p.causal) {
          for (std::int64_t d = 0; d < D; ++d) {
            fk[static_cast<std::size_t>(d)] = linear_feature(p.feature_map, load(k, b, i, h / group, d));
            vi[static_cast<std::size_t>(d)] = load(v, b, i, h / group, d);
          }
          if (g != 1.0) {
            for (double& x : S) x *= g;
          }
          for (std::int64_t d = 0; d < D; ++d) {
            const double f = fk[static_cast<std::size_t>(d)];
            z[d] += f;
            double* row = S.data() + d * D;
#pragma omp simd
            for (std::int64_t e = 0; e < D; ++e) row[e] += f * vi[static_cast<std::size_t>(e)];
          }
        }
        double denom = 0.0;
        std::fill(o.begin(), o.end(), 0.0);
        for (std::int64_t d = 0; d < D; ++d) {
          const double f = linear_feature(p.feature_map, load(q, b, i, h, d));
          denom += f * z[d];
          const double* row = S.data() + d * D;
#pragma omp simd
          for (std::int64_t e = 0; e < D; ++e) o[static_cast<std::size_t>(e)] += f * row[e];
        }
        const double scale = normalise ? 1.0 / (denom + kLinearAttentionEps) : 1.0;
        for (std::int64_t e = 0; e < D; ++e) {
          store_f32(out.dtype, out.data, b * out.strides[0] + i * out.strides[1] + h * out.strides[2] + e,
                    static_cast<float>(o[static_cast<std::size_t>(e)] * scale));
        }
      }
    }
  }
}

}  // namespace ringattn::detail
