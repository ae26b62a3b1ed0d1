#!/usr/bin/env python3
"""Fault injection on the CPU ring (mpirun, 3 ranks): a rank stopped with SIGSTOP or killed
with SIGKILL in the middle of the ring. The job must end on its own, with no process left:

  SIGSTOP: exit code 124, an error line naming the stopped rank, within the time the other
           ranks need to finish their current step plus --timeout plus 5 s;
  SIGKILL: a non-zero exit within the same bound.
"""
import os
import signal
import subprocess
import sys
import time
import uuid

from common import parse_args

TIMEOUT = 4          # --timeout given to ringattn
STEP_SLACK = 12      # seconds the surviving ranks may still compute before they wait
PROBLEM = ["run", "--seq", "12288", "--heads", "8", "--head-dim", "64", "--timeout", str(TIMEOUT)]


def rank_pid(tag, rank):
    """The pid of the ringattn process of this launch (tag) with MPI rank `rank`, or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RINGATTN_FAULT_TAG={tag}".encode() in env and f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(entry)
    return None


def leftovers(tag):
    return [r for r in range(3) if rank_pid(tag, r) is not None]


def run_case(args, name, sig, expect_code):
    tag = uuid.uuid4().hex
    cmd = [args.mpiexec] + [f for f in args.mpiexec_flags.split(",") if f]
    cmd += ["-x", "RINGATTN_FAULT_TAG", "-x", "OMP_NUM_THREADS", "-np", "3", args.ringattn] + PROBLEM
    env = dict(os.environ, OMP_NUM_THREADS="1", RINGATTN_FAULT_TAG=tag)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    problems = []
    # Wait until rank 1 runs, then let the ring start.
    deadline = time.monotonic() + 30
    pid = None
    while pid is None and time.monotonic() < deadline and proc.poll() is None:
        pid = rank_pid(tag, 1)
        time.sleep(0.05)
    if pid is None:
        proc.kill()
        print(f"FAIL {name}: rank 1 never appeared")
        return False
    time.sleep(1.5)
    if proc.poll() is not None:
        print(f"FAIL {name}: the job ended before the fault could be injected (make the problem larger)")
        return False
    os.kill(pid, sig)
    hit = time.monotonic()
    try:
        out, err = proc.communicate(timeout=TIMEOUT + STEP_SLACK + 5 + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        os.kill(pid, signal.SIGKILL)
        print(f"FAIL {name}: the job hung")
        return False
    elapsed = time.monotonic() - hit
    time.sleep(0.5)
    left = leftovers(tag)
    if left:
        problems.append(f"ranks {left} still running")
        for r in left:
            p = rank_pid(tag, r)
            if p:
                os.kill(p, signal.SIGKILL)
    if elapsed > TIMEOUT + STEP_SLACK + 5:
        problems.append(f"took {elapsed:.1f} s after the fault (bound {TIMEOUT + STEP_SLACK + 5} s)")
    if expect_code is not None and proc.returncode != expect_code:
        problems.append(f"exit code {proc.returncode}, expected {expect_code}")
    if expect_code is None and proc.returncode == 0:
        problems.append("exit code 0 after a rank was killed")
    if sig == signal.SIGSTOP and "waited" not in err and "rank 1" not in err:
        problems.append("no error line naming rank 1")
    if sig == signal.SIGSTOP and not any("rank 1" in line for line in err.splitlines() if "ring step" in line):
        problems.append("the timeout message does not name rank 1")
    if problems:
        print(f"FAIL {name}: " + "; ".join(problems))
        print(err[-3000:])
        return False
    print(f"ok   {name}: exit {proc.returncode} {elapsed:.1f} s after the fault, no process left")
    return True


def main():
    args = parse_args(__doc__)
    results = [
        run_case(args, "SIGSTOP rank 1 mid-ring", signal.SIGSTOP, 124),
        run_case(args, "SIGKILL rank 1 mid-ring", signal.SIGKILL, None),
    ]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
