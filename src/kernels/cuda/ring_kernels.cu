// kernels/cuda/ring_kernels.cu: the small kernels around the flash kernel: state
// initialisation, packing the local K/V into the ring buffer, and writing the final output.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/cuda_check.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cuda/flash_common.cuh"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

constexpr int kThreads = 256;

unsigned blocks_for(std::int64_t n) {
  const std::int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 65535 * 16 ? b : 65535 * 16);
}

__global__ void fill_kernel(float* x, std::int64_t n, float value) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

// dst (B, S, Hh, D) dense <- src with strides (sb, ss, sh, 1), one element per thread and
// step: for rows that are not 16-byte aligned (pack_rows_kernel below serves the rest).
template <typename T>
__global__ void pack_kernel(const T* src, T* dst, std::int64_t S, std::int64_t Hh, std::int64_t D, std::int64_t sb,
                            std::int64_t ss, std::int64_t sh, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = i % D;
    const std::int64_t h = (i / D) % Hh;
    const std::int64_t s = (i / (D * Hh)) % S;
    const std::int64_t b = i / (D * Hh * S);
    dst[i] = src[b * sb + s * ss + h * sh + d];
  }
}

// The same with one warp per (b, s, h) row and 16 bytes per lane and step, for D and the
// strides multiples of 16 bytes and a 16-byte aligned source: K and V as strided views of a
// fused QKV projection, whose pack the ring does once per pass. (The per-element kernel above
// pays four 64-bit divisions per element, as finalize_kernel did: ~0.7 TB/s on an H100.)
__global__ void pack_rows_kernel(const uint4* src, uint4* dst, std::int64_t S, std::int64_t Hh, std::int64_t vd,
                                 std::int64_t sb, std::int64_t ss, std::int64_t sh, std::int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const std::int64_t h = r % Hh, s = (r / Hh) % S, b = r / (Hh * S);
    const uint4* from = src + b * sb + s * ss + h * sh;
    uint4* to = dst + r * vd;
    for (std::int64_t i = lane; i < vd; i += 32) to[i] = from[i];
  }
}

template <typename T>
__device__ T from_float(float x);
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ float from_float<float>(float x) { return x; }

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// out[b, s, h, d] <- o_acc[b, h, s, d] (+ add[b, h, s, d] for s in [a0, a0 + an), add set)
template <typename T>
__global__ void finalize_kernel(const float* o_acc, T* out, std::int64_t S, std::int64_t H, std::int64_t D,
                                std::int64_t ob, std::int64_t os, std::int64_t oh, std::int64_t n, const float* add,
                                std::int64_t a0, std::int64_t an, std::int64_t AS, std::int64_t r0) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = i % D;
    const std::int64_t s = (i / D) % S;
    const std::int64_t h = (i / (D * S)) % H;
    const std::int64_t b = i / (D * S * H);
    const std::int64_t a = ((b * H + h) * AS + r0 + s) * D + d;  // the accumulator's element
    const float x = add != nullptr && r0 + s >= a0 && r0 + s < a0 + an ? o_acc[a] + add[a] : o_acc[a];
    out[b * ob + s * os + h * oh + d] = from_float<T>(x);
  }
}

// The same with one warp per (b, h, s) row and four elements per lane and step: float4 loads,
// one 8-byte (16-bit types) or 16-byte store. For D % 4 == 0 and out rows aligned to 4
// elements. The per-element kernel above spends its time on 64-bit index divisions (H100:
// ~2.2 ms for a 64k x 32 x 128 gradient, ~0.7 TB/s); here they are paid once per row.
template <typename T>
struct Vec4 {  // 16-bit types: two packed pairs (the flash kernels' pack2, round to nearest)
  using type = uint2;
  static __device__ uint2 make(float4 v) { return make_uint2(flash::pack2<T>(v.x, v.y), flash::pack2<T>(v.z, v.w)); }
};
template <>
struct Vec4<float> {
  using type = float4;
  static __device__ float4 make(float4 v) { return v; }
};

