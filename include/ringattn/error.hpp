// ringattn/error.hpp: the library's one error type.
//
// The library never exits or aborts: every failure is thrown as ringattn::Error with a code
// saying what kind of failure it was. Errors that stem from one rank's inputs are agreed
// across ranks before any transfer, so every rank throws the same message.
#pragma once

#include <stdexcept>
#include <string>

namespace ringattn {

enum class ErrorCode {
  invalid_argument,  // a tensor, option or file that the caller got wrong
  mismatch,          // ranks disagree on shapes or options
  io,                // a file could not be read or written
  mpi,               // an MPI call failed
  cuda,              // a CUDA call failed
  nccl,              // an NCCL call failed
  out_of_memory,     // an allocation failed
  timeout,           // a wait exceeded its bound
  internal,          // a bug in ringattn
};

const char* to_string(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message, bool on_all_ranks = false)
      : std::runtime_error(message), code_(code), on_all_ranks_(on_all_ranks) {}
  ErrorCode code() const noexcept { return code_; }
  // True when every rank of the communicator throws this same error (it was agreed, or
  // derived from data all ranks share); false when only this rank may have failed, so the
  // others may still be waiting for it.
  bool on_all_ranks() const noexcept { return on_all_ranks_; }

 private:
  ErrorCode code_;
  bool on_all_ranks_;
};

}  // namespace ringattn
