#include "comm/agreement.hpp"

#include <array>
#include <climits>
#include <cstring>
#include <new>

#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

struct Failure {
  ErrorCode code = ErrorCode::internal;
  std::string message;
};

Failure describe(std::exception_ptr outcome) {
  try {
    std::rethrow_exception(outcome);
  } catch (const Error& e) {
    return {e.code(), e.what()};
  } catch (const std::bad_alloc&) {
    return {ErrorCode::out_of_memory, "out of host memory"};
  } catch (const std::exception& e) {
    return {ErrorCode::internal, e.what()};
  } catch (...) {
    return {ErrorCode::internal, "unknown exception"};
  }
}

}  // namespace

void agree(MPI_Comm comm, std::exception_ptr local_outcome) {
  // After an abandoned collective (a rank that never arrived) nothing more is agreed: this
  // rank's own error, the timeout itself, leaves as it is.
  const CollectiveBound* bound = CollectiveBound::current();
  if (bound != nullptr && bound->abandoned() && local_outcome) std::rethrow_exception(local_outcome);
  const int rank = comm_rank(comm);
  const int size = comm_size(comm);
  const Failure mine = local_outcome ? describe(local_outcome) : Failure{};
  // One reduction answers three questions: who failed first, how many failed, and whether
  // they all failed the same way (then the message needs no rank to explain it).
  std::uint64_t hash = 1469598103934665603ull;  // FNV-1a of the message
  for (unsigned char c : mine.message) hash = (hash ^ c) * 1099511628211ull;
  long long local[4] = {local_outcome ? rank : size, local_outcome ? 1 : 0,
                        local_outcome ? static_cast<long long>(hash >> 1) : LLONG_MAX,
                        local_outcome ? -static_cast<long long>(hash >> 1) : LLONG_MAX};
  long long global[4];
  bounded_allreduce(comm, local, global, 4, MPI_LONG_LONG, MPI_MIN, "the agreement on a call's checks");
  const int first_failed = static_cast<int>(global[0]);
  if (first_failed == size) return;
  const bool everyone_alike = global[1] == 1 && global[2] == -global[3];

  // The lowest failing rank shares its error; a fixed-size buffer keeps it to one broadcast.
  constexpr std::size_t kMaxMessage = 2048;
  struct {
    int code;
    char text[kMaxMessage];
  } packet{};
  if (rank == first_failed) {
    packet.code = static_cast<int>(mine.code);
    std::strncpy(packet.text, mine.message.c_str(), kMaxMessage - 1);
  }
  bounded_bcast(comm, &packet, static_cast<int>(sizeof(packet)), MPI_BYTE, first_failed, "the sharing of an error");
  packet.text[kMaxMessage - 1] = '\0';
  std::string message = packet.text;
  if (size > 1 && !everyone_alike) message = "rank " + std::to_string(first_failed) + ": " + message;
  throw Error(static_cast<ErrorCode>(packet.code), message, /*on_all_ranks=*/true);
}

void agree_on(MPI_Comm comm, const std::function<void()>& fn) {
  std::exception_ptr outcome;
  try {
    fn();
  } catch (...) {
    outcome = std::current_exception();
  }
  agree(comm, outcome);
}

std::vector<std::int64_t> agree_fingerprint(MPI_Comm comm, const std::vector<FingerprintField>& fields,
                                            const char* what) {
  if (fields.size() > static_cast<std::size_t>(kMaxFingerprintFields) - 1) {
    throw Error(ErrorCode::internal, "fingerprint has too many fields");
  }
  // Slot 0 holds the field count so that ranks running different builds are caught too.
  std::array<std::int64_t, kMaxFingerprintFields> mine{};
  mine[0] = static_cast<std::int64_t>(fields.size());
  for (std::size_t i = 0; i < fields.size(); ++i) mine[i + 1] = fields[i].value;

  const int size = comm_size(comm);
  std::vector<std::int64_t> all(static_cast<std::size_t>(size) * kMaxFingerprintFields);
  bounded_allgather(comm, mine.data(), kMaxFingerprintFields, MPI_INT64_T, all.data(),
                    std::string("the comparison of ") + what);
  auto at = [&](int r, std::size_t slot) { return all[static_cast<std::size_t>(r) * kMaxFingerprintFields + slot]; };
  for (int r = 1; r < size; ++r) {
    if (at(r, 0) != at(0, 0)) {
      throw Error(ErrorCode::mismatch, std::string("ranks disagree on ") + what + ": rank " + std::to_string(r) +
                                           " runs a different ringattn build than rank 0",
                  /*on_all_ranks=*/true);
    }
    for (std::size_t i = 0; i < fields.size(); ++i) {
      const std::int64_t theirs = at(r, i + 1);
      const std::int64_t ours = at(0, i + 1);
      if (theirs == ours) continue;
      auto show = [&](std::int64_t v) { return fields[i].show ? fields[i].show(v) : std::to_string(v); };
      throw Error(ErrorCode::mismatch, std::string("ranks disagree on ") + what + ": rank " + std::to_string(r) +
                                           " has " + fields[i].name + "=" + show(theirs) + " but rank 0 has " +
                                           fields[i].name + "=" + show(ours),
                  /*on_all_ranks=*/true);
    }
  }
  std::vector<std::int64_t> values(static_cast<std::size_t>(size) * fields.size());
  for (int r = 0; r < size; ++r) {
    for (std::size_t i = 0; i < fields.size(); ++i) values[static_cast<std::size_t>(r) * fields.size() + i] = at(r, i + 1);
  }
  return values;
}

}  // namespace ringattn::detail
