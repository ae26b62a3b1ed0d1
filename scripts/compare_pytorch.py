#!/usr/bin/env python3
"""PyTorch peers on the same shapes as `ringattn bench`, printed in the same table.

  python3 scripts/compare_pytorch.py sdpa -b 4096 -e 65536 -f 4 [--causal both] [--kv-heads 8]
      torch SDPA on one GPU, flash (FA2) and cuDNN backends (--backend picks one).
  torchrun --nproc-per-node 2 scripts/compare_pytorch.py cp -b 65536 -e 262144 -f 4
      PyTorch context parallel (ring attention over NCCL, SDPA inside), per-GPU TFLOP/s.

FLOPs: 4*B*S^2*H*D forward (halved when causal), forward+backward 3.5x forward. Times are
CUDA-event averages over --iters after --warmup iterations (or as many as fill --min-time
seconds, as `ringattn bench --min-time` does). --json FILE also writes the rows
(rank 0), for scripts/scaling.py.

Inputs: Q, K, V and the backward's dO are drawn as `ringattn bench` draws its synthetic values,
uniform on [-sqrt 3, sqrt 3] (unit variance), so that both tools multiply the same kind of
numbers. That matters on these GPUs: under their power cap the clock follows the energy the
tensor cores spend, and that depends on the operands' bits. An all-ones dO (what this script
used before, `--dout ones`) makes two of the backward's five matmuls multiply constants, and
cuDNN's backward ran several percent faster with it (docs/PERFORMANCE.md). `--dist normal`
draws Q, K, V from N(0, 1) instead.
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def seq_lengths(a):
    s = a.begin
    out = []
    while s <= a.end:
        out.append(s)
        s *= a.factor
    return out


def flops(batch, seq, heads, dim, causal, backward):
    f = 4.0 * batch * seq * seq * heads * dim / (2 if causal else 1)
    return f * 3.5 if backward else f


def time_ms(fn, warmup, iters, min_time=0.0):
    """(ms per run, runs timed): the mean of `iters` runs, or of as many as fill min_time s."""
    for _ in range(warmup):
        fn()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    if min_time > 0:
        # One more untimed run, timed alone: enough runs to fill min_time seconds, the most
        # any rank needs (the ranks of context parallel must run the same count).
        torch.cuda.synchronize()
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        want = int(min(1e6, -(-min_time * 1e3 // max(start.elapsed_time(stop), 1e-3))))
        n = torch.tensor([max(iters, want)], device="cuda")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        iters = int(n.item())
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters, iters


def header(title, a, world):
    print(f"# {title}: torch {torch.__version__}, {torch.cuda.get_device_name()}, {world} GPU(s), "
          f"dtype {a.dtype}, inputs {a.dist}, {'forward+backward, dO ' + a.dout if a.backward else 'forward'}")
    print(f"# {'seq':>9} {'batch':>5} {'heads':>5} {'kv':>4} {'dim':>4} {'causal':>6} {'impl':>14} "
          f"{'time_ms':>10} {'TFLOP/s/GPU':>12}")


ROWS = []


def row(seq, a, causal, impl, ms, world, runs):
    tf = flops(a.batch, seq, a.heads, a.head_dim, causal, a.backward) / (ms * 1e-3) / 1e12 / world
    ROWS.append({"seq": seq, "batch": a.batch, "heads": a.heads, "kv_heads": a.kv_heads, "head_dim": a.head_dim,
                 "causal": causal, "backward": a.backward, "impl": impl, "time_ms": ms, "tflops_per_gpu": tf,
                 "world": world, "timed_runs": runs})
    print(f"  {seq:>9} {a.batch:>5} {a.heads:>5} {a.kv_heads:>4} {a.head_dim:>4} {'yes' if causal else 'no':>6} "
          f"{impl:>14} {ms:>10.3f} {tf:>12.1f}", flush=True)


def draw(a, shape, g):
    """A tensor of `shape` drawn as --dist says (both have unit variance)."""
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[a.dtype])
    if a.dist == "normal":
        return torch.randn(shape, device="cuda", dtype=dtype, generator=g)
    u = torch.rand(shape, device="cuda", dtype=torch.float32, generator=g)
    return ((2.0 * u - 1.0) * 3.0 ** 0.5).to(dtype)


def make_qkv(a, seq, device, requires_grad):
    g = torch.Generator(device=device).manual_seed(0)
    q = draw(a, (a.batch, a.heads, seq, a.head_dim), g)
    k = draw(a, (a.batch, a.kv_heads, seq, a.head_dim), g)
    v = draw(a, (a.batch, a.kv_heads, seq, a.head_dim), g)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v


def attention_step(a, q, k, v, causal, gqa):
    kwargs = {"enable_gqa": True} if gqa else {}  # only where needed: not every dispatcher takes it
    dout = None
    if a.backward:  # drawn once, outside the timed steps
        g = torch.Generator(device="cuda").manual_seed(1)
        dout = torch.ones_like(q) if a.dout == "ones" else draw(a, tuple(q.shape), g)

    def step():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kwargs)
        if dout is not None:
            o.backward(dout)
    return step


def run_sdpa(a):
    header("torch SDPA, one GPU", a, 1)
    backends = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}
    backends = {n: b for n, b in backends.items() if a.backend in ("both", n[5:])}
    for seq in seq_lengths(a):
        for causal in a.causal_list:
            for name, backend in backends.items():
                q, k, v = make_qkv(a, seq, "cuda", a.backward)
                gqa = a.kv_heads != a.heads
                if gqa and backend == SDPBackend.FLASH_ATTENTION:
                    # The flash backend has no GQA: it needs the KV heads repeated.
                    k = k.detach().repeat_interleave(a.heads // a.kv_heads, 1).requires_grad_(a.backward)
                    v = v.detach().repeat_interleave(a.heads // a.kv_heads, 1).requires_grad_(a.backward)
                    gqa = False
                try:
                    with sdpa_kernel(backend):
                        ms, runs = time_ms(attention_step(a, q, k, v, causal, gqa), a.warmup, a.iters,
                                           a.min_time)
                    row(seq, a, causal, name, ms, 1, runs)
                except RuntimeError as e:
                    print(f"  {seq:>9} {name}: not available ({str(e).splitlines()[0][:80]})")
                del q, k, v
                torch.cuda.empty_cache()


def run_cp(a):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental import _attention as cp_attention

    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl")
    mesh = init_device_mesh("cuda", (world,))
    if rank == 0:
        header("PyTorch context parallel (ring, SDPA cuDNN inside)", a, world)
    for seq in seq_lengths(a):
        for causal in a.causal_list:
            # Its load balancing (a zigzag-like sharding) exists only for causal attention.
            cp_attention._cp_options.enable_load_balance = causal
            # context_parallel shards the buffers in place, which leaf tensors that require
            # grad refuse: gradients are switched on for the shards.
            q, k, v = make_qkv(a, seq, "cuda", False)
            gqa = a.kv_heads != a.heads
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
                    for t in (q, k, v):
                        t.requires_grad_(a.backward)
                    ms, runs = time_ms(attention_step(a, q, k, v, causal, gqa), a.warmup, a.iters, a.min_time)
                    for t in (q, k, v):  # leaving restores the buffers (a resize)
                        t.requires_grad_(False)
                        t.grad = None
            t = torch.tensor([ms], device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            if rank == 0:
                row(seq, a, causal, "torch-cp", t.item(), world, runs)
            del q, k, v
            torch.cuda.empty_cache()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["sdpa", "cp"])
    p.add_argument("-b", "--begin", type=int, default=4096, help="first total sequence length")
    p.add_argument("-e", "--end", type=int, default=65536, help="last total sequence length")
    p.add_argument("-f", "--factor", type=int, default=4, help="multiplier between lengths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=0, help="default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", choices=["no", "yes", "both"], default="both")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--backward", action="store_true", help="time forward+backward")
    p.add_argument("--backend", choices=["both", "flash", "cudnn"], default="both", help="sdpa: the backends timed")
    p.add_argument("--dist", choices=["uniform", "normal"], default="uniform",
                   help="Q, K, V (and dO): uniform as ringattn's synthetic inputs, or N(0, 1)")
    p.add_argument("--dout", choices=["random", "ones"], default="random",
                   help="the backward's dO: drawn as Q, or all ones (the old default)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--min-time", type=float, default=0.0, metavar="SECONDS",
                   help="time at least this long (more runs than --iters where needed), as ringattn bench "
                        "--min-time: under the power cap the clock swings about once a second")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON (rank 0)")
    a = p.parse_args()
    a.kv_heads = a.kv_heads or a.heads
    if not 0 <= a.min_time <= 3600:
        sys.exit(f"compare_pytorch.py: --min-time {a.min_time}: seconds from 0 to 3600")
    a.causal_list = {"no": [False], "yes": [True], "both": [False, True]}[a.causal]
    if not torch.cuda.is_available():
        sys.exit("compare_pytorch.py: no CUDA device")
    run_sdpa(a) if a.mode == "sdpa" else run_cp(a)
    if a.json and int(os.environ.get("RANK", 0)) == 0:
        with open(a.json, "w") as f:
            json.dump({"tool": "pytorch", "mode": a.mode, "dtype": a.dtype, "dist": a.dist, "dout": a.dout, "rows": ROWS},
                      f, indent=1)


if __name__ == "__main__":
    main()
