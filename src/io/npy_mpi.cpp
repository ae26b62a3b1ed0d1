#include "io/npy_mpi.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <utility>
#include <vector>

#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "ringattn/error.hpp"

namespace ringattn::io {

namespace {

std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return "MPI error code " + std::to_string(rc);
  return std::string(text, static_cast<std::size_t>(len));
}

// Every rank calls this with its own rc of the same collective step, so all ranks throw the
// same Error(io) (that of the lowest failing rank) or none does.
void agree_rc(MPI_Comm comm, int rc, const std::string& what) {
  std::exception_ptr outcome;
  if (rc != MPI_SUCCESS) {
    outcome = std::make_exception_ptr(Error(ErrorCode::io, what + ": " + mpi_error_text(rc)));
  }
  detail::agree(comm, outcome);
}

// Owns a datatype so that error paths free it too.
class Datatype {
 public:
  Datatype() = default;
  Datatype(Datatype&& other) noexcept : type_(std::exchange(other.type_, MPI_DATATYPE_NULL)) {}
  Datatype& operator=(Datatype&&) = delete;
  ~Datatype() {
    if (type_ != MPI_DATATYPE_NULL) MPI_Type_free(&type_);
  }
  MPI_Datatype* out() { return &type_; }
  MPI_Datatype get() const { return type_; }

 private:
  MPI_Datatype type_ = MPI_DATATYPE_NULL;
};

// One rank's records: `record` describes one in memory; `file` (null for a rank without
// records) places them all in the data section, for the file view.
struct RecordTypes {
  Datatype record;
  Datatype file;
  int count = 0;
  std::size_t bytes = 0;
};

[[noreturn]] void bug(const std::string& path, const std::string& what) {
  throw Error(ErrorCode::internal, path + ": " + what);
}

void build_types(const std::string& path, const NpyHeader& header, const std::vector<RecordRun>& runs,
                 std::size_t record_bytes, RecordTypes& t) {
  if (record_bytes == 0 || record_bytes > INT_MAX || header.data_bytes % record_bytes != 0) {
    bug(path, "record size " + std::to_string(record_bytes) + " does not divide the " +
                  std::to_string(header.data_bytes) + " data bytes or is out of range");
  }
  const auto records = static_cast<std::int64_t>(header.data_bytes / record_bytes);
  const auto rb = static_cast<std::int64_t>(record_bytes);
  std::vector<MPI_Aint> displacements;
  std::vector<Datatype> parts;
  RINGATTN_MPI_CHECK(MPI_Type_contiguous(static_cast<int>(record_bytes), MPI_BYTE, t.record.out()));
  RINGATTN_MPI_CHECK(MPI_Type_commit(t.record.out()));
  std::int64_t next = 0;  // the first record that a following run may touch
  std::int64_t total = 0;
  for (const RecordRun& run : runs) {
    const std::string shown = "run {first " + std::to_string(run.first) + ", count " +
                              std::to_string(run.count) + ", stride " + std::to_string(run.stride) + "}";
    if (run.count < 0 || run.first < 0 || run.stride < 1) bug(path, "invalid " + shown);
    if (run.count == 0) continue;
    const std::int64_t stride = run.count == 1 ? 1 : run.stride;  // keeps stride * rb in range
    std::int64_t last = 0;
    if (__builtin_mul_overflow(run.count - 1, stride, &last) ||
        __builtin_add_overflow(last, run.first, &last) || last >= records) {
      bug(path, shown + " runs past the array's " + std::to_string(records) + " records");
    }
    if (run.first < next) bug(path, shown + " overlaps or precedes the previous run");
    next = last + 1;
    total += run.count;
    if (total > INT_MAX) bug(path, "more than INT_MAX records on one rank");
    parts.emplace_back();
    RINGATTN_MPI_CHECK(MPI_Type_create_hvector(static_cast<int>(run.count), 1, stride * rb, t.record.get(),
                                               parts.back().out()));
    displacements.push_back(run.first * rb);
  }
  t.count = static_cast<int>(total);
  t.bytes = static_cast<std::size_t>(total) * record_bytes;
  if (parts.empty()) return;
  std::vector<int> ones(parts.size(), 1);
  std::vector<MPI_Datatype> types;
  for (const Datatype& part : parts) types.push_back(part.get());
  RINGATTN_MPI_CHECK(MPI_Type_create_struct(static_cast<int>(parts.size()), ones.data(), displacements.data(),
                                            types.data(), t.file.out()));
  RINGATTN_MPI_CHECK(MPI_Type_commit(t.file.out()));
}

// Why this rank could not open (or create) `path`, or "" if it can.
std::string local_access_problem(const std::string& path, bool create) {
  if (create) {
    const std::string dir = std::filesystem::path(path).parent_path().string();
    return ::access(dir.empty() ? "." : dir.c_str(), W_OK | X_OK) == 0 ? "" : std::strerror(errno);
  }
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) return std::strerror(errno);
  ::close(fd);
  return {};
}

