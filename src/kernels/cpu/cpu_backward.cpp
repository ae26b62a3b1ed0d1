#include "kernels/cpu/cpu_backward.hpp"

#include <algorithm>
#include <cmath>

#include "core/dtype.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

constexpr std::int64_t kTileKeys = 16;
constexpr std::int64_t kTileRows = 16;
constexpr std::int64_t kChunk = 64;  // terms summed in fp32 before joining an fp64 total

inline float dot(const float* a, const float* b, std::int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (std::int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, std::int64_t n) {
#pragma omp simd
  for (std::int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

// Copies a (B, S, H, D) view into (B, H, S, D) fp32.
void to_head_major(const TensorView& t, float* dst) {
  const std::int64_t B = t.shape[0], S = t.shape[1], H = t.shape[2], D = t.shape[3];
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i) {
        const std::int64_t src = b * t.strides[0] + i * t.strides[1] + h * t.strides[2];
        float* out = dst + ((b * H + h) * S + i) * D;
        for (std::int64_t d = 0; d < D; ++d) out[d] = load_f32(t.dtype, t.data, src + d);
      }
}

}  // namespace

CpuBackwardKernel::CpuBackwardKernel(const AttentionShape& shape, std::int64_t q_len, std::int64_t kv_capacity,
                                     int threads)
    : shape_(shape), q_len_(q_len), kv_capacity_(kv_capacity), threads_(std::max(1, threads)) {
  const auto rows = static_cast<std::size_t>(shape.batch * shape.heads * q_len);
  const auto D = static_cast<std::size_t>(shape.head_dim);
  q_.resize(rows * D);
  dout_.resize(rows * D);
  dq_.resize(rows * D);
  lse_.resize(rows);
  delta_.resize(rows);
  k_.resize(static_cast<std::size_t>(shape.batch * shape.kv_heads * kv_capacity) * D);
  v_.resize(k_.size());
}

void CpuBackwardKernel::load_rows(const TensorView& q, const TensorView& out, const TensorView& dout,
                                  const TensorView& lse, float scale) {
  const std::int64_t B = shape_.batch, H = shape_.heads, D = shape_.head_dim, S = q_len_;
  scale_ = scale;
  to_head_major(q, q_.data());
  to_head_major(dout, dout_.data());
  std::vector<float> o(q_.size());
  to_head_major(out, o.data());
  std::fill(dq_.begin(), dq_.end(), 0.0f);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i) {
        const std::int64_t row = (b * H + h) * S + i;
        lse_[static_cast<std::size_t>(row)] =
            static_cast<const float*>(lse.data)[b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2]];
        // delta_i = dout_i . out_i, once per rank before the ring.
        delta_[static_cast<std::size_t>(row)] = dot(&dout_[static_cast<std::size_t>(row * D)], &o[static_cast<std::size_t>(row * D)], D);
      }
}

void CpuBackwardKernel::load_kv(DType dtype, const void* block, std::int64_t kv_len) {
  if (kv_len > kv_capacity_) throw Error(ErrorCode::internal, "cpu backward: KV block larger than its capacity");
  kv_len_ = kv_len;
  const std::int64_t B = shape_.batch, Hkv = shape_.kv_heads, D = shape_.head_dim, cap = kv_capacity_;
  const std::int64_t v_offset = B * kv_len * Hkv * D;
#pragma omp parallel for collapse(2) num_threads(threads_)
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hkv; ++h)
      for (std::int64_t t = 0; t < kv_len; ++t) {
        const std::int64_t src = ((b * kv_len + t) * Hkv + h) * D;
        const std::int64_t dst = ((b * Hkv + h) * cap + t) * D;
        for (std::int64_t d = 0; d < D; ++d) {
          k_[static_cast<std::size_t>(dst + d)] = load_f32(dtype, block, src + d);
          v_[static_cast<std::size_t>(dst + d)] = load_f32(dtype, block, v_offset + src + d);
        }
      }
}

