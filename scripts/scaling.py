#!/usr/bin/env python3
"""Strong- and weak-scaling experiments of the ring: sweeps, tables, plots, model.

  scripts/scaling.py run --np 2 4 8 --strong 262144:2097152 --weak 65536 --out results/h200x8 [--pytorch]
      runs `mpirun -np N ringattn bench --json ...` for every N: strong scaling over total
      lengths BEGIN, 2 BEGIN, ... END (the same problem on more GPUs), weak scaling at a fixed
      number of tokens per rank (`bench --per-rank`); with --pytorch also PyTorch context
      parallel (torchrun ... compare_pytorch.py cp) on the same shapes. Arguments after `--`
      go to every bench run. GPU by default (--device cpu for a quick look on any machine).
  scripts/scaling.py report results/h200x8 [--link-gbps 300] [--kernel-tflops 650]
      reads the JSON files of a run and writes scaling.md (tables: measured, model, peer) and
      strong.svg, weak.svg (TFLOP/s per GPU against the number of GPUs) into the directory.

The model (one rank of P, n = S / P tokens, K and V blocks of 2 B n H_kv D bytes per element):
  T_c  the rank's kernel time over its P steps: the run's own no-communication time (bench's
       solo_ms: the same kernels with every step on the rank's own block) where measured (GPU),
       else FLOPs / P / R with R = --kernel-tflops, else R = the per-GPU rate of the smallest
       run of the same length and mask (ideal scaling);
  T_m  one hop of a block (with --backward also its fp32 dK/dV sums): bytes / BW(bytes), BW
       from the NCCL send/recv rates measured between two H200s (210 GB/s at 16 MB, 274 at
       64 MB, 303 at 256 MB, 361 at 1 GB; log-interpolated; smaller blocks: 34 us + bytes /
       366 GB/s, fitted to the table's ends), or --link-gbps;
  each step's transfer hides behind that step's compute c = T_c / P (zigzag balances causal
  steps), the last step sends nothing:  T = T_c + (P - 1) max(0, T_m - c).
Predicted TFLOP/s per GPU = FLOPs / P / T. Where measured < predicted the ring loses time the
model does not know of (launches, merges, waits for a slow peer); see bench's per-step split.
"""
import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
import xml.sax.saxutils as saxutils

# NCCL send/recv, one direction, between the two H200s of the GPU machine (GB/s by bytes).
NCCL_P2P_GBPS = [(16 << 20, 210.0), (64 << 20, 274.0), (256 << 20, 303.0), (1 << 30, 361.0)]
ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def fail(msg):
    sys.exit(f"scaling.py: {msg}")


# --- run ----------------------------------------------------------------------------------------

def default_ringattn():
    here = os.path.dirname(os.path.abspath(__file__))
    for build in ("build-gpu", "build"):
        path = os.path.join(here, "..", build, "apps", "ringattn", "ringattn")
        if os.path.exists(path):
            return os.path.normpath(path)
    return shutil.which("ringattn") or "ringattn"


