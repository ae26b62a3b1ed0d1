#!/usr/bin/env bash
# Builds the .npy header fuzz target with clang (libFuzzer, AddressSanitizer, UBSan) and runs
# it for a bounded time from a seed corpus of valid and broken headers. Exits 77 (CTest:
# skipped) where clang cannot build fuzzers.
#   run_fuzz.sh SOURCE_DIR WORK_DIR SECONDS
set -u
src=$1 work=$2 seconds=${3:-30}
mkdir -p "$work/corpus"
cxx=$(command -v clang++ || true)
if [ -z "$cxx" ]; then echo "skipped: no clang++"; exit 77; fi
if ! "$cxx" -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
     -I "$src/include" -I "$src/src" "$src/tests/fuzz/fuzz_npy_header.cpp" "$src/src/io/npy.cpp" \
     "$src/src/core/error.cpp" -o "$work/fuzz_npy_header" 2> "$work/build.log"; then
  if grep -q -i "fuzzer" "$work/build.log"; then echo "skipped: clang cannot build libFuzzer targets"; cat "$work/build.log"; exit 77; fi
  cat "$work/build.log"; exit 1
fi
# Seeds: 8 bytes of claimed file size, then a valid version 1.0 header, a 2.0 one, and a
# truncated one (python3 writes them; numpy is not needed).
python3 - "$work/corpus" <<'PY'
import struct, sys, os
d = sys.argv[1]
def header(descr, shape, major=1):
    body = "{'descr': '%s', 'fortran_order': False, 'shape': %s, }" % (descr, shape)
    lenfield = 2 if major == 1 else 4
    pad = (-(6 + 2 + lenfield + len(body) + 1)) % 64
    body += " " * pad + "\n"
    fmt = "<H" if major == 1 else "<I"
    return b"\x93NUMPY" + bytes([major, 0]) + struct.pack(fmt, len(body)) + body.encode()
seeds = {
    "f4": header("<f4", "(4, 2, 8)"), "f2": header("<f2", "(3,)"), "v2": header("<f8", "(2, 2)", 2),
    "trunc": header("<f4", "(1000, 1000)")[:40],
}
for name, h in seeds.items():
    with open(os.path.join(d, name), "wb") as f:
        f.write(struct.pack("<Q", (len(h) + 4096) * 2) + h)
PY
"$work/fuzz_npy_header" -max_total_time="$seconds" -timeout=5 -rss_limit_mb=1024 -print_final_stats=1 "$work/corpus" \
  > "$work/fuzz.log" 2>&1
rc=$?
tail -15 "$work/fuzz.log"
exit $rc
