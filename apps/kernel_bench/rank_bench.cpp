// rank_bench: one rank's share of a P-rank ring, computed on this one GPU without
// communication. The GPU engines run rank R's plan (its steps, its tasks, the same kernels)
// with every step on the rank's own block (communicate = false: the baseline `ringattn bench`
// divides by for its overlap column), so the figure is the per-GPU compute rate of a P-GPU
// ring before any transfer costs: what splitting the sequence into the plan's tasks costs
// against one task per GPU (P = 1), and an A/B of plan changes, where P GPUs are not at hand.
//   ringattn_rank_bench [--world 2] [--rank 0] [--heads 32] [--kv-heads H] [--head-dim 128]
//                       [--layout zigzag] [--causal] [--backward] [--kernel native] [--iters 3] S...
// Prints per S: the rank's tasks, forward ms, TFLOP/s per GPU (the sequence's FLOPs / P, as
// `ringattn bench` counts them: 4 B S^2 H D, halved when causal); with --backward also
// backward ms and forward+backward TFLOP/s (3.5x the forward's FLOPs).
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "comm/loopback_transport.hpp"
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/cuda_resources.hpp"
#include "engine/cuda_ring_backward.hpp"
#include "engine/cuda_ring_forward.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "ringattn_rank_bench: %s\nusage: ringattn_rank_bench [--world P] [--rank R] [--heads H] [--kv-heads H] "
               "[--head-dim 64|128] [--layout contiguous|zigzag|striped] [--causal] [--backward] "
               "[--kernel auto|native|cudnn] [--iters N] S...\n",
               why.c_str());
  std::exit(2);
}

// Milliseconds per call of fn on `stream`, over `iters` calls after one warm-up.
template <class Fn>
double time_ms(cudaStream_t stream, int iters, Fn&& fn) {
  fn();
  RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  CudaEvent start(true), stop(true);
  RINGATTN_CUDA_CHECK(cudaEventRecord(start, stream));
  for (int i = 0; i < iters; ++i) fn();
  RINGATTN_CUDA_CHECK(cudaEventRecord(stop, stream));
  RINGATTN_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0.0f;
  RINGATTN_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  return ms / iters;
}

}  // namespace

