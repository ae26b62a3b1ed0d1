// ringattn/version.hpp
#pragma once

namespace ringattn {

const char* version();

}  // namespace ringattn
