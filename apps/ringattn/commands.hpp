// apps/ringattn/commands.hpp: the subcommands. Each returns the process exit code and throws
// ringattn::Error for failures.
#pragma once

#include <optional>
#include <string>

#include "problem.hpp"

namespace ringattn::cli {

struct RunOptions {
  ProblemOptions problem;
  std::string out_path;
  std::string lse_path;
  std::string dq_path, dk_path, dv_path;  // with --backward
  std::string json_path;
};

struct VerifyOptions {
  ProblemOptions problem;
  std::optional<double> atol;
  std::optional<double> rtol;
  std::string json_path;
};

struct BenchOptions {
  ProblemOptions problem;
  std::int64_t begin = 4096;  // -b: first sequence length
  std::int64_t end = 65536;   // -e: last
  std::int64_t factor = 4;    // -f: multiplier
  bool per_rank = false;      // lengths are per rank rather than total
  std::string causal = "both";
  int warmup = 3;
  int iters = 10;
  double min_time = 0.0;  // --min-time: seconds each timing covers at least (more runs than iters)
  bool check = false;
  std::string json_path;
};

struct InfoOptions {
  std::string json_path;
};

int run_command(Context& ctx, const RunOptions& options);
int verify_command(Context& ctx, const VerifyOptions& options);
int info_command(Context& ctx, const InfoOptions& options);
int bench_command(Context& ctx, const BenchOptions& options);

// "B=1 S=4096 H=8 H_kv=8 D=64 fp32 causal zigzag"
std::string describe(const Problem& p);

}  // namespace ringattn::cli
