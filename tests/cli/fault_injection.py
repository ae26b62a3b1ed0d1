#!/usr/bin/env python3
"""Fault injection on the ring: a rank stopped with SIGSTOP or killed with SIGKILL in the middle
of the ring. The job must end on its own, with no process left:

  SIGSTOP: exit code 124, an error line naming the stopped rank, within the time the other
           ranks need to finish their current step plus --timeout plus 5 s;
  SIGKILL: a non-zero exit within the same bound.

--device cpu: `ringattn run` on 3 CPU ranks; also rank 0 stuck opening a named pipe as its
input before the ring (the others wait in a host collective): exit 124 within --timeout plus
the slack. --device cuda: `ringattn bench` on 2 GPUs (two
iterations in flight, every wait under the watchdog); exits 77 (skipped) with fewer GPUs.
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
RANKS = {"cpu": 3, "cuda": 2}
PROBLEMS = {
    "cpu": ["run", "--seq", "12288", "--heads", "8", "--head-dim", "64", "--timeout", str(TIMEOUT)],
    # ~30 ms per iteration on 2xH200: the ring runs for minutes unless the fault ends it.
    "cuda": ["bench", "--device", "cuda", "-b", "65536", "-e", "65536", "--mask", "yes", "--heads", "32",
             "--head-dim", "128", "--layout", "zigzag", "--iters", "20000", "--warmup", "1", "--timeout", str(TIMEOUT)],
}
SETTLE = {"cpu": 1.5, "cuda": 20.0}  # seconds from rank 1's start until its ring is running


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


def leftovers(tag, ranks):
    return [r for r in range(ranks) if rank_pid(tag, r) is not None]


def run_case(args, name, sig, expect_code):
    tag = uuid.uuid4().hex
    cmd = [args.mpiexec] + [f for f in args.mpiexec_flags.split(",") if f]
    ranks = RANKS[args.device]
    cmd += ["-x", "RINGATTN_FAULT_TAG", "-x", "OMP_NUM_THREADS"] + (["--bind-to", "none"] if args.device == "cuda" else [])
    cmd += ["-np", str(ranks), args.ringattn]
    cmd += PROBLEMS[args.device]
    out_file = os.path.join(args.workdir, f"fault_out_{tag}.npy")
    if args.device == "cpu":
        os.makedirs(args.workdir, exist_ok=True)
        cmd += ["--out", out_file]
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
    time.sleep(SETTLE[args.device])
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
    left = leftovers(tag, ranks)
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
    # The stop lands mid-ring unless the machine is so loaded that rank 1 is still before its
    # ring after SETTLE seconds; the others then time out in a host collective instead, which
    # must name rank 1 as stopped just the same.
    if sig == signal.SIGSTOP and not any("rank 1" in line for line in err.splitlines()
                                         if "ring step" in line or "rank 1 (pid" in line and "is stopped" in line):
        problems.append("the timeout message does not name rank 1")
    # No output file may appear for a job that failed (writes go through a renamed temporary).
    if os.path.exists(out_file):
        problems.append(f"{out_file} exists after the failed job")
    if problems:
        print(f"FAIL {name}: " + "; ".join(problems))
        print(err[-3000:])
        return False
    shown = next((line for line in err.splitlines() if "ring step" in line), "")
    print(f"ok   {name} ({args.device}): exit {proc.returncode} {elapsed:.1f} s after the fault, no process left"
          + (f"\n     {shown.strip()}" if shown else ""))
    return True


def stuck_reading_case(args):
    """Rank 0 reads the .npy headers for everyone; given a named pipe that no one writes, it
    blocks in open() (as on a hung network file system) while the others wait for the header
    in a host collective, which waited for ever. They must give up after --timeout: exit 124,
    an error naming the file's reading, no process left."""
    name = "rank 0 stuck opening a named pipe"
    fifo = os.path.join(args.workdir, f"fault_fifo_{uuid.uuid4().hex}.npy")
    os.makedirs(args.workdir, exist_ok=True)
    os.mkfifo(fifo)
    tag = uuid.uuid4().hex
    cmd = [args.mpiexec] + [f for f in args.mpiexec_flags.split(",") if f]
    cmd += ["-x", "RINGATTN_FAULT_TAG", "-np", "3", args.ringattn, "run", "--q", fifo, "--k", fifo, "--v", fifo,
            "--timeout", str(TIMEOUT)]
    env = dict(os.environ, OMP_NUM_THREADS="1", RINGATTN_FAULT_TAG=tag)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    problems = []
    try:
        _, err = proc.communicate(timeout=TIMEOUT + STEP_SLACK + 30)
    except subprocess.TimeoutExpired:
        proc.kill()
        for r in leftovers(tag, 3):
            os.kill(rank_pid(tag, r), signal.SIGKILL)
        os.remove(fifo)
        print(f"FAIL {name}: the job hung")
        return False
    elapsed = time.monotonic() - start
    os.remove(fifo)
    time.sleep(0.5)
    left = leftovers(tag, 3)
    for r in left:
        os.kill(rank_pid(tag, r), signal.SIGKILL)
    if left:
        problems.append(f"ranks {left} still running")
    if proc.returncode != 124:
        problems.append(f"exit code {proc.returncode}, expected 124")
    if elapsed > TIMEOUT + STEP_SLACK:
        problems.append(f"took {elapsed:.1f} s (bound {TIMEOUT + STEP_SLACK} s)")
    shown = next((line for line in err.splitlines() if f"waited {TIMEOUT} s" in line and "the reading of" in line), "")
    if not shown:
        problems.append("no error line saying which wait ran out")
    if problems:
        print(f"FAIL {name}: " + "; ".join(problems))
        print(err[-3000:])
        return False
    print(f"ok   {name} (cpu): exit 124 after {elapsed:.1f} s, no process left\n     {shown.strip()}")
    return True


def gpus():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
        return sum(1 for line in out.splitlines() if line.startswith("GPU"))
    except (OSError, subprocess.SubprocessError):
        return 0


def main():
    args = parse_args(__doc__)
    if args.device == "cuda" and gpus() < RANKS["cuda"]:
        print(f"skipped: {RANKS['cuda']} GPUs needed")
        sys.exit(77)
    results = [
        run_case(args, "SIGSTOP rank 1 mid-ring", signal.SIGSTOP, 124),
        run_case(args, "SIGKILL rank 1 mid-ring", signal.SIGKILL, None),
    ]
    if args.device == "cpu":
        results.append(stuck_reading_case(args))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
