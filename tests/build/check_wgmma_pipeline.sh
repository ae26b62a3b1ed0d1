#!/bin/bash
# tests/build/check_wgmma_pipeline.sh NVCC SOURCE_DIR: compiles every sm_90a kernel source with
# ptxas's report on (the build's flags otherwise) and fails if ptxas says it had to insert
# warpgroup waits or fences (C7517, C7519) or serialise the wgmma pipeline (C7510..C7518) in
# any kernel. Those are silent in a normal build, and each has cost the kernels real time:
# an inserted wait before a register read can stall every MMA in flight, a serialised
# pipeline runs one MMA at a time. The message ptxas prints says which function and where.
set -u
nvcc=$1 src=$2
cuda_inc=$(dirname "$(dirname "$nvcc")")/include
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail=0
pids=()
files=("$src"/src/kernels/cuda/flash_*sm90*.cu)
[ -e "${files[0]}" ] || { echo "no sm_90a kernel sources under $src"; exit 1; }
for f in "${files[@]}"; do
  out="$tmp/$(basename "$f").log"
  "$nvcc" -O3 -DNDEBUG -DRINGATTN_HAVE_CUDA=1 -lineinfo --generate-code=arch=compute_90a,code=sm_90a -std=c++17 \
    -I "$src/include" -I "$src/src" -I "$cuda_inc" -Xptxas -v -c "$f" -o "$tmp/$(basename "$f").o" > "$out" 2>&1 &
  pids+=($!)
  # two compiles at a time (CI machines have 2 cores)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}" || fail=1; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
[ $fail -eq 0 ] || { echo "a kernel source failed to compile:"; cat "$tmp"/*.log; exit 1; }
bad=$(grep -h -E "\(C75(1[0-9])\)" "$tmp"/*.log)
if [ -n "$bad" ]; then
  echo "ptxas changed the wgmma pipeline:"
  echo "$bad"
  exit 1
fi
echo "wgmma pipeline: ${#files[@]} sm_90a sources, no waits, fences or serialisation inserted by ptxas"
