// kernels/cuda/tma.cuh: the Hopper (sm_90) data-movement primitives of the warp-specialised
// kernels: mbarriers (init, arrive, expect_tx, parity wait), TMA tile loads and reduce-adds
// (cp.async.bulk.tensor, cp.reduce.async.bulk.tensor; PTX ISA), named barriers and, host side,
// the tensor maps that describe a (B, rows, heads, D) 16-bit tensor to TMA with 64-column boxes
// in the 128-byte swizzle (and the fp32 dQ accumulator with 32-column boxes).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail::flash {

__device__ __forceinline__ void mbar_init(std::uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Raises the transaction count of the current phase without arriving.
__device__ __forceinline__ void mbar_expect_tx_only(std::uint32_t bar, std::uint32_t bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(std::uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(std::uint32_t bar, std::uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// One box of a 4-d tensor map (columns, rows, heads, batch) into shared memory.
__device__ __forceinline__ void tma_load_4d(std::uint32_t dst, const CUtensorMap* map, std::uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<std::uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}
// A tile of kRows rows x 64 * kAtomCols columns at (row, head, batch): one box per 64-column
// atom column, each kRows x 128 bytes (the layout wgmma's descriptors expect), all signalling
// `bar` with their bytes.
template <int kRows, int kAtomCols>
__device__ __forceinline__ void tma_load_tile(std::uint32_t dst, const CUtensorMap* map, std::uint32_t bar, int row,
                                              int head, int batch) {
#pragma unroll
  for (int c = 0; c < kAtomCols; ++c) tma_load_4d(dst + c * kRows * 128, map, bar, 64 * c, row, head, batch);
}

// Adds a box of shared memory into a 4-d tensor map's box at (c0, c1, c2, c3), elementwise,
// in L2 (cp.reduce.async.bulk.tensor, .add): rows outside the map are not written. Tracked by
// the issuing thread's bulk groups.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, std::uint32_t src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
          reinterpret_cast<std::uint64_t>(map)),
      "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(src)
      : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// The shared-memory sources of this thread's bulk groups have been read (may be overwritten).
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// This thread's bulk groups are complete: their writes to global memory are performed.
__device__ __forceinline__ void bulk_wait_done() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's generic-proxy accesses to global memory against its async-proxy ones.
__device__ __forceinline__ void fence_proxy_async_global() { asm volatile("fence.proxy.async.global;\n" ::: "memory"); }

// Named barriers (bar.sync / bar.arrive, ids 1..15; 0 is __syncthreads): `threads` counts
// every participant, a multiple of 32.
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// --- host side ---
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

inline EncodeTiledFn encode_tiled_fn() {
  static const EncodeTiledFn fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found{};
    RINGATTN_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw Error(ErrorCode::cuda, "the CUDA driver has no cuTensorMapEncodeTiled (TMA)");
    }
    return reinterpret_cast<EncodeTiledFn>(ptr);
  }();
  return fn;
}

// rows: the extent of the row dimension (later rows read as zeros); strides in elements.
template <typename T>
CUtensorMap make_tile_map(const void* base, int dim, std::int64_t rows, int heads, int batch, std::int64_t row_stride,
                          std::int64_t head_stride, std::int64_t batch_stride, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  // One batch: its stride is never used, but TMA still wants a multiple of 16 bytes.
  const std::int64_t batch_step = batch > 1 ? batch_stride : (rows * row_stride + 7) / 8 * 8;
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_stride) * sizeof(T),
                                 static_cast<cuuint64_t>(head_stride) * sizeof(T),
                                 static_cast<cuuint64_t>(batch_step) * sizeof(T)};
  const cuuint32_t box[4] = {64, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUtensorMapDataType type =
      sizeof(T) == 2 && std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult rc = encode_tiled_fn()(&map, type, 4, const_cast<void*>(base), dims, strides, box, elem_strides,
                                        CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS) {
    throw Error(ErrorCode::cuda, "cuTensorMapEncodeTiled failed (" + std::to_string(static_cast<int>(rc)) +
                                     "): strides must be multiples of 16 bytes and the base 16-byte aligned");
  }
  return map;
}

// A (B, rows, heads, dim) fp32 tensor (dense rows of `dim` elements) in boxes of 32 columns
// x box_rows rows, 128-byte swizzled: the dQ accumulator as the single-pass backward adds to it.
inline CUtensorMap make_f32_tile_map(float* base, int dim, std::int64_t rows, int heads, int batch,
                                     std::int64_t head_stride, std::int64_t batch_stride, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(dim) * sizeof(float),
                                 static_cast<cuuint64_t>(head_stride) * sizeof(float),
                                 static_cast<cuuint64_t>(batch_stride) * sizeof(float)};
  const cuuint32_t box[4] = {32, static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult rc = encode_tiled_fn()(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 4, base, dims, strides, box,
                                        elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                        CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (rc != CUDA_SUCCESS) {
    throw Error(ErrorCode::cuda, "cuTensorMapEncodeTiled failed for the fp32 dQ accumulator (" +
                                     std::to_string(static_cast<int>(rc)) + ")");
  }
  return map;
}

// Whether TMA can describe a tensor: 16-byte aligned base, strides multiples of 8 elements.
inline bool tma_aligned(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }
inline bool tma_stride_ok(std::int64_t stride) { return stride > 0 && stride % 8 == 0; }

}  // namespace ringattn::detail::flash
