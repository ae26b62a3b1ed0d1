// `ringattn info`: ranks, hosts, devices, library versions and enabled backends.
#include <CLI/Version.hpp>
#include <mpi.h>
#include <nlohmann/json.hpp>
#include <spdlog/version.h>

#include <fstream>
#include <map>
#include <thread>

#include "commands.hpp"
#include "report.hpp"

#ifndef RINGATTN_WITH_CUDA_SETTING
#define RINGATTN_WITH_CUDA_SETTING "unknown"
#endif

namespace ringattn::cli {

namespace {

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown CPU";
}

std::string mpi_library() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string s(text, static_cast<std::size_t>(len));
  const auto cut = s.find_first_of(",\n");
  return cut == std::string::npos ? s : s.substr(0, cut);
}

}  // namespace

int info_command(Context& ctx, const InfoOptions& o) {
  const std::vector<std::string> hosts = gather_hostnames(ctx);
  std::map<std::string, int> per_host;
  for (const auto& h : hosts) ++per_host[h];
  const std::string spdlog_version = std::to_string(SPDLOG_VER_MAJOR) + "." + std::to_string(SPDLOG_VER_MINOR) + "." +
                                     std::to_string(SPDLOG_VER_PATCH);
  const std::string json_version = std::to_string(NLOHMANN_JSON_VERSION_MAJOR) + "." +
                                   std::to_string(NLOHMANN_JSON_VERSION_MINOR) + "." +
                                   std::to_string(NLOHMANN_JSON_VERSION_PATCH);
#ifdef RINGATTN_HAVE_CUDA
  const std::string cuda = "toolkit found at build time; GPU kernels and NCCL transport not yet implemented";
#else
  const std::string cuda = std::string("not built (RINGATTN_WITH_CUDA=") + RINGATTN_WITH_CUDA_SETTING + ")";
#endif

  print0(ctx, "ringattn %s\n", version());
  print0(ctx, "  ranks            %d on %zu host(s)\n", ctx.size(), per_host.size());
  for (const auto& [host, n] : per_host) print0(ctx, "    %-24s %d rank(s)\n", host.c_str(), n);
  print0(ctx, "  cpu              %s, %u hardware threads, %d threads per rank\n", cpu_model().c_str(),
         std::thread::hardware_concurrency(), ctx.cpu_threads());
  print0(ctx, "  backends         cpu kernel: yes (fp32/fp16/bf16 storage, fp32 compute); transport: MPI\n");
  print0(ctx, "  cuda             %s\n", cuda.c_str());
  print0(ctx, "  MPI              %s (MPI progress from kernel threads: %s)\n", mpi_library().c_str(),
         ctx.mpi_progress_from_threads() ? "yes" : "no");
  print0(ctx, "  libraries        CLI11 %s, spdlog %s, nlohmann-json %s\n", CLI11_VERSION, spdlog_version.c_str(),
         json_version.c_str());
  print0(ctx, "  compiler         %s\n", __VERSION__);

  if (!o.json_path.empty()) {
    nlohmann::json report = {
        {"command", "info"},
        {"version", version()},
        {"ranks", ctx.size()},
        {"hosts", hosts},
        {"cpu", {{"model", cpu_model()}, {"hardware_threads", std::thread::hardware_concurrency()},
                 {"threads_per_rank", ctx.cpu_threads()}}},
        {"backends", {{"cpu", true}, {"cuda", cuda}, {"transport", "mpi"}}},
        {"libraries", {{"mpi", mpi_library()}, {"cli11", CLI11_VERSION}, {"spdlog", spdlog_version},
                       {"nlohmann_json", json_version}, {"compiler", __VERSION__}}},
        {"environment", relevant_environment()},
    };
    write_json(ctx, o.json_path, report);
  }
  return 0;
}

}  // namespace ringattn::cli
