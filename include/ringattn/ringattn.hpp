// ringattn/ringattn.hpp: the whole public C++ API.
#pragma once

#include "ringattn/attention.hpp"
#include "ringattn/context.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/local_group.hpp"
#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"
#include "ringattn/version.hpp"
