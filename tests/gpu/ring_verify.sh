#!/usr/bin/env bash
# The GPU ring end to end: `ringattn verify --device cuda` at np = $NP for every layout x
# causal x (MHA, GQA 32/8) x (bf16, fp16) with the default kernel (--kernel auto: at head dim
# 128 the native kernel for every ring task), and every layout x causal with --kernel native
# and with --kernel cudnn (bf16, GQA: the cuDNN ring and its merge pass); at np 1 the default
# forward (native from 4096 rows) feeding cuDNN's backward; sliding windows (causal, with
# sinks, two-sided) with both kernels; linear attention; at np 2, `run --gpus 2` (one process)
# against `mpirun -np 2 run` byte for byte, and `verify --gpus 2`; `verify --gpus NP --backward`,
# and at np 2 `run --gpus 2 --backward` against `mpirun -np 2 run --backward` (dQ, dK, dV
# files) byte for byte; `bench --backward --json`: a backward breakdown of one entry per step,
# its parts within the run.
# Then the backward pass
# (`verify --backward`, gradients against the fp64 reference) for every layout x causal x
# (MHA, GQA) in bf16, fp16 / head-dim-64 and --kernel native cases, sliding windows and linear attention; at np > 1 the gradient error may not
# exceed 1.5x the error of the same inputs at np 1 (not for --kernel cudnn, whose per-task gradients
# are rounded to the dtype: those meet the absolute tolerance only). Exits 77 (CTest: skipped) where this
# machine has fewer than $NP GPUs.
# The checks are independent jobs: RINGATTN_VERIFY_JOBS (default 4) of them run at once on the
# same GPUs (each its own mpirun, NCCL communicator and fp64 reference; the time is mostly
# start-up); each report, with the job's time, is printed in order as soon as it and those
# before it are done (a run cut short still shows what finished); 1 runs them one by one.
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
jobs_max=${RINGATTN_VERIFY_JOBS:-4}
cores=$(nproc 2>/dev/null || echo 1)
# The fp64 references of concurrent jobs share the cores.
threads=$(( cores / (jobs_max * np) ))
[ "$threads" -ge 1 ] || threads=1
export OMP_NUM_THREADS=$threads
reports=$(mktemp -d)
trap 'rm -rf "$reports"' EXIT
n_jobs=0
printed=0
flush() {  # prints the finished reports that come next in order
  while [ -e "$reports/$(printf %04d $((printed + 1))).done" ]; do
    printed=$((printed + 1))
    cat "$reports/$(printf %04d "$printed").log"
  done
}
spawn() {  # runs "$@" (a check and its arguments) as a background job, at most jobs_max at once
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do
    wait -n
    flush
  done
  n_jobs=$((n_jobs + 1))
  local report
  report=$reports/$(printf %04d "$n_jobs")
  (
    start=$SECONDS
    "$@" > "$report.log" 2>&1
    echo "     ($((SECONDS - start)) s)" >> "$report.log"
    touch "$report.done"
  ) &
}
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
        spawn check "np=$np $layout ${causal:---full} kv-heads=$kv $dtype" --kv-heads "$kv" --layout "$layout" $causal \
          --dtype "$dtype"
      done
    done
    spawn check "np=$np $layout ${causal:---full} kv-heads=8 bf16 native" --kv-heads 8 --layout "$layout" $causal \
      --kernel native
    spawn check "np=$np $layout ${causal:---full} kv-heads=8 bf16 cudnn" --kv-heads 8 --layout "$layout" $causal \
      --kernel cudnn
  done
done
# One rank, the default kernels where the forward is native (head dim 128, 4096 rows) and the
# backward cuDNN's (the rank's one task): gradients against the reference.
check_one() {  # name, then the verify flags (np 1)
  local name=$1
  shift
  if out=$("$mpiexec" "${mpi_flags[@]}" --bind-to none -np 1 "$ringattn" verify --device cuda "$@" 2>&1); then
    echo "ok   $name: $(echo "$out" | grep -m1 'dQ')"
  else
    echo "FAIL $name"; echo "$out"; failed=1
  fi
}
spawn check_one "np=1 default kernels (native forward, cuDNN backward)" --backward --seq 4096 --heads 4 --head-dim 128 --causal

# Sliding windows (contiguous layout): within one block, reaching across blocks, with sinks,
# and two-sided; the default kernel (cuDNN's band mask where it builds) and the native one.
for kernel in auto native; do
  spawn check "np=$np window 300 causal kv-heads=8 $kernel" --kv-heads 8 --layout contiguous --causal --window 300 --kernel "$kernel"
  spawn check "np=$np window 900 sinks 40 causal $kernel" --layout contiguous --causal --window 900 --sinks 40 --kernel "$kernel"
  spawn check "np=$np window 200 sinks 16 two-sided fp16 $kernel" --layout contiguous --window 200 --sinks 16 --dtype fp16 \
    --kernel "$kernel"
