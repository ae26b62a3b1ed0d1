// `ringattn info`: ranks, hosts, devices, library versions and enabled backends.
#include <CLI/Version.hpp>
#include <mpi.h>
#include <nlohmann/json.hpp>
#include <spdlog/version.h>

#include <fstream>
#include <map>
#include <thread>

#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "commands.hpp"
#include "report.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include <cuda_runtime_api.h>
#include <nccl.h>

#include "kernels/cudnn/cudnn_sdpa.hpp"

#include "core/cuda_raii.hpp"
#endif

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

// The GPUs this process sees ("2 GPUs: NVIDIA H200, NVIDIA H200"), without creating contexts
// beyond what cudaGetDeviceProperties needs.
std::string local_gpus() {
#ifdef RINGATTN_HAVE_CUDA
  const int count = detail::cuda_device_count();
  if (count == 0) return "no CUDA device visible";
  std::string text = std::to_string(count) + " GPU" + (count > 1 ? "s: " : ": ");
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
    text += (d ? ", " : "") + std::string(prop.name);
  }
  return text;
#else
  return "no CUDA backend in this build";
#endif
}

std::string cuda_description() {
#ifdef RINGATTN_HAVE_CUDA
  int runtime = 0, driver = 0, nccl = 0;
  cudaRuntimeGetVersion(&runtime);
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  ncclGetVersion(&nccl);
  auto cuda_version = [](int v) { return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10); };
#ifdef RINGATTN_HAVE_CUDNN
  // cudnnGetVersion: major * 10000 + minor * 100 + patch (cuDNN 9).
  const std::int64_t cudnn = detail::cudnn_version();
  const std::string kernels = "cuDNN " + std::to_string(cudnn / 10000) + "." + std::to_string((cudnn / 100) % 100) + "." +
                              std::to_string(cudnn % 100) +
                              " fused attention (--kernel auto picks it but for the forward blocks where the native kernel is measured faster on H100/H200), native flash kernels (warp-specialised "
                              "wgmma on H100/H200, mma.sync elsewhere; bf16/fp16, head dim 64/128)";
#else
  const std::string kernels =
      "native flash kernels (warp-specialised wgmma on H100/H200, mma.sync elsewhere; bf16/fp16, head dim 64/128); "
      "no cuDNN in this build";
#endif
  return kernels + " + NCCL ring; CUDA runtime " + cuda_version(runtime) +
         ", driver " + (driver ? cuda_version(driver) : std::string("none")) + ", NCCL " + std::to_string(nccl / 10000) +
         "." + std::to_string((nccl / 100) % 100) + "." + std::to_string(nccl % 100);
#else
  return std::string("not built (RINGATTN_WITH_CUDA=") + RINGATTN_WITH_CUDA_SETTING + ")";
#endif
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
  const std::string cuda = cuda_description();
  // Every rank's GPUs, gathered so that rank 0 can print them per host.
  const std::string mine = ctx.hostname() + ": " + local_gpus();
  std::vector<char> line(512, '\0');
  mine.copy(line.data(), line.size() - 1);
  std::vector<char> lines(line.size() * static_cast<std::size_t>(ctx.size()));
  detail::bounded_gather(ctx.comm(), line.data(), static_cast<int>(line.size()), MPI_CHAR, lines.data(), 0,
                         "the gathering of the ranks' lines");
  std::map<std::string, int> gpu_lines;  // one line per host
  if (ctx.rank() == 0) {
    for (int r = 0; r < ctx.size(); ++r) gpu_lines[&lines[line.size() * static_cast<std::size_t>(r)]] = r;
  }

  print0(ctx, "ringattn %s\n", version());
  print0(ctx, "  ranks            %d on %zu host(s)\n", ctx.size(), per_host.size());
  for (const auto& [host, n] : per_host) print0(ctx, "    %-24s %d rank(s)\n", host.c_str(), n);
  print0(ctx, "  cpu              %s, %u hardware threads, %d threads per rank\n", cpu_model().c_str(),
         std::thread::hardware_concurrency(), ctx.cpu_threads());
  print0(ctx, "  backends         cpu kernel: yes (fp32/fp16/bf16 storage, fp32 compute); transports: MPI (cpu), NCCL (cuda)\n");
  print0(ctx, "  cuda             %s\n", cuda.c_str());
  for (const auto& [text, rank] : gpu_lines) print0(ctx, "    %s\n", text.c_str());
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
        {"backends", {{"cpu", true}, {"cuda", cuda}}},
        {"gpus", local_gpus()},
        {"libraries", {{"mpi", mpi_library()}, {"cli11", CLI11_VERSION}, {"spdlog", spdlog_version},
                       {"nlohmann_json", json_version}, {"compiler", __VERSION__}}},
        {"environment", relevant_environment()},
    };
    write_json(ctx, o.json_path, report);
  }
  return 0;
}

}  // namespace ringattn::cli
