// kernels/cuda/flash_fwd_launch.cuh: turns the runtime causal flag into a template argument
// and launches one instantiation. Included once per (dtype, head dim) .cu file.
#pragma once

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_fwd_kernel.cuh"

namespace ringattn::detail::flash {

// Over 48 KiB of dynamic shared memory must be opted into, once per kernel instantiation.
template <class Tr, bool kCausal>
void launch_configured(dim3 grid, const FlashFwdParams& p, cudaStream_t stream) {
  static const bool configured = [] {
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_fwd_kernel<Tr, kCausal>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
    return true;
  }();
  (void)configured;
  flash_fwd_kernel<Tr, kCausal><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <class Tr>
void launch_flash_fwd_traits(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  const dim3 grid((p.q_len + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch);
  if (p.causal) {
    launch_configured<Tr, true>(grid, p, stream);
  } else {
    launch_configured<Tr, false>(grid, p, stream);
  }
}

template <typename T, int kHeadDim>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  launch_flash_fwd_traits<FwdTraits<T, kHeadDim>>(p, stream);
}

}  // namespace ringattn::detail::flash
