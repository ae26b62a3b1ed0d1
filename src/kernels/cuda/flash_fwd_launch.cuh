// kernels/cuda/flash_fwd_launch.cuh: turns the runtime causal flag into a template argument
// and launches one instantiation of either kernel. Included once per (kernel, dtype, head
// dim) .cu file.
#pragma once

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_fwd_kernel.cuh"
#include "kernels/cuda/flash_fwd_sm90.cuh"

namespace ringattn::detail::flash {

// Over 48 KiB of dynamic shared memory must be opted into, once per kernel instantiation
// (hence the kernel as a template argument: one flag per kernel).
template <class Tr, void (*kernel)(FlashFwdParams)>
void launch_configured(dim3 grid, const FlashFwdParams& p, cudaStream_t stream) {
  static const bool configured = [] {
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    return true;
  }();
  (void)configured;
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

// One CTA per kBlockM query rows of the task, per head and batch; the causal flag picks the
// instantiation.
template <class Tr, void (*kCausalKernel)(FlashFwdParams), void (*kFullKernel)(FlashFwdParams)>
void launch_task(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  const dim3 grid((p.q_len + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch);
  if (p.causal) {
    launch_configured<Tr, kCausalKernel>(grid, p, stream);
  } else {
    launch_configured<Tr, kFullKernel>(grid, p, stream);
  }
}

// The mma.sync kernel (sm_80 and later) with tile traits Tr.
template <class Tr>
void launch_flash_fwd_traits(const FlashFwdParams& p, cudaStream_t stream) {
  launch_task<Tr, flash_fwd_kernel<Tr, true>, flash_fwd_kernel<Tr, false>>(p, stream);
}

// The wgmma kernel (sm_90a only) with tile traits Tr.
template <class Tr>
void launch_flash_fwd_sm90_traits(const FlashFwdParams& p, cudaStream_t stream) {
  launch_task<Tr, flash_fwd_sm90_kernel<Tr, true>, flash_fwd_sm90_kernel<Tr, false>>(p, stream);
}

template <typename T, int kHeadDim>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  launch_flash_fwd_traits<FwdTraits<T, kHeadDim>>(p, stream);
}

template <typename T, int kHeadDim>
void launch_flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream) {
  launch_flash_fwd_sm90_traits<Sm90Traits<T, kHeadDim>>(p, stream);
}

}  // namespace ringattn::detail::flash
