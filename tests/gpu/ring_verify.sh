#!/usr/bin/env bash
# The GPU ring end to end: `ringattn verify --device cuda` at np = $NP for every layout x
# causal x (MHA, GQA 32/8) x (bf16, fp16) with the default kernel (cuDNN where the build has
# it), and every layout x causal with --kernel native (bf16, GQA). Exits 77 (CTest: skipped)
# where this machine has fewer than $NP GPUs.
#   ring_verify.sh RINGATTN MPIEXEC NP [mpirun flags...]
set -u
ringattn=$1 mpiexec=$2 np=$3
shift 3
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
if [ "${gpus:-0}" -lt "$np" ]; then
  echo "skipped: $np GPU(s) needed, ${gpus:-0} found"
  exit 77
fi
failed=0
check() {  # name, then the verify flags
  local name=$1
  shift
  if out=$("$mpiexec" "${mpi_flags[@]}" --bind-to none -np "$np" "$ringattn" verify --device cuda --seq 1536 --heads 32 \
           --head-dim 128 "$@" 2>&1); then
    echo "ok   $name: $(echo "$out" | grep -m1 'O:')"
  else
    echo "FAIL $name"; echo "$out"; failed=1
  fi
}
mpi_flags=("$@")
for layout in contiguous zigzag striped; do
  for causal in "" --causal; do
    for kv in 32 8; do
      for dtype in bf16 fp16; do
        check "np=$np $layout ${causal:---full} kv-heads=$kv $dtype" --kv-heads "$kv" --layout "$layout" $causal \
          --dtype "$dtype"
      done
    done
    check "np=$np $layout ${causal:---full} kv-heads=8 bf16 native" --kv-heads 8 --layout "$layout" $causal \
      --kernel native
  done
done
exit $failed