int main(int argc, char** argv) {
  int world = 2, rank = 0, iters = 3;
  std::int64_t heads = 32, kv_heads = 0, dim = 128;
  std::string layout_name = "zigzag", kernel_name = "native";
  bool causal = false, with_backward = false;
  std::vector<std::int64_t> lengths;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "--world") world = std::atoi(value().c_str());
    else if (a == "--rank") rank = std::atoi(value().c_str());
    else if (a == "--heads") heads = std::atoll(value().c_str());
    else if (a == "--kv-heads") kv_heads = std::atoll(value().c_str());
    else if (a == "--head-dim") dim = std::atoll(value().c_str());
    else if (a == "--layout") layout_name = value();
    else if (a == "--kernel") kernel_name = value();
    else if (a == "--iters") iters = std::atoi(value().c_str());
    else if (a == "--causal") causal = true;
    else if (a == "--backward") with_backward = true;
    else if (!a.empty() && a[0] != '-') lengths.push_back(std::atoll(a.c_str()));
    else usage("unknown option " + a);
  }
  if (kv_heads == 0) kv_heads = heads;
  if (lengths.empty()) usage("give at least one sequence length");
  if (world < 1 || rank < 0 || rank >= world) usage("need 0 <= rank < world");
  if (iters < 1 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0) usage("bad --iters, --heads or --kv-heads");
  for (const std::int64_t S : lengths) {
    // Every block as long as the rank's own (each step reuses it): equal shares only.
    if (S < 2 * world || S % (2 * world) != 0) usage("each S must be a multiple of 2 x world");
  }
  try {
    const LayoutKind layout_kind = parse_layout(layout_name);
    const KernelKind kernel = parse_kernel(kernel_name);
    const DType dtype = DType::bf16;
    const std::size_t elem = dtype_size(dtype);
    // One member with nobody to talk to: the engines get a transport but never use it.
    CudaResources resources(0, std::make_shared<LoopbackHub>(1), 0);
    const cudaStream_t stream = resources.compute_stream();
    std::printf("# rank %d of %d on %s, B=1 H=%lld/%lld D=%lld bf16 %s %s, %s kernels, no communication\n", rank, world,
                resources.device_name().c_str(), static_cast<long long>(heads), static_cast<long long>(kv_heads),
                static_cast<long long>(dim), layout_name.c_str(), causal ? "causal" : "full", kernel_name.c_str());
    std::printf("# %9s %6s %10s %9s %10s %12s\n", "S", "tasks", "fwd_ms", "fwd_TF/s", "bwd_ms", "fwd+bwd_TF/s");
    for (const std::int64_t S : lengths) {
      const Layout layout(layout_kind, S, world);
      const RingPlan plan = make_ring_plan(layout, causal ? MaskKind::causal : MaskKind::full, rank);
      std::size_t tasks = 0;
      for (const RingStep& step : plan.steps) tasks += step.tasks.size();
      const std::int64_t n = layout.local_length(rank), B = 1, H = heads, Hk = kv_heads, D = dim;
      const std::vector<std::int64_t> pos = layout.positions(rank);
      auto make = [&](SyntheticTensor t, std::int64_t h) {
        std::vector<unsigned char> host(static_cast<std::size_t>(B * n * h * D) * elem);
        fill_synthetic(7, t, dtype, B, pos, h, D, host.data());
        DeviceBuffer d(host.size());
        RINGATTN_CUDA_CHECK(cudaMemcpy(d.get(), host.data(), host.size(), cudaMemcpyHostToDevice));
        return d;
      };
      DeviceBuffer q = make(SyntheticTensor::q, H), k = make(SyntheticTensor::k, Hk), v = make(SyntheticTensor::v, Hk),
                   dout = make(SyntheticTensor::dout, H);
      DeviceBuffer out(q.bytes()), dq(q.bytes()), dk(k.bytes()), dv(v.bytes());
      DeviceBuffer lse(static_cast<std::size_t>(B * H * n) * sizeof(float));
      auto view = [&](DeviceBuffer& d, std::int64_t h) {
        return TensorView::contiguous(d.get(), dtype, {B, n, h, D}, DeviceKind::cuda, 0);
      };
      const TensorView lse_view = TensorView::contiguous(lse.get(), DType::f32, {B, H, n}, DeviceKind::cuda, 0);
      const AttentionShape shape{B, H, Hk, D};
      const float scale = 1.0f / std::sqrt(static_cast<float>(D));
      CudaRingForward fwd(resources, plan, shape, dtype, n, layout.max_local_length(), kernel);
      const double fwd_ms = time_ms(stream, iters, [&] {
        fwd.run(view(q, H), view(k, Hk), view(v, Hk), view(out, H), lse_view, scale, /*communicate=*/false);
      });
      const double flops = 4.0 * static_cast<double>(B) * static_cast<double>(S) * static_cast<double>(S) *
                           static_cast<double>(H * D) * (causal ? 0.5 : 1.0) / world;
      double bwd_ms = 0.0;
      if (with_backward) {
        CudaRingBackward bwd(resources, plan, shape, dtype, n, layout.max_local_length(), kernel);
        bwd_ms = time_ms(stream, iters, [&] {
          bwd.run(view(q, H), view(k, Hk), view(v, Hk), view(out, H), lse_view, view(dout, H), view(dq, H),
                  view(dk, Hk), view(dv, Hk), scale, /*communicate=*/false);
        });
      }
      std::printf("  %9lld %6zu %10.3f %9.2f", static_cast<long long>(S), tasks, fwd_ms, flops / fwd_ms / 1e9);
      if (with_backward) {
        std::printf(" %10.3f %12.2f\n", bwd_ms, 3.5 * flops / (fwd_ms + bwd_ms) / 1e9);
      } else {
        std::printf(" %10s %12s\n", "-", "-");
      }
    }
  } catch (const Error& e) {
    std::fprintf(stderr, "ringattn_rank_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