template <typename T>
__global__ void finalize_rows_kernel(const float* o_acc, T* out, std::int64_t S, std::int64_t H, std::int64_t D,
                                     std::int64_t ob, std::int64_t os, std::int64_t oh, std::int64_t rows,
                                     const float* add, std::int64_t a0, std::int64_t an, std::int64_t AS,
                                     std::int64_t r0) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const std::int64_t s = r % S, h = (r / S) % H, b = r / (S * H);
    const std::int64_t a = (b * H + h) * AS + r0 + s;  // the accumulator's row
    const auto* src = reinterpret_cast<const float4*>(o_acc + a * D);
    auto* dst = reinterpret_cast<typename Vec4<T>::type*>(out + b * ob + s * os + h * oh);
    if (add != nullptr && r0 + s >= a0 && r0 + s < a0 + an) {
      const auto* more = reinterpret_cast<const float4*>(add + a * D);
      for (std::int64_t i = lane; i < D / 4; i += 32) {
        float4 x = src[i];
        const float4 y = more[i];
        x.x += y.x, x.y += y.y, x.z += y.z, x.w += y.w;
        dst[i] = Vec4<T>::make(x);
      }
    } else {
      for (std::int64_t i = lane; i < D / 4; i += 32) dst[i] = Vec4<T>::make(src[i]);
    }
  }
}

__global__ void copy_lse_kernel(const float* lse_acc, float* lse, std::int64_t S, std::int64_t H, std::int64_t lb,
                                std::int64_t lh, std::int64_t ls, std::int64_t n) {
  for (std::int64_t i = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t s = i % S;
    const std::int64_t h = (i / S) % H;
    const std::int64_t b = i / (S * H);
    lse[b * lb + h * lh + s * ls] = lse_acc[i];
  }
}

// One warp per (batch, head, row): folds a block result (o_b normalised, lse_b) into the
// running state, lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|)),
// o' = o e^(lse - lse') + o_b e^(lse_b - lse').
template <typename T>
__global__ void merge_block_kernel(float* o_acc, float* lse, std::int64_t s_q, std::int64_t q_begin,
                                   std::int64_t q_len, std::int64_t H, std::int64_t D, const T* o_b,
                                   const float* lse_b, std::int64_t rows) {
  const std::int64_t w = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (w >= rows) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t i = w % q_len;         // row within the block
  const std::int64_t h = (w / q_len) % H;
  const std::int64_t b = w / (q_len * H);
  const std::int64_t state = (b * H + h) * s_q + q_begin + i;
  const float mine = lse_b[w], old = lse[state];
  if (mine == -INFINITY) return;  // the block saw no key for this row
  float w_old = 0.0f, w_b = 1.0f, merged = mine;
  if (old != -INFINITY) {
    merged = fmaxf(old, mine) + log1pf(__expf(-fabsf(old - mine)));
    w_old = __expf(old - merged);
    w_b = __expf(mine - merged);
  }
  const T* src = o_b + ((b * q_len + i) * H + h) * D;
  float* dst = o_acc + state * D;
  for (std::int64_t d = lane; d < D; d += 32) {
    const float prev = old != -INFINITY ? dst[d] * w_old : 0.0f;
    dst[d] = fmaf(to_float(src[d]), w_b, prev);
  }
  __syncwarp();
  if (lane == 0) lse[state] = merged;
}


