// Chooses the kernel and the (dtype, head dim) instantiation of the native flash forward.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <array>
#include <cstdlib>
#include <string>

#include "core/cuda_check.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cuda/flash_fwd_sm90_ws.cuh"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace flash {
template <typename T, int kHeadDim>
void launch_flash_fwd(const FlashFwdParams& p, cudaStream_t stream);
template <typename T, int kHeadDim>
void launch_flash_fwd_sm90(const FlashFwdParams& p, cudaStream_t stream);
// Instantiated in flash_fwd_sm90_{bf16,fp16}_d{64,128}.cu (this file includes the header for
// sm90_ws_supports only).
extern template void launch_flash_fwd_sm90_ws<__nv_bfloat16, 64>(const FlashFwdParams&, cudaStream_t);
extern template void launch_flash_fwd_sm90_ws<__half, 64>(const FlashFwdParams&, cudaStream_t);
extern template void launch_flash_fwd_sm90_ws<__nv_bfloat16, 128>(const FlashFwdParams&, cudaStream_t);
extern template void launch_flash_fwd_sm90_ws<__half, 128>(const FlashFwdParams&, cudaStream_t);
}  // namespace flash

const char* to_string(FlashKernel kernel) {
  switch (kernel) {
    case FlashKernel::automatic: return "automatic";
    case FlashKernel::mma_sync: return "mma.sync";
    case FlashKernel::wgmma: return "wgmma";
    case FlashKernel::wgmma_ws: return "wgmma warp-specialised";
    case FlashKernel::wgmma_fused: return "wgmma single-pass";
  }
  return "?";
}

bool flash_fwd_supports(DType dtype, std::int64_t head_dim) {
  return (dtype == DType::bf16 || dtype == DType::f16) && (head_dim == 64 || head_dim == 128);
}

bool flash_fwd_wgmma_available() {
#if defined(RINGATTN_CUDA_SM90A)
  // Per device, asked once: compute capability 9.0 exactly (sm_90a code runs nowhere else).
  static std::array<int, 64> cached{};  // 0 unknown, 1 yes, 2 no
  int device = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= static_cast<int>(cached.size())) return false;
  if (cached[static_cast<std::size_t>(device)] == 0) {
    int major = 0, minor = 0;
    RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    cached[static_cast<std::size_t>(device)] = major == 9 && minor == 0 ? 1 : 2;
  }
  return cached[static_cast<std::size_t>(device)] == 1;
#else
  return false;
#endif
}

namespace {

// RINGATTN_NATIVE_KERNEL=mma_sync|wgmma|wgmma_ws: what `automatic` means, for A/B runs of the
// native kernels. Read once.
FlashKernel native_kernel_override() {
  static const FlashKernel chosen = [] {
    const char* env = std::getenv("RINGATTN_NATIVE_KERNEL");
    if (env == nullptr || *env == '\0') return FlashKernel::automatic;
    const std::string name(env);
    if (name == "mma_sync") return FlashKernel::mma_sync;
    if (name == "wgmma") return FlashKernel::wgmma;
    if (name == "wgmma_ws") return FlashKernel::wgmma_ws;
    throw Error(ErrorCode::invalid_argument,
                "RINGATTN_NATIVE_KERNEL=" + name + ": expected mma_sync, wgmma or wgmma_ws (or unset)");
  }();
  return chosen;
}

}  // namespace

FlashKernel flash_fwd_resolve(FlashKernel kernel) {
  if (kernel != FlashKernel::automatic) return kernel;
  if (const FlashKernel chosen = native_kernel_override(); chosen != FlashKernel::automatic) {
    if (chosen != FlashKernel::mma_sync && !flash_fwd_wgmma_available()) {
      throw Error(ErrorCode::invalid_argument, std::string("RINGATTN_NATIVE_KERNEL=") + std::getenv("RINGATTN_NATIVE_KERNEL") +
                                                   " needs a compute capability 9.0 GPU and a build with sm_90a code");
    }
    return chosen;
  }
  // The warp-specialised kernel (flash_fwd falls back to the wgmma kernel for tensors TMA
  // cannot describe).
  return flash_fwd_wgmma_available() ? FlashKernel::wgmma_ws : FlashKernel::mma_sync;
}