// An open MPI file. Every rank constructs and closes it together, so the collective close in
// the destructor also pairs up when an agreed error unwinds all ranks. A failed constructor
// leaves the handles of ranks that did open unclosed: closing them alone would hang.
class File {
 public:
  // `path` is opened; errors name `shown` (the user's path when writing through a temporary).
  File(MPI_Comm comm, const std::string& path, int amode, const char* verb, const std::string* shown = nullptr)
      : comm_(comm), path_(shown != nullptr ? *shown : path) {
    // POSIX checks on every rank first: OMPIO hangs in MPI_File_open when the open fails on only
    // some ranks (a file on node-local storage), and errno describes the problem better.
    const std::string problem = local_access_problem(path, amode & MPI_MODE_CREATE);
    std::exception_ptr outcome;
    if (!problem.empty()) {
      outcome = std::make_exception_ptr(Error(ErrorCode::io, path_ + ": cannot " + verb + ": " + problem));
    }
    detail::agree(comm, outcome);
    const int rc = MPI_File_open(comm, path.c_str(), amode, MPI_INFO_NULL, &fh_);
    // Files default to MPI_ERRORS_RETURN, but the application may have changed that default.
    if (rc == MPI_SUCCESS) MPI_File_set_errhandler(fh_, MPI_ERRORS_RETURN);
    agree_rc(comm, rc, path_ + ": cannot " + verb);
  }
  File(const File&) = delete;
  File& operator=(const File&) = delete;
  ~File() {
    // MPI_File_close is collective: after a collective was abandoned at its deadline (a rank
    // stuck in this file's I/O, say) the others would wait in it for ever, so the handle is
    // left open instead.
    const detail::CollectiveBound* bound = detail::CollectiveBound::current();
    if (bound != nullptr && bound->abandoned()) return;
    if (fh_ != MPI_FILE_NULL) MPI_File_close(&fh_);
  }
  MPI_File get() const { return fh_; }

  void set_view(std::uint64_t offset, const RecordTypes& t) {
    const MPI_Datatype filetype = t.file.get() == MPI_DATATYPE_NULL ? MPI_BYTE : t.file.get();
    const int rc = MPI_File_set_view(fh_, static_cast<MPI_Offset>(offset), MPI_BYTE, filetype, "native",
                                     MPI_INFO_NULL);
    agree_rc(comm_, rc, path_ + ": cannot set the file view");
  }

  // A failed close may mean lost writes, so its outcome is agreed too.
  void close() {
    const int rc = MPI_File_close(&fh_);
    fh_ = MPI_FILE_NULL;
    agree_rc(comm_, rc, path_ + ": cannot close");
  }

 private:
  MPI_Comm comm_;
  const std::string& path_;
  MPI_File fh_ = MPI_FILE_NULL;
};

// Throws unless `status` shows `expected` bytes transferred (`type` consists of MPI_BYTEs).
// ROMIO leaves the status unset for a zero-count transfer, so there is nothing to check then.
void check_transferred(const MPI_Status& status, MPI_Datatype type, std::size_t expected,
                       const std::string& what) {
  if (expected == 0) return;
  MPI_Count got = 0;
  RINGATTN_MPI_CHECK(MPI_Get_elements_x(&status, type, &got));
  if (static_cast<std::size_t>(got) != expected) {
    throw Error(ErrorCode::io,
                what + ": transferred " + std::to_string(got) + " of " + std::to_string(expected) + " bytes");
  }
}

