#!/usr/bin/env bash
# Sourced by test.sh and demo.sh: makes sure the build dependencies are present, installing
# the missing ones from Debian/Ubuntu packages when running as root. Checks by function
# (a header compiles, a program runs), not by package name, so machines that provide the
# libraries some other way (the GPU machine) are left alone.

ringattn_missing_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  command -v make >/dev/null 2>&1 || command -v ninja >/dev/null 2>&1 || missing+=(make)
  command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
  command -v mpicxx >/dev/null 2>&1 || missing+=(libopenmpi-dev)
  local header pkg
  for pair in "CLI/CLI.hpp:libcli11-dev" "spdlog/spdlog.h:libspdlog-dev" \
              "nlohmann/json.hpp:nlohmann-json3-dev" "gtest/gtest.h:libgtest-dev"; do
    header=${pair%%:*}
    pkg=${pair##*:}
    if ! command -v g++ >/dev/null 2>&1 || \
       ! echo "#include <${header}>" | g++ -std=c++20 -fsyntax-only -x c++ - >/dev/null 2>&1; then
      missing+=("$pkg")
    fi
  done
  echo "${missing[@]}"
}

# Optional: the CLI tests compare with numpy (without it CMake skips them, with a warning).
ringattn_missing_optional_packages() {
  local py
  for py in /usr/bin/python3 python3; do
    "$py" -c "import numpy" >/dev/null 2>&1 && return 0
  done
  echo python3 python3-numpy
}

ringattn_ensure_dependencies() {
  local missing optional
  missing=$(ringattn_missing_packages)
  optional=$(ringattn_missing_optional_packages)
  if [ -z "$missing" ] && [ -n "$optional" ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "ringattn: installing $optional"
      # shellcheck disable=SC2086
      (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq && apt-get install -y -qq --no-install-recommends $optional >/dev/null) ||
        echo "ringattn: could not install $optional; the CLI tests that need numpy will be skipped" >&2
    else
      echo "ringattn: $optional not found; the CLI tests that need numpy will be skipped" >&2
    fi
    return 0
  fi
  [ -z "$missing" ] && return 0
  missing="$missing $optional"
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ringattn: missing build dependencies: $missing" >&2
    echo "ringattn: install them (Debian/Ubuntu: sudo apt-get install $missing) and run again" >&2
    return 1
  fi
  echo "ringattn: installing $missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

# Best effort, for the fuzz test only (test.sh): clang with libFuzzer and the sanitizer
# runtimes. Without them the fuzz test reports "skipped".
ringattn_ensure_fuzz_toolchain() {
  if command -v clang++ >/dev/null 2>&1 &&
     echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' |
       clang++ -fsanitize=fuzzer,address -x c++ - -o /dev/null >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "ringattn: installing clang libclang-rt-dev (for the fuzz test)"
    (export DEBIAN_FRONTEND=noninteractive; apt-get update -qq &&
       apt-get install -y -qq --no-install-recommends clang libclang-rt-dev >/dev/null) ||
      echo "ringattn: could not install clang; the fuzz test will be skipped" >&2
  else
    echo "ringattn: clang with libFuzzer not found; the fuzz test will be skipped" >&2
  fi
}

# Flags mpirun needs here: root (containers, CI) and more ranks than cores.
ringattn_mpirun_flags() {
  local flags="--oversubscribe"
  [ "$(id -u)" -eq 0 ] && flags="$flags --allow-run-as-root"
  echo "$flags"
}
