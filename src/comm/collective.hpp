// comm/collective.hpp: host collectives whose wait is bounded.
//
// A rank that never reaches a collective (stopped, hung, or it skipped the call) left the
// others blocked in MPI for ever. These wrappers post the nonblocking collective and wait for
// it at most as long as the calling thread's innermost CollectiveBound allows (none, or a
// bound of 0: for ever). On expiry they throw Error(timeout) naming the collective, the bound
// and any stopped or vanished rank on this node. The collective stays posted: its buffers
// (the wrapper's own copies of the caller's) are leaked, never freed under it, and the
// communicator must carry no further collective on this rank (the attention calls mark their
// Context's collectives abandoned; the CLI aborts the job).
#pragma once

#include <mpi.h>

#include <cstddef>
#include <string>
#include <vector>

namespace ringattn::detail {

// A collective waits at least this long: the API accepts bounds far below what ranks need to
// arrive at a collective together (a 1 ns bound for ring transfers, in the tests).
inline constexpr double kMinCollectiveBoundSeconds = 1.0;

class CollectiveBound {
 public:
  // seconds <= 0 or not a number: no bound. peer_pids: Context::node_peer_pids, or null.
  explicit CollectiveBound(double seconds, const std::vector<long>* peer_pids = nullptr);
  ~CollectiveBound();
  CollectiveBound(const CollectiveBound&) = delete;
  CollectiveBound& operator=(const CollectiveBound&) = delete;

  // The calling thread's innermost bound, or null.
  static const CollectiveBound* current();
  double seconds() const { return seconds_; }
  const std::vector<long>* peer_pids() const { return peer_pids_; }
  // Whether a collective under this bound (or one nested in it, or under an enclosing bound
  // before this one began) was abandoned at its deadline.
  bool abandoned() const { return abandoned_; }
  void note_abandoned() const;

 private:
  double seconds_;
  const std::vector<long>* peer_pids_;
  const CollectiveBound* outer_;
  mutable bool abandoned_ = false;
};

// MPI_Allreduce, MPI_Allgather, MPI_Bcast, MPI_Gather and MPI_Barrier under the current
// bound. `what` names the collective in the timeout error ("the agreement on a call's
// checks"). Arguments as MPI's (send may be MPI_IN_PLACE for allreduce); contiguous
// datatypes only (their bytes are copied).
void bounded_allreduce(MPI_Comm comm, const void* send, void* recv, int count, MPI_Datatype type, MPI_Op op,
                       const std::string& what);
// MPI_Exscan; recv keeps what it held where MPI leaves it undefined (the first rank). Any
// contiguous datatype (a record of several elements) and user-defined operation.
void bounded_exscan(MPI_Comm comm, const void* send, void* recv, int count, MPI_Datatype type, MPI_Op op,
                    const std::string& what);
void bounded_allgather(MPI_Comm comm, const void* send, int count, MPI_Datatype type, void* recv,
                       const std::string& what);
// MPI_Allgatherv of bytes (counts and displacements in bytes); recv keeps what it held
// outside the gathered ranges.
void bounded_allgatherv(MPI_Comm comm, const void* send, int count, void* recv, const int* counts,
                        const int* displs, const std::string& what);
void bounded_bcast(MPI_Comm comm, void* buffer, int count, MPI_Datatype type, int root, const std::string& what);
void bounded_gather(MPI_Comm comm, const void* send, int count, MPI_Datatype type, void* recv, int root,
                    const std::string& what);
void bounded_barrier(MPI_Comm comm, const std::string& what);
// MPI_Sendrecv of `bytes` bytes with `peer` (not this rank) under `tag`, bounded likewise.
void bounded_sendrecv(MPI_Comm comm, const void* send, std::size_t bytes, void* recv, int peer, int tag,
                      const std::string& what);
// MPI_Comm_idup: on expiry the duplicate's handle is abandoned with the request.
MPI_Comm bounded_comm_dup(MPI_Comm comm, const std::string& what);

}  // namespace ringattn::detail
