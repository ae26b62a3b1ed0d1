// `ringattn bench`: sweeps of sequence length, timed like nccl-tests.
//
// For each length and mask: warm-up runs, then --iters timed runs, or as many as fill
// --min-time seconds (CUDA events on GPUs, MPI_Wtime on CPUs), the slowest rank's average.
// Also times the same per-rank block work with no communication (every step computes on the
// rank's own block): overlap efficiency = that time / the ring's time (1.0 means
// communication is completely hidden).
// --check compares sampled rows of every rank (16 rows, first and last head) with the fp64
// reference and counts the elements over tolerance in #wrong.
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <vector>

#include "api/prepared_forward.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "commands.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/reference.hpp"
#include "report.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "engine/cuda_resources.hpp"
#endif

namespace ringattn::cli {

namespace {

struct Timing {
  double ring_ms = 0.0;
  double solo_ms = 0.0;  // 0 where not measured
  int ring_runs = 0, solo_runs = 0;
};

// How many timed runs cover `min_time_s` at `probe_ms` a run (at least `iters`), the most that
// any rank needs: the ranks of a ring must run the same count.
int runs_for(Context& ctx, int iters, double min_time_s, double probe_ms) {
  if (min_time_s <= 0.0) return iters;  // (every rank has the same --min-time: they agreed on it)
  const double want = std::ceil(min_time_s * 1e3 / std::max(probe_ms, 1e-3));
  int n = std::max(iters, static_cast<int>(std::min(want, 1e6)));
  detail::bounded_allreduce(ctx.comm(), MPI_IN_PLACE, &n, 1, MPI_INT, MPI_MAX, "the number of timed runs");
  return n;
}

// Average milliseconds of `iters` runs after `warmup`, the slowest rank's; with `min_time_s`,
// one more untimed run measures how many runs (at least `iters`) fill that time, and `runs`
// says how many were timed. On GPUs at most two runs are in flight, and every wait goes
// through the watchdog (--timeout), so a stalled peer ends the benchmark instead of filling
// the launch queue.
template <class Fn>
double time_runs(Context& ctx, detail::PreparedForward& prepared, int warmup, int iters, double min_time_s, int& runs,
                 Fn&& run_once) {
  double ms = 0.0;
  runs = iters;
#ifdef RINGATTN_HAVE_CUDA
  if (prepared.cuda_stream() != nullptr) {
    const cudaStream_t stream = prepared.cuda_stream();
    for (int i = 0; i < warmup; ++i) {
      run_once();
      prepared.wait_cuda();
    }
    detail::CudaEvent start(true), stop(true), issued[2];
    double probe_ms = 0.0;
    if (min_time_s > 0.0) {
      RINGATTN_CUDA_CHECK(cudaEventRecord(start, stream));
      run_once();
      RINGATTN_CUDA_CHECK(cudaEventRecord(stop, stream));
      prepared.wait_cuda(stop);
      float elapsed = 0.0f;
      RINGATTN_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
      probe_ms = elapsed;
    }
    runs = runs_for(ctx, iters, min_time_s, probe_ms);
    detail::bounded_barrier(ctx.comm(), "the start of a timed run");
    RINGATTN_CUDA_CHECK(cudaEventRecord(start, stream));
    for (int i = 0; i < runs; ++i) {
      if (i >= 2) prepared.wait_cuda(issued[i % 2]);  // run i - 2 has finished
      run_once();
      RINGATTN_CUDA_CHECK(cudaEventRecord(issued[i % 2], stream));
    }
    RINGATTN_CUDA_CHECK(cudaEventRecord(stop, stream));
    prepared.wait_cuda(stop);
    float elapsed = 0.0f;
    RINGATTN_CUDA_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
    ms = elapsed / runs;
  }
#endif
  if (prepared.cpu || prepared.linear) {
    for (int i = 0; i < warmup; ++i) run_once();
    double probe_ms = 0.0;
    if (min_time_s > 0.0) {
      const double t = MPI_Wtime();
      run_once();
      probe_ms = (MPI_Wtime() - t) * 1e3;
    }
    runs = runs_for(ctx, iters, min_time_s, probe_ms);
    detail::bounded_barrier(ctx.comm(), "the start of a timed run");
    const double t0 = MPI_Wtime();
    for (int i = 0; i < runs; ++i) run_once();
    ms = (MPI_Wtime() - t0) * 1e3 / runs;
  }
  double slowest = 0.0;
  detail::bounded_allreduce(ctx.comm(), &ms, &slowest, 1, MPI_DOUBLE, MPI_MAX, "the slowest rank's time");
  return slowest;
}

// Elements of sampled rows (16 per rank; first and last head) over the tolerance.
double count_wrong(Context& ctx, const Problem& p, const std::vector<unsigned char>& out, const std::vector<float>& lse) {
  const std::int64_t n = p.local_len();
  const std::int64_t samples = std::min<std::int64_t>(16, n);
  std::vector<std::int64_t> heads = {0};
  if (p.heads > 1) heads.push_back(p.heads - 1);
  const std::int64_t group = p.heads / p.kv_heads;
  const double scale = p.scale.value_or(1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  // Synthetic values are uniform on [-sqrt(3), sqrt(3)): that bounds |V|.
  const detail::Tolerance tol = detail::output_tolerance(p.dtype, 1.7320508075688772);
  const detail::Tolerance ltol = detail::lse_tolerance();
  const auto D = static_cast<std::size_t>(p.head_dim);
  double wrong = 0.0;
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h : heads) {
      // K and V of this head's KV head for the whole sequence, rounded to the storage dtype.
      const std::int64_t hk = h / group;
      std::vector<float> kv(static_cast<std::size_t>(p.seq) * D * 2);
#pragma omp parallel for
      for (std::int64_t t = 0; t < p.seq; ++t) {
        for (std::size_t d = 0; d < D; ++d) {
          const auto dd = static_cast<std::int64_t>(d);
          kv[static_cast<std::size_t>(t) * D * 2 + d] = detail::round_to(
              p.dtype, detail::synthetic_value(p.seed, detail::SyntheticTensor::k, b, t, hk, dd));
          kv[static_cast<std::size_t>(t) * D * 2 + D + d] = detail::round_to(
              p.dtype, detail::synthetic_value(p.seed, detail::SyntheticTensor::v, b, t, hk, dd));
        }
      }
#pragma omp parallel for reduction(+ : wrong)
      for (std::int64_t j = 0; j < samples; ++j) {
        const std::int64_t i = j * n / samples;
        const std::int64_t pos = p.positions[static_cast<std::size_t>(i)];
        const std::int64_t keys = p.causal ? pos + 1 : p.seq;
        std::vector<double> q(D), o(D, 0.0), s(static_cast<std::size_t>(keys));
        const std::size_t row = static_cast<std::size_t>(((b * n + i) * p.heads + h) * p.head_dim);
        for (std::size_t d = 0; d < D; ++d) q[d] = detail::load_f32(p.dtype, p.q.data(), static_cast<std::int64_t>(row + d));
        double mx = -INFINITY;
        for (std::int64_t t = 0; t < keys; ++t) {
          double dot = 0.0;
          for (std::size_t d = 0; d < D; ++d) dot += q[d] * kv[static_cast<std::size_t>(t) * D * 2 + d];
          s[static_cast<std::size_t>(t)] = dot * scale;
          if (p.window >= 0 && (t < pos - p.window || t > pos + p.window) && t >= p.sinks) {
            s[static_cast<std::size_t>(t)] = -INFINITY;  // outside the window
          }
          mx = std::max(mx, dot * scale);
        }
        double sum = 0.0;
        for (double& x : s) sum += (x = std::exp(x - mx));
        for (std::int64_t t = 0; t < keys; ++t)
          for (std::size_t d = 0; d < D; ++d) o[d] += s[static_cast<std::size_t>(t)] / sum * kv[static_cast<std::size_t>(t) * D * 2 + D + d];
        for (std::size_t d = 0; d < D; ++d) {
          const double got = detail::load_f32(p.dtype, out.data(), static_cast<std::int64_t>(row + d));
          if (!(std::fabs(got - o[d]) <= tol.atol + tol.rtol * std::fabs(o[d]))) wrong += 1.0;
        }
        const double ref_lse = mx + std::log(sum);
        const double got_lse = lse[static_cast<std::size_t>((b * p.heads + h) * n + i)];
        if (!(std::fabs(got_lse - ref_lse) <= ltol.atol + ltol.rtol * std::fabs(ref_lse))) wrong += 1.0;
      }
    }
  }
  double total = 0.0;
  detail::bounded_allreduce(ctx.comm(), &wrong, &total, 1, MPI_DOUBLE, MPI_SUM, "the count of wrong elements");
  return total;
}

std::string device_description(Context& ctx, DeviceKind device) {
#ifdef RINGATTN_HAVE_CUDA
  if (device == DeviceKind::cuda) {
    auto& r = ctx.cuda();
    return "cuda:" + std::to_string(r.device()) + " " + r.device_name();
  }
#endif
  (void)device;
  return "cpu, " + std::to_string(ctx.cpu_threads()) + " threads";
}

#ifdef RINGATTN_HAVE_CUDA
// A profiled run's transfers of one kind, for the comment lines: the hops' time on the
// communication stream (from the moment the compute stream reached each to the end of its
// send/recv; transfers slowed by the compute beside them take longer) and the rate it gives.
std::string transfers_text(const char* what, const detail::TransferProfile& t) {
  if (t.count == 0) return "";
  char text[160];
  std::snprintf(text, sizeof text, "; %s transfers %d, %.3f ms on the communication stream (%.1f GB/s received)", what,
                t.count, t.ms, t.gbps());
  return text;
}

nlohmann::json transfers_json(const detail::TransferProfile& t) {
  return {{"count", t.count}, {"ms", t.ms}, {"bytes_received", t.bytes}};
}

// The mean of two profiled backward runs of the same problem (same steps, same hops).
detail::CudaRingBackward::Breakdown mean_of(const detail::CudaRingBackward::Breakdown& a,
                                            const detail::CudaRingBackward::Breakdown& b) {
  detail::CudaRingBackward::Breakdown m = a;
  m.total_ms = (a.total_ms + b.total_ms) / 2;
  m.other_ms = (a.other_ms + b.other_ms) / 2;
  for (std::size_t i = 0; i < m.step_kernel_ms.size() && i < b.step_kernel_ms.size(); ++i) {
    m.step_kernel_ms[i] = (a.step_kernel_ms[i] + b.step_kernel_ms[i]) / 2;
  }
  m.kv.ms = (a.kv.ms + b.kv.ms) / 2;
  m.sums.ms = (a.sums.ms + b.sums.ms) / 2;
  return m;
}
#endif

}  // namespace