// One warp per (batch, head, row) of the backward pass: delta = rowsum(dO * O) in fp32 and
// lse2 = LSE * log2(e), both (B, H, S) dense; a row that saw no key (LSE = -inf) gets
// lse2 = +inf, so that the backward kernels' exp2(s - lse2) is 0 there, not NaN.
template <typename T>
__global__ void backward_prep_kernel(const T* out, const T* dout, const float* lse, float* lse2, float* delta,
                                     std::int64_t S, std::int64_t H, std::int64_t D, std::int64_t ob, std::int64_t os,
                                     std::int64_t oh, std::int64_t db, std::int64_t ds, std::int64_t dh,
                                     std::int64_t lb, std::int64_t lh, std::int64_t ls, std::int64_t rows) {
  const std::int64_t w = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (w >= rows) return;
  const int lane = threadIdx.x % 32;
  const std::int64_t s = w % S;
  const std::int64_t h = (w / S) % H;
  const std::int64_t b = w / (S * H);
  const T* o = out + b * ob + s * os + h * oh;
  const T* g = dout + b * db + s * ds + h * dh;
  float sum = 0.0f;
  for (std::int64_t d = lane; d < D; d += 32) sum = fmaf(to_float(o[d]), to_float(g[d]), sum);
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const float l = lse[b * lb + h * lh + s * ls];
    lse2[w] = l == -INFINITY ? INFINITY : l * 1.4426950408889634f;
    delta[w] = sum;
  }
}

// acc[(b * Hh + h) * acc_rows + row0 + i][d] += src[b * sb + h * sh + i * ss + d] (fp32 sum).
template <typename T>
__global__ void accumulate_rows_kernel(float* acc, std::int64_t acc_rows, std::int64_t row0, const T* src,
                                       std::int64_t Hh, std::int64_t n, std::int64_t D, std::int64_t sb,
                                       std::int64_t sh, std::int64_t ss, std::int64_t total) {
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t d = e % D;
    const std::int64_t i = (e / D) % n;
    const std::int64_t h = (e / (D * n)) % Hh;
    const std::int64_t b = e / (D * n * Hh);
    float x;
    if constexpr (std::is_same_v<T, float>) {
      x = src[b * sb + h * sh + i * ss + d];
    } else {
      x = to_float(src[b * sb + h * sh + i * ss + d]);
    }
    acc[((b * Hh + h) * acc_rows + row0 + i) * D + d] += x;
  }
}

// The same with one warp per (b, h, i) row and four elements per lane and step (float4 for the
// sums, 8 or 16 bytes of src), for D % 4 == 0 and 4-element-aligned src rows: the ring's step
// sums (2 x the K/V rows in fp32 each step the accumulator had not arrived) and the cuDNN
// path's per-task gradients pass through here. The sums are the same fp32 adds either way.
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <typename T>  // 16-bit types
__device__ __forceinline__ float4 load4(const T* p) {
  const uint2 u = *reinterpret_cast<const uint2*>(p);
  const T* e = reinterpret_cast<const T*>(&u);
  return make_float4(to_float(e[0]), to_float(e[1]), to_float(e[2]), to_float(e[3]));
}

template <typename T>
__global__ void accumulate_rows_vec_kernel(float* acc, std::int64_t acc_rows, std::int64_t row0, const T* src,
                                           std::int64_t Hh, std::int64_t n, std::int64_t D, std::int64_t sb,
                                           std::int64_t sh, std::int64_t ss, std::int64_t rows) {
  const int lane = static_cast<int>(threadIdx.x % 32);
  const std::int64_t warps = static_cast<std::int64_t>(gridDim.x) * (blockDim.x / 32);
  for (std::int64_t r = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32; r < rows;
       r += warps) {
    const std::int64_t i = r % n, h = (r / n) % Hh, b = r / (n * Hh);
    const T* in = src + b * sb + h * sh + i * ss;
    auto* out = reinterpret_cast<float4*>(acc + ((b * Hh + h) * acc_rows + row0 + i) * D);
    for (std::int64_t v = lane; v < D / 4; v += 32) {
      const float4 x = load4(in + 4 * v);
      float4 a = out[v];
      a.x += x.x, a.y += x.y, a.z += x.z, a.w += x.w;
      out[v] = a;
    }
  }
}

