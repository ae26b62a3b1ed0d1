#!/usr/bin/env python3
"""Bad inputs end every rank with one clear error and a non-zero exit, within seconds.

Each case runs ringattn under mpirun and asserts: a non-zero exit (the expected code), that
every rank printed exactly one "ringattn: error (rank r of P): ..." line, that all ranks
printed the same message, that it contains the expected words, and that the job ended within
the time limit (no hang).
"""
import os
import re
import stat
import struct
import subprocess
import sys

import numpy as np

from common import mpirun, parse_args

ERROR_LINE = re.compile(r"^ringattn: error \(rank (\d+) of (\d+)\): (.*)$", re.M)


def write_npy_raw(path, header_dict, data=b""):
    """A .npy file with an arbitrary header (for malformed cases)."""
    header = header_dict.encode()
    pad = 64 - (10 + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data)


def make_files(workdir):
    rng = np.random.default_rng(1)
    f = {}
    def save(name, array):
        f[name] = os.path.join(workdir, name + ".npy")
        np.save(f[name], array)
    save("q", rng.standard_normal((64, 4, 32)).astype(np.float32))
    save("k", rng.standard_normal((64, 2, 32)).astype(np.float32))
    save("v", rng.standard_normal((64, 2, 32)).astype(np.float32))
    save("k_d48", rng.standard_normal((64, 2, 48)).astype(np.float32))
    save("k_h3", rng.standard_normal((64, 3, 32)).astype(np.float32))
    save("v_h3", rng.standard_normal((64, 3, 32)).astype(np.float32))
    save("k_s60", rng.standard_normal((60, 2, 32)).astype(np.float32))
    save("q_2d", rng.standard_normal((64, 128)).astype(np.float32))
    save("q_i32", np.zeros((64, 4, 32), dtype=np.int32))
    # Truncated: a valid header, half the data.
    full = open(f["q"], "rb").read()
    f["q_trunc"] = os.path.join(workdir, "q_trunc.npy")
    open(f["q_trunc"], "wb").write(full[: len(full) // 2])
    f["q_fortran"] = os.path.join(workdir, "q_fortran.npy")
    write_npy_raw(f["q_fortran"], "{'descr': '<f4', 'fortran_order': True, 'shape': (64, 4, 32), }",
                  bytes(64 * 4 * 32 * 4))
    # Values the run cannot use: NaN / inf in the file, or too large for the storage dtype.
    q = np.load(f["q"])
    bad = q.copy(); bad[5, 1, 3] = np.nan; save("q_nan", bad)
    bad = np.load(f["k"]); bad[40, 0, 0] = -np.inf; save("k_inf", bad)
    bad = q.copy(); bad[7, 2, 1] = 1e30; save("q_1e30", bad)
    bad = q.astype(np.float64); bad[9, 0, 2] = 1e300; save("q_f8_1e300", bad)
    f["garbage"] = os.path.join(workdir, "garbage.npy")
    open(f["garbage"], "wb").write(b"this is not a numpy file at all")
    f["missing"] = os.path.join(workdir, "does_not_exist.npy")
    return f


def has_gpu():
    try:
        return "GPU" in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False


def files(f, q="q", k="k", v="v"):
    return ["--q", f[q], "--k", f[k], "--v", f[v]]


def check(args, name, np_, cli, words, code=1, mpmd=None, limit=30.0):
    proc, seconds = mpirun(args, np_, cli, mpmd=mpmd, timeout=120)
    ranks = sum(n for n, _ in mpmd) if mpmd else np_
    errors = ERROR_LINE.findall(proc.stderr)
    problems = []
    if proc.returncode == 0:
        problems.append("exit code 0")
    elif code is not None and proc.returncode != code:
        problems.append(f"exit code {proc.returncode}, expected {code}")
    by_rank = {}
    for rank, world, message in errors:
        by_rank.setdefault(int(rank), []).append(message)
        if int(world) != ranks:
            problems.append(f"error line names world {world}, expected {ranks}")
    if sorted(by_rank) != list(range(ranks)) or any(len(m) != 1 for m in by_rank.values()):
        problems.append(f"expected one error line from each of {ranks} ranks, got {dict(by_rank)}")
    messages = {m for ms in by_rank.values() for m in ms}
    if len(messages) > 1:
        problems.append(f"ranks printed different errors: {messages}")
    for word in words:
        if not any(word in m for m in messages):
            problems.append(f"no error mentions '{word}'")
    if seconds > limit:
        problems.append(f"took {seconds:.1f} s (limit {limit} s)")
    status = "ok  " if not problems else "FAIL"
    shown = next(iter(messages), "<no error line>")
    print(f"{status} np={ranks} {name}: exit {proc.returncode}, {seconds:.1f} s: {shown}")
    for p in problems:
        print(f"     {p}")
    if problems:
        print(proc.stdout[-2000:], proc.stderr[-3000:])
    return not problems


def main():
    args = parse_args(__doc__)
    os.makedirs(args.workdir, exist_ok=True)
    f = make_files(args.workdir)
    out = os.path.join(args.workdir, "out.npy")
    cases = [
        ("head dims differ", 2, ["run"] + files(f, k="k_d48"), ["head_dim 48", "differs from q's 32"]),
        ("kv-heads do not divide heads (files)", 3, ["run"] + files(f, k="k_h3", v="v_h3"), ["does not divide"]),
        ("kv-heads do not divide heads (flags)", 4, ["run", "--seq", "64", "--heads", "4", "--kv-heads", "3"],
         ["kv-heads 3 does not divide q's heads 4"]),
        ("truncated .npy", 3, ["run"] + files(f, q="q_trunc"), ["q_trunc.npy", "truncated"]),
        ("missing .npy", 2, ["run"] + files(f, v="missing"), ["does_not_exist.npy"]),
        ("not a .npy file", 5, ["run"] + files(f, q="garbage"), ["garbage.npy"]),
        ("fortran-order .npy", 2, ["run"] + files(f, q="q_fortran"), ["ortran"]),
        ("integer .npy", 1, ["run"] + files(f, q="q_i32"), ["q_i32.npy"]),
        ("2-D q", 3, ["run"] + files(f, q="q_2d"), ["[S, H, D]"]),
        ("k sequence length differs", 2, ["run"] + files(f, k="k_s60"), ["sequence length 60 differs from q's 64"]),
        ("--seq conflicts with files", 2, ["run", "--seq", "128"] + files(f), ["--seq 128 conflicts"]),
        ("--q without --k/--v", 2, ["run", "--q", f["q"]], ["must be given together"]),
        ("fewer tokens than ranks", 5, ["run", "--seq", "4"], ["shorter than the 5 ranks"]),
        ("output directory missing", 2, ["run", "--seq", "64", "--out", "/nonexistent/dir/o.npy"], ["o.npy"]),
        ("unknown flag", 3, ["run", "--bogus"], ["--bogus"], 2),
        ("bad layout name", 2, ["run", "--layout", "ring"], ["ring"], 2),
        ("zero heads", 2, ["verify", "--heads", "0"], ["--heads"], 2),
        # A negative or NaN tolerance made every element pass (x <= NaN is false, x / NaN is NaN).
        ("verify: NaN --atol", 2, ["verify", "--seq", "64", "--atol", "nan"], ["--atol", "finite number >= 0"], 2),
        ("verify: negative --rtol", 2, ["verify", "--seq", "64", "--rtol", "-1"], ["--rtol", "finite number >= 0"], 2),
        ("--dout without --backward", 2, ["run"] + files(f) + ["--dout", f["q"]], ["--dout needs --backward"]),
        ("bench: -e below -b", 3, ["bench", "-b", "512", "-e", "256"], ["-e 256 is below -b 512"]),
        ("bench: factor 1", 2, ["bench", "-f", "1"], ["--factor"], 2),
        ("bench: --min-time NaN", 2, ["bench", "--min-time", "nan"], ["--min-time: must be a number of seconds"], 2),
        ("bench: --min-time negative", 2, ["bench", "--min-time=-1"], ["--min-time: must be a number of seconds"], 2),
        ("--kernel cudnn on the cpu", 2, ["run", "--seq", "64", "--kernel", "cudnn"], ["--kernel cudnn needs --device cuda"]),
        ("unknown --kernel", 2, ["run", "--kernel", "flash"], ["flash"], 2),
        ("linear attention, zigzag layout", 3, ["run", "--seq", "64", "--attention", "linear", "--layout", "zigzag"],
         ["needs the contiguous layout"]),
        ("linear attention, decay above 1", 2, ["run", "--seq", "64", "--attention", "linear", "--causal", "--decay",
                                                "1.5"], ["(0, 1]"], 2),
        ("linear attention with --scale", 2, ["run", "--seq", "64", "--attention", "linear", "--scale", "0.5"],
         ["linear attention has no softmax scale"]),
        ("linear attention, decay without --causal", 4, ["run", "--seq", "64", "--attention", "linear", "--decay",
                                                         "0.9"], ["needs causal"]),
        ("--decay without --attention linear", 2, ["run", "--seq", "64", "--decay", "0.9"],
         ["need --attention linear"]),
        ("linear attention with --lse", 2, ["run", "--seq", "64", "--attention", "linear", "--lse",
                                            os.path.join(args.workdir, "lse.npy")], ["no LSE"]),
        ("sliding window, zigzag layout", 3, ["run", "--seq", "64", "--causal", "--window", "8", "--layout", "zigzag"],
         ["needs the contiguous layout"]),
        ("--sinks without --window", 2, ["run", "--seq", "64", "--causal", "--sinks", "4"], ["need a sliding window"]),
        ("--gpus under mpirun", 2, ["run", "--seq", "64", "--gpus", "2"], ["one rank per GPU instead"]),
        ("--gpus with --device cpu", 1, ["run", "--seq", "64", "--gpus", "2", "--device", "cpu"],
         ["drop --device cpu"]),
        ("--gpus 0", 1, ["run", "--seq", "64", "--gpus", "0"], ["--gpus"], 2),
        ("bench --gpus", 1, ["bench", "--gpus", "2"], ["bench --gpus is not available"]),
        # Sizes whose product overflows wrapped to a tiny buffer, and the input fill crashed.
        ("sizes that overflow", 2, ["run", "--batch", "4611686018427387904", "--seq", "2", "--heads", "1",
                                    "--head-dim", "1"], ["too large"]),
        ("gradients without --backward", 2, ["run", "--seq", "64", "--dq", os.path.join(args.workdir, "dq.npy")],
         ["need --backward"]),
        ("two outputs, one file", 2, ["run", "--seq", "64", "--out", out, "--lse", out], ["--out and --lse", "same file"]),
        ("an output over an input", 2, ["run"] + files(f) + ["--out", f["q"]], ["--out and --q", "same file"]),
        # Inputs that are not finite, or not finite once stored, made every output NaN with exit 0.
        ("NaN in q", 3, ["run"] + files(f, q="q_nan"), ["q_nan.npy", "nan at [5, 1, 3]", "not finite"]),
        ("-inf in k", 2, ["run"] + files(f, k="k_inf"), ["k_inf.npy", "-inf at [40, 0, 0]"]),
        ("1e30 stored as fp16", 2, ["run", "--dtype", "fp16"] + files(f, q="q_1e30"),
         ["q_1e30.npy", "1e+30 at [7, 2, 1] does not fit fp16"]),
        ("1e300 in a float64 file", 1, ["run"] + files(f, q="q_f8_1e300"), ["does not fit fp32"]),
        ("scores beyond fp32", 2, ["run", "--seq", "64", "--scale", "2e38"], ["O is nan", "overflowed"]),
        ("--scale times log2(e) beyond fp32", 2, ["run", "--seq", "64", "--scale", "3e38"], ["--scale", "2.36e38"], 2),
        ("--scale beyond fp32", 2, ["run", "--seq", "64", "--scale", "1e300"], ["--scale", "fp32"], 2),
        ("--seed -1", 2, ["run", "--seq", "64", "--seed", "-1"], ["--seed", "18446744073709551615"], 2),
        ("--seed past 2^64", 1, ["run", "--seq", "64", "--seed", "18446744073709551616"], ["--seed"], 2),
        ("--timeout nan", 2, ["run", "--seq", "64", "--timeout", "nan"], ["--timeout"], 2),
        ("--timeout below a second", 2, ["run", "--seq", "64", "--timeout", "1e-9"], ["--timeout"], 2),
        # The .npy writer moves a finished temporary into place: over a device it replaced it.
        ("--out onto a device", 2, ["run", "--seq", "64", "--out", "/dev/null"], ["--out /dev/null",
                                                                                 "not a regular file"]),
        ("--json is a directory", 2, ["run", "--seq", "64", "--json", args.workdir], ["--json", "is a directory"]),
        ("bench on input files", 2, ["bench", "-b", "64", "-e", "64"] + files(f), ["takes no --q"]),
        ("bench: --per-rank length overflows", 3, ["bench", "--per-rank", "-b", "6148914691236517227", "-e",
                                                   "6148914691236517227"], ["overflows the sequence length"]),
    ]
    if not has_gpu():
        cases.append(("--device cuda without a GPU", 2, ["run", "--seq", "64", "--device", "cuda"], ["cuda"]))
        cases.append(("--gpus 2 without a GPU", 1, ["run", "--seq", "64", "--gpus", "2"], ["does not exist"]))
    else:
        # The native kernels took a row whose scaled scores left fp32 for a row that sees no
        # key: O = 0 and LSE = 0, exit 0.
        cases.append(("scores beyond fp32, native GPU kernel", 1, ["run", "--seq", "300", "--device", "cuda", "--kernel",
                                                                   "native", "--scale", "2e38"], ["O is nan", "overflowed"]))
    results = [check(args, *c[:4], code=c[4] if len(c) > 4 else 1) for c in cases]
    # An output that cannot be written fails before the run, so no earlier output is left behind.
    early = os.path.join(args.workdir, "early_out.npy")
    if os.path.exists(early):
        os.remove(early)
    results.append(check(args, "--json into a missing directory, with --out", 2,
                         ["run", "--seq", "64", "--out", early, "--json", "/nonexistent/dir/r.json"],
                         ["--json /nonexistent/dir/r.json", "No such file"]))
    if os.path.exists(early):
        print(f"FAIL --json into a missing directory: {early} was written")
        results.append(False)
    if not stat.S_ISCHR(os.stat("/dev/null").st_mode):
        print("FAIL /dev/null is no longer a character device")
        results.append(False)
    # Ranks started with different options (an MPMD launch) fail together before any transfer.
    results.append(check(args, "MPMD: different --seq", 0, None, ["rank 1 has --seq=1000 but rank 0 has --seq=512"],
                         mpmd=[(1, ["run", "--seq", "512"]), (2, ["run", "--seq", "1000"])]))
    results.append(check(args, "MPMD: different --causal", 0, None, ["--causal"],
                         mpmd=[(2, ["run", "--seq", "256"]), (1, ["run", "--seq", "256", "--causal"])]))
    # A different --timeout on one rank ran to the end (the bound would differ per rank).
    results.append(check(args, "MPMD: different --timeout", 0, None, ["--timeout"],
                         mpmd=[(1, ["run", "--seq", "64", "--timeout", "5"]), (1, ["run", "--seq", "64"])]))
    results.append(check(args, "MPMD: one rank's bad flag", 0, None, ["--bogus"], code=2,
                         mpmd=[(1, ["run", "--seq", "256"]), (1, ["run", "--seq", "256", "--bogus"])]))
    # ... and so must ranks that run different subcommands or write files on some ranks only
    # (both waited for each other in different collectives until the timeout).
    results.append(check(args, "MPMD: different subcommands", 0, None,
                         ["rank 1 has the subcommand=verify but rank 0 has the subcommand=run"],
                         mpmd=[(1, ["run", "--seq", "64"]), (1, ["verify", "--seq", "64"])]))
    results.append(check(args, "MPMD: --out on one rank", 0, None, ["--out"],
                         mpmd=[(1, ["run", "--seq", "64", "--out", out]), (1, ["run", "--seq", "64"])]))
    results.append(check(args, "MPMD: run and info", 0, None, ["subcommand=info"],
                         mpmd=[(1, ["run", "--seq", "64"]), (1, ["info"])]))
    print(f"{sum(results)} of {len(results)} bad-input cases behaved")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
