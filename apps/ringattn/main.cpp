// ringattn: command-line entry point.
//
//   mpirun -np 4 ringattn run [--seq 4096 --heads 8 ... | --q q.npy --k k.npy --v v.npy] [--out o.npy]
//   mpirun -np 4 ringattn verify [...]
//   mpirun -np 4 ringattn info
//   mpirun -np 2 ringattn bench --device cuda -b 16384 -e 262144 -f 4 --heads 32 --head-dim 128
//
// Exit codes: 0 success; 1 an error (printed by every rank, naming the rank) or a failed
// verification; 2 bad command-line usage.
#include <CLI/CLI.hpp>
#include <mpi.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "io/npy_mpi.hpp"
#include "commands.hpp"

namespace {

using namespace ringattn;
using namespace ringattn::cli;

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

void print_error(const std::string& message) {
  // One write() per line: mpirun forwards each rank's stderr in the chunks it reads, and a
  // line written in pieces can come out spliced with another rank's.
  const std::string line = "ringattn: error (rank " + std::to_string(world_rank()) + " of " +
                           std::to_string(world_size()) + "): " + message + "\n";
  std::fflush(stdout);
  if (::write(STDERR_FILENO, line.data(), line.size()) < 0) std::fputs(line.c_str(), stderr);
}

enum class ParseOutcome { ok = 0, help = 1, error = 2 };

int run_cli(int argc, char** argv) {
  CLI::App app{"ringattn: exact attention over a sequence sharded across MPI ranks in a ring"};
  app.require_subcommand(1);
  std::string log_level = "info";
  app.add_option("--log-level", log_level, "trace, debug, info, warn, error or off")
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error", "off"}));

  RunOptions run;
  CLI::App* run_cmd = app.add_subcommand("run", "Compute attention (the main job); writes O/LSE on request");
  add_problem_options(*run_cmd, run.problem);
  run_cmd->add_option("--out", run.out_path, "Write O to this .npy (q's shape and dtype)");
  run_cmd->add_option("--lse", run.lse_path, "Write LSE to this .npy (float32, [H, S] or [B, H, S])");
  run_cmd->add_option("--json", run.json_path, "Write a JSON report here");
  run_cmd->add_option("--dq", run.dq_path, "With --backward: write dQ to this .npy (q's shape and dtype)");
  run_cmd->add_option("--dk", run.dk_path, "With --backward: write dK to this .npy (k's shape and dtype)");
  run_cmd->add_option("--dv", run.dv_path, "With --backward: write dV to this .npy (v's shape and dtype)");

  VerifyOptions verify;
  CLI::App* verify_cmd = app.add_subcommand("verify", "Run, then check every rank's O and LSE against fp64");
  add_problem_options(*verify_cmd, verify.problem);
  verify_cmd->add_option("--atol", verify.atol, "Absolute tolerance on O (default by dtype)")->check(non_negative_finite());
  verify_cmd->add_option("--rtol", verify.rtol, "Relative tolerance on O (default by dtype)")->check(non_negative_finite());
  verify_cmd->add_option("--json", verify.json_path, "Write a JSON report here");

  BenchOptions bench;
  CLI::App* bench_cmd = app.add_subcommand("bench", "Sweep sequence lengths: time, TFLOP/s, comm GB/s, overlap");
  add_problem_options(*bench_cmd, bench.problem);
  bench_cmd->add_option("-b,--begin", bench.begin, "First sequence length")->check(at_least(1));
  bench_cmd->add_option("-e,--end", bench.end, "Last sequence length (>= --begin)")->check(at_least(1));
  bench_cmd->add_option("-f,--factor", bench.factor, "Multiplier between lengths")->check(at_least(2));
  bench_cmd->add_flag("--per-rank", bench.per_rank, "Lengths are per rank instead of total");
  bench_cmd->add_option("--mask", bench.causal, "Which masks: no (full), yes (causal) or both")
      ->check(CLI::IsMember({"no", "yes", "both"}));
  bench_cmd->add_option("--warmup", bench.warmup, "Untimed runs first")->check(at_least(0));
  bench_cmd->add_option("--iters", bench.iters, "Timed runs")->check(at_least(1));
  bench_cmd
      ->add_option("--min-time", bench.min_time,
                   "Seconds each timing covers at least: more timed runs than --iters where needed (under a "
                   "power cap the GPU clock swings about once a second, so shorter timings vary by a few %)")
      ->check(CLI::Validator(
          [](std::string& value) -> std::string {
            try {
              std::size_t used = 0;
              const double x = std::stod(value, &used);
              if (used == value.size() && x >= 0.0 && x <= 3600.0) return {};  // (NaN fails both)
            } catch (const std::exception&) {
            }
            return "must be a number of seconds from 0 to 3600, got '" + value + "'";
          },
          "SECONDS"));
  bench_cmd->add_flag("--check", bench.check, "Compare sampled rows with the fp64 reference (#wrong)");
  bench_cmd->add_option("--json", bench.json_path, "Write the table as JSON here");

  InfoOptions info;
  CLI::App* info_cmd = app.add_subcommand("info", "Ranks, hosts, devices, versions and backends");
  info_cmd->add_option("--json", info.json_path, "Write a JSON report here");

  // Parse on every rank, then agree: ranks launched with different arguments (MPMD) must not
  // go on alone into collectives.
  ParseOutcome outcome = ParseOutcome::ok;
  std::string parse_message;
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp&) {
    outcome = ParseOutcome::help;
  } catch (const CLI::CallForAllHelp&) {
    outcome = ParseOutcome::help;
  } catch (const CLI::ParseError& e) {
    outcome = ParseOutcome::error;
    parse_message = e.what();
  }
  // Every host collective from here on waits at most --timeout for the other ranks (a rank
  // that stopped or hung before the ring ends the job with 124 instead of hanging it). A rank
  // that could not parse its arguments uses the default.
  const double timeout = outcome != ParseOutcome::ok ? ProblemOptions{}.timeout
                         : run_cmd->parsed()         ? run.problem.timeout
                         : verify_cmd->parsed()      ? verify.problem.timeout
                         : bench_cmd->parsed()       ? bench.problem.timeout
                                                     : ProblemOptions{}.timeout;
  detail::CollectiveBound bound(timeout);
  int local = static_cast<int>(outcome), global = 0;
  detail::bounded_allreduce(MPI_COMM_WORLD, &local, &global, 1, MPI_INT, MPI_MAX, "the agreement on the command line");
  if (global == static_cast<int>(ParseOutcome::error)) {
    try {
      detail::agree(MPI_COMM_WORLD, outcome == ParseOutcome::error
                                        ? std::make_exception_ptr(Error(ErrorCode::invalid_argument, parse_message))
                                        : nullptr);
    } catch (const Error& e) {
      if (e.code() == ErrorCode::timeout) throw;  // a peer never arrived: the caller's exit 124
      print_error(std::string(e.what()) + " (run with --help for usage)");
    }
    return 2;
  }
  if (global == static_cast<int>(ParseOutcome::help)) {
    if (world_rank() == 0) {
      const CLI::App* target = app.get_subcommands().empty() ? &app : app.get_subcommands().front();
      std::printf("%s", target->help().c_str());
    }
    return 0;
  }

