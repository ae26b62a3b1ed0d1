// io/npy_mpi.hpp: collective, sharded .npy reading and writing with MPI-IO.
//
// Each rank reads or writes only its own records. A record is `record_bytes` contiguous bytes
// (a token's H*D values for q/k/v/out, one float for lse). A rank's records are described by
// runs: run j covers records first + i*stride, 0 <= i < count, laid out back to back in the
// rank's local buffer in run order. Runs must be in increasing file order, must not overlap
// (MPI file views require monotone displacements) and must stay inside the array; runs of
// count 0 are ignored; record_bytes must divide the data size; at most INT_MAX records per
// rank. Breaking these rules is an agreed Error(internal) naming the path.
#pragma once

#include <mpi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "io/npy.hpp"

namespace ringattn::io {

struct RecordRun {
  std::int64_t first = 0;   // index of the first record in the file's data section
  std::int64_t count = 0;   // records in the run
  std::int64_t stride = 1;  // records between consecutive records of the run
};

// Collective; every rank must pass the same path (rank 0's is the one read). Rank 0 reads the
// header bytes and the file size and broadcasts them; every rank parses the same bytes, so a
// missing or malformed file gives the same Error(io) everywhere.
NpyHeader npy_read_header(MPI_Comm comm, const std::string& path);

// Collective. Reads this rank's runs into `dst` (sum of counts * record_bytes bytes). A file
// shorter than data_offset + data_bytes is an error on every rank.
// Failures (open, read, short read) are agreed: every rank throws the same Error(io).
void npy_read_records(MPI_Comm comm, const std::string& path, const NpyHeader& header,
                      const std::vector<RecordRun>& runs, std::size_t record_bytes, void* dst);

// Not collective: why this process could not write an output at `path`, or "" if it can. A
// directory, a parent that is missing or not writable; with `replaced` (npy_write_records moves
// a finished temporary over `path`), also an existing file that is not a regular file (a device
// such as /dev/null, a FIFO), which the move would replace instead of writing into.
std::string output_path_problem(const std::string& path, bool replaced);

// Collective. Creates (truncating) `path`, rank 0 writes the header for (dtype, shape), every
// rank writes its runs from `src`. The ranks' runs together should cover the array; records
// no rank writes read back as zeros.
// Failures are agreed: every rank throws the same Error(io).
void npy_write_records(MPI_Comm comm, const std::string& path, NpyDType dtype,
                       const std::vector<std::int64_t>& shape, const std::vector<RecordRun>& runs,
                       std::size_t record_bytes, const void* src);

}  // namespace ringattn::io
