#!/usr/bin/env python3
"""Two promises of docs/RELIABILITY.md, end to end under mpirun:

  reports: a JSON report records the NCCL_, CUDA_, OMPI_, SLURM_ and UCX_ variables of the
           environment and nothing else (a planted secret must not appear);
  repeats: two runs with the same seed and rank count write bitwise-identical outputs (the
           SHA-256 of O, LSE and, with --backward, dQ, dK, dV), for the ring and for the
           sliding-window and linear-attention paths.
"""
import hashlib
import json
import os
import subprocess
import sys

from common import parse_args


def run(args, np_, cli_args, extra_env=None):
    cmd = [args.mpiexec] + [f for f in args.mpiexec_flags.split(",") if f]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    for name in (extra_env or {}):
        cmd += ["-x", name]
    cmd += ["-np", str(np_), args.ringattn] + cli_args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main():
    args = parse_args(__doc__)
    os.makedirs(args.workdir, exist_ok=True)
    ok = True

    report = os.path.join(args.workdir, "report.json")
    proc = run(args, 2, ["run", "--seq", "256", "--json", report],
               {"NCCL_DEBUG_SUBSYS": "INIT", "RINGATTN_TEST_SECRET": "do-not-record", "UCX_TLS": "self"})
    if proc.returncode != 0:
        print("FAIL reports: run failed\n" + proc.stderr[-2000:])
        return 1
    with open(report) as f:
        text = f.read()
    env = json.loads(text).get("environment", {})
    allowed = ("NCCL_", "CUDA_", "OMPI_", "SLURM_", "UCX_")
    stray = [k for k in env if not k.startswith(allowed)]
    if "do-not-record" in text or "RINGATTN_TEST_SECRET" in text or stray:
        print(f"FAIL reports: recorded more than it should: {stray}")
        ok = False
    elif env.get("NCCL_DEBUG_SUBSYS") != "INIT" or env.get("UCX_TLS") != "self":
        print(f"FAIL reports: NCCL_/UCX_ variables missing: {sorted(env)}")
        ok = False
    else:
        print(f"ok   reports: {len(env)} variables, all with the allowed prefixes, the secret absent")

    cases = {
        "ring backward": ["run", "--seq", "301", "--heads", "4", "--kv-heads", "2", "--causal", "--layout", "zigzag",
                          "--dtype", "bf16", "--backward"],
        "sliding window": ["run", "--seq", "301", "--heads", "4", "--causal", "--window", "40", "--sinks", "3"],
        "linear": ["run", "--seq", "301", "--heads", "4", "--causal", "--attention", "linear", "--decay", "0.9"],
    }
    for name, cli in cases.items():
        digests = []
        for attempt in range(2):
            outs = {k: os.path.join(args.workdir, f"{k}{attempt}.npy") for k in ("out", "lse", "dq", "dk", "dv")}
            flags = ["--out", outs["out"]]
            if "linear" not in name:
                flags += ["--lse", outs["lse"]]
            if "--backward" in cli:
                flags += ["--dq", outs["dq"], "--dk", outs["dk"], "--dv", outs["dv"]]
            proc = run(args, 3, cli + flags)
            if proc.returncode != 0:
                print(f"FAIL repeats {name}: run failed\n" + proc.stderr[-2000:])
                return 1
            digests.append([sha(p) for p in outs.values() if os.path.exists(p) and p in flags])
        if digests[0] != digests[1] or not digests[0]:
            print(f"FAIL repeats {name}: outputs differ between two runs")
            ok = False
        else:
            print(f"ok   repeats {name}: {len(digests[0])} files bitwise identical (sha256 {digests[0][0][:12]}...)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