// Rank 0's part of npy_read_header: the file's size and first bytes, or an error message.
std::string read_prefix(const std::string& path, std::uint64_t& file_size, std::vector<char>& bytes) {
  const std::unique_ptr<std::FILE, int (*)(std::FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) return path + ": cannot open: " + std::strerror(errno);
  struct stat st {};
  if (fstat(fileno(f.get()), &st) != 0) return path + ": cannot stat: " + std::strerror(errno);
  if (!S_ISREG(st.st_mode)) return path + ": not a regular file";
  file_size = static_cast<std::uint64_t>(st.st_size);
  bytes.resize(std::min<std::uint64_t>(file_size, kNpyMaxHeaderBytes));
  if (std::fread(bytes.data(), 1, bytes.size(), f.get()) != bytes.size()) {
    return path + ": read failed: " + (std::ferror(f.get()) ? std::strerror(errno) : "the file shrank");
  }
  return {};
}

}  // namespace

NpyHeader npy_read_header(MPI_Comm comm, const std::string& path) {
  std::uint64_t meta[2] = {0, 0};  // file size, then the length of the bytes or of the error
  std::vector<char> bytes;
  std::string error;
  if (detail::comm_rank(comm) == 0) {
    error = read_prefix(path, meta[0], bytes);
    meta[1] = error.empty() ? bytes.size() : error.size();
  }
  int failed = !error.empty();
  detail::bounded_bcast(comm, &failed, 1, MPI_INT, 0, "the reading of " + path);
  detail::bounded_bcast(comm, meta, 2, MPI_UINT64_T, 0, "the reading of " + path);
  if (failed) bytes.assign(error.begin(), error.end());
  bytes.resize(meta[1]);
  detail::bounded_bcast(comm, bytes.data(), static_cast<int>(bytes.size()), MPI_BYTE, 0, "the reading of " + path);
  // Rank 0's message or bytes everywhere, so all ranks throw the same error without agreeing.
  if (failed) throw Error(ErrorCode::io, std::string(bytes.begin(), bytes.end()));
  return parse_npy_header(bytes.data(), bytes.size(), meta[0], path);
}

void npy_read_records(MPI_Comm comm, const std::string& path, const NpyHeader& header,
                      const std::vector<RecordRun>& runs, std::size_t record_bytes, void* dst) {
  RecordTypes t;
  detail::agree_on(comm, [&] { build_types(path, header, runs, record_bytes, t); });
  File file(comm, path, MPI_MODE_RDONLY, "open");
  // Checked here because some MPI-IO implementations (OMPIO) report reads past the end of the
  // file as complete.
  detail::agree_on(comm, [&] {
    MPI_Offset size = 0;
    const int rc = MPI_File_get_size(file.get(), &size);
    if (rc != MPI_SUCCESS) throw Error(ErrorCode::io, path + ": cannot get the size: " + mpi_error_text(rc));
    if (static_cast<std::uint64_t>(size) < header.data_offset + header.data_bytes) {
      throw Error(ErrorCode::io, path + ": truncated: expected " + std::to_string(header.data_bytes) +
                                     " bytes of data from offset " + std::to_string(header.data_offset) +
                                     " but the file has " + std::to_string(size) + " bytes");
    }
  });
  file.set_view(header.data_offset, t);
  detail::agree_on(comm, [&] {
    MPI_Status status;
    const int rc = MPI_File_read_all(file.get(), dst, t.count, t.record.get(), &status);
    if (rc != MPI_SUCCESS) throw Error(ErrorCode::io, path + ": read failed: " + mpi_error_text(rc));
    check_transferred(status, t.record.get(), t.bytes, path + ": short read (is the file truncated?)");
  });
  file.close();
}

namespace {
void write_records_to(MPI_Comm comm, const std::string& file_path, const std::string& path, NpyDType dtype,
                      const std::vector<std::int64_t>& shape, const std::vector<RecordRun>& runs,
                      std::size_t record_bytes, const void* src);
}  // namespace