  auto logger = spdlog::stderr_color_mt("ringattn");
  logger->set_pattern("[ringattn %^%l%$] %v");
  spdlog::set_default_logger(logger);
  // Only rank 0 reports progress; every rank reports errors.
  auto level = spdlog::level::from_str(log_level);
  if (world_rank() != 0 && level < spdlog::level::err) level = spdlog::level::err;
  spdlog::set_level(level);

  // The problem's options are compared where the problem is loaded; the subcommand and its own
  // options here, first: ranks of an MPMD launch that run different commands, or write files
  // on some ranks only, would otherwise wait for each other in different collectives.
  {
    auto text = hash_string;
    auto other = show_other;
    auto show_command = [](std::int64_t v) {
      for (const char* name : {"run", "verify", "bench", "info"}) {
        if (hash_string(name) == v) return std::string(name);
      }
      return std::string("(unknown)");
    };
    auto number = [&](const std::optional<double>& x) { return x ? text(std::to_string(*x)) : 0; };
    const std::string command = run_cmd->parsed()      ? "run"
                                : verify_cmd->parsed() ? "verify"
                                : bench_cmd->parsed()  ? "bench"
                                                       : "info";
    const std::string json = run_cmd->parsed()      ? run.json_path
                             : verify_cmd->parsed() ? verify.json_path
                             : bench_cmd->parsed()  ? bench.json_path
                                                    : info.json_path;
    detail::agree_fingerprint(MPI_COMM_WORLD,
                              {{"the subcommand", text(command), show_command},
                               {"--out", text(run.out_path), other},
                               {"--lse", text(run.lse_path), other},
                               {"--dq", text(run.dq_path), other},
                               {"--dk", text(run.dk_path), other},
                               {"--dv", text(run.dv_path), other},
                               {"--json", text(json), other},
                               {"--atol", number(verify.atol), other},
                               {"--rtol", number(verify.rtol), other},
                               {"--begin", bench.begin},
                               {"--end", bench.end},
                               {"--factor", bench.factor},
                               {"--per-rank", bench.per_rank},
                               {"--mask", text(bench.causal), other},
                               {"--warmup", bench.warmup},
                               {"--iters", bench.iters},
                               {"--min-time", text(std::to_string(bench.min_time)), other},
                               {"--check", bench.check}},
                              "command-line options");
    // Rules between a command's options (the same verdict on every rank: they agree).
    detail::agree_on(MPI_COMM_WORLD, [&] {
      auto invalid = [](const std::string& m) { throw Error(ErrorCode::invalid_argument, m); };
      if (run_cmd->parsed()) {
        const bool grads = !run.dq_path.empty() || !run.dk_path.empty() || !run.dv_path.empty();
        if (grads && !run.problem.backward) invalid("--dq, --dk and --dv write gradients: they need --backward");
        // Each output its own file, none of them an input: a later write would replace an earlier one.
        std::vector<std::pair<const char*, std::string>> files = {
            {"--out", run.out_path}, {"--lse", run.lse_path}, {"--dq", run.dq_path},
            {"--dk", run.dk_path},   {"--dv", run.dv_path},   {"--json", run.json_path},
            {"--q", run.problem.q_path}, {"--k", run.problem.k_path}, {"--v", run.problem.v_path},
            {"--dout", run.problem.dout_path}};
        for (std::size_t i = 0; i < 6; ++i) {
          for (std::size_t j = 0; j < files.size(); ++j) {
            if (i == j || files[i].second.empty() || files[i].second != files[j].second) continue;
            invalid(std::string(files[i].first) + " and " + files[j].first + " name the same file " + files[i].second);
          }
        }
      }
      // Outputs that cannot be written fail now, not after the run (and after earlier outputs
      // were written). The .npy files are written by every rank, the JSON report by rank 0.
      auto writable = [](const char* flag, const std::string& path, bool npy) {
        if (path.empty() || (!npy && world_rank() != 0)) return;
        const std::string problem = io::output_path_problem(path, npy);
        if (!problem.empty()) throw Error(ErrorCode::io, std::string(flag) + " " + path + ": " + problem);
      };
      if (run_cmd->parsed()) {
        for (const auto& [flag, path] : {std::pair{"--out", &run.out_path}, {"--lse", &run.lse_path},
                                         {"--dq", &run.dq_path}, {"--dk", &run.dk_path}, {"--dv", &run.dv_path}}) {
          writable(flag, *path, true);
        }
      }
      writable("--json", json, false);
      if (bench_cmd->parsed() && (!bench.problem.q_path.empty() || !bench.problem.k_path.empty() ||
                                  !bench.problem.v_path.empty() || !bench.problem.dout_path.empty())) {
        invalid("bench sweeps generated inputs over -b .. -e; it takes no --q/--k/--v/--dout (use run --json for "
                "a timed run on files)");
      }
    });
  }

