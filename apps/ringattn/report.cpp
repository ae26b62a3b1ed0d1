#include "report.hpp"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <fstream>

#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"

extern char** environ;

namespace ringattn::cli {

void print0(const Context& ctx, const char* format, ...) {
  if (ctx.rank() != 0) return;
  va_list args;
  va_start(args, format);
  std::vprintf(format, args);
  va_end(args);
  std::fflush(stdout);
}

std::vector<std::string> gather_hostnames(const Context& ctx) {
  constexpr int kLen = 256;
  std::vector<char> mine(kLen, '\0');
  ctx.hostname().copy(mine.data(), kLen - 1);
  std::vector<char> all(static_cast<std::size_t>(kLen) * static_cast<std::size_t>(ctx.size()));
  detail::bounded_allgather(ctx.comm(), mine.data(), kLen, MPI_CHAR, all.data(), "the gathering of host names");
  std::vector<std::string> hosts;
  for (int r = 0; r < ctx.size(); ++r) hosts.emplace_back(&all[static_cast<std::size_t>(r) * kLen]);
  return hosts;
}

nlohmann::json relevant_environment() {
  nlohmann::json env = nlohmann::json::object();
  static const char* prefixes[] = {"NCCL_", "CUDA_", "OMPI_", "SLURM_", "UCX_"};
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    for (const char* prefix : prefixes) {
      if (entry.rfind(prefix, 0) == 0) {
        const auto eq = entry.find('=');
        env[entry.substr(0, eq)] = eq == std::string::npos ? "" : entry.substr(eq + 1);
        break;
      }
    }
  }
  return env;
}

void write_json(const Context& ctx, const std::string& path, const nlohmann::json& report) {
  detail::agree_on(ctx.comm(), [&] {
    if (ctx.rank() != 0) return;
    std::ofstream f(path);
    if (!f) throw Error(ErrorCode::io, path + ": cannot open for writing");
    f << report.dump(2) << "\n";
    if (!f) throw Error(ErrorCode::io, path + ": write failed");
  });
}

std::function<void(int, int)> progress_logger(const Context& ctx, const char* what) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  auto last = start;
  const bool rank0 = ctx.rank() == 0;
  return [=](int done, int total) mutable {
    if (!rank0) return;
    const auto now = clock::now();
    if (now - last < std::chrono::seconds(2)) return;
    last = now;
    const double elapsed = std::chrono::duration<double>(now - start).count();
    spdlog::info("{}: step {}/{} ({:.0f}%), {:.1f} s", what, done, total, 100.0 * done / total, elapsed);
  };
}

}  // namespace ringattn::cli
