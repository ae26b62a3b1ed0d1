// comm/mpi_util.hpp: checked MPI calls.
//
// RINGATTN_MPI_CHECK(MPI_Isend(...)) throws ringattn::Error(mpi) naming the call, file:line,
// the world rank, the host and MPI_Error_string. The library's communicators use
// MPI_ERRORS_RETURN, so failures arrive here instead of aborting the job.
#pragma once

#include <mpi.h>

#include <cstddef>
#include <string>

namespace ringattn::detail {

void mpi_check(int rc, const char* call, const char* file, int line);

int comm_rank(MPI_Comm comm);
int comm_size(MPI_Comm comm);
std::string host_name();

// MPI counts are ints: large byte ranges travel as several messages of at most this size.
inline constexpr std::size_t kMaxMpiMessageBytes = std::size_t{1} << 30;

}  // namespace ringattn::detail

#define RINGATTN_MPI_CHECK(call) ::ringattn::detail::mpi_check((call), #call, __FILE__, __LINE__)
