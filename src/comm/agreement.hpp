// comm/agreement.hpp: making every rank reach the same verdict.
//
// A bad input on one rank must fail every rank with the same error rather than leave the
// others waiting in a collective. Two tools:
//   agree(comm, outcome)      every rank passes its local outcome (null = success); if any
//                             rank failed, every rank throws the error of the lowest failing
//                             rank, prefixed with that rank.
//   agree_fingerprint(...)    every rank passes the same list of named integer fields; if any
//                             rank differs from rank 0, every rank throws naming the field and
//                             both values.
// Both wait for the other ranks at most as long as the thread's CollectiveBound allows
// (comm/collective.hpp), then throw Error(timeout) on this rank only.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <string>
#include <vector>

namespace ringattn::detail {

void agree(MPI_Comm comm, std::exception_ptr local_outcome);

// Runs `fn` on this rank, then agrees on its outcome (Error, std::bad_alloc and any
// std::exception are caught and shared).
void agree_on(MPI_Comm comm, const std::function<void()>& fn);

struct FingerprintField {
  const char* name;
  std::int64_t value;
  // Renders a value for the error message; null prints the integer.
  std::string (*show)(std::int64_t) = nullptr;
};

// At most kMaxFingerprintFields fields. Returns every rank's values (rank-major), which the
// caller may use for fields that legitimately differ (such as local lengths).
inline constexpr int kMaxFingerprintFields = 32;
std::vector<std::int64_t> agree_fingerprint(MPI_Comm comm, const std::vector<FingerprintField>& fields,
                                            const char* what);

}  // namespace ringattn::detail
