// tests/common/mpi_world.hpp: this process's place in MPI_COMM_WORLD, for tests under mpirun.
#pragma once

#include <mpi.h>

namespace ringattn::testing {

inline int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

inline int world_size() {
  int n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

}  // namespace ringattn::testing
