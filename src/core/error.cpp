#include "ringattn/error.hpp"

namespace ringattn {

const char* to_string(ErrorCode code) {
  switch (code) {
    case ErrorCode::invalid_argument: return "invalid argument";
    case ErrorCode::mismatch: return "ranks disagree";
    case ErrorCode::io: return "i/o error";
    case ErrorCode::mpi: return "MPI error";
    case ErrorCode::cuda: return "CUDA error";
    case ErrorCode::nccl: return "NCCL error";
    case ErrorCode::out_of_memory: return "out of memory";
    case ErrorCode::timeout: return "timeout";
    case ErrorCode::internal: return "internal error";
  }
  return "unknown error";
}

}  // namespace ringattn
