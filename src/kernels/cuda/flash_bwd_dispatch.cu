// Chooses the kernel and the (dtype, head dim) instantiation of the native flash backward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <string>

#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cuda/flash_bwd_fused_sm90.cuh"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace flash {
template <typename T, int kHeadDim>
void launch_flash_bwd(const FlashBwdParams& p, cudaStream_t stream, bool dq, bool dkv);
// Instantiated in flash_bwd_sm90_{bf16,fp16}_d{64,128}.cu (this file includes the header for
// sm90_bwd_supports only).
extern template void launch_flash_bwd_sm90<__nv_bfloat16, 64>(const FlashBwdParams&, cudaStream_t, bool, bool);
extern template void launch_flash_bwd_sm90<__nv_bfloat16, 128>(const FlashBwdParams&, cudaStream_t, bool, bool);
extern template void launch_flash_bwd_sm90<__half, 64>(const FlashBwdParams&, cudaStream_t, bool, bool);
extern template void launch_flash_bwd_sm90<__half, 128>(const FlashBwdParams&, cudaStream_t, bool, bool);
// flash_bwd_fused_sm90_{bf16,fp16}_d{64,128}.cu.
extern template void launch_flash_bwd_fused_sm90<__nv_bfloat16, 64>(const FlashBwdParams&, cudaStream_t);
extern template void launch_flash_bwd_fused_sm90<__nv_bfloat16, 128>(const FlashBwdParams&, cudaStream_t);
extern template void launch_flash_bwd_fused_sm90<__half, 64>(const FlashBwdParams&, cudaStream_t);
extern template void launch_flash_bwd_fused_sm90<__half, 128>(const FlashBwdParams&, cudaStream_t);
}  // namespace flash

namespace {

// RINGATTN_NATIVE_BWD_KERNEL=mma_sync|wgmma|wgmma_fused: what `automatic` means for the
// backward. Read once.
FlashKernel native_bwd_kernel_override() {
  static const FlashKernel chosen = [] {
    const char* env = std::getenv("RINGATTN_NATIVE_BWD_KERNEL");
    if (env == nullptr || *env == '\0') return FlashKernel::automatic;
    const std::string name(env);
    if (name == "mma_sync") return FlashKernel::mma_sync;
    if (name == "wgmma") return FlashKernel::wgmma;
    if (name == "wgmma_fused") return FlashKernel::wgmma_fused;
    throw Error(ErrorCode::invalid_argument,
                "RINGATTN_NATIVE_BWD_KERNEL=" + name + ": expected mma_sync, wgmma or wgmma_fused (or unset)");
  }();
  return chosen;
}

}  // namespace

FlashKernel flash_bwd_resolve(FlashKernel kernel) {
  if (kernel == FlashKernel::wgmma_ws) kernel = FlashKernel::wgmma;  // the wgmma backward is warp-specialised
  if (kernel == FlashKernel::automatic) kernel = native_bwd_kernel_override();
  if (kernel == FlashKernel::automatic) {
    return flash_fwd_wgmma_available() ? FlashKernel::wgmma_fused : FlashKernel::mma_sync;
  }
  if ((kernel == FlashKernel::wgmma || kernel == FlashKernel::wgmma_fused) && !flash_fwd_wgmma_available()) {
    throw Error(ErrorCode::invalid_argument, "the wgmma backward kernels need a compute capability 9.0 GPU and a build "
                                             "with CMAKE_CUDA_ARCHITECTURES including 90a");
  }
  return kernel;
}

bool flash_bwd_wgmma_supports(const FlashBwdParams& p) { return flash::sm90_bwd_supports(p); }

bool flash_bwd_fused_supports(const FlashBwdParams& p) { return flash::sm90_fused_bwd_supports(p); }

std::int64_t flash_bwd_semaphores(const FlashBwdParams& p) { return flash::fused_bwd_sem_words(p); }

