// One instantiation per dtype so that builds parallelise.
#include "kernels/cuda/flash_bwd_fused_sm90.cuh"

namespace ringattn::detail::flash {

template void launch_flash_bwd_fused_sm90<__half, 64>(const FlashBwdParams&, cudaStream_t);

}  // namespace ringattn::detail::flash
