#!/usr/bin/env bash
# Sets up like test.sh, builds the CLI, then runs the main job on its embedded default:
#   mpirun -np 4 ringattn run            (extra arguments go to `ringattn run`)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup.sh
ringattn_ensure_dependencies

BUILD_DIR=${BUILD_DIR:-build}
NP=${NP:-4}
# shellcheck disable=SC2086
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release ${CMAKE_ARGS:-} >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target ringattn_cli
# shellcheck disable=SC2046
exec mpirun -np "$NP" $(ringattn_mpirun_flags) "$BUILD_DIR/apps/ringattn/ringattn" run "$@"
