#include "core/cuda_check.hpp"

#include <mpi.h>
#include <nccl.h>

#include <cstdio>
#include <string>

#include "comm/mpi_util.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

std::string where(const char* call, const char* file, int line) {
  int rank = -1, initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return std::string(call) + " failed at " + file + ":" + std::to_string(line) + " on rank " + std::to_string(rank) +
         " (" + host_name() + ")";
}

std::string nccl_text(int rc) {
  std::string text = ncclGetErrorString(static_cast<ncclResult_t>(rc));
  const char* last = ncclGetLastError(nullptr);
  if (last != nullptr && *last != '\0') text += std::string(" (") + last + ")";
  return text;
}

}  // namespace

void cuda_check(cudaError_t rc, const char* call, const char* file, int line) {
  if (rc == cudaSuccess) return;
  const ErrorCode code = rc == cudaErrorMemoryAllocation ? ErrorCode::out_of_memory : ErrorCode::cuda;
  throw Error(code, where(call, file, line) + ": " + cudaGetErrorString(rc));
}

void cuda_check_nothrow(cudaError_t rc, const char* call, const char* file, int line) noexcept {
  if (rc == cudaSuccess) return;
  std::fprintf(stderr, "ringattn: %s: %s\n", where(call, file, line).c_str(), cudaGetErrorString(rc));
}

void nccl_check(int rc, const char* call, const char* file, int line) {
  if (rc == ncclSuccess || rc == ncclInProgress) return;
  throw Error(ErrorCode::nccl, where(call, file, line) + ": " + nccl_text(rc));
}

void nccl_check_nothrow(int rc, const char* call, const char* file, int line) noexcept {
  if (rc == ncclSuccess || rc == ncclInProgress) return;
  std::fprintf(stderr, "ringattn: %s: %s\n", where(call, file, line).c_str(), nccl_text(rc).c_str());
}

}  // namespace ringattn::detail
