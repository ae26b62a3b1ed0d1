// ringattn/tensor.hpp: non-owning views of the caller's tensors.
//
// Shapes used throughout (llm.c style):
//   q, out: (B, S_local, H,    D)    k, v: (B, S_local, H_kv, D)    lse: (B, H, S_local), fp32
// S_local is this rank's shard of the sequence (see layout.hpp). Strides are in elements
// and may be anything non-negative; the innermost (head_dim) stride must be 1. On cuda, q and
// out also need 16-byte-aligned data and batch, sequence and head strides that are multiples of 8.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace ringattn {

enum class DType : std::uint8_t { f32, f16, bf16 };
enum class DeviceKind : std::uint8_t { cpu, cuda };

const char* to_string(DType dtype);
const char* to_string(DeviceKind device);
std::size_t dtype_size(DType dtype);
// Parses "fp32"/"f32"/"float32", "fp16"/"f16"/"float16", "bf16"/"bfloat16".
DType parse_dtype(const std::string& name);

struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::f32;
  DeviceKind device = DeviceKind::cpu;
  int device_index = 0;
  int ndim = 0;
  std::array<std::int64_t, kMaxDims> shape{};
  std::array<std::int64_t, kMaxDims> strides{};  // in elements

  // A dense row-major view over `data`.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                               DeviceKind device = DeviceKind::cpu, int device_index = 0);

  std::int64_t numel() const;
  bool is_contiguous() const;
  std::string shape_string() const;  // "(1, 256, 8, 64)"
};

}  // namespace ringattn
