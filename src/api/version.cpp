#include "ringattn/version.hpp"

namespace ringattn {

const char* version() { return RINGATTN_VERSION_STRING; }

}  // namespace ringattn
