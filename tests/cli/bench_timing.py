#!/usr/bin/env python3
"""`ringattn bench --min-time`: the timed runs fill at least that many seconds (the ranks of a
ring agreeing on one count), --iters stays the minimum, and without it exactly --iters runs are
timed. Under a GPU's power cap the clock swings about once a second, so timings shorter than
a few seconds vary by several percent (docs/PERFORMANCE.md); this is how a sweep asks for
long enough ones.
"""
import json
import os
import sys

from common import mpirun, parse_args


def main():
    args = parse_args(__doc__)
    os.makedirs(args.workdir, exist_ok=True)
    failures = []
    shape = ["-b", "512", "-f", "2", "--heads", "2", "--head-dim", "32", "--mask", "no",
             "--warmup", "1", "--device", args.device]

    def rows(extra):
        path = os.path.join(args.workdir, "bench.json")
        proc, _ = mpirun(args, 2, ["bench"] + shape + extra + ["--json", path], timeout=300)
        if proc.returncode != 0:
            failures.append(f"bench {' '.join(extra)} failed:\n{proc.stderr[-2000:]}")
            return []
        with open(path) as f:
            return json.load(f)["rows"]

    solo = 2 if args.device == "cuda" else 0  # (the run without communication is timed on GPUs only)
    for row in rows(["-e", "1024", "--iters", "2"]):
        if (row["timed_runs"], row["solo_timed_runs"]) != (2, solo):
            failures.append(f"without --min-time: {row['timed_runs']} / {row['solo_timed_runs']} runs timed, "
                            f"not 2 / {solo}")
        else:
            print(f"ok   without --min-time: --iters runs timed at S={row['seq']}")
    min_time = 0.4
    for row in rows(["-e", "1024", "--iters", "2", "--min-time", str(min_time)]):
        runs = row["timed_runs"]
        span = runs * row["time_ms"] * 1e-3
        # The count comes from one probe run; the timed runs may run a little faster than it.
        if runs <= 2 or span < 0.7 * min_time:
            failures.append(f"--min-time {min_time} at S={row['seq']}: {runs} runs of {row['time_ms']:.3f} ms")
        else:
            print(f"ok   --min-time {min_time} at S={row['seq']}: {runs} runs, {span:.2f} s timed")
    for row in rows(["-e", "512", "--iters", "200", "--min-time", "0.01"]):
        if row["timed_runs"] != 200:
            failures.append(f"--iters 200 is the minimum, but {row['timed_runs']} runs were timed")
        else:
            print("ok   --iters is the minimum under --min-time")
    for f in failures:
        print("FAIL " + f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
