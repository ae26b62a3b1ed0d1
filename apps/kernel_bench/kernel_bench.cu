// kernel_bench: the native flash forward kernel alone on one GPU (no ring, no MPI), for
// kernel tuning. Times init + kernel + finalize (what one rank's forward costs at P = 1)
// with CUDA events; prints TFLOP/s with 4*B*S^2*H*D (halved when causal).
//   kernel_bench [--heads 32] [--head-dim 128] [--dtype bf16] [--iters 10] [--variant N] [--steps N] S...
// --variant picks a kernel and tile shape (bf16, head dim 128 only) for tuning; 0 is the
// library's choice for the device (warp-specialised wgmma on H100/H200, mma.sync elsewhere).
// --steps N runs the kernel N times per forward over the same rows, as N ring steps would,
// so that each step after the first merges into the running result.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cuda/flash_fwd_launch.cuh"
#if defined(RINGATTN_HAVE_CUDNN)
#include "kernels/cudnn/cudnn_sdpa.hpp"
#endif

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using flash::FwdTraits;
using flash::launch_flash_fwd_traits;
using bf16 = __nv_bfloat16;

// Tile shapes to compare: (keys per tile, m16 tiles per warp, warps).
const char* kVariants[] = {"library default", "BN64 MT2 W4", "BN64 MT1 W4", "BN64 MT1 W8", "BN128 MT1 W8",
                           "BN32 MT2 W4", "BN64 MT1 W8 Qregs", "BN128 MT1 W8 Qregs", "BN64 MT1 W4 Qregs",
                           "BN64 MT1 W4 Qregs 3/SM", "BN64 MT1 W4 Qregs 4/SM", "BN64 MT1 W4 3/SM",
                           "BN64 MT2 W4 2/SM", "BN128 MT1 W4 Qregs 2/SM", "default tiles, separate merge kernel",
                           "mma.sync kernel, default tiles", "wgmma BN128 2 warpgroups 1/SM",
                           "wgmma BN64 2 warpgroups 2/SM", "wgmma BN64 3 warpgroups 1/SM",
                           "cuDNN fused attention (O and LSE written directly, no running state)",
                           "wgmma warp-specialised (FlashKernel::wgmma_ws): TMA producer warp, 2 consumer "
                           "warpgroups, BN128, intra-warpgroup overlap"};
constexpr int kCudnnVariant = 19;
constexpr int kWsVariant = 20;

// The alternative to the fused epilogue merge: the kernel writes its block result (o_b
// normalised, lse_b) to scratch, then this merges it into the running state, one warp per row:
//   lse' = max(lse, lse_b) + log1p(exp(-|lse - lse_b|)),  o' = o e^(lse - lse') + o_b e^(lse_b - lse')
__global__ void merge_rows_kernel(const float* block_o, const float* block_lse, float* o_acc, float* lse,
                                  std::int64_t rows, int dim) {
  const std::int64_t row = blockIdx.x * static_cast<std::int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const float lse_b = block_lse[row], old = lse[row];
  float w_old = 0.0f, w_b = 1.0f, merged = lse_b;
  if (old != -INFINITY) {
    merged = fmaxf(old, lse_b) + log1pf(__expf(-fabsf(old - lse_b)));
    w_old = __expf(old - merged);
    w_b = __expf(lse_b - merged);
  }
  for (int d = lane; d < dim; d += 32) {
    const std::int64_t i = row * dim + d;
    o_acc[i] = (old != -INFINITY ? o_acc[i] * w_old : 0.0f) + block_o[i] * w_b;
  }
  if (lane == 0) lse[row] = merged;
}

// Scratch for the separate-merge variant: one block result, (B, H, S, D) and (B, H, S) fp32.
struct Scratch {
  DeviceBuffer o, lse;
};