std::string output_path_problem(const std::string& path, bool replaced) {
  if (path.empty()) return "the path is empty";
  struct stat st {};
  const bool exists = ::stat(path.c_str(), &st) == 0;
  if (exists && S_ISDIR(st.st_mode)) return "is a directory";
  if (exists && !S_ISREG(st.st_mode)) {
    if (replaced) {
      return "exists and is not a regular file (a device, FIFO or socket); the .npy is written next to it and "
             "moved into its place, which would replace it";
    }
    return ::access(path.c_str(), W_OK) == 0 ? "" : std::strerror(errno);
  }
  const std::string parent = std::filesystem::path(path).parent_path().string();
  const std::string dir = parent.empty() ? "." : parent;
  struct stat ds {};
  if (::stat(dir.c_str(), &ds) != 0) return "cannot use the directory " + dir + ": " + std::strerror(errno);
  if (!S_ISDIR(ds.st_mode)) return dir + " is not a directory";
  if (exists && !replaced) return ::access(path.c_str(), W_OK) == 0 ? "" : std::strerror(errno);
  if (::access(dir.c_str(), W_OK | X_OK) != 0) return "cannot create files in " + dir + ": " + std::strerror(errno);
  return {};
}

void npy_write_records(MPI_Comm comm, const std::string& path, NpyDType dtype,
                       const std::vector<std::int64_t>& shape, const std::vector<RecordRun>& runs,
                       std::size_t record_bytes, const void* src) {
  // The data goes to a temporary file next to `path`, renamed over it once every rank has
  // written and closed it: `path` is never left half-written (a failure removes the temporary;
  // a killed job may leave only the temporary behind).
  const std::string partial = path + ".partial";
  const bool root = detail::comm_rank(comm) == 0;
  try {
    write_records_to(comm, partial, path, dtype, shape, runs, record_bytes, src);
  } catch (...) {
    if (root) std::remove(partial.c_str());
    throw;
  }
  std::exception_ptr outcome;
  struct stat st {};
  if (root && ::stat(path.c_str(), &st) == 0 && !S_ISREG(st.st_mode)) {
    // Checked before the run by the CLI; here too, so that no caller replaces a device or a directory.
    outcome = std::make_exception_ptr(Error(ErrorCode::io, path + ": " + output_path_problem(path, true)));
    std::remove(partial.c_str());
  } else if (root && std::rename(partial.c_str(), path.c_str()) != 0) {
    outcome = std::make_exception_ptr(Error(ErrorCode::io, path + ": cannot move the finished file into place: " +
                                                               std::strerror(errno)));
    std::remove(partial.c_str());
  }
  detail::agree(comm, outcome);
}

namespace {
void write_records_to(MPI_Comm comm, const std::string& file_path, const std::string& path, NpyDType dtype,
                      const std::vector<std::int64_t>& shape, const std::vector<RecordRun>& runs,
                      std::size_t record_bytes, const void* src) {
  std::string head;
  NpyHeader header;
  RecordTypes t;
  detail::agree_on(comm, [&] {
    head = make_npy_header(dtype, shape);
    // Parsing our own header checks that it can be read back and sizes the data section.
    header = parse_npy_header(head.data(), head.size(), UINT64_MAX, path);
    build_types(path, header, runs, record_bytes, t);
  });
  File file(comm, file_path, MPI_MODE_CREATE | MPI_MODE_WRONLY, "create", &path);
  agree_rc(comm, MPI_File_set_size(file.get(), 0), path + ": cannot truncate");
  detail::agree_on(comm, [&] {
    if (detail::comm_rank(comm) != 0) return;
    MPI_Status status;
    const int n = static_cast<int>(head.size());
    const int rc = MPI_File_write_at(file.get(), 0, head.data(), n, MPI_BYTE, &status);
    if (rc != MPI_SUCCESS) {
      throw Error(ErrorCode::io, path + ": cannot write the header: " + mpi_error_text(rc));
    }
    check_transferred(status, MPI_BYTE, head.size(), path + ": short write of the header");
  });
  file.set_view(header.data_offset, t);
  detail::agree_on(comm, [&] {
    MPI_Status status;
    const int rc = MPI_File_write_all(file.get(), src, t.count, t.record.get(), &status);
    if (rc != MPI_SUCCESS) throw Error(ErrorCode::io, path + ": write failed: " + mpi_error_text(rc));
    check_transferred(status, t.record.get(), t.bytes, path + ": short write");
  });
  file.close();
}
}  // namespace

}  // namespace ringattn::io
