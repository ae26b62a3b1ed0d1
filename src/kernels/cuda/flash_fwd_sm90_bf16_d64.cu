// One instantiation per (dtype, head dim) so that builds parallelise.
#include "kernels/cuda/flash_fwd_launch.cuh"
#include "kernels/cuda/flash_fwd_sm90_ws.cuh"

namespace ringattn::detail::flash {

template void launch_flash_fwd_sm90<__nv_bfloat16, 64>(const FlashFwdParams&, cudaStream_t);
template void launch_flash_fwd_sm90_ws<__nv_bfloat16, 64>(const FlashFwdParams&, cudaStream_t);

}  // namespace ringattn::detail::flash
