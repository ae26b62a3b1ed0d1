#!/usr/bin/env python3
"""ringattn run (and run --backward) with .npy inputs against an independent numpy float64 reference.

For each case: write q/k/v .npy files with numpy, run `mpirun -np N ringattn run --q --k --v
--out --lse ...`, and compare O and LSE with attention computed here in float64. float32
inputs must match to 1e-5 (the issue's bar); float16 inputs to float16 output precision.
"""
import os
import sys

import numpy as np

from common import mpirun, parse_args


def reference(q, k, v, causal):
    """q: [B, S, H, D], k/v: [B, S, Hkv, D] (float64) -> O [B, S, H, D], LSE [B, H, S]."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    k = np.repeat(k, H // Hkv, axis=2)
    v = np.repeat(v, H // Hkv, axis=2)
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
    if causal:
        scores = np.where(np.tril(np.ones((S, S), dtype=bool)), scores, -np.inf)
    m = scores.max(axis=-1, keepdims=True)
    p = np.exp(scores - m)
    s = p.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", p / s, v)
    lse = (m + np.log(s))[..., 0]
    return out, lse


def reference_backward(q, k, v, dout, causal):
    """Gradients of sum(O * dout) (float64), same shapes as the inputs; shared KV heads sum."""
    B, S, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    kr, vr = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    scale = 1.0 / np.sqrt(D)
    scores = np.einsum("bqhd,bkhd->bhqk", q, kr) * scale
    if causal:
        scores = np.where(np.tril(np.ones((S, S), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    o = np.einsum("bhqk,bkhd->bqhd", p, vr)
    delta = np.einsum("bqhd,bqhd->bhq", dout, o)[..., None]
    dp = np.einsum("bqhd,bkhd->bhqk", dout, vr)
    ds = p * (dp - delta) * scale
    dq = np.einsum("bhqk,bkhd->bqhd", ds, kr)
    dk = np.einsum("bhqk,bqhd->bkhd", ds, q).reshape(B, S, Hkv, g, D).sum(axis=3)
    dv = np.einsum("bhqk,bqhd->bkhd", p, dout).reshape(B, S, Hkv, g, D).sum(axis=3)
    return dq, dk, dv


def run_backward_case(args, np_, layout, causal, S, H, Hkv, D, tol=1e-5, seed=1):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((S, H, D)).astype(np.float32)
    k = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    v = rng.standard_normal((S, Hkv, D)).astype(np.float32)
    dout = rng.standard_normal((S, H, D)).astype(np.float32)
    paths = {n: os.path.join(args.workdir, f"b{n}.npy") for n in ("q", "k", "v", "do", "dq", "dk", "dv")}
    for n, a in (("q", q), ("k", k), ("v", v), ("do", dout)):
        np.save(paths[n], a)
    cli = ["run", "--backward", "--q", paths["q"], "--k", paths["k"], "--v", paths["v"], "--dout", paths["do"],
           "--dq", paths["dq"], "--dk", paths["dk"], "--dv", paths["dv"], "--layout", layout]
    cli += ["--causal"] if causal else []
    proc, _ = mpirun(args, np_, cli)
    name = f"backward np={np_} {layout} {'causal' if causal else 'full'} S={S} H={H}/{Hkv} D={D} float32"
    if proc.returncode != 0:
        print(f"FAIL {name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return False
    want = reference_backward(*(a[None].astype(np.float64) for a in (q, k, v, dout)), causal)
    errs = []
    for n, w, like in (("dq", want[0], q), ("dk", want[1], k), ("dv", want[2], v)):
        got = np.load(paths[n])
        if got.shape != like.shape or got.dtype != np.float32:
            print(f"FAIL {name}: {n} has shape {got.shape} {got.dtype}, expected {like.shape} float32")
            return False
        errs.append(np.abs(got.astype(np.float64) - w[0]).max())
    ok = all(e <= tol for e in errs)  # (max() of a list skips a NaN that is not first)
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|dQ-ref| {errs[0]:.2e} max|dK-ref| {errs[1]:.2e} "
          f"max|dV-ref| {errs[2]:.2e} (tol {tol:g})")
    return ok


def run_case(args, np_, layout, causal, S, H, Hkv, D, B=None, dtype=np.float32, tol=1e-5, seed=0):
    rng = np.random.default_rng(seed)
    shape_q = (S, H, D) if B is None else (B, S, H, D)
    shape_kv = (S, Hkv, D) if B is None else (B, S, Hkv, D)
    q = rng.standard_normal(shape_q).astype(dtype)
    k = rng.standard_normal(shape_kv).astype(dtype)
    v = rng.standard_normal(shape_kv).astype(dtype)
    paths = {n: os.path.join(args.workdir, f"{n}.npy") for n in ("q", "k", "v", "o", "l")}
    for n, a in (("q", q), ("k", k), ("v", v)):
        np.save(paths[n], a)
    cli = ["run", "--q", paths["q"], "--k", paths["k"], "--v", paths["v"], "--out", paths["o"],
           "--lse", paths["l"], "--layout", layout] + (["--causal"] if causal else [])
    proc, _ = mpirun(args, np_, cli)
    name = f"np={np_} {layout} {'causal' if causal else 'full'} S={S} H={H}/{Hkv} D={D} B={B} {np.dtype(dtype).name}"
    if proc.returncode != 0:
        print(f"FAIL {name}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return False
    o = np.load(paths["o"])
    lse = np.load(paths["l"])
    batched = lambda a: a if B is not None else a[None]
    ref_o, ref_lse = reference(batched(q).astype(np.float64), batched(k).astype(np.float64),
                               batched(v).astype(np.float64), causal)
    ok = True
    if o.shape != q.shape or o.dtype != q.dtype:
        print(f"FAIL {name}: out has shape {o.shape} {o.dtype}, expected {q.shape} {q.dtype}")
        ok = False
    expected_lse_shape = (H, S) if B is None else (B, H, S)
    if lse.shape != expected_lse_shape or lse.dtype != np.float32:
        print(f"FAIL {name}: lse has shape {lse.shape} {lse.dtype}, expected {expected_lse_shape} float32")
        ok = False
    if not ok:
        return False
    err_o = np.abs(batched(o).astype(np.float64) - ref_o).max()
    err_l = np.abs(batched(lse).astype(np.float64) - ref_lse).max()
    ok = err_o <= tol and err_l <= tol * 10
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max|O-ref| {err_o:.2e} max|LSE-ref| {err_l:.2e} (tol {tol:g})")
    return ok


def main():
    args = parse_args(__doc__)
    os.makedirs(args.workdir, exist_ok=True)
    results = [
        # The cases: S = 1001, 4 query heads, 2 KV heads, float32, tolerance 1e-5.
        run_case(args, 3, "zigzag", True, 1001, 4, 2, 32),
        run_case(args, 2, "contiguous", True, 1001, 4, 2, 32),
        run_case(args, 5, "contiguous", True, 1001, 4, 2, 32),
        run_case(args, 2, "striped", True, 1001, 4, 2, 32),
        run_case(args, 5, "striped", True, 1001, 4, 2, 32),
        run_case(args, 4, "zigzag", False, 1001, 4, 2, 32),
        # A leading batch dimension, and float16 files (compared at float16 precision).
        run_case(args, 3, "striped", False, 301, 2, 1, 64, B=2),
        run_case(args, 2, "zigzag", True, 257, 4, 4, 64, dtype=np.float16, tol=4e-3),
        # The backward bar: np 3 with .npy inputs, dQ, dK, dV within 1e-5 (float32, CPU).
        run_backward_case(args, 3, "zigzag", True, 1001, 4, 2, 32),
        run_backward_case(args, 3, "contiguous", False, 1001, 4, 2, 32),
        run_backward_case(args, 5, "striped", True, 1001, 4, 2, 32),
    ]
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
