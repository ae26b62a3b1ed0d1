// core/text.hpp: formatting shared by error messages.
#pragma once

#include <cstdio>
#include <string>

namespace ringattn::detail {

// A duration or bound in seconds as the user gave it: "300", "0.25", "1e+03" (%g), not
// truncated to whole seconds.
inline std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof text, "%g", seconds);
  return text;
}

}  // namespace ringattn::detail
