// Chooses the (dtype, head dim) instantiation of the native flash backward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "kernels/cuda/cuda_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace flash {
template <typename T, int kHeadDim>
void launch_flash_bwd(const FlashBwdParams& p, cudaStream_t stream, bool dq, bool dkv);
}  // namespace flash

void flash_bwd(const FlashBwdParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream, FlashBwdPart part) {
  if (!flash_fwd_supports(dtype, head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the native CUDA backward kernel supports bf16 and fp16 with "
                                                         "head_dim 64 or 128, not ") +
                                                 to_string(dtype) + " with head_dim " + std::to_string(head_dim));
  }
  const bool bf16 = dtype == DType::bf16;
  const bool dq = part != FlashBwdPart::dkv, dkv = part != FlashBwdPart::dq;
  if (head_dim == 64) {
    bf16 ? flash::launch_flash_bwd<__nv_bfloat16, 64>(p, stream, dq, dkv) : flash::launch_flash_bwd<__half, 64>(p, stream, dq, dkv);
  } else {
    bf16 ? flash::launch_flash_bwd<__nv_bfloat16, 128>(p, stream, dq, dkv) : flash::launch_flash_bwd<__half, 128>(p, stream, dq, dkv);
  }
}

}  // namespace ringattn::detail
