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

const char* to_string(AttentionKind kind) {
  switch (kind) {
    case AttentionKind::softmax: return "softmax";
    case AttentionKind::linear: return "linear";
  }
  return "?";
}

AttentionKind parse_attention(const std::string& name) {
  if (name == "softmax") return AttentionKind::softmax;
  if (name == "linear") return AttentionKind::linear;
  throw Error(ErrorCode::invalid_argument, "unknown attention '" + name + "' (expected softmax or linear)");
}

const char* to_string(FeatureMap map) {
  switch (map) {
    case FeatureMap::elu1: return "elu1";
    case FeatureMap::identity: return "identity";
  }
  return "?";
}

FeatureMap parse_feature_map(const std::string& name) {
  if (name == "elu1") return FeatureMap::elu1;
  if (name == "identity") return FeatureMap::identity;
  throw Error(ErrorCode::invalid_argument, "unknown feature map '" + name + "' (expected elu1 or identity)");
}

}  // namespace ringattn
