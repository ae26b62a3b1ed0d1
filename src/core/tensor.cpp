#include <algorithm>
#include <cctype>

#include "ringattn/error.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

const char* to_string(DType dtype) {
  switch (dtype) {
    case DType::f32: return "fp32";
    case DType::f16: return "fp16";
    case DType::bf16: return "bf16";
  }
  return "?";
}

const char* to_string(DeviceKind device) { return device == DeviceKind::cpu ? "cpu" : "cuda"; }

std::size_t dtype_size(DType dtype) { return dtype == DType::f32 ? 4 : 2; }

DType parse_dtype(const std::string& name) {
  std::string n = name;
  std::transform(n.begin(), n.end(), n.begin(), [](unsigned char c) { return std::tolower(c); });
  if (n == "fp32" || n == "f32" || n == "float32" || n == "float") return DType::f32;
  if (n == "fp16" || n == "f16" || n == "float16" || n == "half") return DType::f16;
  if (n == "bf16" || n == "bfloat16") return DType::bf16;
  throw Error(ErrorCode::invalid_argument, "unknown dtype '" + name + "' (expected fp32, fp16 or bf16)");
}

TensorView TensorView::contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                                  DeviceKind device, int device_index) {
  if (shape.size() > static_cast<std::size_t>(kMaxDims)) {
    throw Error(ErrorCode::invalid_argument, "tensor views have at most 4 dimensions");
  }
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.device_index = device_index;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t s : shape) t.shape[static_cast<std::size_t>(i++)] = s;
  std::int64_t stride = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    t.strides[static_cast<std::size_t>(d)] = stride;
    stride *= t.shape[static_cast<std::size_t>(d)];
  }
  return t;
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[static_cast<std::size_t>(d)];
  return n;
}

bool TensorView::is_contiguous() const {
  std::int64_t stride = 1;
  for (int d = ndim - 1; d >= 0; --d) {
    if (shape[static_cast<std::size_t>(d)] != 1 && strides[static_cast<std::size_t>(d)] != stride) return false;
    stride *= shape[static_cast<std::size_t>(d)];
  }
  return true;
}

std::string TensorView::shape_string() const {
  std::string s = "(";
  for (int d = 0; d < ndim; ++d) {
    if (d) s += ", ";
    s += std::to_string(shape[static_cast<std::size_t>(d)]);
  }
  return s + ")";
}

}  // namespace ringattn
