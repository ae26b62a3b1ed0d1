#include "io/npy_mpi.hpp"

#include <gtest/gtest.h>

#include "common/mpi_world.hpp"
#include <mpi.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "ringattn/error.hpp"

namespace {

using ringattn::Error;
using ringattn::ErrorCode;
using ringattn::io::make_npy_header;
using ringattn::io::NpyDType;
using ringattn::io::NpyHeader;
using ringattn::io::RecordRun;

using ringattn::testing::world_rank;
using ringattn::testing::world_size;

// Rank 0's pid names a scratch directory that every rank uses; rank 0 removes it afterwards.
class NpyMpi : public ::testing::Test {
 protected:
  void SetUp() override {
    long pid = static_cast<long>(getpid());
    MPI_Bcast(&pid, 1, MPI_LONG, 0, MPI_COMM_WORLD);
    dir_ = (std::filesystem::temp_directory_path() / ("ringattn_npy_test_" + std::to_string(pid))).string();
    if (world_rank() == 0) std::filesystem::create_directories(dir_);
    MPI_Barrier(MPI_COMM_WORLD);
  }
  void TearDown() override {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) std::filesystem::remove_all(dir_);
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  std::string dir_;
};

// How the S tokens of each of `outer` rows (batches, or batch-heads for lse) are split.
enum class Scheme { block, striped, reversed_block, all_on_last };

// This rank's runs and, in local order, the file record index of each of its records.
struct Partition {
  std::vector<RecordRun> runs;
  std::vector<std::int64_t> records;
};

Partition partition(Scheme scheme, std::int64_t outer, std::int64_t S) {
  const std::int64_t P = world_size();
  std::int64_t r = world_rank();
  if (scheme == Scheme::reversed_block) r = P - 1 - r;
  Partition p;
  for (std::int64_t o = 0; o < outer; ++o) {
    RecordRun run;
    if (scheme == Scheme::striped) {
      run = {o * S + r, r < S ? (S - r + P - 1) / P : 0, P};
    } else if (scheme == Scheme::all_on_last) {
      run = {o * S, r == P - 1 ? S : 0, 1};
    } else {
      const std::int64_t lo = S * r / P;
      const std::int64_t hi = S * (r + 1) / P;
      run = {o * S + lo, hi - lo, 1};
    }
    p.runs.push_back(run);
    for (std::int64_t i = 0; i < run.count; ++i) p.records.push_back(run.first + i * run.stride);
  }
  return p;
}

// Element e of record k holds k * per_record + e: its index in the whole array.
std::vector<float> make_values(const Partition& p, std::int64_t per_record) {
  std::vector<float> values;
  for (const std::int64_t k : p.records) {
    for (std::int64_t e = 0; e < per_record; ++e) values.push_back(static_cast<float>(k * per_record + e));
  }
  return values;
}

// Writes with one partition, then reads back with others and checks every value.
void round_trip(const std::string& file, const std::vector<std::int64_t>& shape, std::int64_t outer,
                std::int64_t S, std::int64_t per_record, Scheme write_scheme,
                const std::vector<Scheme>& read_schemes) {
  const std::size_t record_bytes = static_cast<std::size_t>(per_record) * sizeof(float);
  const Partition w = partition(write_scheme, outer, S);
  const std::vector<float> out = make_values(w, per_record);
  ringattn::io::npy_write_records(MPI_COMM_WORLD, file, NpyDType::f4, shape, w.runs, record_bytes,
                                  out.data());

  const NpyHeader h = ringattn::io::npy_read_header(MPI_COMM_WORLD, file);
  EXPECT_EQ(h.dtype, NpyDType::f4);
  EXPECT_EQ(h.shape, shape);
  EXPECT_EQ(h.data_offset, make_npy_header(NpyDType::f4, shape).size());
  EXPECT_EQ(h.data_bytes, static_cast<std::uint64_t>(outer * S) * record_bytes);
  EXPECT_EQ(std::filesystem::file_size(file), h.data_offset + h.data_bytes);

  for (const Scheme scheme : read_schemes) {
    const Partition r = partition(scheme, outer, S);
    std::vector<float> in(r.records.size() * static_cast<std::size_t>(per_record), -1.0f);
    ringattn::io::npy_read_records(MPI_COMM_WORLD, file, h, r.runs, record_bytes, in.data());
    EXPECT_EQ(in, make_values(r, per_record)) << "read scheme " << static_cast<int>(scheme);
  }
}

TEST_F(NpyMpi, TokenRecordsRoundTrip) {
  constexpr std::int64_t B = 2, S = 37, H = 3, D = 4;
  round_trip(path("q.npy"), {B, S, H, D}, B, S, H * D, Scheme::block, {Scheme::striped, Scheme::all_on_last});
  round_trip(path("q.npy"), {B, S, H, D}, B, S, H * D, Scheme::striped,
             {Scheme::reversed_block, Scheme::block});
}

TEST_F(NpyMpi, LseRecordsRoundTrip) {
  constexpr std::int64_t B = 2, H = 3, S = 37;
  round_trip(path("lse.npy"), {B, H, S}, B * H, S, 1, Scheme::striped,
             {Scheme::block, Scheme::reversed_block});
  // Written through a temporary that is renamed into place: none is left behind.
  EXPECT_FALSE(std::filesystem::exists(path("lse.npy.partial")));
  EXPECT_TRUE(std::filesystem::exists(path("lse.npy")));
}

struct Caught {
  bool thrown = false;
  ErrorCode code = ErrorCode::internal;
  std::string message;
};

Caught catch_error(const std::function<void()>& fn) {
  Caught c;
  try {
    fn();
  } catch (const Error& e) {
    c = {true, e.code(), e.what()};
  }
  return c;
}

// Every rank threw Error(code) with the same message, which contains `word`.
void expect_same_error_everywhere(const Caught& c, ErrorCode code, const std::string& word) {
  EXPECT_TRUE(c.thrown);
  EXPECT_EQ(c.code, code) << c.message;
  EXPECT_NE(c.message.find(word), std::string::npos) << "\"" << c.message << "\" lacks \"" << word << "\"";
  int length = static_cast<int>(c.message.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::string root(static_cast<std::size_t>(length), '\0');
  if (world_rank() == 0) root = c.message;
  MPI_Bcast(root.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  int same = root == c.message && c.thrown;
  MPI_Allreduce(MPI_IN_PLACE, &same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  EXPECT_EQ(same, 1) << "rank " << world_rank() << " has \"" << c.message << "\", rank 0 \"" << root << "\"";
}

TEST_F(NpyMpi, MissingFileFailsEverywhere) {
  const std::string file = path("missing.npy");
  const Caught header = catch_error([&] { ringattn::io::npy_read_header(MPI_COMM_WORLD, file); });
  expect_same_error_everywhere(header, ErrorCode::io, file + ": cannot open: No such file or directory");

  const std::string text = make_npy_header(NpyDType::f4, {4, 8});
  const NpyHeader h = ringattn::io::parse_npy_header(text.data(), text.size(), text.size() + 128, file);
  const Partition p = partition(Scheme::block, 1, 4);
  std::vector<float> in(p.records.size() * 8);
  const Caught read = catch_error([&] {
    ringattn::io::npy_read_records(MPI_COMM_WORLD, file, h, p.runs, 8 * sizeof(float), in.data());
  });
  expect_same_error_everywhere(read, ErrorCode::io, file + ": cannot open");
}

TEST_F(NpyMpi, TruncatedFileFailsEverywhere) {
  const std::string file = path("truncated.npy");
  const std::string text = make_npy_header(NpyDType::f4, {4, 8});
  if (world_rank() == 0) {
    std::ofstream(file, std::ios::binary) << text << std::string(20, '\x01');
  }
  MPI_Barrier(MPI_COMM_WORLD);
  const Caught header = catch_error([&] { ringattn::io::npy_read_header(MPI_COMM_WORLD, file); });
  expect_same_error_everywhere(header, ErrorCode::io,
                               file + ": truncated: header says 4x8 float32 (128 bytes of data from offset " +
                                   std::to_string(text.size()) + ") but the file has " +
                                   std::to_string(text.size() + 20) + " bytes");

  // A header that was valid when read (the file shrank since) is caught by the read.
  const NpyHeader h = ringattn::io::parse_npy_header(text.data(), text.size(), text.size() + 128, file);
  const Partition p = partition(Scheme::striped, 1, 4);
  std::vector<float> in(p.records.size() * 8);
  const Caught read = catch_error([&] {
    ringattn::io::npy_read_records(MPI_COMM_WORLD, file, h, p.runs, 8 * sizeof(float), in.data());
  });
  expect_same_error_everywhere(read, ErrorCode::io,
                               file + ": truncated: expected 128 bytes of data from offset " +
                                   std::to_string(text.size()) + " but the file has " +
                                   std::to_string(text.size() + 20) + " bytes");
}

TEST_F(NpyMpi, UnwritableFileFailsEverywhere) {
  const std::string file = path("no/such/dir/out.npy");
  const Partition p = partition(Scheme::block, 1, 6);
  const std::vector<float> out = make_values(p, 2);
  const Caught write = catch_error([&] {
    ringattn::io::npy_write_records(MPI_COMM_WORLD, file, NpyDType::f4, {6, 2}, p.runs, 2 * sizeof(float),
                                    out.data());
  });
  expect_same_error_everywhere(write, ErrorCode::io, file + ": cannot create");
}

TEST_F(NpyMpi, BadRunsOnOneRankFailEverywhere) {
  const std::string file = path("runs.npy");
  const int last = world_size() - 1;
  // The last rank's runs overlap; the others' are fine.
  std::vector<RecordRun> runs;
  if (world_rank() == last) runs = {{0, 3, 2}, {3, 1, 1}};
  const std::vector<float> out(runs.empty() ? 0 : 4, 1.0f);
  const Caught write = catch_error([&] {
    ringattn::io::npy_write_records(MPI_COMM_WORLD, file, NpyDType::f4, {8}, runs, sizeof(float), out.data());
  });
  expect_same_error_everywhere(write, ErrorCode::internal, "overlaps or precedes the previous run");
}

}  // namespace
