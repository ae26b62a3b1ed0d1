// `ringattn run`: the main job. Computes attention for generated or .npy inputs, optionally
// writes O and LSE, and reports time and throughput.
#include <mpi.h>

#include <memory>

#include "commands.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "report.hpp"

namespace ringattn::cli {

std::string describe(const Problem& p) {
  return "B=" + std::to_string(p.batch) + " S=" + std::to_string(p.seq) + " H=" + std::to_string(p.heads) +
         " H_kv=" + std::to_string(p.kv_heads) + " D=" + std::to_string(p.head_dim) + " " + to_string(p.dtype) +
         (p.causal ? " causal " : " non-causal ") + to_string(p.layout) +
         (p.window >= 0 ? " window " + std::to_string(p.window) + (p.sinks > 0 ? " sinks " + std::to_string(p.sinks) : "")
                        : std::string()) +
         (p.attention == AttentionKind::linear
              ? std::string(" linear attention (") + to_string(p.feature_map) +
                    (p.decay.empty() ? "" : ", decay " + std::to_string(p.decay[0])) + ")"
              : "");
}

namespace {

void check_gradients(Context& ctx, const Problem& p, const std::vector<unsigned char>& dq,
                     const std::vector<unsigned char>& dk, const std::vector<unsigned char>& dv) {
  check_finite(ctx, p, "dQ", dq, p.heads);
  check_finite(ctx, p, "dK", dk, p.kv_heads);
  check_finite(ctx, p, "dV", dv, p.kv_heads);
}

}  // namespace

int run_command(Context& ctx, const RunOptions& o) {
  Problem p = load_problem(ctx, o.problem);
  std::vector<unsigned char> out(p.q.size());
  std::vector<float> lse(static_cast<std::size_t>(p.batch * p.heads * p.local_len()));
  AttentionOptions attention = p.attention_options();
  attention.on_step = progress_logger(ctx, "run");

  const bool linear = p.attention == AttentionKind::linear;
  if (linear && !o.lse_path.empty()) {
    throw Error(ErrorCode::invalid_argument, "--lse: linear attention has no LSE", /*on_all_ranks=*/true);
  }
  double seconds = 0.0;  // the slowest rank finishes the job
  std::unique_ptr<ProblemTensors> tensors;
  LocalGradients local_grads;  // --gpus with --backward
  LocalGpuTimes local_times;
  if (p.gpus > 0) {
    local_times = run_on_local_gpus(p, out, lse, &local_grads);
    seconds = local_times.forward_s;
  } else {
    tensors = std::make_unique<ProblemTensors>(ctx, p, out, lse);
    detail::bounded_barrier(ctx.comm(), "the start of the timed forward pass");
    const double start = MPI_Wtime();
    forward(ctx, tensors->q, tensors->k, tensors->v, tensors->out, linear ? TensorView{} : tensors->lse, attention);
    const double mine = MPI_Wtime() - start;
    tensors->download();
    detail::bounded_allreduce(ctx.comm(), &mine, &seconds, 1, MPI_DOUBLE, MPI_MAX, "the slowest rank's time");
  }

  check_finite(ctx, p, "O", out, p.heads);
  if (!linear) check_finite_lse(ctx, p, lse);
  write_outputs(ctx, p, o.out_path, o.lse_path, out, lse);

  // The backward pass: gradients of sum(O * dO) from the forward's O and LSE.
  double backward_seconds = 0.0;
  if (p.backward && p.gpus > 0) {
    backward_seconds = local_times.backward_s;
    check_gradients(ctx, p, local_grads.dq, local_grads.dk, local_grads.dv);
    write_gradients(ctx, p, o.dq_path, o.dk_path, o.dv_path, local_grads.dq, local_grads.dk, local_grads.dv);
  } else if (p.backward) {
    GradientTensors grads(ctx, p);
    detail::bounded_barrier(ctx.comm(), "the start of the timed backward pass");
    const double t0 = MPI_Wtime();
    backward(ctx, tensors->q, tensors->k, tensors->v, tensors->out, linear ? TensorView{} : tensors->lse, grads.dout_view,
             grads.dq_view, grads.dk_view, grads.dv_view, attention);
    const double mine_backward = MPI_Wtime() - t0;
    detail::bounded_allreduce(ctx.comm(), &mine_backward, &backward_seconds, 1, MPI_DOUBLE, MPI_MAX,
                              "the slowest rank's time");
    grads.download();
    check_gradients(ctx, p, grads.dq, grads.dk, grads.dv);
    write_gradients(ctx, p, o.dq_path, o.dk_path, o.dv_path, grads.dq, grads.dk, grads.dv);
  }

  const double tflops = p.flops() / seconds / 1e12;
  if (p.device == DeviceKind::cpu) {
    print0(ctx, "ringattn run: %s, %d ranks x %d threads (cpu)\n", describe(p).c_str(), ctx.size(), ctx.cpu_threads());
  } else if (p.gpus > 0) {
    print0(ctx, "ringattn run: %s, 1 process on %d GPUs (cuda, one thread each)\n", describe(p).c_str(), p.gpus);
  } else {
    print0(ctx, "ringattn run: %s, %d ranks (cuda, one GPU each)\n", describe(p).c_str(), ctx.size());
  }
  const int workers = p.gpus > 0 ? p.gpus : ctx.size();
  print0(ctx, "  time %.4f s   %.3f GFLOP   %.4f TFLOP/s total   %.4f TFLOP/s per %s\n", seconds, p.flops() / 1e9,
         tflops, tflops / workers, p.gpus > 0 ? "GPU" : "rank");
  if (p.backward) {
    // FLOPs of forward + backward: 3.5x the forward's (backward = 2.5x), as PyTorch counts.
    const double both = 3.5 * p.flops() / (seconds + backward_seconds) / 1e12;
    print0(ctx, "  backward %.4f s   forward+backward %.4f TFLOP/s total   %.4f TFLOP/s per %s\n", backward_seconds,
           both, both / workers, p.gpus > 0 ? "GPU" : "rank");
  }
  if (!o.out_path.empty()) print0(ctx, "  wrote O to %s\n", o.out_path.c_str());
  if (!o.dq_path.empty()) print0(ctx, "  wrote dQ to %s\n", o.dq_path.c_str());
  if (!o.dk_path.empty()) print0(ctx, "  wrote dK to %s\n", o.dk_path.c_str());
  if (!o.dv_path.empty()) print0(ctx, "  wrote dV to %s\n", o.dv_path.c_str());
  if (!o.lse_path.empty()) print0(ctx, "  wrote LSE to %s\n", o.lse_path.c_str());

  if (!o.json_path.empty()) {
    nlohmann::json report = {
        {"command", "run"},
        {"version", version()},
        {"problem",
         {{"batch", p.batch}, {"seq", p.seq}, {"heads", p.heads}, {"kv_heads", p.kv_heads}, {"head_dim", p.head_dim},
          {"dtype", to_string(p.dtype)}, {"causal", p.causal}, {"layout", to_string(p.layout)}, {"seed", p.seed}}},
        {"ranks", ctx.size()},
        {"gpus_in_process", p.gpus},
        {"threads_per_rank", ctx.cpu_threads()},
        {"device", to_string(p.device)},
        {"hosts", gather_hostnames(ctx)},
        {"time_s", seconds},
        {"backward_time_s", p.backward ? nlohmann::json(backward_seconds) : nlohmann::json(nullptr)},
        {"flop", p.flops()},
        {"tflops", tflops},
        {"tflops_per_rank", tflops / workers},
        {"environment", relevant_environment()},
    };
    write_json(ctx, o.json_path, report);
  }
  return 0;
}

}  // namespace ringattn::cli
