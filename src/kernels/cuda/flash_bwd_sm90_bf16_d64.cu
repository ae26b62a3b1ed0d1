// One instantiation per (dtype, head dim) so that builds parallelise.
#include "kernels/cuda/flash_bwd_sm90.cuh"

namespace ringattn::detail::flash {

template void launch_flash_bwd_sm90<__nv_bfloat16, 64>(const FlashBwdParams&, cudaStream_t, bool, bool);

}  // namespace ringattn::detail::flash
