#!/usr/bin/env bash
# Installs what is missing (as root, from Debian packages), configures, builds (CUDA code too
# where nvcc is present) and runs every test with CTest, MPI tests under mpirun included.
#   scripts/test.sh                      # build/ , Release
#   BUILD_DIR=b CMAKE_ARGS="-DRINGATTN_WITH_CUDA=OFF" scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
ringattn_ensure_dependencies
ringattn_ensure_fuzz_toolchain

BUILD_DIR=${BUILD_DIR:-build}
JOBS=${JOBS:-$(nproc)}
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-}
cmake --build "$BUILD_DIR" -j "$JOBS"
ctest --test-dir "$BUILD_DIR" --output-on-failure -j "$JOBS"