void launch_variant(int variant, const FlashFwdParams& p, DType dtype, std::int64_t dim, cudaStream_t s,
                    Scratch& scratch) {
  switch (variant) {
    case 1: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 2, 4>>(p, s);
    case 2: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4>>(p, s);
    case 3: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 8>>(p, s);
    case 4: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 128, 1, 8>>(p, s);
    case 5: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 32, 2, 4>>(p, s);
    case 6: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 8, true>>(p, s);
    case 7: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 128, 1, 8, true>>(p, s);
    case 8: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4, true>>(p, s);
    case 9: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4, true, 3>>(p, s);
    case 10: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4, true, 4>>(p, s);
    case 11: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4, false, 3>>(p, s);
    case 12: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 2, 4, false, 2>>(p, s);
    case 13: return launch_flash_fwd_traits<FwdTraits<bf16, 128, 128, 1, 4, true, 2>>(p, s);
    case 14: {
      // Block result to scratch, then the merge kernel.
      const std::int64_t rows = static_cast<std::int64_t>(p.batch) * p.heads * p.s_q;
      FlashFwdParams block = p;
      block.o_acc = scratch.o.as<float>();
      block.lse = scratch.lse.as<float>();
      launch_flash_fwd_traits<FwdTraits<bf16, 128, 64, 1, 4, true, 1, false>>(block, s);
      merge_rows_kernel<<<static_cast<unsigned>((rows + 7) / 8), 256, 0, s>>>(scratch.o.as<float>(), scratch.lse.as<float>(),
                                                                         p.o_acc, p.lse, rows, static_cast<int>(dim));
      RINGATTN_CUDA_CHECK(cudaGetLastError());
      return;
    }
    case 15: return flash_fwd(p, dtype, dim, s, FlashKernel::mma_sync);
    case 16: return flash::launch_flash_fwd_sm90_traits<flash::Sm90Traits<bf16, 128, 128, 2, 1>>(p, s);
    case 17: return flash::launch_flash_fwd_sm90_traits<flash::Sm90Traits<bf16, 128, 64, 2, 2>>(p, s);
    case 18: return flash::launch_flash_fwd_sm90_traits<flash::Sm90Traits<bf16, 128, 64, 3, 1>>(p, s);
    case kWsVariant: return flash_fwd(p, dtype, dim, s, FlashKernel::wgmma_ws);
    default: return flash_fwd(p, dtype, dim, s);
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::int64_t heads = 32, dim = 128;
  int iters = 10;
  int variant = 0;
  int steps = 1;
  DType dtype = DType::bf16;
  std::vector<std::int64_t> seqs;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--heads" && i + 1 < argc) heads = std::atoll(argv[++i]);
    else if (a == "--head-dim" && i + 1 < argc) dim = std::atoll(argv[++i]);
    else if (a == "--iters" && i + 1 < argc) iters = std::atoi(argv[++i]);
    else if (a == "--dtype" && i + 1 < argc) dtype = parse_dtype(argv[++i]);
    else if (a == "--variant" && i + 1 < argc) variant = std::atoi(argv[++i]);
    else if (a == "--steps" && i + 1 < argc) steps = std::max(1, std::atoi(argv[++i]));
    else seqs.push_back(std::atoll(a.c_str()));
  }
  if (seqs.empty()) seqs = {4096, 16384, 65536};
  if (cuda_device_count() == 0) {
    std::fprintf(stderr, "kernel_bench: no CUDA device\n");
    return 1;
  }
  cudaDeviceProp prop{};
  RINGATTN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  if (variant < 0 || variant >= static_cast<int>(sizeof(kVariants) / sizeof(kVariants[0])) ||
      (variant > 0 && (dtype != DType::bf16 || dim != 128))) {
    std::fprintf(stderr, "kernel_bench: variant %d is not available for %s, head dim %lld\n", variant, to_string(dtype),
                 static_cast<long long>(dim));
    return 2;
  }
#if !defined(RINGATTN_HAVE_CUDNN)
  if (variant == kCudnnVariant) {
    std::fprintf(stderr, "kernel_bench: built without cuDNN\n");
    return 2;
  }
#endif
  if (variant >= 16 && variant != kCudnnVariant && !flash_fwd_wgmma_available()) {
    std::fprintf(stderr, "kernel_bench: variant %d needs the wgmma kernel (compute capability 9.0, sm_90a build)\n",
                 variant);
    return 2;
  }
  std::printf("# kernel_bench: %s, B=1 H=%lld D=%lld %s, %d iterations after 2 warm-up, %d step(s), default kernel %s, "
              "tiles: %s\n",
              prop.name, static_cast<long long>(heads), static_cast<long long>(dim), to_string(dtype), iters, steps,
              to_string(flash_fwd_resolve(FlashKernel::automatic)), kVariants[variant]);
  std::printf("# %8s %7s %10s %10s %12s\n", "seq", "causal", "time_ms", "TFLOP/s", "max|diff|");
  CudaStream stream;
  CudaEvent start(true), stop(true);
  for (std::int64_t S : seqs) {
    const std::size_t elems = static_cast<std::size_t>(S * heads * dim);
    DeviceBuffer q(elems * 2), k(elems * 2), v(elems * 2), out(elems * 2);
    DeviceBuffer o_acc(elems * 4), lse(static_cast<std::size_t>(S * heads) * 4);
    Scratch scratch;
    if (variant == 14) scratch = Scratch{DeviceBuffer(elems * 4), DeviceBuffer(static_cast<std::size_t>(S * heads) * 4)};
    // Random inputs in [-1, 1): the variant's output is compared with the library default's.
    {
      std::vector<std::uint16_t> host(elems);
      std::uint64_t state = 0x9e3779b97f4a7c15ull;
      for (DeviceBuffer* buf : {&q, &k, &v}) {
        for (auto& x : host) {
          state = state * 6364136223846793005ull + 1442695040888963407ull;
          const float f = static_cast<float>(static_cast<std::int32_t>(state >> 33) - (1 << 30)) * 0x1p-30f;
          x = dtype == DType::bf16 ? f32_to_bf16(f) : f32_to_f16(f);
        }
        RINGATTN_CUDA_CHECK(cudaMemcpy(buf->get(), host.data(), elems * 2, cudaMemcpyHostToDevice));
      }
    }
    for (bool causal : {false, true}) {
      FlashFwdParams p;
      p.q = q.get();
      p.k = k.get();
      p.v = v.get();
      p.q_batch_stride = p.kv_batch_stride = S * heads * dim;
      p.q_row_stride = p.kv_row_stride = heads * dim;
      p.q_head_stride = p.kv_head_stride = dim;
      p.o_acc = o_acc.as<float>();
      p.lse = lse.as<float>();
      p.s_q = S;
      p.heads = static_cast<int>(heads);
      p.q_len = p.kv_len = static_cast<int>(S);
      p.causal = causal;
      p.scale_log2 = static_cast<float>(1.4426950408889634 / std::sqrt(static_cast<double>(dim)));
      const TensorView out_view = TensorView::contiguous(out.get(), dtype, {1, S, heads, dim}, DeviceKind::cuda);
#if defined(RINGATTN_HAVE_CUDNN)
      static CudnnSdpa sdpa;
      CudnnSdpaProblem cp;
      cp.dtype = dtype;
      cp.heads = cp.kv_heads = heads;
      cp.q_len = cp.kv_len = S;
      cp.head_dim = dim;
      cp.q_batch_stride = cp.kv_batch_stride = cp.o_batch_stride = S * heads * dim;
      cp.q_row_stride = cp.kv_row_stride = cp.o_row_stride = heads * dim;
      cp.q_head_stride = cp.kv_head_stride = cp.o_head_stride = dim;
      cp.causal = causal;
#endif
      auto once = [&] {
        if (variant == kCudnnVariant) {
#if defined(RINGATTN_HAVE_CUDNN)
          sdpa.forward(cp, q.get(), k.get(), v.get(), out.get(), lse.as<float>(), p.scale_log2 / 1.4426950408889634f, stream);
#endif
          return;
        }
        fill_neg_inf(lse.as<float>(), S * heads, stream);
        for (int step = 0; step < steps; ++step) launch_variant(variant, p, dtype, dim, stream, scratch);
        finalize_output(o_acc.as<float>(), lse.as<float>(), out_view, TensorView{}, stream);
      };
      for (int w = 0; w < 2; ++w) once();
      RINGATTN_CUDA_CHECK(cudaEventRecord(start, stream));
      for (int it = 0; it < iters; ++it) once();
      RINGATTN_CUDA_CHECK(cudaEventRecord(stop, stream));
      RINGATTN_CUDA_CHECK(cudaEventSynchronize(stop));
      float ms = 0.0f;
      RINGATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
      ms /= static_cast<float>(iters);
      // Max |difference| from the library's default kernel on the same inputs.
      double max_diff = 0.0;
      if (variant != 0 && variant != kCudnnVariant) {
        std::vector<float> got(elems), want(elems);
        RINGATTN_CUDA_CHECK(cudaMemcpy(got.data(), o_acc.get(), elems * 4, cudaMemcpyDeviceToHost));
        fill_neg_inf(lse.as<float>(), S * heads, stream);
        for (int step = 0; step < steps; ++step) flash_fwd(p, dtype, dim, stream);
        RINGATTN_CUDA_CHECK(cudaMemcpyAsync(want.data(), o_acc.get(), elems * 4, cudaMemcpyDeviceToHost, stream));
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
        for (std::size_t i = 0; i < elems; ++i) max_diff = std::max(max_diff, static_cast<double>(std::fabs(got[i] - want[i])));
      }
      const double flops = 4.0 * static_cast<double>(S) * static_cast<double>(S) * static_cast<double>(heads * dim) /
                           (causal ? 2.0 : 1.0) * steps;
      std::printf("  %8lld %7s %10.3f %10.1f %12.2e\n", static_cast<long long>(S), causal ? "yes" : "no", ms,
                  flops / (ms * 1e-3) / 1e12, max_diff);
    }
  }
  return 0;
}