std::size_t flash_fwd_split_bytes(std::int64_t head_dim, int slots) {
  if (slots <= 0) return 0;
  const auto n = static_cast<std::size_t>(slots);
  return (flash::fwd_split_count_words(slots) + n * flash::fwd_split_slot_floats(static_cast<int>(head_dim))) * sizeof(float);
}

int flash_fwd_split_slots() {
  int device = 0, sms = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return 2 * sms;
}

std::pair<int, int> flash_fwd_split(const FlashFwdParams& params, int units, int key_tiles, int sms) {
  const flash::FwdSplit s = flash::fwd_split_rule(params, units, key_tiles, sms);
  return {s.parts, s.split};
}

bool flash_fwd_auto_prefers_native(std::int64_t head_dim, const BlockTask& t, bool merged) {
  // A band lets query i see keys i + lower_offset .. i + diag_offset.
  if (t.mask == MaskKind::band && t.diag_offset - t.lower_offset + 1 < kFlashFwdAutoNativeRows) return false;
  if (flash_fwd_resolve(FlashKernel::automatic) != FlashKernel::wgmma_ws) return false;
  if (head_dim == 128) return merged || (t.q_len >= kFlashFwdAutoNativeRows && t.kv_len >= kFlashFwdAutoNativeRows);
  if (head_dim == 64) return merged && t.q_len <= kFlashFwdAutoNative64Rows;
  return false;
}

void flash_fwd(const FlashFwdParams& p, DType dtype, std::int64_t head_dim, cudaStream_t stream, FlashKernel kernel) {
  if (!flash_fwd_supports(dtype, head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the native CUDA kernel supports bf16 and fp16 with head_dim 64 "
                                                         "or 128, not ") + to_string(dtype) + " with head_dim " +
                                                 std::to_string(head_dim));
  }
  kernel = flash_fwd_resolve(kernel);
  if (kernel == FlashKernel::wgmma_fused) kernel = FlashKernel::wgmma_ws;  // a backward name
  const bool bf16 = dtype == DType::bf16;
  if (kernel == FlashKernel::wgmma || kernel == FlashKernel::wgmma_ws) {
    if (!flash_fwd_wgmma_available()) {
      throw Error(ErrorCode::invalid_argument, "the wgmma flash kernel needs a compute capability 9.0 GPU and a build with "
                                          "CMAKE_CUDA_ARCHITECTURES including 90a");
    }
    if (kernel == FlashKernel::wgmma_ws && flash::sm90_ws_supports(p)) {  // TMA can describe q, k, v
      if (head_dim == 64) {
        bf16 ? flash::launch_flash_fwd_sm90_ws<__nv_bfloat16, 64>(p, stream)
             : flash::launch_flash_fwd_sm90_ws<__half, 64>(p, stream);
      } else {
        bf16 ? flash::launch_flash_fwd_sm90_ws<__nv_bfloat16, 128>(p, stream)
             : flash::launch_flash_fwd_sm90_ws<__half, 128>(p, stream);
      }
    } else if (head_dim == 64) {
      bf16 ? flash::launch_flash_fwd_sm90<__nv_bfloat16, 64>(p, stream) : flash::launch_flash_fwd_sm90<__half, 64>(p, stream);
    } else {
      bf16 ? flash::launch_flash_fwd_sm90<__nv_bfloat16, 128>(p, stream)
           : flash::launch_flash_fwd_sm90<__half, 128>(p, stream);
    }
    return;
  }
  if (head_dim == 64) {
    bf16 ? flash::launch_flash_fwd<__nv_bfloat16, 64>(p, stream) : flash::launch_flash_fwd<__half, 64>(p, stream);
  } else {
    bf16 ? flash::launch_flash_fwd<__nv_bfloat16, 128>(p, stream) : flash::launch_flash_fwd<__half, 128>(p, stream);
  }
}

}  // namespace ringattn::detail
