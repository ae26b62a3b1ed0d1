// io/npy.hpp: the .npy format (version 1.0-3.0), little-endian float16/32/64, C order.
//
// A .npy file is: magic "\x93NUMPY", major/minor version bytes, a header length (uint16 for
// v1, uint32 for v2/v3), a Python-dict header such as
//   {'descr': '<f4', 'fortran_order': False, 'shape': (1001, 4, 64), }
// padded with spaces and a newline so that the data starts at a multiple of 64 bytes, then
// the raw array data.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ringattn::io {

enum class NpyDType : std::uint8_t { f2, f4, f8 };

std::size_t npy_dtype_size(NpyDType dtype);
const char* npy_dtype_name(NpyDType dtype);  // "float16", "float32", "float64"

struct NpyHeader {
  NpyDType dtype = NpyDType::f4;
  std::vector<std::int64_t> shape;
  std::uint64_t data_offset = 0;  // bytes from the start of the file to the first element
  std::uint64_t data_bytes = 0;   // product(shape) * element size
};

// Upper bound on the bytes parse_npy_header needs to see (magic + length + header).
inline constexpr std::size_t kNpyMaxHeaderBytes = 1 << 16;

// Parses the start of a .npy file. `prefix` holds its first `prefix_len` bytes (all of them
// for small files), `file_size` is the whole file's size. Throws Error(io) naming `path` for
// any malformed, unsupported or truncated file: bad magic or version, header length past the
// end of the file or over kNpyMaxHeaderBytes, a descr other than <f2/<f4/<f8 (also |f2 etc.
// are rejected if not little-endian), fortran_order True, negative or overflowing shape
// products, or a file shorter than data_offset + data_bytes.
NpyHeader parse_npy_header(const void* prefix, std::size_t prefix_len, std::uint64_t file_size,
                           const std::string& path);

// The full header (magic through padding) for a C-order array; version 1.0 unless the header
// needs more than 65535 bytes.
std::string make_npy_header(NpyDType dtype, const std::vector<std::int64_t>& shape);

}  // namespace ringattn::io