void CpuBackwardKernel::run(const std::vector<BlockTask>& tasks, float* dkv) {
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  const std::int64_t group = H / Hkv, cap = kv_capacity_, S = q_len_, L = kv_len_;
  float* dk_all = dkv;
  float* dv_all = dkv + B * L * Hkv * D;
  const float scale = scale_;
  // Tasks of one step may share key rows or query rows: they run one after another.
  for (const BlockTask& t : tasks) {
    // Pass A: dK, dV; each item owns a tile of keys of one (batch, KV head). Long sums (a key
    // collects one term per query row) are added up in chunks of kChunk terms in fp32, and the
    // chunks in fp64: the error stays that of a kChunk-term sum, not of a sequence-long one.
    const std::int64_t key_tiles = (t.kv_len + kTileKeys - 1) / kTileKeys;
#pragma omp parallel for schedule(dynamic) num_threads(threads_)
    for (std::int64_t item = 0; item < B * Hkv * key_tiles; ++item) {
      const std::int64_t tile = item % key_tiles, bh = item / key_tiles, b = bh / Hkv, hk = bh % Hkv;
      alignas(64) float part_k[CpuForwardKernel::kMaxHeadDim], part_v[CpuForwardKernel::kMaxHeadDim];
      double sum_k[CpuForwardKernel::kMaxHeadDim], sum_v[CpuForwardKernel::kMaxHeadDim];
      for (std::int64_t l = tile * kTileKeys; l < std::min(t.kv_len, (tile + 1) * kTileKeys); ++l) {
        const float* kl = &k_[static_cast<std::size_t>(((b * Hkv + hk) * cap + t.kv_begin + l) * D)];
        const float* vl = &v_[static_cast<std::size_t>(((b * Hkv + hk) * cap + t.kv_begin + l) * D)];
        std::fill_n(sum_k, D, 0.0);
        std::fill_n(sum_v, D, 0.0);
        // Causal: row i sees key l iff l <= i + diag_offset; a band also needs l >= i + lower_offset.
        const std::int64_t first = t.mask != MaskKind::full ? std::max<std::int64_t>(0, l - t.diag_offset) : 0;
        const std::int64_t rows = t.mask == MaskKind::band ? std::min(t.q_len, l - t.lower_offset + 1) : t.q_len;
        for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          for (std::int64_t i0 = first; i0 < rows; i0 += kChunk) {
            std::fill_n(part_k, D, 0.0f);
            std::fill_n(part_v, D, 0.0f);
            for (std::int64_t i = i0; i < std::min(rows, i0 + kChunk); ++i) {
              const std::int64_t row = (b * H + h) * S + t.q_begin + i;
              const float* qi = &q_[static_cast<std::size_t>(row * D)];
              const float* di = &dout_[static_cast<std::size_t>(row * D)];
              const float p = std::exp(scale * dot(qi, kl, D) - lse_[static_cast<std::size_t>(row)]);
              const float ds = p * (dot(di, vl, D) - delta_[static_cast<std::size_t>(row)]);
              axpy(p, di, part_v, D);
              axpy(scale * ds, qi, part_k, D);
            }
            for (std::int64_t d = 0; d < D; ++d) {
              sum_k[d] += part_k[d];
              sum_v[d] += part_v[d];
            }
          }
        }
        float* dk = dk_all + ((b * L + t.kv_begin + l) * Hkv + hk) * D;
        float* dv = dv_all + ((b * L + t.kv_begin + l) * Hkv + hk) * D;
        for (std::int64_t d = 0; d < D; ++d) {
          dk[d] = static_cast<float>(dk[d] + sum_k[d]);
          dv[d] = static_cast<float>(dv[d] + sum_v[d]);
        }
      }
    }
    // Pass B: dQ; each item owns a tile of query rows of one (batch, head); keys are summed in
    // chunks the same way.
    const std::int64_t row_tiles = (t.q_len + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(dynamic) num_threads(threads_)
    for (std::int64_t item = 0; item < B * H * row_tiles; ++item) {
      const std::int64_t tile = item % row_tiles, bh = item / row_tiles, b = bh / H, h = bh % H, hk = h / group;
      alignas(64) float part[CpuForwardKernel::kMaxHeadDim];
      double sum[CpuForwardKernel::kMaxHeadDim];
      for (std::int64_t i = tile * kTileRows; i < std::min(t.q_len, (tile + 1) * kTileRows); ++i) {
        const std::int64_t row = (b * H + h) * S + t.q_begin + i;
        const float* qi = &q_[static_cast<std::size_t>(row * D)];
        const float* di = &dout_[static_cast<std::size_t>(row * D)];
        const std::int64_t keys = t.mask != MaskKind::full ? std::min(t.kv_len, i + t.diag_offset + 1) : t.kv_len;
        const std::int64_t key0 = t.mask == MaskKind::band ? std::max<std::int64_t>(0, i + t.lower_offset) : 0;
        std::fill_n(sum, D, 0.0);
        for (std::int64_t l0 = key0; l0 < keys; l0 += kChunk) {
          std::fill_n(part, D, 0.0f);
          for (std::int64_t l = l0; l < std::min(keys, l0 + kChunk); ++l) {
            const float* kl = &k_[static_cast<std::size_t>(((b * Hkv + hk) * cap + t.kv_begin + l) * D)];
            const float* vl = &v_[static_cast<std::size_t>(((b * Hkv + hk) * cap + t.kv_begin + l) * D)];
            const float p = std::exp(scale * dot(qi, kl, D) - lse_[static_cast<std::size_t>(row)]);
            const float ds = p * (dot(di, vl, D) - delta_[static_cast<std::size_t>(row)]);
            axpy(scale * ds, kl, part, D);
          }
          for (std::int64_t d = 0; d < D; ++d) sum[d] += part[d];
        }
        float* dq = &dq_[static_cast<std::size_t>(row * D)];
        for (std::int64_t d = 0; d < D; ++d) dq[d] = static_cast<float>(dq[d] + sum[d]);
      }
    }
  }
}

void CpuBackwardKernel::store_dq(const TensorView& dq) const {
  const std::int64_t B = shape_.batch, H = shape_.heads, D = shape_.head_dim, S = q_len_;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < S; ++i) {
        const std::int64_t dst = b * dq.strides[0] + i * dq.strides[1] + h * dq.strides[2];
        const float* src = &dq_[static_cast<std::size_t>(((b * H + h) * S + i) * D)];
        for (std::int64_t d = 0; d < D; ++d) store_f32(dq.dtype, dq.data, dst + d, src[d]);
      }
}

}  // namespace ringattn::detail
