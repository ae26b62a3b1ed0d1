// api_bench: what a program embedding ringattn pays per call. Times forward() (and with
// --backward, backward()) through the public C++ API on a borrowed stream, each call checking,
// agreeing, preparing, running and releasing its engine, against the same work on one engine
// prepared once (what `ringattn bench` times). Run under mpirun, one rank per GPU.
//   ringattn_api_bench [--heads 32] [--head-dim 128] [--causal] [--backward] [--iters 10]
//                      [--window W [--sinks N]] S...
// Prints per S (total tokens): ms per call through the API and prepared, and how long the
// host spent inside the API calls (a call that waits for the GPU blocks the host as long as
// the GPU works; one that only enqueues returns at once).
#include <cuda_runtime_api.h>
#include <mpi.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "api/prepared_forward.hpp"
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "ringattn/ringattn.hpp"

using namespace ringattn;

namespace {

[[noreturn]] void usage(const std::string& why) {
  std::fprintf(stderr,
               "ringattn_api_bench: %s\nusage: ringattn_api_bench [--heads H] [--head-dim 64|128] [--causal] "
               "[--backward] [--iters N] [--window W [--sinks N]] S...\n",
               why.c_str());
  std::exit(2);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int H = 32, D = 128, iters = 10, window = -1, sinks = 0;
  bool causal = false, with_backward = false;
  std::vector<std::int64_t> lengths;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] {
      if (i + 1 >= argc) usage(a + " needs a value");
      return std::atoi(argv[++i]);
    };
    if (a == "--heads") {
      H = value();
    } else if (a == "--head-dim") {
      D = value();
    } else if (a == "--iters") {
      iters = value();
    } else if (a == "--window") {
      window = value();
    } else if (a == "--sinks") {
      sinks = value();
    } else if (a == "--causal") {
      causal = true;
    } else if (a == "--backward") {
      with_backward = true;
    } else if (!a.empty() && a[0] != '-') {
      lengths.push_back(std::atoll(a.c_str()));
    } else {
      usage("unknown option " + a);
    }
  }
  if (lengths.empty() || H < 1 || iters < 1) usage("give at least one sequence length");
  int code = 0;
  try {
    cudaStream_t stream = nullptr;
    ContextOptions copt;
    {
      int rank = 0, devices = 1;
      MPI_Comm_rank(MPI_COMM_WORLD, &rank);
      RINGATTN_CUDA_CHECK(cudaGetDeviceCount(&devices));
      RINGATTN_CUDA_CHECK(cudaSetDevice(rank % devices));
      RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
      copt.cuda_device = rank % devices;
      copt.cuda_stream = stream;
    }
    Context ctx(MPI_COMM_WORLD, copt);
    AttentionOptions opt;
    opt.causal = causal;
    opt.layout = window >= 0 ? LayoutKind::contiguous : LayoutKind::zigzag;  // (windows need contiguous)
    opt.window = window;
    opt.sinks = sinks;
    opt.kernel = KernelKind::native;
    if (ctx.rank() == 0) {
      std::printf("# B=1 H=%d D=%d bf16 %s %s, window %d, sinks %d, %d ranks, %d calls each; ms per call%s\n", H, D,
                  causal ? "causal" : "full", window >= 0 ? "contiguous" : "zigzag", window, sinks, ctx.size(), iters,
                  with_backward ? " (forward + backward)" : "");
      std::printf("%10s %12s %12s %14s %14s\n", "S", "api_ms", "prepared_ms", "api_host_ms", "prepared_host");
    }
    for (const std::int64_t S : lengths) {
      const std::int64_t n = S / ctx.size();
      const std::size_t rows = static_cast<std::size_t>(n) * static_cast<std::size_t>(H) * static_cast<std::size_t>(D);
      detail::DeviceBuffer q(rows * 2), k(rows * 2), v(rows * 2), o(rows * 2), lse(static_cast<std::size_t>(H * n) * 4);
      detail::DeviceBuffer dout(rows * 2), dq(rows * 2), dk(rows * 2), dv(rows * 2);
      for (const detail::DeviceBuffer* b : {&q, &k, &v, &dout}) {
        RINGATTN_CUDA_CHECK(cudaMemset(b->get(), 0x3c, b->bytes()));  // bf16 0x3c3c: about 0.0115
      }
      auto view = [&](const detail::DeviceBuffer& b) {
        return TensorView::contiguous(b.get(), DType::bf16, {1, n, H, D}, DeviceKind::cuda, copt.cuda_device);
      };
      const TensorView lv = TensorView::contiguous(lse.get(), DType::f32, {1, H, n}, DeviceKind::cuda, copt.cuda_device);
      auto api_call = [&] {
        forward(ctx, view(q), view(k), view(v), view(o), lv, opt);
        if (with_backward) backward(ctx, view(q), view(k), view(v), view(o), lv, view(dout), view(dq), view(dk), view(dv), opt);
      };
      detail::PreparedForward pf = detail::prepare_forward(ctx, view(q), view(k), view(v), view(o), lv, opt);
      detail::PreparedBackward pb;
      if (with_backward) {
        pb = detail::prepare_backward(ctx, view(q), view(k), view(v), view(o), lv, view(dout), view(dq), view(dk),
                                      view(dv), opt);
      }
      auto prepared_call = [&] {
        pf.run(view(q), view(k), view(v), view(o), lv);
        if (with_backward) pb.run(view(q), view(k), view(v), view(o), lv, view(dout), view(dq), view(dk), view(dv));
      };
      // Host time inside the calls, then the time until the stream has finished them all.
      auto timed = [&](auto&& call, double& host_ms) {
        call();  // warm-up
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
        MPI_Barrier(MPI_COMM_WORLD);
        const double start = now_ms();
        for (int i = 0; i < iters; ++i) call();
        host_ms = (now_ms() - start) / iters;
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
        return (now_ms() - start) / iters;
      };
      double api_host = 0.0, prep_host = 0.0;
      // Alternately, twice each: this machine's clocks drift.
      double api = 0.0, prepared = 0.0;
      for (int round = 0; round < 2; ++round) {
        api += timed(api_call, api_host) / 2;
        prepared += timed(prepared_call, prep_host) / 2;
      }
      if (ctx.rank() == 0) {
        std::printf("%10lld %12.3f %12.3f %14.3f %14.3f\n", static_cast<long long>(S), api, prepared, api_host,
                    prep_host);
      }
    }
    RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn_api_bench: %s\n", e.what());
    code = 1;
  }
  MPI_Finalize();
  return code;
}
