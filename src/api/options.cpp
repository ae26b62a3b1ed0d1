#include "ringattn/options.hpp"

#include "ringattn/error.hpp"

namespace ringattn {

const char* to_string(KernelKind kind) {
  switch (kind) {
    case KernelKind::automatic: return "auto";
    case KernelKind::cudnn: return "cudnn";
    case KernelKind::native: return "native";
  }
  return "?";
}

KernelKind parse_kernel(const std::string& name) {
  if (name == "auto") return KernelKind::automatic;
  if (name == "cudnn") return KernelKind::cudnn;
  if (name == "native") return KernelKind::native;
  throw Error(ErrorCode::invalid_argument, "unknown kernel '" + name + "' (expected auto, cudnn or native)");
}

}  // namespace ringattn
