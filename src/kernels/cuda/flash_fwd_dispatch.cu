// Chooses the (dtype, head dim) instantiation of the native flash forward kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>

#include "kernels/cuda/cuda_kernels.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace flash {
template <typename T, int kHeadDim>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream);
}  // namespace flash

bool flash_fwd_supports(DType dtype, std::int64_t head_dim) {
  return (dtype == DType::bf16 || dtype == DType::f16) && (head_dim == 64 || head_dim == 128);
}

void flash_fwd(const FlashFwdParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream) {
  if (!flash_fwd_supports(dtype, head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the native CUDA kernel supports bf16 and fp16 with head_dim 64 "
                                                         "or 128, not ") + to_string(dtype) + " with head_dim " +
                                                 std::to_string(head_dim));
  }
  const bool bf16 = dtype == DType::bf16;
  if (head_dim == 64) {
    bf16 ? flash::launch_flash_fwd<__nv_bfloat16, 64>(p, stream) : flash::launch_flash_fwd<__half, 64>(p, stream);
  } else {
    bf16 ? flash::launch_flash_fwd<__nv_bfloat16, 128>(p, stream) : flash::launch_flash_fwd<__half, 128>(p, stream);
  }
}

}  // namespace ringattn::detail
