#include "engine/linear_attention.hpp"

#include <algorithm>
#include <cmath>

#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "core/dtype.hpp"

namespace ringattn::detail {

namespace {

// The scan record: a header {tokens, heads, head_dim, batch}, the per-head decays, then per
// (batch, head) the state S (D x D, row d of phi(k) times v) and z (D).
constexpr int kHeader = 4;
// The reverse scan's exchanges with the mirror rank (the ring's hops use MpiTransport::kTag).
constexpr int kMirrorTag = 0x524c;

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
    bounded_exscan(comm, local.data(), before.data(), 1, record, op, "the scan of linear attention's states");
    MPI_Op_free(&op);
    MPI_Type_free(&record);
    int rank = 0;
    RINGATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
    if (rank > 0) std::copy(before.begin() + kHeader + H, before.end(), incoming.begin());  // rank 0: nothing before
  } else {
    bounded_allreduce(comm, local.data() + kHeader + H, incoming.data(), static_cast<int>(body), MPI_DOUBLE, MPI_SUM,
                      "the sum of linear attention's states");
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

namespace ringattn::detail {

namespace {

// The exclusive scan of `local` (records as above) in rank order (reverse = false: the state of
// the ranks before this one) or in reverse rank order (the ranks after it); rank 0 (or the
// last rank) gets zeros.
void state_exscan(MPI_Comm comm, const std::vector<double>& local, std::vector<double>& before, bool reverse) {
  const RecordShape shape = shape_of(local.data());
  int rank = 0, world = 1;
  RINGATTN_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  RINGATTN_MPI_CHECK(MPI_Comm_size(comm, &world));
  // In reverse, rank r scans the record of its mirror rank P-1-r, so that the scan in rank
  // order folds x[P-1], x[P-2], ..., as the reverse order needs; each result then goes back to
  // the mirror whose scan it is. Two bounded exchanges instead of a reordered communicator
  // (MPI_Comm_split, which cannot be bounded: a rank that timed out in an earlier collective
  // would leave a late peer blocked in it).
  const int mirror = world - 1 - rank;
  const std::size_t bytes = local.size() * sizeof(double);
  const std::string what = "the reverse scan of linear attention's states";
  std::vector<double> mine = local;
  if (reverse && mirror != rank) bounded_sendrecv(comm, local.data(), bytes, mine.data(), mirror, kMirrorTag, what);
  MPI_Datatype record;
  RINGATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(shape.size()), MPI_DOUBLE, &record));
  RINGATTN_MPI_CHECK(MPI_Type_commit(&record));
  MPI_Op op;
  RINGATTN_MPI_CHECK(MPI_Op_create(&combine, /*commute=*/0, &op));
  before = mine;
  bounded_exscan(comm, mine.data(), before.data(), 1, record, op, "the scan of linear attention's states");
  MPI_Op_free(&op);
  MPI_Type_free(&record);
  if (reverse && mirror != rank) {
    std::vector<double> scanned = before;
    bounded_sendrecv(comm, scanned.data(), bytes, before.data(), mirror, kMirrorTag, what);
  }
  const bool first = reverse ? rank == world - 1 : rank == 0;
  if (first) std::fill(before.begin() + kHeader + shape.heads, before.end(), 0.0);
}

// The states this rank's tokens see from the others: causal, the exclusive scan above (in
// reverse rank order for the dual states); otherwise the sum over all ranks.
void states_from_others(MPI_Comm comm, const std::vector<double>& local, std::vector<double>& out, bool causal,
                        bool reverse) {
  if (causal) {
    state_exscan(comm, local, out, reverse);
    return;
  }
  const RecordShape shape = shape_of(local.data());
  const std::size_t body = static_cast<std::size_t>(kHeader + shape.heads);
  out.assign(shape.size(), 0.0);
  bounded_allreduce(comm, local.data() + body, out.data() + body, static_cast<int>(shape.size() - body), MPI_DOUBLE,
                    MPI_SUM, "the sum of linear attention's states");
}

double feature_slope(FeatureMap map, double x) { return map == FeatureMap::identity ? 1.0 : (x > 0.0 ? 1.0 : std::exp(x)); }

}  // namespace

void linear_attention_backward_cpu(MPI_Comm comm, const LinearAttentionProblem& p, const TensorView& q,
                                   const TensorView& k, const TensorView& v, const TensorView& dout,
                                   const TensorView& dq, const TensorView& dk, const TensorView& dv, int threads) {
  // O_i = phi(q_i)^T S_i / den_i. With du_i = dO_i / den_i and dden_i = -(dO_i . O_i) / den_i
  // (elu1; 0 unnormalised): dphi(q_i) = S_i du_i + dden_i z_i. The keys and values see the
  // dual states T_j = sum_{i >= j} w_ij phi(q_i) du_i^T and t_j = sum_{i >= j} w_ij dden_i phi(q_i):
  // dphi(k_j) = T_j v_j + t_j, dv_j = T_j^T phi(k_j). The forward states come from the same
  // scan as the forward pass; the dual states from one in reverse rank order.
  const std::int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, D = p.head_dim, n = q.shape[1];
  const std::int64_t group = H / Hk;
  const RecordShape shape{H, D, B};
  const std::size_t state = static_cast<std::size_t>(D * D + D);
  auto header = [&](std::vector<double>& r) {
    r.assign(shape.size(), 0.0);
    r[0] = static_cast<double>(n);
    r[1] = static_cast<double>(H);
    r[2] = static_cast<double>(D);
    r[3] = static_cast<double>(B);
    for (std::int64_t h = 0; h < H; ++h) r[static_cast<std::size_t>(kHeader + h)] = p.decay[static_cast<std::size_t>(h)];
  };
  const bool normalise = p.feature_map == FeatureMap::elu1;
  // Per (b, h, token): du (D) then dden; per (b, h, token, d): dphi(k) and dv before the group sum.
  std::vector<double> grad_u(static_cast<std::size_t>(B * H * n * (D + 1)));
  std::vector<double> dfk(static_cast<std::size_t>(B * H * n * D)), dvh(dfk.size());

  // 1. Forward states, as in the forward pass.
  std::vector<double> local, incoming;
  header(local);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = p.decay[static_cast<std::size_t>(h)];
      double* S = &local[shape.state_offset(b * H + h)];
      double* z = S + D * D;
      for (std::int64_t i = 0; i < n; ++i) {
        if (g != 1.0) {
          for (std::size_t e = 0; e < state; ++e) S[e] *= g;
        }
        for (std::int64_t d = 0; d < D; ++d) {
          const double f = linear_feature(p.feature_map, load(k, b, i, h / group, d));
          z[d] += f;
          for (std::int64_t e = 0; e < D; ++e) S[d * D + e] += f * load(v, b, i, h / group, e);
        }
      }
    }
  }
  states_from_others(comm, local, incoming, p.causal, false);

  // 2. Walk the tokens forward: dQ, and du, dden for the dual states; the local dual state.
  std::vector<double> dual;
  header(dual);
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = p.decay[static_cast<std::size_t>(h)];
      const std::size_t at = shape.state_offset(b * H + h);
      std::vector<double> S(incoming.begin() + static_cast<std::ptrdiff_t>(at),
                            incoming.begin() + static_cast<std::ptrdiff_t>(at + state));
      double* z = S.data() + D * D;
      std::vector<double> e(static_cast<std::size_t>(D)), o(static_cast<std::size_t>(D));
      for (std::int64_t i = 0; i < n; ++i) {
        if (p.causal) {
          if (g != 1.0) {
            for (double& x : S) x *= g;
          }
          for (std::int64_t d = 0; d < D; ++d) {
            const double f = linear_feature(p.feature_map, load(k, b, i, h / group, d));
            z[d] += f;
            for (std::int64_t c = 0; c < D; ++c) S[static_cast<std::size_t>(d * D + c)] += f * load(v, b, i, h / group, c);
          }
        }
        double den = 0.0;
        std::fill(o.begin(), o.end(), 0.0);
        for (std::int64_t d = 0; d < D; ++d) {
          e[static_cast<std::size_t>(d)] = linear_feature(p.feature_map, load(q, b, i, h, d));
          den += e[static_cast<std::size_t>(d)] * z[d];
          for (std::int64_t c = 0; c < D; ++c) o[static_cast<std::size_t>(c)] += e[static_cast<std::size_t>(d)] * S[static_cast<std::size_t>(d * D + c)];
        }
        den = normalise ? den + kLinearAttentionEps : 1.0;
        double* gu = &grad_u[static_cast<std::size_t>(((b * H + h) * n + i) * (D + 1))];
        double dden = 0.0;
        for (std::int64_t c = 0; c < D; ++c) {
          const double d_o = load(dout, b, i, h, c);
          gu[c] = d_o / den;
          dden -= d_o * o[static_cast<std::size_t>(c)] / (den * den);
        }
        gu[D] = normalise ? dden : 0.0;
        for (std::int64_t d = 0; d < D; ++d) {
          double de = gu[D] * z[d];
          for (std::int64_t c = 0; c < D; ++c) de += S[static_cast<std::size_t>(d * D + c)] * gu[c];
          store_f32(dq.dtype, dq.data, b * dq.strides[0] + i * dq.strides[1] + h * dq.strides[2] + d,
                    static_cast<float>(de * feature_slope(p.feature_map, load(q, b, i, h, d))));
        }
      }
      // The local dual state, decayed to this rank's first token: sum_i g^i phi(q_i) du_i^T.
      double* T = &dual[at];
      double* t = T + D * D;
      for (std::int64_t i = n - 1; i >= 0; --i) {
        const double* gu = &grad_u[static_cast<std::size_t>(((b * H + h) * n + i) * (D + 1))];
        if (p.causal && g != 1.0) {
          for (std::size_t x = 0; x < state; ++x) T[x] *= g;
        }
        for (std::int64_t d = 0; d < D; ++d) {
          const double ed = linear_feature(p.feature_map, load(q, b, i, h, d));
          t[d] += gu[D] * ed;
          for (std::int64_t c = 0; c < D; ++c) T[d * D + c] += ed * gu[c];
        }
      }
    }
  }

  // 3. The dual states of the tokens after this rank (causal) or of all tokens.
  std::vector<double> after;
  states_from_others(comm, dual, after, p.causal, true);

  // 4. Walk the tokens backward: dphi(k_j), dv_j per head.
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      const double g = p.decay[static_cast<std::size_t>(h)];
      const std::size_t at = shape.state_offset(b * H + h);
      std::vector<double> T(after.begin() + static_cast<std::ptrdiff_t>(at),
                            after.begin() + static_cast<std::ptrdiff_t>(at + state));
      double* t = T.data() + D * D;
      std::vector<double> f(static_cast<std::size_t>(D));
      for (std::int64_t j = n - 1; j >= 0; --j) {
        if (p.causal) {
          const double* gu = &grad_u[static_cast<std::size_t>(((b * H + h) * n + j) * (D + 1))];
          if (g != 1.0) {
            for (double& x : T) x *= g;
          }
          for (std::int64_t d = 0; d < D; ++d) {
            const double ed = linear_feature(p.feature_map, load(q, b, j, h, d));
            t[d] += gu[D] * ed;
            for (std::int64_t c = 0; c < D; ++c) T[static_cast<std::size_t>(d * D + c)] += ed * gu[c];
          }
        }
        for (std::int64_t d = 0; d < D; ++d) f[static_cast<std::size_t>(d)] = linear_feature(p.feature_map, load(k, b, j, h / group, d));
        double* df = &dfk[static_cast<std::size_t>(((b * H + h) * n + j) * D)];
        double* dvv = &dvh[static_cast<std::size_t>(((b * H + h) * n + j) * D)];
        for (std::int64_t d = 0; d < D; ++d) {
          double acc = t[d];
          for (std::int64_t c = 0; c < D; ++c) acc += T[static_cast<std::size_t>(d * D + c)] * load(v, b, j, h / group, c);
          df[d] = acc;
        }
        for (std::int64_t c = 0; c < D; ++c) {
          double acc = 0.0;
          for (std::int64_t d = 0; d < D; ++d) acc += T[static_cast<std::size_t>(d * D + c)] * f[static_cast<std::size_t>(d)];
          dvv[c] = acc;
        }
      }
    }
  }
  // 5. Sum the query heads of each KV head, apply phi' and store.
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t j = 0; j < n; ++j) {
      for (std::int64_t hk = 0; hk < Hk; ++hk) {
        for (std::int64_t d = 0; d < D; ++d) {
          double sk = 0.0, sv = 0.0;
          for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
            sk += dfk[static_cast<std::size_t>(((b * H + h) * n + j) * D + d)];
            sv += dvh[static_cast<std::size_t>(((b * H + h) * n + j) * D + d)];
          }
          const double slope = feature_slope(p.feature_map, load(k, b, j, hk, d));
          store_f32(dk.dtype, dk.data, b * dk.strides[0] + j * dk.strides[1] + hk * dk.strides[2] + d,
                    static_cast<float>(sk * slope));
          store_f32(dv.dtype, dv.data, b * dv.strides[0] + j * dv.strides[1] + hk * dv.strides[2] + d,
                    static_cast<float>(sv));
        }
      }
    }
  }
}

}  // namespace ringattn::detail
