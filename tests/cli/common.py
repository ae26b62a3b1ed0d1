"""Shared helpers of the CLI tests: launching ringattn under mpirun."""
import argparse
import os
import subprocess
import time


def parse_args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--ringattn", required=True, help="path of the ringattn executable")
    p.add_argument("--mpiexec", required=True, help="mpirun")
    p.add_argument("--mpiexec-flags", default="", help="extra mpirun flags, comma-separated")
    p.add_argument("--workdir", required=True, help="scratch directory")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tested ring runs")
    return p.parse_args()


def mpirun(args, np_, cli_args, timeout=120, mpmd=None):
    """Runs `mpirun -np np_ ringattn cli_args` (or an MPMD launch: mpmd = [(np, args), ...])."""
    cmd = [args.mpiexec] + [f for f in args.mpiexec_flags.split(",") if f]
    apps = mpmd if mpmd is not None else [(np_, cli_args)]
    for i, (n, a) in enumerate(apps):
        if i:
            cmd.append(":")
        cmd += ["-np", str(n), args.ringattn] + list(a)
    start = time.monotonic()
    # Keep the environment: launchers and drivers are configured through it (OMPI_MCA_*,
    # LD_LIBRARY_PATH). One thread per rank keeps oversubscribed runs quick.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return proc, time.monotonic() - start