int flash_bwd_head_chunk(const FlashBwdParams& p) { return flash::fused_bwd_head_chunk(p); }

std::pair<int, int> flash_bwd_split(const FlashBwdParams& p, int units, int q_tiles, int sms) {
  const flash::FusedBwdSplit s = flash::fused_bwd_split(p, units, q_tiles, sms);
  return {s.parts, s.split};
}

void flash_bwd(const FlashBwdParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream, FlashBwdPart part,
               FlashKernel kernel) {
  if (!flash_fwd_supports(dtype, head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the native CUDA backward kernel supports bf16 and fp16 with "
                                                         "head_dim 64 or 128, not ") +
                                                 to_string(dtype) + " with head_dim " + std::to_string(head_dim));
  }
  const bool bf16 = dtype == DType::bf16;
  const bool dq = part != FlashBwdPart::dkv, dkv = part != FlashBwdPart::dq;
  kernel = flash_bwd_resolve(kernel);
  // Store mode where no kernel will store: the task's rows zeroed here (kernels that only add,
  // or a task without query rows, which no kernel launches for).
  auto zero_task_rows = [&] {
    const std::size_t pitch = static_cast<std::size_t>(p.acc_len * head_dim) * sizeof(float);
    const std::size_t width = static_cast<std::size_t>(p.kv_len * head_dim) * sizeof(float);
    const std::size_t height = static_cast<std::size_t>(p.batch) * static_cast<std::size_t>(p.kv_heads);
    for (float* acc : {p.dk, p.dv}) {
      RINGATTN_CUDA_CHECK(cudaMemset2DAsync(acc + static_cast<std::int64_t>(p.kv_begin) * head_dim, pitch, 0, width,
                                            height, stream));
    }
  };
  if (p.dkv_store && dkv && p.kv_len > 0 && p.q_len <= 0) {
    zero_task_rows();
    return;
  }
  if (kernel == FlashKernel::wgmma_fused && part == FlashBwdPart::both && flash::sm90_fused_bwd_supports(p)) {
    if (head_dim == 64) {
      bf16 ? flash::launch_flash_bwd_fused_sm90<__nv_bfloat16, 64>(p, stream)
           : flash::launch_flash_bwd_fused_sm90<__half, 64>(p, stream);
    } else {
      bf16 ? flash::launch_flash_bwd_fused_sm90<__nv_bfloat16, 128>(p, stream)
           : flash::launch_flash_bwd_fused_sm90<__half, 128>(p, stream);
    }
    return;
  }
  if (kernel == FlashKernel::wgmma_fused) kernel = FlashKernel::wgmma;  // the other launches run the pair
  if (p.dkv_store && dkv && p.kv_len > 0) zero_task_rows();  // these kernels add
  if (kernel == FlashKernel::wgmma && flash::sm90_bwd_supports(p)) {  // TMA can describe the tensors
    if (head_dim == 64) {
      bf16 ? flash::launch_flash_bwd_sm90<__nv_bfloat16, 64>(p, stream, dq, dkv)
           : flash::launch_flash_bwd_sm90<__half, 64>(p, stream, dq, dkv);
    } else {
      bf16 ? flash::launch_flash_bwd_sm90<__nv_bfloat16, 128>(p, stream, dq, dkv)
           : flash::launch_flash_bwd_sm90<__half, 128>(p, stream, dq, dkv);
    }
    return;
  }
  if (head_dim == 64) {
    bf16 ? flash::launch_flash_bwd<__nv_bfloat16, 64>(p, stream, dq, dkv) : flash::launch_flash_bwd<__half, 64>(p, stream, dq, dkv);
  } else {
    bf16 ? flash::launch_flash_bwd<__nv_bfloat16, 128>(p, stream, dq, dkv) : flash::launch_flash_bwd<__half, 128>(p, stream, dq, dkv);
  }
}

}  // namespace ringattn::detail