done

# Linear attention (contiguous layout): causal with and without a decay, GQA, non-causal
# unnormalised (identity feature map) in fp16.
spawn check "np=$np linear causal elu1" --layout contiguous --causal --attention linear
spawn check "np=$np linear causal decay 0.998 kv-heads=8" --layout contiguous --causal --attention linear --decay 0.998 --kv-heads 8
spawn check "np=$np linear full identity fp16" --layout contiguous --attention linear --feature-map identity --dtype fp16
spawn check "np=$np linear full elu1 kv-heads=8" --layout contiguous --attention linear --kv-heads 8

# One process on two GPUs (--gpus 2, no mpirun): the same bytes as mpirun -np 2 (O and LSE
# files), and verify's reference check.
same_bytes() {  # args: `mpirun -np 2 run` and `run --gpus 2` write the same O and LSE bytes
  local args=$1 tmp
  tmp=$(mktemp -d)
  local lse=(--lse "$tmp/lse_a.npy") lse_b=(--lse "$tmp/lse_b.npy")
  case "$args" in *linear*) lse=(); lse_b=() ;; esac
  if "$mpiexec" "${mpi_flags[@]}" --bind-to none -np 2 "$ringattn" run --device cuda --seq 4096 --heads 32 --head-dim 128 \
       $args --out "$tmp/out_a.npy" "${lse[@]}" > "$tmp/a.log" 2>&1 &&
     "$ringattn" run --gpus 2 --seq 4096 --heads 32 --head-dim 128 $args --out "$tmp/out_b.npy" "${lse_b[@]}" \
       > "$tmp/b.log" 2>&1 &&
     cmp -s "$tmp/out_a.npy" "$tmp/out_b.npy" && { [ ${#lse[@]} -eq 0 ] || cmp -s "$tmp/lse_a.npy" "$tmp/lse_b.npy"; }; then
    echo "ok   --gpus 2 == mpirun -np 2: $args"
  else
    echo "FAIL --gpus 2 == mpirun -np 2: $args"; cat "$tmp/a.log" "$tmp/b.log"
  fi
  rm -rf "$tmp"
}
verify_local() {  # args: verify --gpus 2 against the reference
  local args=$1 out
  if out=$("$ringattn" verify --gpus 2 --seq 1536 --heads 32 --head-dim 128 $args 2>&1); then
    echo "ok   verify --gpus 2 $args: $(echo "$out" | grep -m1 'O:')"
  else
    echo "FAIL verify --gpus 2 $args"; echo "$out"
  fi
}
if [ "$np" -eq 2 ]; then
  for args in "--causal --layout zigzag" "--layout striped --kv-heads 8" "--causal --window 300 --sinks 8" \
              "--attention linear --causal --decay 0.999"; do
    spawn same_bytes "$args"
  done
  for args in "--causal --layout zigzag --kv-heads 8" "--window 200 --sinks 16" "--attention linear --kv-heads 8"; do
    spawn verify_local "$args"
  done
fi

# Backward: smaller problems, since every rank builds the whole fp64 reference on its CPU.
grad_err() {  # the relative gradient error that verify printed
  echo "$1" | sed -n 's/.*dQ, dK, dV: max |err| \/ max |ref| \([0-9.e+-]*\).*/\1/p'
}
check_bwd() {  # name, strict|loose, then the verify flags; strict: the 1.5x rule at np > 1
  local name=$1 rule=$2
  shift 2
  local flags=(verify --backward --device cuda --seq 1024 --heads 4 "$@")
  if out=$("$mpiexec" "${mpi_flags[@]}" --bind-to none -np "$np" "$ringattn" "${flags[@]}" 2>&1); then
    local err one=""
    err=$(grad_err "$out")
    if [ "$np" -gt 1 ] && [ "$rule" = strict ]; then
      if ! one_out=$("$mpiexec" "${mpi_flags[@]}" --bind-to none -np 1 "$ringattn" "${flags[@]}" 2>&1); then
        echo "FAIL $name (np=1)"; echo "$one_out"; failed=1; return
      fi
      one=$(grad_err "$one_out")
      if ! awk -v a="$err" -v b="$one" 'BEGIN { exit !(a <= 1.5 * b + 1e-7) }'; then
        echo "FAIL $name: gradient error $err at np=$np exceeds 1.5x the np=1 error $one"; failed=1; return
      fi
      one=" (np=1: $one)"
    fi
    echo "ok   $name: gradient error $err$one"
  else
    echo "FAIL $name"; echo "$out"; failed=1
  fi
}
for layout in contiguous zigzag striped; do
  for causal in "" --causal; do
    for kv in 4 1; do
      spawn check_bwd "backward np=$np $layout ${causal:---full} kv-heads=$kv bf16" strict --kv-heads "$kv" --layout "$layout" \
        $causal --head-dim 128 --dtype bf16
    done
  done
  spawn check_bwd "backward np=$np $layout causal kv-heads=2 fp16 d64" strict --kv-heads 2 --layout "$layout" --causal \
    --head-dim 64 --dtype fp16
  spawn check_bwd "backward np=$np $layout causal kv-heads=1 bf16 native" strict --kv-heads 1 --layout "$layout" --causal \
    --head-dim 128 --dtype bf16 --kernel native
  # cuDNN in the ring rounds each task's gradients to the dtype: the absolute tolerance only.
  spawn check_bwd "backward np=$np $layout causal kv-heads=4 bf16 cudnn" loose --kv-heads 4 --layout "$layout" --causal \
    --head-dim 128 --dtype bf16 --kernel cudnn
done
# Sliding-window backward (native kernels with band masks; dK/dV sums sent straight home; the
# reverse pass for two-sided windows; sink gradients reduced over the ranks).
spawn check_bwd "backward np=$np window 300 sinks 8 causal kv-heads=2 bf16" strict --layout contiguous --causal --window 300 \
  --sinks 8 --head-dim 128 --dtype bf16 --kv-heads 2
spawn check_bwd "backward np=$np window 700 causal kv-heads=4 bf16" strict --layout contiguous --causal --window 700 \
  --head-dim 128 --dtype bf16 --kv-heads 4
spawn check_bwd "backward np=$np window 200 sinks 4 two-sided fp16 d64" strict --layout contiguous --window 200 --sinks 4 \
  --head-dim 64 --dtype fp16 --kv-heads 1
# Linear attention's backward (forward states walked forward, dual states backward, both
# scanned across ranks).
spawn check_bwd "backward np=$np linear causal decay 0.995 kv-heads=2 bf16" strict --layout contiguous --attention linear \
  --causal --decay 0.995 --head-dim 128 --dtype bf16 --kv-heads 2
spawn check_bwd "backward np=$np linear full elu1 fp16 d64" strict --layout contiguous --attention linear --head-dim 64 \
  --dtype fp16
spawn check_bwd "backward np=$np linear causal identity bf16" strict --layout contiguous --attention linear --causal \
  --feature-map identity --head-dim 128 --dtype bf16 --kv-heads 1
# One process on np GPUs with --backward (LocalGroup backward): verify's reference check, and
# at np 2 the same gradient bytes as mpirun -np 2 (native kernels: bitwise reproducible).
verify_local_bwd() {  # args: verify --gpus np --backward against the reference
  local args=$1 out
  if out=$("$ringattn" verify --gpus "$np" --backward --seq 1024 --heads 4 $args 2>&1); then
    echo "ok   verify --gpus $np --backward $args: $(grad_err "$out")"
  else
    echo "FAIL verify --gpus $np --backward $args"; echo "$out"
  fi
}
same_grad_bytes() {  # args: `mpirun -np 2 run --backward` and `run --gpus 2 --backward` write the same dQ, dK, dV
  local args=$1 tmp f ok=1
  tmp=$(mktemp -d)
  "$mpiexec" "${mpi_flags[@]}" --bind-to none -np 2 "$ringattn" run --device cuda --backward --kernel native --seq 2048 \
    --heads 8 --head-dim 128 $args --dq "$tmp/dq_a.npy" --dk "$tmp/dk_a.npy" --dv "$tmp/dv_a.npy" > "$tmp/a.log" 2>&1 || ok=0
  "$ringattn" run --gpus 2 --backward --kernel native --seq 2048 --heads 8 --head-dim 128 $args --dq "$tmp/dq_b.npy" \
    --dk "$tmp/dk_b.npy" --dv "$tmp/dv_b.npy" > "$tmp/b.log" 2>&1 || ok=0
  for f in dq dk dv; do cmp -s "$tmp/${f}_a.npy" "$tmp/${f}_b.npy" || ok=0; done
  if [ $ok -eq 1 ]; then
    echo "ok   --gpus 2 --backward == mpirun -np 2: $args"
  else
    echo "FAIL --gpus 2 --backward == mpirun -np 2: $args"; cat "$tmp/a.log" "$tmp/b.log"
  fi
  rm -rf "$tmp"
}
bench_breakdown() {  # `bench --backward --json`: every row's backward breakdown, one entry per step, within its run
  local tmp ok=1
  tmp=$(mktemp -d)
  "$mpiexec" "${mpi_flags[@]}" --bind-to none -np "$np" "$ringattn" bench --device cuda --backward --kernel native \
    --heads 8 --head-dim 128 --layout zigzag -b 2048 -e 2048 --warmup 1 --iters 1 --mask both --json "$tmp/b.json" \
    > "$tmp/b.log" 2>&1 || ok=0
  python3 - "$tmp/b.json" "$np" > "$tmp/check.log" 2>&1 <<'PY' || ok=0
import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
np_ = int(sys.argv[2])
assert len(rows) == 2, "two rows (both masks), got %d" % len(rows)
for row in rows:
    for kind in ("ring", "without_communication"):
        b = row["backward_ms"][kind]
        steps = b["step_kernels"]
        # a zigzag ring computes one step per rank
        assert len(steps) == np_, "%s: %d steps for %d ranks" % (kind, len(steps), np_)
        assert all(ms > 0 for ms in steps) and b["other"] >= 0, "%s: %s" % (kind, b)
        # the spans lie inside the run and do not overlap: together at most its span
        assert sum(steps) + b["other"] <= b["total"] + 0.01, "%s: the parts exceed the run: %s" % (kind, b)
    # The hops on the communication stream: none without communication; in the ring, np - 1
    # K/V hops and np hops of the dK/dV sums (passed on, then home, rounded to bf16 for the last).
    rows = 2048 // np_
    kv_bytes, sum_bytes = 2 * rows * 8 * 128 * 2, 2 * rows * 8 * 128 * 4
    hops = np_ - 1 if np_ > 1 else 0
    expect = {"ring": (hops, hops * kv_bytes, np_ if np_ > 1 else 0, hops * sum_bytes + (kv_bytes if np_ > 1 else 0)),
              "without_communication": (0, 0, 0, 0)}
    for kind, (kv_n, kv_b, sum_n, sum_b) in expect.items():
        kv, sums = row["backward_ms"][kind]["kv_transfers"], row["backward_ms"][kind]["sum_transfers"]
        assert (kv["count"], kv["bytes_received"]) == (kv_n, kv_b), "%s K/V transfers: %s" % (kind, kv)
        assert (sums["count"], sums["bytes_received"]) == (sum_n, sum_b), "%s sum transfers: %s" % (kind, sums)
        for t in (kv, sums):
            assert (t["ms"] > 0) == (t["count"] > 0), "%s: %s" % (kind, t)
    # Four profiled runs in the order without, with, with, without communication; the
    # breakdowns above are the means of each pair.
    runs = row["backward_ms"]["runs_in_order"]
    assert len(runs) == 4, "four profiled runs, got %d" % len(runs)
    for run, kind in zip(runs, ("without_communication", "ring", "ring", "without_communication")):
        assert run["kv_transfers"]["count"] == expect[kind][0], "%s run: %s" % (kind, run)
    for kind, pair in (("without_communication", (runs[0], runs[3])), ("ring", (runs[1], runs[2]))):
        mean = row["backward_ms"][kind]
        assert abs(mean["total"] - (pair[0]["total"] + pair[1]["total"]) / 2) < 1e-6, "%s: not the mean" % kind
        assert all(abs(m - (a + b) / 2) < 1e-6 for m, a, b in
                   zip(mean["step_kernels"], pair[0]["step_kernels"], pair[1]["step_kernels"])), kind
    fwd = row["forward_step_ms"]["kv_transfers"]
    assert (fwd["count"], fwd["bytes_received"]) == (hops, hops * kv_bytes) and (fwd["ms"] > 0) == (hops > 0), fwd
print("ok")
PY
  if [ $ok -eq 1 ]; then
    echo "ok   bench --backward breakdown (np=$np)"
  else
    echo "FAIL bench --backward breakdown (np=$np)"; cat "$tmp/b.log" "$tmp/check.log"
  fi
  rm -rf "$tmp"
}
spawn bench_breakdown
spawn verify_local_bwd "--causal --layout zigzag --kv-heads 2 --head-dim 128"
spawn verify_local_bwd "--layout contiguous --head-dim 64 --dtype fp16 --window 300"
if [ "$np" -eq 2 ]; then
  for args in "--causal --layout zigzag" "--layout striped --kv-heads 2"; do
    spawn same_grad_bytes "$args"
  done
fi
wait
flush
if grep -q '^FAIL' "$reports"/*.log; then failed=1; fi
exit $failed