int bench_command(Context& ctx, const BenchOptions& o) {
  if (o.end < o.begin) {
    throw Error(ErrorCode::invalid_argument,
                "bench: -e " + std::to_string(o.end) + " is below -b " + std::to_string(o.begin), /*on_all_ranks=*/true);
  }
  ProblemOptions base = o.problem;
  if (base.gpus > 0) {
    throw Error(ErrorCode::invalid_argument,
                "bench --gpus is not available: run the benchmark under mpirun with one rank per GPU",
                /*on_all_ranks=*/true);
  }
  if (base.attention == "linear" && o.check) {
    throw Error(ErrorCode::invalid_argument, "bench --check compares softmax attention only; use verify --attention linear",
                /*on_all_ranks=*/true);
  }
  const DeviceKind device = base.device == "cuda" ? DeviceKind::cuda : DeviceKind::cpu;
  std::vector<bool> masks;
  if (o.causal == "no" || o.causal == "both") masks.push_back(false);
  if (o.causal == "yes" || o.causal == "both") masks.push_back(true);

  // Preamble: one line per rank (host, pid, device), gathered so that rank 0 prints them.
  const std::string mine = ctx.hostname() + " pid " + std::to_string(getpid()) + " " + device_description(ctx, device);
  std::vector<char> line(256, '\0');
  mine.copy(line.data(), line.size() - 1);
  std::vector<char> lines(line.size() * static_cast<std::size_t>(ctx.size()));
  detail::bounded_gather(ctx.comm(), line.data(), static_cast<int>(line.size()), MPI_CHAR, lines.data(), 0,
                         "the gathering of the ranks' lines");
  char runs_text[96] = "";
  if (o.min_time > 0.0) std::snprintf(runs_text, sizeof runs_text, " (more where needed to time %g s)", o.min_time);
  print0(ctx, "# ringattn bench %s: %d ranks, kernel: %s, %d warm-up + %d timed iterations%s\n", version(), ctx.size(),
         device == DeviceKind::cuda ? ("--kernel " + base.kernel).c_str() : "cpu", o.warmup, o.iters, runs_text);
  for (int r = 0; r < ctx.size(); ++r) print0(ctx, "#   rank %d: %s\n", r, &lines[line.size() * static_cast<std::size_t>(r)]);
  print0(ctx, "# seq = total tokens; TFLOP/s per GPU/rank with 4*B*S^2*H*D (halved when causal%s); comm = bytes "
              "sent by the busiest rank / time; overlap = no-comm time / ring time\n",
         base.attention == "linear" ? "; linear attention: 4*B*S*H*D^2"
                                    : (base.backward ? "; x3.5 for forward+backward" : ""));
  print0(ctx, "# %9s %5s %5s %4s %4s %6s %10s %6s %10s %10s %9s %7s %7s\n", "seq", "batch", "heads", "kv", "dim", "causal",
         "layout", "dtype", "time_ms", "TFLOP/s", "comm_GB/s", "overlap", "#wrong");

  nlohmann::json table = nlohmann::json::array();
  double total_wrong = 0.0;
  std::string kernel_said, backward_said;
  // The lengths -b, -b f, ... up to -e, stopping before one would pass -e (a huge factor
  // wrapped around and benchmarked lengths below -b).
  std::vector<std::int64_t> lengths;
  for (std::int64_t len = o.begin; len <= o.end; len *= o.factor) {
    lengths.push_back(len);
    if (len > o.end / o.factor) break;
  }
  for (const std::int64_t len : lengths) {
    std::int64_t total = len;
    if (o.per_rank && __builtin_mul_overflow(len, static_cast<std::int64_t>(ctx.size()), &total)) {
      throw Error(ErrorCode::invalid_argument, "--per-rank " + std::to_string(len) + " x " +
                                                   std::to_string(ctx.size()) + " ranks overflows the sequence length",
                  /*on_all_ranks=*/true);
    }
    for (bool causal : masks) {
      ProblemOptions opt = base;
      opt.seq = total;
      opt.causal = causal;
      Problem p = load_problem(ctx, opt);
      std::vector<unsigned char> out(p.q.size());
      std::vector<float> lse(static_cast<std::size_t>(p.batch * p.heads * p.local_len()));
      ProblemTensors t(ctx, p, out, lse);
      if (p.attention == AttentionKind::linear) t.lse = TensorView{};  // linear attention has no LSE
      detail::PreparedForward prepared = detail::prepare_forward(ctx, t.q, t.k, t.v, t.out, t.lse, p.attention_options());
#ifdef RINGATTN_HAVE_CUDA
      // Which kernel runs, and why (rank 0's view; once, or when it changes across the sweep).
      if (prepared.cuda && prepared.cuda->kernel_description() != kernel_said) {
        kernel_said = prepared.cuda->kernel_description();
        print0(ctx, "# blocks computed by: %s\n", kernel_said.c_str());
        if (ctx.size() > 1) {
          print0(ctx, "# ring buffers: %s\n",
                 ctx.cuda().ring_buffers_registered() ? "registered with NCCL (send/recv copy peer to peer)"
                                                      : "not registered with NCCL (send/recv stage through its FIFOs)");
        }
      }
#endif

      Timing timing;
#ifdef RINGATTN_HAVE_CUDA
      detail::CudaRingForward::Breakdown breakdown;
      detail::CudaRingBackward::Breakdown bwd_solo, bwd_ring, bwd_solo_runs[2], bwd_ring_runs[2];
#endif
      // With --backward every timed run is a forward and a backward pass.
      std::unique_ptr<GradientTensors> grads;
      detail::PreparedBackward prepared_bwd;
      if (p.backward) {
        grads = std::make_unique<GradientTensors>(ctx, p);
        prepared_bwd = detail::prepare_backward(ctx, t.q, t.k, t.v, t.out, t.lse, grads->dout_view, grads->dq_view,
                                                grads->dk_view, grads->dv_view, p.attention_options());
#ifdef RINGATTN_HAVE_CUDA
        if (prepared_bwd.cuda && prepared_bwd.cuda->kernel_description() != backward_said) {
          backward_said = prepared_bwd.cuda->kernel_description();
          print0(ctx, "# backward blocks computed by: %s\n", backward_said.c_str());
        }
#endif
      }
      auto run_once = [&] {
        prepared.run(t.q, t.k, t.v, t.out, t.lse);
        if (p.backward) {
          prepared_bwd.run(t.q, t.k, t.v, t.out, t.lse, grads->dout_view, grads->dq_view, grads->dk_view,
                           grads->dv_view);
        }
      };
      timing.ring_ms = time_runs(ctx, prepared, o.warmup, o.iters, o.min_time, timing.ring_runs, run_once);
      double bytes = 0.0;
#ifdef RINGATTN_HAVE_CUDA
      if (prepared.cuda) {
        bytes = static_cast<double>(prepared.cuda->bytes_sent_per_run());
        if (prepared_bwd.cuda) bytes += static_cast<double>(prepared_bwd.cuda->bytes_sent_per_run());
        timing.solo_ms = time_runs(ctx, prepared, o.warmup, o.iters, o.min_time, timing.solo_runs, [&] {
          prepared.cuda->run(t.q, t.k, t.v, t.out, t.lse, prepared.scale, false);
          if (prepared_bwd.cuda) {
            prepared_bwd.cuda->run(t.q, t.k, t.v, t.out, t.lse, grads->dout_view, grads->dq_view, grads->dk_view,
                                   grads->dv_view, prepared_bwd.scale, false);
          }
        });
        // The backward pass profiled with and without communication (timing events around each
        // step's kernels and the other work), in the order without, with, with, without, each
        // pair's mean reported: a GPU under its power cap slows as it warms, and one run of each
        // in a fixed order charged that drift to whichever ran second. (--check samples the
        // forward's output, not the gradients: which run comes last does not matter to it.)
        if (prepared_bwd.cuda) {
          auto profile = [&](bool communicate) {
            prepared_bwd.cuda->set_profiling(true);
            prepared_bwd.cuda->run(t.q, t.k, t.v, t.out, t.lse, grads->dout_view, grads->dq_view, grads->dk_view,
                                   grads->dv_view, prepared_bwd.scale, communicate);
            prepared_bwd.cuda->wait();
            prepared_bwd.cuda->set_profiling(false);
            return prepared_bwd.cuda->breakdown();
          };
          bwd_solo_runs[0] = profile(false);
          bwd_ring_runs[0] = profile(true);
          bwd_ring_runs[1] = profile(true);
          bwd_solo_runs[1] = profile(false);
          bwd_solo = mean_of(bwd_solo_runs[0], bwd_solo_runs[1]);
          bwd_ring = mean_of(bwd_ring_runs[0], bwd_ring_runs[1]);
        }
        // One more ring run, profiled (timing events around kernels, merges and copies), which
        // also leaves the ring's result for --check.
        prepared.cuda->set_profiling(true);
        prepared.run(t.q, t.k, t.v, t.out, t.lse);
        prepared.wait_cuda();
        prepared.cuda->set_profiling(false);
        breakdown = prepared.cuda->breakdown();
      }
      if (prepared.cuda_linear) {
        bytes = static_cast<double>(prepared.cuda_linear->bytes_sent_per_run());
        prepared.wait_cuda();
      }
#endif
      if (prepared.cpu) bytes = static_cast<double>(prepared.cpu->bytes_sent());
      // The busiest rank's bytes: ranks send different amounts (sliding windows trim hops).
      detail::bounded_allreduce(ctx.comm(), MPI_IN_PLACE, &bytes, 1, MPI_DOUBLE, MPI_MAX, "the busiest rank's byte count");
      double wrong = -1.0;
      if (o.check) {
        t.download();
        wrong = count_wrong(ctx, p, out, lse);
        total_wrong += wrong;
      }
      const double tflops = (p.backward ? 3.5 : 1.0) * p.flops() / (timing.ring_ms * 1e-3) / 1e12 / ctx.size();
      const double gbps = bytes / (timing.ring_ms * 1e-3) / 1e9;
      const double overlap = timing.solo_ms > 0.0 ? timing.solo_ms / timing.ring_ms : 0.0;
      const std::string overlap_text = timing.solo_ms > 0.0 ? std::to_string(overlap).substr(0, 5) : "-";
      const std::string wrong_text = o.check ? std::to_string(static_cast<long long>(wrong)) : "-";
      // The CPU backward pass's own traffic (K, V with dK, dV) is not counted: no figure then.
      char gbps_text[32] = "-";
      if (!(p.backward && prepared.cpu)) std::snprintf(gbps_text, sizeof gbps_text, "%.2f", gbps);
      print0(ctx, "  %9lld %5lld %5lld %4lld %4lld %6s %10s %6s %10.3f %10.2f %9s %7s %7s\n",
             static_cast<long long>(p.seq), static_cast<long long>(p.batch), static_cast<long long>(p.heads),
             static_cast<long long>(p.kv_heads), static_cast<long long>(p.head_dim), causal ? "yes" : "no",
             to_string(p.layout), to_string(p.dtype), timing.ring_ms, tflops, gbps_text,
             overlap_text.c_str(),
             wrong_text.c_str());
      table.push_back({{"seq", p.seq}, {"backward", p.backward}, {"batch", p.batch}, {"heads", p.heads}, {"kv_heads", p.kv_heads},
                      {"head_dim", p.head_dim}, {"causal", causal}, {"layout", to_string(p.layout)},
                      {"dtype", to_string(p.dtype)}, {"time_ms", timing.ring_ms}, {"solo_ms", timing.solo_ms},
                      {"timed_runs", timing.ring_runs}, {"solo_timed_runs", timing.solo_runs},
                      {"tflops_per_rank", tflops}, {"comm_gbps", gbps}, {"overlap", overlap}, {"wrong", wrong}});
#ifdef RINGATTN_HAVE_CUDA
      if (breakdown.steps > 0) {
        // The forward ring's time outside the block kernels, per step, on rank 0.
        const double n = breakdown.steps;
        print0(ctx,
               "#   forward per step (rank 0, one profiled run of %.3f ms): block kernels %.3f ms, merges %.3f ms, "
               "copies %.3f ms, waits for transfers and gaps %.3f ms%s\n",
               breakdown.total_ms, breakdown.kernel_ms / n, breakdown.merge_ms / n, breakdown.copy_ms / n,
               breakdown.wait_ms() / n, transfers_text("K/V", breakdown.kv).c_str());
        table.back()["forward_step_ms"] = {{"steps", breakdown.steps},
                                           {"kernels", breakdown.kernel_ms / n},
                                           {"merges", breakdown.merge_ms / n},
                                           {"copies", breakdown.copy_ms / n},
                                           {"waits", breakdown.wait_ms() / n},
                                           {"kv_transfers", transfers_json(breakdown.kv)}};
      }
      if (!bwd_ring.step_kernel_ms.empty()) {
        // The backward ring against the same steps without communication, on rank 0: a block
        // kernel slower in the ring than alone lost time to the transfers running beside it.
        auto list = [](const std::vector<double>& ms) {
          std::string text;
          for (double x : ms) text += (text.empty() ? "" : " / ") + std::to_string(x).substr(0, 7);
          return text;
        };
        print0(ctx,
               "#   backward (rank 0, means of two profiled runs of each, in the order without, with, with, without "
               "communication: %.3f ms, %.3f ms without): block kernels "
               "per step %s ms (%s), other work %.3f ms (%.3f), waits for transfers and gaps %.3f ms (%.3f)%s%s\n",
               bwd_ring.total_ms, bwd_solo.total_ms, list(bwd_ring.step_kernel_ms).c_str(),
               list(bwd_solo.step_kernel_ms).c_str(), bwd_ring.other_ms, bwd_solo.other_ms, bwd_ring.wait_ms(),
               bwd_solo.wait_ms(), transfers_text("K/V", bwd_ring.kv).c_str(),
               transfers_text("dK/dV sums", bwd_ring.sums).c_str());
        auto json = [&](const detail::CudaRingBackward::Breakdown& b) {
          return nlohmann::json{{"total", b.total_ms},          {"step_kernels", b.step_kernel_ms},
                                {"other", b.other_ms},          {"waits", b.wait_ms()},
                                {"kv_transfers", transfers_json(b.kv)}, {"sum_transfers", transfers_json(b.sums)}};
        };
        table.back()["backward_ms"] = {
            {"ring", json(bwd_ring)},
            {"without_communication", json(bwd_solo)},
            {"runs_in_order",
             {json(bwd_solo_runs[0]), json(bwd_ring_runs[0]), json(bwd_ring_runs[1]), json(bwd_solo_runs[1])}}};
      }
#endif
    }
  }
  const bool ok = total_wrong <= 0.0;
  print0(ctx, "# %s\n", o.check ? (ok ? "check: all sampled values within tolerance" : "check: WRONG VALUES")
                                : "(no --check: values not verified)");
  if (!o.json_path.empty()) {
    nlohmann::json report = {{"command", "bench"},       {"version", version()}, {"ranks", ctx.size()},
                             {"device", to_string(device)}, {"rows", table},       {"check", o.check},
                             {"environment", relevant_environment()}};
    write_json(ctx, o.json_path, report);
  }
  return ok ? 0 : 1;
}

}  // namespace ringattn::cli