def run_logged(cmd, log, env=None):
    print("+ " + " ".join(cmd), flush=True)
    start = time.monotonic()
    with open(log, "a") as f:
        f.write("+ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        f.write(proc.stdout)
    for line in proc.stdout.splitlines():
        if not line.startswith("#   rank"):
            print("  " + line)
    print(f"  ({time.monotonic() - start:.0f} s, exit {proc.returncode})", flush=True)
    return proc.returncode


def cmd_run(a):
    if not a.strong and not a.weak:
        fail("nothing to run: give --strong BEGIN:END and/or --weak TOKENS_PER_RANK")
    strong = None
    if a.strong:
        try:
            begin, end = (int(x) for x in a.strong.split(":"))
        except ValueError:
            fail(f"--strong {a.strong}: expected BEGIN:END, total tokens, e.g. 262144:2097152")
        if begin <= 0 or end < begin:
            fail(f"--strong {a.strong}: need 0 < BEGIN <= END")
        strong = (begin, end)
    if a.weak is not None and a.weak <= 0:
        fail(f"--weak {a.weak}: tokens per rank must be positive")
    if any(n <= 0 for n in a.np):
        fail("--np: rank counts must be positive")
    os.makedirs(a.out, exist_ok=True)
    log = os.path.join(a.out, "run.log")
    mpiexec = [a.mpiexec] + [f for f in a.mpiexec_flags.split(",") if f]
    shape = ["--heads", str(a.heads), "--kv-heads", str(a.kv_heads or a.heads), "--head-dim", str(a.head_dim)]
    if a.min_time is None:
        a.min_time = 3.0 if a.device == "cuda" else 0.0
    if not 0 <= a.min_time <= 3600:
        fail(f"--min-time {a.min_time}: seconds from 0 to 3600")
    timing = ["--iters", str(a.iters), "--warmup", str(a.warmup)] + (["--min-time", str(a.min_time)] if a.min_time else [])
    bench = [a.ringattn, "bench", "--device", a.device, "--layout", a.layout, "--mask", a.mask] + timing + shape + \
        (["--backward"] if a.backward else [])
    if a.dtype:
        bench += ["--dtype", a.dtype]
    bench += a.bench_args
    failures = 0
    with open(os.path.join(a.out, "experiment.json"), "w") as f:
        json.dump({"np": a.np, "strong": strong, "weak": a.weak, "device": a.device, "mask": a.mask,
                   "backward": a.backward, "bench": bench, "date": time.strftime("%Y-%m-%d")}, f, indent=1)
    for n in a.np:
        runs = []
        if strong:
            runs.append(("strong", ["-b", str(strong[0]), "-e", str(strong[1]), "-f", "2"]))
        if a.weak:
            runs.append(("weak", ["--per-rank", "-b", str(a.weak), "-e", str(a.weak)]))
        for mode, lengths in runs:
            out = os.path.join(a.out, f"ringattn-{mode}-np{n}.json")
            failures += run_logged(mpiexec + ["-np", str(n)] + bench + lengths + ["--json", out], log) != 0
            if a.pytorch:
                peer = os.path.join(a.out, f"pytorch-{mode}-np{n}.json")
                b, e = (a.weak * n, a.weak * n) if mode == "weak" else strong  # total tokens
                cmd = [a.torchrun, "--nproc-per-node", str(n),
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "compare_pytorch.py"), "cp",
                       "-b", str(b), "-e", str(e), "-f", "2", "--causal", a.mask, "--json", peer] + timing + shape + \
                    (["--backward"] if a.backward else [])
                failures += run_logged(cmd, log) != 0
    print(f"# {failures} failed run(s); log: {log}; next: scripts/scaling.py report {a.out}")
    return 1 if failures else 0


# --- model --------------------------------------------------------------------------------------

def link_gbps(nbytes, fixed):
    if fixed:
        return fixed
    pts = NCCL_P2P_GBPS
    if nbytes < pts[0][0]:
        # Below the table: latency plus streaming, fitted to its ends (34 us + bytes / 366 GB/s).
        return nbytes / (34e-6 + nbytes / 366e9) / 1e9
    for (b0, g0), (b1, g1) in zip(pts, pts[1:]):
        if nbytes <= b1:
            t = math.log(nbytes / b0) / math.log(b1 / b0)
            return g0 + t * (g1 - g0)
    return pts[-1][1]


def flops(r):
    f = 4.0 * r["batch"] * r["seq"] ** 2 * r["heads"] * r["head_dim"] / (2 if r["causal"] else 1)
    return f * 3.5 if r.get("backward") else f


def fmt_rate(tflops):
    """TFLOP/s with two decimals, or three significant digits below 1 (tiny CPU runs would
    otherwise print as 0.00)."""
    return f"{tflops:.2f}" if tflops >= 1 else f"{tflops:.3g}"


def predict(r, ranks, baseline_tflops, a):
    """Predicted ms of one forward (or forward+backward) of row r at `ranks` ranks, and the
    source of the kernel time."""
    n = r["seq"] / ranks
    per_rank = flops(r) / ranks
    if r.get("solo_ms", 0.0) > 0.0:
        t_c, source = r["solo_ms"] * 1e-3, "solo"
    elif a.kernel_tflops:
        t_c, source = per_rank / (a.kernel_tflops * 1e12), "given"
    elif baseline_tflops:
        t_c, source = per_rank / (baseline_tflops * 1e12), "ideal"
    else:
        return None, "-"
    e = ELEMENT_BYTES.get(r.get("dtype", "bf16"), 2)
    block = 2 * r["batch"] * n * r["kv_heads"] * r["head_dim"] * e
    if r.get("backward"):
        block += 2 * r["batch"] * n * r["kv_heads"] * r["head_dim"] * 4  # the travelling fp32 dK/dV sums
    t_m = block / (link_gbps(block, a.link_gbps) * 1e9)
    c = t_c / ranks
    t = t_c + (ranks - 1) * max(0.0, t_m - c)
    return t * 1e3, source


# --- report -------------------------------------------------------------------------------------

def load(directory, tool, mode):
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, f"{tool}-{mode}-np*.json"))):
        ranks = int(path.rsplit("-np", 1)[1].split(".")[0])
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as err:
                fail(f"{path}: not JSON ({err})")
        out[ranks] = data.get("rows", [])
    return out