// dst[(b * H + h) * n + i] = lse[b * lb + h * lh + (row0 + i) * ls]
__global__ void gather_lse_kernel(const float* lse, float* dst, std::int64_t H, std::int64_t n, std::int64_t row0,
                                  std::int64_t lb, std::int64_t lh, std::int64_t ls, std::int64_t total) {
  for (std::int64_t e = blockIdx.x * static_cast<std::int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = e % n;
    const std::int64_t h = (e / n) % H;
    const std::int64_t b = e / (n * H);
    dst[e] = lse[b * lb + h * lh + (row0 + i) * ls];
  }
}

}  // namespace

void fill_neg_inf(float* lse, std::int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  fill_kernel<<<blocks_for(n), kThreads, 0, stream>>>(lse, n, -std::numeric_limits<float>::infinity());
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void pack_rows(const TensorView& t, void* dst, cudaStream_t stream) {
  const std::int64_t n = t.numel();
  if (n == 0) return;
  if (t.is_contiguous()) {
    RINGATTN_CUDA_CHECK(cudaMemcpyAsync(dst, t.data, static_cast<std::size_t>(n) * dtype_size(t.dtype),
                                        cudaMemcpyDeviceToDevice, stream));
    return;
  }
  // 16-byte vectors per row where the rows allow (the destination is dense and aligned).
  const auto elem = static_cast<std::int64_t>(dtype_size(t.dtype));
  const std::int64_t per_vec = 16 / elem;
  const bool rows_aligned = reinterpret_cast<std::uintptr_t>(t.data) % 16 == 0 &&
                            reinterpret_cast<std::uintptr_t>(dst) % 16 == 0 && t.shape[3] % per_vec == 0 &&
                            t.strides[0] % per_vec == 0 && t.strides[1] % per_vec == 0 && t.strides[2] % per_vec == 0;
  if (rows_aligned) {
    const std::int64_t rows = n / t.shape[3];
    pack_rows_kernel<<<blocks_for(rows * 32), kThreads, 0, stream>>>(
        static_cast<const uint4*>(t.data), static_cast<uint4*>(dst), t.shape[1], t.shape[2], t.shape[3] / per_vec,
        t.strides[0] / per_vec, t.strides[1] / per_vec, t.strides[2] / per_vec, rows);
  } else if (elem == 2) {
    pack_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const __half*>(t.data), static_cast<__half*>(dst),
                                                        t.shape[1], t.shape[2], t.shape[3], t.strides[0], t.strides[1],
                                                        t.strides[2], n);
  } else {
    pack_kernel<<<blocks_for(n), kThreads, 0, stream>>>(static_cast<const float*>(t.data), static_cast<float*>(dst),
                                                        t.shape[1], t.shape[2], t.shape[3], t.strides[0], t.strides[1],
                                                        t.strides[2], n);
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void finalize_output(const float* o_acc, const float* lse_acc, const TensorView& out, const TensorView& lse,
                     cudaStream_t stream, const float* add, std::int64_t add_row0, std::int64_t add_rows,
                     std::int64_t acc_rows, std::int64_t acc_row0) {
  const std::int64_t B = out.shape[0], S = out.shape[1], H = out.shape[2], D = out.shape[3];
  const std::int64_t AS = acc_rows > 0 ? acc_rows : S;
  if (acc_row0 < 0 || acc_row0 + S > AS || (lse.data != nullptr && (AS != S || acc_row0 != 0))) {
    throw Error(ErrorCode::internal, "finalize_output: rows outside the accumulator, or LSE with a row window");
  }
  const std::int64_t n = B * S * H * D;
  const std::int64_t elem = static_cast<std::int64_t>(dtype_size(out.dtype));
  const bool rows_aligned = D % 4 == 0 && out.strides[0] % 4 == 0 && out.strides[1] % 4 == 0 &&
                            out.strides[2] % 4 == 0 && reinterpret_cast<std::uintptr_t>(out.data) % (4 * elem) == 0 &&
                            reinterpret_cast<std::uintptr_t>(o_acc) % 16 == 0 &&
                            reinterpret_cast<std::uintptr_t>(add) % 16 == 0;
  if (n > 0 && rows_aligned) {
    const std::int64_t rows = B * S * H;
    const unsigned grid = blocks_for(rows * 32);  // a warp per row
    switch (out.dtype) {
      case DType::bf16:
        finalize_rows_kernel<<<grid, kThreads, 0, stream>>>(o_acc, static_cast<__nv_bfloat16*>(out.data), S, H, D,
                                                            out.strides[0], out.strides[1], out.strides[2], rows,
                                                            add, add_row0, add_rows, AS, acc_row0);
        break;
      case DType::f16:
        finalize_rows_kernel<<<grid, kThreads, 0, stream>>>(o_acc, static_cast<__half*>(out.data), S, H, D,
                                                            out.strides[0], out.strides[1], out.strides[2], rows,
                                                            add, add_row0, add_rows, AS, acc_row0);
        break;
      case DType::f32:
        finalize_rows_kernel<<<grid, kThreads, 0, stream>>>(o_acc, static_cast<float*>(out.data), S, H, D,
                                                            out.strides[0], out.strides[1], out.strides[2], rows,
                                                            add, add_row0, add_rows, AS, acc_row0);
        break;
    }
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  } else if (n > 0) {
    switch (out.dtype) {
      case DType::bf16:
        finalize_kernel<<<blocks_for(n), kThreads, 0, stream>>>(o_acc, static_cast<__nv_bfloat16*>(out.data), S, H, D,
                                                                out.strides[0], out.strides[1], out.strides[2], n,
                                                                add, add_row0, add_rows, AS, acc_row0);
        break;
      case DType::f16:
        finalize_kernel<<<blocks_for(n), kThreads, 0, stream>>>(o_acc, static_cast<__half*>(out.data), S, H, D,
                                                                out.strides[0], out.strides[1], out.strides[2], n,
                                                                add, add_row0, add_rows, AS, acc_row0);
        break;
      case DType::f32:
        finalize_kernel<<<blocks_for(n), kThreads, 0, stream>>>(o_acc, static_cast<float*>(out.data), S, H, D,
                                                                out.strides[0], out.strides[1], out.strides[2], n,
                                                                add, add_row0, add_rows, AS, acc_row0);
        break;
    }
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  }
  if (lse.data != nullptr && B * H * S > 0) {
    copy_lse_kernel<<<blocks_for(B * H * S), kThreads, 0, stream>>>(lse_acc, static_cast<float*>(lse.data), S, H,
                                                                     lse.strides[0], lse.strides[1], lse.strides[2],
                                                                     B * H * S);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  }
}

void merge_block_result(float* o_acc, float* lse, std::int64_t s_q, std::int64_t q_begin, std::int64_t q_len,
                        std::int64_t batch, std::int64_t heads, std::int64_t head_dim, const void* o_b, DType dtype,
                        const float* lse_b, cudaStream_t stream) {
  const std::int64_t rows = batch * heads * q_len;
  if (rows == 0) return;
  const auto grid = static_cast<unsigned>((rows + kThreads / 32 - 1) / (kThreads / 32));
  if (dtype == DType::bf16) {
    merge_block_kernel<<<grid, kThreads, 0, stream>>>(o_acc, lse, s_q, q_begin, q_len, heads, head_dim,
                                                      static_cast<const __nv_bfloat16*>(o_b), lse_b, rows);
  } else {
    merge_block_kernel<<<grid, kThreads, 0, stream>>>(o_acc, lse, s_q, q_begin, q_len, heads, head_dim,
                                                      static_cast<const __half*>(o_b), lse_b, rows);
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void backward_prep(const TensorView& out, const TensorView& dout, const TensorView& lse, float* lse2, float* delta,
                   cudaStream_t stream) {
  const std::int64_t B = out.shape[0], S = out.shape[1], H = out.shape[2], D = out.shape[3];
  const std::int64_t rows = B * H * S;
  if (rows == 0) return;
  const auto grid = static_cast<unsigned>((rows + kThreads / 32 - 1) / (kThreads / 32));
  const auto* l = static_cast<const float*>(lse.data);
  if (out.dtype == DType::bf16) {
    backward_prep_kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(out.data), static_cast<const __nv_bfloat16*>(dout.data), l, lse2, delta, S, H, D,
        out.strides[0], out.strides[1], out.strides[2], dout.strides[0], dout.strides[1], dout.strides[2],
        lse.strides[0], lse.strides[1], lse.strides[2], rows);
  } else {
    backward_prep_kernel<<<grid, kThreads, 0, stream>>>(
        static_cast<const __half*>(out.data), static_cast<const __half*>(dout.data), l, lse2, delta, S, H, D,
        out.strides[0], out.strides[1], out.strides[2], dout.strides[0], dout.strides[1], dout.strides[2],
        lse.strides[0], lse.strides[1], lse.strides[2], rows);
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void accumulate_rows(float* acc, std::int64_t acc_rows, std::int64_t row0, const void* src, DType src_dtype,
                     std::int64_t batch, std::int64_t heads, std::int64_t n, std::int64_t head_dim,
                     const std::int64_t (&src_strides)[3], cudaStream_t stream) {
  const std::int64_t total = batch * heads * n * head_dim;
  if (total == 0) return;
  const std::int64_t sb = src_strides[0], sh = src_strides[1], ss = src_strides[2];
  const auto elem = static_cast<std::uintptr_t>(dtype_size(src_dtype));
  if (head_dim % 4 == 0 && sb % 4 == 0 && sh % 4 == 0 && ss % 4 == 0 &&
      reinterpret_cast<std::uintptr_t>(src) % (4 * elem) == 0 && reinterpret_cast<std::uintptr_t>(acc) % 16 == 0) {
    const std::int64_t rows = batch * heads * n;
    const unsigned grid = blocks_for(rows * 32);  // a warp per row
    switch (src_dtype) {
      case DType::bf16:
        accumulate_rows_vec_kernel<<<grid, kThreads, 0, stream>>>(
            acc, acc_rows, row0, static_cast<const __nv_bfloat16*>(src), heads, n, head_dim, sb, sh, ss, rows);
        break;
      case DType::f16:
        accumulate_rows_vec_kernel<<<grid, kThreads, 0, stream>>>(
            acc, acc_rows, row0, static_cast<const __half*>(src), heads, n, head_dim, sb, sh, ss, rows);
        break;
      case DType::f32:
        accumulate_rows_vec_kernel<<<grid, kThreads, 0, stream>>>(
            acc, acc_rows, row0, static_cast<const float*>(src), heads, n, head_dim, sb, sh, ss, rows);
        break;
    }
    RINGATTN_CUDA_CHECK(cudaGetLastError());
    return;
  }
  switch (src_dtype) {
    case DType::bf16:
      accumulate_rows_kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          acc, acc_rows, row0, static_cast<const __nv_bfloat16*>(src), heads, n, head_dim, sb, sh, ss, total);
      break;
    case DType::f16:
      accumulate_rows_kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          acc, acc_rows, row0, static_cast<const __half*>(src), heads, n, head_dim, sb, sh, ss, total);
      break;
    case DType::f32:
      accumulate_rows_kernel<<<blocks_for(total), kThreads, 0, stream>>>(
          acc, acc_rows, row0, static_cast<const float*>(src), heads, n, head_dim, sb, sh, ss, total);
      break;
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

void gather_lse(const TensorView& lse, std::int64_t row0, std::int64_t n, float* dst, cudaStream_t stream) {
  const std::int64_t B = lse.shape[0], H = lse.shape[1];
  const std::int64_t total = B * H * n;
  if (total == 0) return;
  gather_lse_kernel<<<blocks_for(total), kThreads, 0, stream>>>(static_cast<const float*>(lse.data), dst, H, n, row0,
                                                                lse.strides[0], lse.strides[1], lse.strides[2], total);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ringattn::detail
