// libFuzzer target: the .npy header parser (io::parse_npy_header) on arbitrary bytes. The
// first 8 input bytes give the file size the parser is told, the rest are the file's first
// bytes. Every input must either parse or throw ringattn::Error: any other exception, a
// crash, or an AddressSanitizer / UndefinedBehaviorSanitizer report is a finding.
// Built and run by tests/fuzz/run_fuzz.sh (clang, -fsanitize=fuzzer,address,undefined).
#include <cstdint>
#include <cstring>

#include "io/npy.hpp"
#include "ringattn/error.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 8) return 0;
  std::uint64_t file_size = 0;
  std::memcpy(&file_size, data, sizeof file_size);
  const std::size_t prefix_len = size - 8;
  // Mostly sizes near the prefix (the interesting boundary), sometimes anything.
  if (file_size & 1) file_size = prefix_len + (file_size >> 1) % 4096;
  try {
    const ringattn::io::NpyHeader h = ringattn::io::parse_npy_header(data + 8, prefix_len, file_size, "fuzz.npy");
    // A header the parser accepts must describe data that fits the file.
    if (h.data_offset + h.data_bytes > file_size || h.data_offset < 10) __builtin_trap();
  } catch (const ringattn::Error&) {
  }
  return 0;
}
