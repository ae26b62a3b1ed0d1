#include "comm/mpi_util.hpp"

#include <unistd.h>

#include <array>

#include "ringattn/error.hpp"

namespace ringattn::detail {

std::string host_name() {
  std::array<char, 256> buf{};
  if (gethostname(buf.data(), buf.size() - 1) != 0) return "unknown-host";
  return buf.data();
}

void mpi_check(int rc, const char* call, const char* file, int line) {
  if (rc == MPI_SUCCESS) return;
  std::array<char, MPI_MAX_ERROR_STRING> text{};
  int len = 0;
  MPI_Error_string(rc, text.data(), &len);
  int world_rank = -1;
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  throw Error(ErrorCode::mpi, std::string(call) + " failed at " + file + ":" + std::to_string(line) +
                                  " on rank " + std::to_string(world_rank) + " (" + host_name() +
                                  "): " + std::string(text.data(), static_cast<std::size_t>(len)));
}

int comm_rank(MPI_Comm comm) {
  int r = 0;
  RINGATTN_MPI_CHECK(MPI_Comm_rank(comm, &r));
  return r;
}

int comm_size(MPI_Comm comm) {
  int n = 0;
  RINGATTN_MPI_CHECK(MPI_Comm_size(comm, &n));
  return n;
}

}  // namespace ringattn::detail
