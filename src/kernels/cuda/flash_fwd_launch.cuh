// kernels/cuda/flash_fwd_launch.cuh: turns the runtime causal flag into a template argument
// and launches one instantiation. Included once per (dtype, head dim) .cu file.
#pragma once

#include "core/cuda_check.hpp"
#include "kernels/cuda/flash_fwd_kernel.cuh"

namespace ringattn::detail::flash {

template <class Tr>
void launch_flash_fwd_traits(const FlashFwdParams& p, cudaStream_t stream) {
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  const dim3 grid((p.q_len + Tr::kBlockM - 1) / Tr::kBlockM, p.heads, p.batch);
  auto run = [&](auto kernel) {
    // Over 48 KiB of dynamic shared memory must be opted into, once per kernel.
    static const bool configured = [&] {
      RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes));
      return true;
    }();
    (void)configured;
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
  };
  if (p.causal) {
    run(flash_fwd_kernel<Tr, true>);
  } else {
    run(flash_fwd_kernel<Tr, false>);
  }
}

template <typename T, int kHeadDim>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream) {
  launch_flash_fwd_traits<FwdTraits<T, kHeadDim>>(p, stream);
}

}  // namespace ringattn::detail::flash
