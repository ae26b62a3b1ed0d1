#include "kernels/cpu/cpu_forward.hpp"

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cmath>

#include "core/dtype.hpp"
#include "kernels/cpu/merge.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

constexpr std::int64_t kTileRows = 16;
constexpr std::int64_t kTileKeys = 64;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x for x <= 0, vectorisable (no libm call): x = n + f with n = round(x), |f| <= 1/2, and
// 2^f = e^(f ln 2) by its Taylor series to degree 7 (truncation error < 6e-9, below fp32's
// rounding). Inputs below -126 clamp to 2^-126, which is negligible beside the row maximum's 1.
inline float exp2_nonpositive(float x) {
  x = x < -126.0f ? -126.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to nearest
  const float n = (x + magic) - magic;
  const float f = (x - n) * kLn2;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const auto bits = static_cast<std::uint32_t>(static_cast<std::int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

}  // namespace

CpuForwardKernel::CpuForwardKernel(const AttentionShape& shape, std::int64_t q_len, std::int64_t kv_capacity,
                                   int threads)
    : shape_(shape), q_len_(q_len), kv_capacity_(kv_capacity), threads_(std::max(1, threads)) {
  if (shape.head_dim > kMaxHeadDim) {
    throw Error(ErrorCode::invalid_argument, "head_dim " + std::to_string(shape.head_dim) +
                                                 " exceeds the CPU kernel's maximum of " + std::to_string(kMaxHeadDim));
  }
  const auto B = static_cast<std::size_t>(shape.batch);
  const auto H = static_cast<std::size_t>(shape.heads);
  const auto Hkv = static_cast<std::size_t>(shape.kv_heads);
  const auto D = static_cast<std::size_t>(shape.head_dim);
  q_.resize(B * H * static_cast<std::size_t>(q_len) * D);
  o_.assign(q_.size(), 0.0f);
  lse_.assign(B * H * static_cast<std::size_t>(q_len), -INFINITY);
  k_t_.resize(B * Hkv * D * static_cast<std::size_t>(kv_capacity));
  v_.resize(k_t_.size());
}

void CpuForwardKernel::load_queries(const TensorView& q, float scale) {
  const std::int64_t B = shape_.batch, H = shape_.heads, D = shape_.head_dim, S = q_len_;
  const float factor = scale * kLog2e;
  // A new pass starts from an empty running result (the kernel may be reused).
  std::fill(o_.begin(), o_.end(), 0.0f);
  std::fill(lse_.begin(), lse_.end(), -INFINITY);
#pragma omp parallel for collapse(2) num_threads(threads_)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < S; ++i) {
        const std::int64_t src = b * q.strides[0] + i * q.strides[1] + h * q.strides[2];
        float* dst = &q_[static_cast<std::size_t>(((b * H + h) * S + i) * D)];
        for (std::int64_t d = 0; d < D; ++d) dst[d] = load_f32(q.dtype, q.data, src + d) * factor;
      }
    }
  }
}

void CpuForwardKernel::load_kv(DType dtype, const void* block, std::int64_t kv_len) {
  if (kv_len > kv_capacity_) throw Error(ErrorCode::internal, "cpu kernel: KV block larger than its capacity");
  kv_len_ = kv_len;
  const std::int64_t B = shape_.batch, Hkv = shape_.kv_heads, D = shape_.head_dim, cap = kv_capacity_;
  const std::int64_t v_offset = B * kv_len * Hkv * D;  // V follows K in the packed block
#pragma omp parallel for collapse(2) num_threads(threads_)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < Hkv; ++h) {
      float* kt = &k_t_[static_cast<std::size_t>((b * Hkv + h) * D * cap)];
      float* v = &v_[static_cast<std::size_t>((b * Hkv + h) * cap * D)];
      for (std::int64_t t = 0; t < kv_len; ++t) {
        const std::int64_t src = ((b * kv_len + t) * Hkv + h) * D;
        for (std::int64_t d = 0; d < D; ++d) {
          kt[d * cap + t] = load_f32(dtype, block, src + d);
          v[t * D + d] = load_f32(dtype, block, v_offset + src + d);
        }
      }
    }
  }
}

void CpuForwardKernel::run(const std::vector<BlockTask>& tasks, const std::function<void()>& poke) {
  const std::int64_t B = shape_.batch, H = shape_.heads;
  // Tasks of one step may share query rows (zigzag), so they run one after another; inside a
  // task every (batch, head, row tile) item writes its own rows.
  for (const BlockTask& task : tasks) {
    if (task.kv_begin + task.kv_len > kv_len_ || task.q_begin + task.q_len > q_len_) {
      throw Error(ErrorCode::internal, "cpu kernel: task outside the loaded blocks");
    }
    const std::int64_t tiles = (task.q_len + kTileRows - 1) / kTileRows;
    const std::int64_t items = B * H * tiles;
#pragma omp parallel for schedule(dynamic) num_threads(threads_)
    for (std::int64_t item = 0; item < items; ++item) {
      const std::int64_t tile = item % tiles;
      const std::int64_t bh = item / tiles;
      const std::int64_t row0 = tile * kTileRows;
      run_tile(task, bh / H, bh % H, row0, std::min(kTileRows, task.q_len - row0));
      if (poke && omp_get_thread_num() == 0) poke();
    }
  }
}