def key(r):
    return (r["seq"], bool(r["causal"]))


def fmt_seq(s):
    return f"{s // 1048576}M" if s % 1048576 == 0 else f"{s // 1024}k" if s % 1024 == 0 else str(s)


def table(mode, ours, peer, a):
    """Markdown rows and plot series of one scaling mode."""
    lines = []
    series = {}
    head = ("| S total | tokens/GPU | causal | GPUs | time (ms) | TFLOP/s per GPU | scaling eff. | model (ms) "
            "| measured / model | overlap | PyTorch CP TFLOP/s | ours / CP |")
    lines += [head, "|" + " --- |" * (head.count("|") - 1)]
    by_shape = {}
    for ranks, rows in ours.items():
        for r in rows:
            by_shape.setdefault(key(r) if mode == "strong" else (r["seq"] // ranks, bool(r["causal"])), {})[ranks] = r
    peer_rows = {}
    for ranks, rows in peer.items():
        for r in rows:
            peer_rows[(ranks, r["seq"], bool(r["causal"]))] = r
    for shape in sorted(by_shape):
        runs = by_shape[shape]
        base_ranks = min(runs)
        base = runs[base_ranks]["tflops_per_rank"]
        for ranks in sorted(runs):
            r = runs[ranks]
            eff = r["tflops_per_rank"] / base if base > 0 else float("nan")
            model_ms, source = predict(r, ranks, base, a)
            p = peer_rows.get((ranks, r["seq"], bool(r["causal"])))
            cp = f"{p['tflops_per_gpu']:.1f}" if p else "-"
            ratio = f"{r['tflops_per_rank'] / p['tflops_per_gpu']:.3f}" if p and p["tflops_per_gpu"] > 0 else "-"
            overlap = f"{r['overlap']:.3f}" if r.get("overlap", 0) > 0 else "-"
            model = "-" if model_ms is None else f"{model_ms:.3f} ({source})"
            versus = "-" if model_ms is None else f"{model_ms / r['time_ms']:.3f}"
            lines.append(
                f"| {fmt_seq(r['seq'])} | {fmt_seq(r['seq'] // ranks)} | {'yes' if r['causal'] else 'no'} | {ranks} "
                f"| {r['time_ms']:.3f} | {fmt_rate(r['tflops_per_rank'])} | {eff:.3f} | {model} | {versus} | {overlap} "
                f"| {cp} | {ratio} |")
            label = (f"S={fmt_seq(shape[0])}" if mode == "strong" else f"{fmt_seq(shape[0])}/GPU") + \
                (" causal" if shape[1] else " full")
            series.setdefault(label, []).append((ranks, r["tflops_per_rank"]))
            if model_ms:
                series.setdefault(label + " (model)", []).append((ranks, flops(r) / ranks / (model_ms * 1e-3) / 1e12))
            if p:
                series.setdefault(label + " (PyTorch CP)", []).append((ranks, p["tflops_per_gpu"]))
    return lines, series


COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def svg_chart(path, title, series):
    """A line chart (x: GPUs on a log2 axis, y: TFLOP/s per GPU) written as plain SVG."""
    w, h, left, right, top, bottom = 760, 440, 70, 250, 40, 50
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ymax = max((y for pts in series.values() for _, y in pts), default=1.0) or 1.0
    step = 10 ** math.floor(math.log10(ymax / 5)) if ymax > 0 else 1
    for m in (1, 2, 5, 10):
        if ymax / (step * m) <= 6:
            step *= m
            break
    ytop = step * math.ceil(ymax / step)
    lx = [math.log2(x) for x in xs]
    x0, x1 = (min(lx), max(lx)) if lx else (0, 1)
    span = (x1 - x0) or 1.0

    def px(x):
        return left + (math.log2(x) - x0) / span * (w - left - right) if x1 > x0 else left + (w - left - right) / 2

    def py(y):
        return top + (1 - y / ytop) * (h - top - bottom)

    esc = saxutils.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{left}" y="22" font-size="15">{esc(title)}</text>']
    y = 0.0
    while y <= ytop + 1e-9:
        out.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{w - right}" y2="{py(y):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        y += step
    for x in xs:
        out.append(f'<text x="{px(x):.1f}" y="{h - bottom + 18}" text-anchor="middle">{x}</text>')
    out.append(f'<text x="{(left + w - right) / 2:.0f}" y="{h - 10}" text-anchor="middle">GPUs (ranks)</text>')
    out.append(f'<text x="16" y="{(top + h - bottom) / 2:.0f}" transform="rotate(-90 16 {(top + h - bottom) / 2:.0f})" '
               f'text-anchor="middle">TFLOP/s per GPU</text>')
    out.append(f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="black"/>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="black"/>')
    bases = sorted({label.split(" (")[0] for label in series})
    for i, label in enumerate(sorted(series)):
        color = COLORS[bases.index(label.split(" (")[0]) % len(COLORS)]
        dash = ' stroke-dasharray="6 4"' if "(model)" in label else ' stroke-dasharray="2 3"' if "(PyTorch" in label else ""
        pts = sorted(series[label])
        coords = " ".join(f"{px(x):.1f},{py(v):.1f}" for x, v in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, v in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(v):.1f}" r="3" fill="{color}"/>')
        ly = top + 16 * i
        out.append(f'<line x1="{w - right + 12}" y1="{ly}" x2="{w - right + 36}" y2="{ly}" stroke="{color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(f'<text x="{w - right + 42}" y="{ly + 4}">{esc(label)}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def cmd_report(a):
    if not os.path.isdir(a.directory):
        fail(f"{a.directory}: no such directory")
    meta = {}
    meta_path = os.path.join(a.directory, "experiment.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
    md = [f"# Scaling: {a.directory}", ""]
    if meta:
        md += [f"Run {meta.get('date', '?')} on {meta.get('device', '?')}: `{' '.join(meta.get('bench', []))}`", ""]
    md += ["Model: see scripts/scaling.py (kernel time from `solo` = the run's no-communication time, `given` = "
           "--kernel-tflops, `ideal` = the smallest run's per-GPU rate; link: "
           + (f"{a.link_gbps} GB/s" if a.link_gbps else "NCCL send/recv rates measured on 2xH200") + ").", ""]
    found = False
    for mode in ("strong", "weak"):
        ours = load(a.directory, "ringattn", mode)
        if not ours:
            continue
        found = True
        peer = load(a.directory, "pytorch", mode)
        lines, series = table(mode, ours, peer, a)
        md += [f"## {'Strong' if mode == 'strong' else 'Weak'} scaling", "",
               "Scaling efficiency: per-GPU TFLOP/s relative to the fewest GPUs measured for the same shape.", ""]
        md += lines + ["", f"![{mode} scaling]({mode}.svg)", ""]
        svg_chart(os.path.join(a.directory, f"{mode}.svg"),
                  f"{'Strong' if mode == 'strong' else 'Weak'} scaling: TFLOP/s per GPU (solid: measured)", series)
    if not found:
        fail(f"{a.directory}: no ringattn-strong-np*.json or ringattn-weak-np*.json (run `scaling.py run` first)")
    path = os.path.join(a.directory, "scaling.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"# wrote {path}")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the sweeps")
    r.add_argument("--np", type=int, nargs="+", required=True, help="rank counts, e.g. 1 2 4 8")
    r.add_argument("--strong", metavar="BEGIN:END", help="strong scaling: total lengths BEGIN..END, doubling")
    r.add_argument("--weak", type=int, metavar="TOKENS", help="weak scaling: tokens per rank")
    r.add_argument("--out", required=True, help="directory for the JSON files and the log")
    r.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    r.add_argument("--heads", type=int, default=32)
    r.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    r.add_argument("--head-dim", type=int, default=128)
    r.add_argument("--dtype", default="", help="bench's --dtype (default: its own)")
    r.add_argument("--layout", default="zigzag")
    r.add_argument("--mask", default="both", choices=["no", "yes", "both"])
    r.add_argument("--backward", action="store_true", help="forward+backward")
    r.add_argument("--iters", type=int, default=5)
    r.add_argument("--warmup", type=int, default=2)
    r.add_argument("--min-time", type=float, default=None, metavar="SECONDS",
                   help="each timing covers at least this long (default: 3 on cuda, where the power cap's clock "
                        "swings about once a second; 0 on cpu)")
    r.add_argument("--pytorch", action="store_true", help="also PyTorch context parallel (torchrun)")
    r.add_argument("--ringattn", default=default_ringattn())
    r.add_argument("--mpiexec", default="mpirun")
    r.add_argument("--mpiexec-flags", default="--bind-to,none", help="comma-separated")
    r.add_argument("--torchrun", default="torchrun")
    r.add_argument("bench_args", nargs="*", help="after --: more bench arguments")
    q = sub.add_parser("report", help="tables and plots of a run")
    q.add_argument("directory")
    q.add_argument("--link-gbps", type=float, default=0.0, help="link rate for the model (default: NCCL table)")
    q.add_argument("--kernel-tflops", type=float, default=0.0, help="kernel rate where no solo time was measured")
    a = p.parse_args()
    sys.exit(cmd_run(a) if a.command == "run" else cmd_report(a))


if __name__ == "__main__":
    main()
