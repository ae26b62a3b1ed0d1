// core/cuda_check.hpp: checked CUDA and NCCL calls.
//
// RINGATTN_CUDA_CHECK(cudaMalloc(...)) and RINGATTN_NCCL_CHECK(ncclSend(...)) throw
// ringattn::Error(cuda / nccl) naming the call, file:line, the MPI rank, the host and the
// library's error string (plus ncclGetLastError). The _NOTHROW forms, for destructors, log
// instead.
#pragma once

#include <cuda_runtime_api.h>

namespace ringattn::detail {

void cuda_check(cudaError_t rc, const char* call, const char* file, int line);
void cuda_check_nothrow(cudaError_t rc, const char* call, const char* file, int line) noexcept;
// rc is an ncclResult_t; an int here so that this header needs no nccl.h.
void nccl_check(int rc, const char* call, const char* file, int line);
void nccl_check_nothrow(int rc, const char* call, const char* file, int line) noexcept;

}  // namespace ringattn::detail

#define RINGATTN_CUDA_CHECK(call) ::ringattn::detail::cuda_check((call), #call, __FILE__, __LINE__)
#define RINGATTN_CUDA_CHECK_NOTHROW(call) ::ringattn::detail::cuda_check_nothrow((call), #call, __FILE__, __LINE__)
#define RINGATTN_NCCL_CHECK(call) ::ringattn::detail::nccl_check(static_cast<int>(call), #call, __FILE__, __LINE__)
#define RINGATTN_NCCL_CHECK_NOTHROW(call) \
  ::ringattn::detail::nccl_check_nothrow(static_cast<int>(call), #call, __FILE__, __LINE__)