void CpuForwardKernel::run_tile(const BlockTask& task, std::int64_t b, std::int64_t h, std::int64_t row0,
                                std::int64_t rows) {
  const std::int64_t H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim, cap = kv_capacity_;
  const std::int64_t kv_head = h / (H / Hkv);
  const float* q = &q_[static_cast<std::size_t>(((b * H + h) * q_len_ + task.q_begin + row0) * D)];
  const float* kt = &k_t_[static_cast<std::size_t>((b * Hkv + kv_head) * D * cap + task.kv_begin)];
  const float* v = &v_[static_cast<std::size_t>(((b * Hkv + kv_head) * cap + task.kv_begin) * D)];
  const bool band = task.mask == MaskKind::band;
  const bool causal = task.mask == MaskKind::causal || band;
  // Keys past what the tile's last row may see are never loaded, nor (band) keys before what
  // its first row may see.
  const std::int64_t key_end =
      causal ? std::min(task.kv_len, row0 + rows - 1 + task.diag_offset + 1) : task.kv_len;
  const std::int64_t key_start = band ? std::max<std::int64_t>(0, row0 + task.lower_offset) : 0;

  alignas(64) float acc[kTileRows][kMaxHeadDim];
  alignas(64) float p[kTileKeys];
  float row_max[kTileRows];
  float row_sum[kTileRows];
  for (std::int64_t r = 0; r < rows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.0f;
    std::fill_n(acc[r], D, 0.0f);
  }

  for (std::int64_t tile0 = key_start; tile0 < key_end; tile0 += kTileKeys) {
    const std::int64_t tile_keys = std::min(kTileKeys, key_end - tile0);
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t end =
          causal ? std::clamp<std::int64_t>(row0 + r + task.diag_offset + 1 - tile0, 0, tile_keys) : tile_keys;
      const std::int64_t begin = band ? std::clamp<std::int64_t>(row0 + r + task.lower_offset - tile0, 0, tile_keys) : 0;
      const std::int64_t valid = end - begin;
      if (valid <= 0) continue;
      const std::int64_t key0 = tile0 + begin;  // this row's keys in the tile: key0 .. key0 + valid
      const float* qr = q + r * D;

      // Scores (log2 units): p[l] = q_r . k_l, four head dims at a time to keep p in registers.
      std::fill_n(p, valid, 0.0f);
      std::int64_t d = 0;
      for (; d + 4 <= D; d += 4) {
        const float q0 = qr[d], q1 = qr[d + 1], q2 = qr[d + 2], q3 = qr[d + 3];
        const float* k0 = kt + d * cap + key0;
        const float* k1 = k0 + cap;
        const float* k2 = k1 + cap;
        const float* k3 = k2 + cap;
#pragma omp simd
        for (std::int64_t l = 0; l < valid; ++l) p[l] += q0 * k0[l] + q1 * k1[l] + q2 * k2[l] + q3 * k3[l];
      }
      for (; d < D; ++d) {
        const float qd = qr[d];
        const float* kd = kt + d * cap + key0;
#pragma omp simd
        for (std::int64_t l = 0; l < valid; ++l) p[l] += qd * kd[l];
      }

      // Online softmax: rescale what came before by 2^(old max - new max).
      float tile_max = -INFINITY;
      for (std::int64_t l = 0; l < valid; ++l) tile_max = std::max(tile_max, p[l]);
      const float new_max = std::max(row_max[r], tile_max);
      const float correction = std::exp2(row_max[r] - new_max);  // 0 on the first tile
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (std::int64_t l = 0; l < valid; ++l) {
        p[l] = exp2_nonpositive(p[l] - new_max);
        sum += p[l];
      }
      row_sum[r] = row_sum[r] * correction + sum;
      row_max[r] = new_max;
      float* a = acc[r];
      if (correction != 1.0f) {
#pragma omp simd
        for (std::int64_t e = 0; e < D; ++e) a[e] *= correction;
      }
      for (std::int64_t l = 0; l < valid; ++l) {
        const float pl = p[l];
        const float* vl = v + (key0 + l) * D;
#pragma omp simd
        for (std::int64_t e = 0; e < D; ++e) a[e] += pl * vl[e];
      }
    }
  }

  for (std::int64_t r = 0; r < rows; ++r) {
    if (row_sum[r] == 0.0f) continue;  // the planner never emits such rows; merging would be a no-op
    const std::int64_t i = task.q_begin + row0 + r;
    const std::size_t row = static_cast<std::size_t>((b * H + h) * q_len_ + i);
    const float lse_b = (row_max[r] + std::log2(row_sum[r])) * kLn2;
    lse_[row] = merge_block_into(&o_[row * static_cast<std::size_t>(D)], lse_[row], acc[r], 1.0f / row_sum[r], lse_b, D);
  }
}

void CpuForwardKernel::store(const TensorView& out, const TensorView& lse) const {
  const std::int64_t B = shape_.batch, H = shape_.heads, D = shape_.head_dim, S = q_len_;
#pragma omp parallel for collapse(2) num_threads(threads_)
  for (std::int64_t b = 0; b < B; ++b) {
    for (std::int64_t h = 0; h < H; ++h) {
      for (std::int64_t i = 0; i < S; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * H + h) * S + i);
        const std::int64_t dst = b * out.strides[0] + i * out.strides[1] + h * out.strides[2];
        for (std::int64_t d = 0; d < D; ++d) store_f32(out.dtype, out.data, dst + d, o_[row * static_cast<std::size_t>(D) + static_cast<std::size_t>(d)]);
        if (lse.data != nullptr) {
          static_cast<float*>(lse.data)[b * lse.strides[0] + h * lse.strides[1] + i * lse.strides[2]] = lse_[row];
        }
      }
    }
  }
}

}  // namespace ringattn::detail
