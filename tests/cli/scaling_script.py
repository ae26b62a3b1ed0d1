#!/usr/bin/env python3
"""scripts/scaling.py end to end on CPU ranks: `run` sweeps strong and weak scaling at np 1
and 2 through mpirun, `report` writes the tables (measured, model, efficiency) and the SVG
plots; bad arguments and an empty directory end with one clear error and a non-zero exit.
"""
import os
import re
import shutil
import subprocess
import sys
import xml.dom.minidom

from common import parse_args

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "scaling.py")


def scaling(args, *argv):
    cmd = [sys.executable, SCRIPT] + list(argv)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def main():
    args = parse_args(__doc__)
    out = os.path.join(args.workdir, "sweep")
    shutil.rmtree(out, ignore_errors=True)
    failures = []

    def check(ok, what):
        print(("ok   " if ok else "FAIL ") + what)
        if not ok:
            failures.append(what)

    proc = scaling(args, "run", "--device", "cpu", "--np", "1", "2", "--strong", "256:512", "--weak", "128",
                   "--heads", "2", "--head-dim", "32", "--iters", "1", "--warmup", "1", "--ringattn", args.ringattn,
                   "--mpiexec", args.mpiexec, "--mpiexec-flags=" + args.mpiexec_flags, "--out", out)
    check(proc.returncode == 0, f"run exits 0 (got {proc.returncode}): {proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    for name in ("ringattn-strong-np1.json", "ringattn-strong-np2.json", "ringattn-weak-np1.json",
                 "ringattn-weak-np2.json", "experiment.json", "run.log"):
        check(os.path.exists(os.path.join(out, name)), f"run wrote {name}")

    proc = scaling(args, "report", out)
    check(proc.returncode == 0, f"report exits 0 (got {proc.returncode}): {proc.stderr[-1500:]}")
    md = open(os.path.join(out, "scaling.md")).read() if os.path.exists(os.path.join(out, "scaling.md")) else ""
    rows = [line for line in md.splitlines() if re.match(r"\| \d", line)]
    # Strong: S in {256, 512} x mask {no, yes} x np {1, 2}; weak: 128/rank x mask x np.
    check(len(rows) == 12, f"12 table rows (got {len(rows)})")
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        time_ms, tflops, eff, model = float(cells[4]), float(cells[5]), float(cells[6]), cells[7]
        good = time_ms > 0 and tflops > 0 and eff > 0 and re.match(r"[\d.]+ \((solo|given|ideal)\)", model)
        check(bool(good), f"row has positive time, TFLOP/s, efficiency and a model prediction: {line}")
    for cells in ([c.strip() for c in r.strip("|").split("|")] for r in rows):
        if cells[3] == "1":
            check(cells[6] == "1.000", f"the fewest-GPU run is the efficiency baseline: {cells}")
    for plot in ("strong.svg", "weak.svg"):
        path = os.path.join(out, plot)
        try:
            doc = xml.dom.minidom.parse(path)
            lines = doc.getElementsByTagName("polyline")
            check(len(lines) >= 2, f"{plot} parses and has measured and model lines ({len(lines)})")
        except Exception as err:  # noqa: BLE001 (any parse failure is the finding)
            check(False, f"{plot} parses as SVG: {err}")

    # The model on GPU-like rows (bench's solo_ms present): compute-bound, the transfer hidden
    # (T = T_c); communication-bound, P - 1 exposed remainders (T = T_c + (P - 1)(T_m - T_c / P)).
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import scaling as model  # noqa: E402

    class Opts:
        link_gbps = 0.0
        kernel_tflops = 0.0

    row = {"seq": 262144, "batch": 1, "heads": 32, "kv_heads": 32, "head_dim": 128, "causal": False,
           "dtype": "bf16", "solo_ms": 1000.0}
    block = 2 * 131072 * 32 * 128 * 2
    t_m = block / (model.link_gbps(block, 0.0) * 1e9) * 1e3
    got, source = model.predict(row, 2, None, Opts)
    check(source == "solo" and abs(got - 1000.0) < 1e-9, f"compute-bound prediction = solo time ({got} ms)")
    row["solo_ms"] = 1.0
    got, _ = model.predict(row, 2, None, Opts)
    check(abs(got - (1.0 + (t_m - 0.5))) < 1e-9 and t_m > 0.5, f"comm-bound prediction {got} ms, hop {t_m} ms")
    Opts.link_gbps = 100.0
    got, _ = model.predict(row, 2, None, Opts)
    check(abs(got - (1.0 + block / 100e9 * 1e3 - 0.5)) < 1e-9, f"--link-gbps overrides the table ({got} ms)")

    bad = [
        (("run", "--np", "2", "--strong", "512", "--out", out), "expected BEGIN:END"),
        (("run", "--np", "2", "--out", out), "nothing to run"),
        (("run", "--np", "0", "--weak", "64", "--out", out), "rank counts must be positive"),
        (("report", os.path.join(args.workdir, "no-such-dir")), "no such directory"),
    ]
    empty = os.path.join(args.workdir, "empty")
    os.makedirs(empty, exist_ok=True)
    bad.append((("report", empty), "no ringattn-strong-np*.json"))
    for argv, message in bad:
        proc = scaling(args, *argv)
        check(proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr,
              f"`scaling.py {' '.join(argv[:3])} ...` fails with '{message}' (exit {proc.returncode}: "
              f"{proc.stderr.strip()[-300:]})")
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
