#!/usr/bin/env python3
"""Summarise Nsight Compute's per-instruction (SASS) counters for one kernel.

  ncu -k regex:NAME --section SourceCounters --section WarpStateStats -o prof ringattn bench ...
  ncu -i prof.ncu-rep --page source --csv --print-source sass > sass.csv
  python3 scripts/ncu_hotspots.py sass.csv [substring of the kernel name]

Prints the kernel's warp-stall reasons in total, the 45 instructions with the most stall
samples (in program order, with their two main stall reasons), and every instruction with
excess shared-memory wavefronts (bank conflicts), then the instructions executed per opcode
with the threads each kept predicated on, and the instructions that leave the most thread
slots idle (divergence or a false predicate). Used for docs/PERFORMANCE.md.
"""
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
kern = sys.argv[2] if len(sys.argv) > 2 else ''
i = 0
while i < len(rows):
    r = rows[i]
    if r and r[0] == "Kernel Name":
        name = r[1]; hdr = rows[i + 1]; j = i + 2; body = []
        while j < len(rows) and not (rows[j] and rows[j][0] == "Kernel Name"):
            if len(rows[j]) == len(hdr): body.append(rows[j])
            j += 1
        i = j
        if kern not in name: continue
        H = {h: k for k, h in enumerate(hdr)}
        def g(row, col):
            try: return float(row[H[col]])
            except: return 0.0
        tot = sum(g(b, "Warp Stall Sampling (All Samples)") for b in body)
        print("==", name[:100], "instrs", len(body), "samples", tot)
        stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
        agg = {s: sum(g(b, s) for b in body) for s in stalls}
        print("stall totals:", ", ".join(f"{s[6:]}={100*v/tot:.1f}%" for s, v in sorted(agg.items(), key=lambda x: -x[1]) if v > 0.005 * tot))
        print("-- top 45 by samples (idx, samples%, top stalls, instr)")
        idx = sorted(range(len(body)), key=lambda k: -g(body[k], "Warp Stall Sampling (All Samples)"))[:45]
        for k in sorted(idx):
            b = body[k]; s = g(b, "Warp Stall Sampling (All Samples)")
            top = sorted(((g(b, st), st[6:]) for st in stalls), reverse=True)[:2]
            print(f"{k:5d} {100*s/tot:5.2f}% {top[0][1]}:{top[0][0]:.0f} {top[1][1]}:{top[1][0]:.0f}  {b[H['Source']].strip()[:70]}")
        print("-- shared excess wavefronts")
        for k, b in enumerate(body):
            ex = g(b, "L1 Wavefronts Shared Excessive")
            if ex > 0: print(f"{k:5d} excess {ex:.3g} ideal {g(b,'L1 Wavefronts Shared Ideal'):.3g}  {b[H['Source']].strip()[:70]}")
        ex_col = next((h for h in hdr if h == "Instructions Executed"), None)
        on_col = next((h for h in hdr if "Predicated-On Thread Instructions" in h), None)
        if not ex_col or not on_col:
            print("-- no instruction counts; columns:", hdr); continue
        def opcode(src):
            t = src.strip().split()
            if t and t[0].startswith("@"): t = t[1:]
            return t[0].split(".")[0] if t else "?"
        n_ex = sum(g(b, ex_col) for b in body); n_on = sum(g(b, on_col) for b in body)
        print(f"-- instructions executed {n_ex:.4g}, threads predicated on per instruction {n_on / max(n_ex, 1):.2f}")
        ops = {}
        for b in body:
            o = ops.setdefault(opcode(b[H['Source']]), [0.0, 0.0])
            o[0] += g(b, ex_col); o[1] += g(b, on_col)
        for o, (e, t) in sorted(ops.items(), key=lambda x: -x[1][0])[:25]:
            print(f"   {o:12s} {e:10.4g} ({100 * e / n_ex:4.1f}%)  threads on {t / max(e, 1):5.2f}")
        print("-- top 30 by idle thread slots (idx, executed, threads on, instr)")
        idle = sorted(range(len(body)), key=lambda k: -(32 * g(body[k], ex_col) - g(body[k], on_col)))[:30]
        for k in sorted(idle):
            b = body[k]; e = g(b, ex_col)
            print(f"{k:5d} {e:10.4g} {g(b, on_col) / max(e, 1):5.2f}  {b[H['Source']].strip()[:70]}")
    else:
        i += 1
