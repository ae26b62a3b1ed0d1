// kernels/cuda/flash_bwd_launch.cuh: launches the dq and dkv kernels of one task for one
// (dtype, head dim). Included once per instantiation .cu file.
#pragma once

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_bwd_kernel.cuh"

namespace ringattn::detail::flash {

// Over 48 KiB of dynamic shared memory must be opted into, once per kernel instantiation.
template <void (*kernel)(FlashBwdParams)>
void launch_bwd_configured(dim3 grid, int threads, int smem, const FlashBwdParams& p, cudaStream_t stream) {
  static const bool configured = [smem] {
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    return true;
  }();
  (void)configured;
  kernel<<<grid, threads, smem, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

// Head dim 128 keeps dK, dV (64 registers each per thread) and 32-row query tiles within the
// register file; head dim 64 affords 64-row tiles.
template <typename T, int kHeadDim>
using DefaultBwdTraits = BwdTraits<T, kHeadDim, (kHeadDim >= 128 ? 32 : 64)>;

template <typename T, int kHeadDim>
void launch_flash_bwd(const FlashBwdParams& p, cudaStream_t stream, bool dq, bool dkv) {
  using Tr = DefaultBwdTraits<T, kHeadDim>;
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  const dim3 dq_grid((p.q_len + Tr::kRows - 1) / Tr::kRows, p.heads, p.batch);
  const dim3 dkv_grid((p.kv_len + Tr::kRows - 1) / Tr::kRows, p.kv_heads, p.batch);
  if (p.causal) {
    if (dq) launch_bwd_configured<flash_bwd_dq_kernel<Tr, true>>(dq_grid, Tr::kThreads, Tr::kSmemDq, p, stream);
    if (dkv) launch_bwd_configured<flash_bwd_dkv_kernel<Tr, true>>(dkv_grid, Tr::kThreads, Tr::kSmemDkv, p, stream);
  } else {
    if (dq) launch_bwd_configured<flash_bwd_dq_kernel<Tr, false>>(dq_grid, Tr::kThreads, Tr::kSmemDq, p, stream);
    if (dkv) launch_bwd_configured<flash_bwd_dkv_kernel<Tr, false>>(dkv_grid, Tr::kThreads, Tr::kSmemDkv, p, stream);
  }
}

}  // namespace ringattn::detail::flash