  Context ctx(MPI_COMM_WORLD);
  detail::CollectiveBound naming_peers(timeout, &ctx.node_peer_pids());  // a timeout names a stopped rank
  if (run_cmd->parsed()) {
    note_explicit_options(*run_cmd, run.problem);
    return run_command(ctx, run);
  }
  if (bench_cmd->parsed()) {
    note_explicit_options(*bench_cmd, bench.problem);
    if (bench.problem.causal) bench.causal = "yes";  // --causal alone means the causal mask only
    return bench_command(ctx, bench);
  }
  if (verify_cmd->parsed()) {
    note_explicit_options(*verify_cmd, verify.problem);
    return verify_command(ctx, verify);
  }
  return info_command(ctx, info);
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided);
  int code = 0;
  try {
    code = run_cli(argc, argv);
  } catch (const Error& e) {
    print_error(e.what());
    // A timeout (a peer stopped or hung) ends the job with 124, as timeout(1) does.
    const int failure = e.code() == ErrorCode::timeout ? 124 : 1;
    if (!e.on_all_ranks() && world_size() > 1) {
      // Only this rank failed: the others may be waiting for it in the ring, so end the job.
      MPI_Abort(MPI_COMM_WORLD, failure);
    }
    code = failure;
  } catch (const std::exception& e) {
    print_error(e.what());
    if (world_size() > 1) MPI_Abort(MPI_COMM_WORLD, 1);
    code = 1;
  }
  MPI_Finalize();
  return code;
}
