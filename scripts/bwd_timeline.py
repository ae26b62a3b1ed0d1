#!/usr/bin/env python3
"""Per-CTA timeline of the single-pass backward kernel (flash_bwd_fused_sm90.cuh), for profiling.

  python3 scripts/bwd_timeline.py instrument src/kernels/cuda/flash_bwd_fused_sm90.cuh > /tmp/f.cuh
  cp /tmp/f.cuh src/kernels/cuda/flash_bwd_fused_sm90.cuh        # a throw-away build only
  cmake --build build-gpu --target ringattn_cli
  RINGATTN_BWD_TIMELINE_FILE=tl.bin mpirun -np 1 -x RINGATTN_BWD_TIMELINE_FILE ringattn bench --device cuda \
      --backward --kernel native -b 16384 -e 16384 --mask yes --warmup 1 --iters 1
  python3 scripts/bwd_timeline.py analyse tl.bin

`instrument` prints the kernel header with probes added: the first consumer thread of each
CTA records its SM, tile count, globaltimer at entry and exit, and clock64 cycles of the
prologue (to K/V loaded), the tile loop and the epilogue, plus the cycles spent waiting for
Q/dO tiles, at the dS barrier (both warpgroups) and for the dQ buffer. The launcher appends
each launch's records to $RINGATTN_BWD_TIMELINE_FILE (it synchronises after every launch:
timings of the bench itself are then not comparable). Every edit asserts that its anchor
text is still in the kernel, so a changed kernel fails here rather than profiling wrongly.
The probes cost no spills (ptxas -v) in the tenth session's kernel; check again after changes.

`analyse` prints per launch: span, SM busy fraction, the measured clock, per-CTA prologue and
epilogue, the loop's cycles per tile (and a least-squares fit over the tile count), the waits
per tile, the same by quartile of tile count, and the idle gaps between CTAs on each SM.
Used for docs/PERFORMANCE.md (tenth session).

  python3 scripts/bwd_timeline.py phases src/kernels/cuda /tmp/ph     # writes two headers there
  cp /tmp/ph/*.cuh src/kernels/cuda/                                  # a throw-away build only
  ringattn bench ... --warmup 1 --iters 1 2> err.txt; grep ^PH err.txt

`phases` instruments the consumer loop itself: one thread of each consumer warpgroup reads
%clock at nine points of every tile and adds the differences up in shared memory (a static
area; the dynamic request shrinks by the alignment slack it no longer needs, and the kernel
traps if the base is then unaligned). After each launch the launcher prints, per warpgroup,
the cycles per tile of: issuing S^T and dP^T; waiting for S^T; the exponentials and mask;
waiting for dP^T; dS^T, packing and issuing dV; storing dS^T and the dS barrier; issuing dQ
and dK and waiting for dQ; storing dQ; waiting for dK and the next Q/dO tile. The probes cost
~15% (ptxas: 8-12 bytes of spills); compare shares, not totals. Used for docs/PERFORMANCE.md
(eleventh session).
"""
import struct, sys

# (anchor, replacement) pairs applied to the kernel header, each anchor exactly once.
EDITS = [
    ('#include "kernels/cuda/flash_bwd_sm90.cuh"\n','#include "kernels/cuda/flash_bwd_sm90.cuh"\n#include <cstdio>\n#include <cstdlib>\n#include <vector>\n#include <algorithm>\n'),
    ("""template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)""","""constexpr int kTlFields = 12, kTlMax = 1 << 16;
static __device__ unsigned long long g_bwd_timeline[kTlMax * kTlFields];
__device__ __forceinline__ unsigned int tl_smid() { unsigned int r; asm volatile("mov.u32 %0, %%smid;" : "=r"(r)); return r; }
#define TL_SLOT (g_bwd_timeline + static_cast<std::int64_t>(min(ticket, kTlMax - 1)) * kTlFields)  // the CTA's work: its ticket

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)"""),
    ("""  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Key blocks""","""  const long long tl_c0 = clock64();
  const unsigned long long tl_g0 = global_timer_ns();
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Key blocks"""),
    ("""    if (i > 0) named_bar_sync(kFusedBarDqEmpty + (i - 1) % 2, kFusedConsumersAndWriter);  // tile i - 1 was read""",
"""    if (i > 0) { const long long tl_a = clock64(); named_bar_sync(kFusedBarDqEmpty + (i - 1) % 2, kFusedConsumersAndWriter); tl_dqe += clock64() - tl_a; }"""),
    ("""  float dq[NQ];
  const int row_base""","""  long long tl_dqe = 0, tl_qw = 0, tl_ds = 0;
  float dq[NQ];
  const int row_base"""),
    ("""  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = walk(it).y;""","""  const long long tl_c1 = clock64();  // K and V (and at head dim 64 K^T) are in shared memory
  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = walk(it).y;"""),
    ("""    mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u);""","""    { const long long tl_a = clock64(); mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u); tl_qw += clock64() - tl_a; }"""),
    ("""    named_bar_sync(kFusedBarDs, kFusedConsumers);  // both halves of dS^T are stored""",
"""    { const long long tl_a = clock64(); named_bar_sync(kFusedBarDs, kFusedConsumers); tl_ds += clock64() - tl_a; }"""),
    ("""  if (parts == 1) {
    add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane, p.dkv_store != 0);""","""  const long long tl_c2 = clock64();
  if (parts == 1) {
    add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane, p.dkv_store != 0);"""),
    # after the epilogue of every CTA, split parts (which wait for their turn) included
    ("""        sem_release_add(turn);  // ... before the next part reads them
      }
    }
  }
#elif""","""        sem_release_add(turn);  // ... before the next part reads them
      }
    }
  }
  if (tid == 128) {
    unsigned long long* o = TL_SLOT;
    o[0] = tl_smid() | (static_cast<unsigned long long>(iters) << 32);
    o[1] = tl_g0; o[2] = global_timer_ns(); o[3] = tl_c1 - tl_c0; o[4] = tl_c2 - tl_c1; o[5] = clock64() - tl_c2;
    o[6] = tl_qw; o[7] = tl_ds; o[8] = tl_dqe;
  }
  if (tid == 256) TL_SLOT[11] = tl_ds;
#elif"""),
    ("""  if (p.causal) {
    flash_bwd_fused_sm90_kernel<Tr, true>""","""  if (std::getenv("RINGATTN_BWD_TIMELINE_FILE")) {
    void* tl = nullptr;
    RINGATTN_CUDA_CHECK(cudaGetSymbolAddress(&tl, g_bwd_timeline));
    RINGATTN_CUDA_CHECK(cudaMemsetAsync(tl, 0, sizeof(unsigned long long) * kTlMax * kTlFields, stream));
  }
  if (p.causal) {
    flash_bwd_fused_sm90_kernel<Tr, true>"""),
    ("""  RINGATTN_CUDA_CHECK(cudaGetLastError());
}""","""  RINGATTN_CUDA_CHECK(cudaGetLastError());
  if (const char* f = std::getenv("RINGATTN_BWD_TIMELINE_FILE")) {
    const long long n = std::min<long long>(static_cast<long long>(grid.x) * grid.y * grid.z, kTlMax);
    std::vector<unsigned long long> buf(static_cast<std::size_t>(n) * kTlFields);
    RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
    RINGATTN_CUDA_CHECK(cudaMemcpyFromSymbol(buf.data(), g_bwd_timeline, buf.size() * 8));
    if (FILE* fp = std::fopen(f, "ab")) {
      const int hdr[8] = {static_cast<int>(grid.x), static_cast<int>(grid.y), static_cast<int>(grid.z), p.q_len, p.kv_len, p.causal ? 1 : 0, p.kv_group, kTlFields};
      std::fwrite(hdr, sizeof hdr, 1, fp);
      std::fwrite(buf.data(), 8, buf.size(), fp);
      std::fclose(fp);
    }
  }
}"""),
]


def apply_edit(text, old, new, where):
    """text with the anchor `old` (which must occur exactly once) replaced by `new`."""
    if text.count(old) != 1:
        sys.exit("bwd_timeline.py: anchor not found once in %s:\n%s" % (where, old))
    return text.replace(old, new)


def instrument(path):
    s = open(path).read()
    for old, new in EDITS:
        s = apply_edit(s, old, new, path)
    sys.stdout.write(s)


def analyse(path):
    data = open(path, 'rb').read()
    off = 0; li = 0
    while off < len(data):
        gx, gy, gz, ql, kl, causal, group, F = struct.unpack_from('8i', data, off); off += 32
        n = gx * gy * gz
        recs = [struct.unpack_from('%dQ' % F, data, off + i * F * 8) for i in range(n)]
        off += n * F * 8
        li += 1
        recs = [r for r in recs if (r[0] >> 32) > 0]
        if not recs: continue
        sm = [r[0] & 0xffffffff for r in recs]; it = [r[0] >> 32 for r in recs]
        g0 = min(r[1] for r in recs); span = max(r[2] for r in recs) - g0
        busy = sum(r[2] - r[1] for r in recs)
        nsm = len(set(sm))
        cyc = sum(r[3] + r[4] + r[5] for r in recs)
        ghz = cyc / busy
        T = sum(it)
        def per_it(k): return sum(r[k] for r in recs) / T
        # least squares loop = a + b*iters
        mx = sum(it) / len(it); my = sum(r[4] for r in recs) / len(recs)
        sxx = sum((x - mx) ** 2 for x in it); sxy = sum((x - mx) * (r[4] - my) for x, r in zip(it, recs))
        b = sxy / sxx if sxx > 0 else my / mx; a = my - b * mx
        print(f"launch {li}: grid {gx}x{gy}x{gz} q {ql} kv {kl} causal {causal} group {group}: {len(recs)} CTAs on {nsm} SMs, "
              f"span {span/1e3:.1f} us, SM busy {busy/(nsm*span):.3f}, clock {ghz:.3f} GHz, iters/CTA {T/len(recs):.1f}")
        print(f"  per CTA (cycles): prologue {sum(r[3] for r in recs)/len(recs):.0f}, epilogue {sum(r[5] for r in recs)/len(recs):.0f}, "
              f"loop fit {a:.0f} + {b:.0f} x iters; loop per iter {per_it(4):.0f}")
        print(f"  per iter (cycles): Q/dO wait {per_it(6):.0f}, dS barrier wg0 {per_it(7):.0f} wg1 {per_it(11):.0f}, dQ-empty wait {per_it(8):.0f}")
        # by iteration-count bucket
        srt = sorted(recs, key=lambda r: r[0] >> 32)
        q = len(srt) // 4
        for k in range(4):
            part = srt[k * q:(k + 1) * q] if k < 3 else srt[3 * q:]
            ti = sum(r[0] >> 32 for r in part)
            print(f"  quartile {k}: iters {part[0][0]>>32}-{part[-1][0]>>32}: loop/iter {sum(r[4] for r in part)/ti:.0f}, "
                  f"qwait/iter {sum(r[6] for r in part)/ti:.0f}, dqe/iter {sum(r[8] for r in part)/ti:.0f}, "
                  f"prologue {sum(r[3] for r in part)/len(part):.0f}")
        # SM gaps: per SM, sort by start, sum gaps
        by = {}
        for r in recs: by.setdefault(r[0] & 0xffffffff, []).append((r[1], r[2]))
        gaps = 0; ends = []
        for s, v in by.items():
            v.sort(); gaps += sum(max(0, v[i + 1][0] - v[i][1]) for i in range(len(v) - 1)); ends.append(v[-1][1] - g0)
        ends.sort()
        print(f"  SM gaps between CTAs: {gaps/(nsm*span):.4f} of span; SM end times (us): min {ends[0]/1e3:.1f} median {ends[len(ends)//2]/1e3:.1f} max {ends[-1]/1e3:.1f}")


# Per-phase probes: (file, anchor, replacement) edits to the two kernel headers.
PHASE_EDITS = [
    ("flash_bwd_sm90.cuh", """template <typename T, int D, int BN, int BQ, bool kCausal, bool kDkByCaller = false>
__device__ __forceinline__ void dkv_step_sm90(""",
     """#define PH(k) do { if (ph_on) { unsigned c_; asm volatile("mov.u32 %0, %%clock;" : "=r"(c_)); ph[k] += c_ - ph[15]; ph[15] = c_; } } while (0)
template <typename T, int D, int BN, int BQ, bool kCausal, bool kDkByCaller = false>
__device__ __forceinline__ void dkv_step_sm90("""),
    ("flash_bwd_sm90.cuh", """int key_wg, int key0, int m0, int lane) {
  float s[BQ / 2], dp[BQ / 2];""",
     """int key_wg, int key0, int m0, int lane, unsigned* ph = nullptr, bool ph_on = false) {
  float s[BQ / 2], dp[BQ / 2];"""),
    ("flash_bwd_sm90.cuh", """  issue_abt_sm90<T, D, BN, BQ, kStepA>(dp, sV, wg * 64, do_tile);  // dP^T = V dO^T
  wgmma_commit();
  wgmma_wait<1>();  // S^T has landed; P^T overlaps the dP^T MMAs
  fence_regs(s);""",
     """  issue_abt_sm90<T, D, BN, BQ, kStepA>(dp, sV, wg * 64, do_tile);  // dP^T = V dO^T
  wgmma_commit();
  PH(0);
  wgmma_wait<1>();  // S^T has landed; P^T overlaps the dP^T MMAs
  fence_regs(s);
  PH(1);"""),
    ("flash_bwd_sm90.cuh", """  wgmma_wait<0>();  // dP^T has landed
  fence_regs(dp);""",
     """  PH(2);
  wgmma_wait<0>();  // dP^T has landed
  fence_regs(dp);
  PH(3);"""),
    ("flash_bwd_sm90.cuh", """  if constexpr (!kDkByCaller) issue_xb_sm90<T, D, BQ>(dk, ads, q_tile);  // dK += dS^T Q
  wgmma_commit();
}""",
     """  if constexpr (!kDkByCaller) issue_xb_sm90<T, D, BQ>(dk, ads, q_tile);  // dK += dS^T Q
  wgmma_commit();
  PH(4);
}"""),
    ("flash_bwd_fused_sm90.cuh", '#include "kernels/cuda/flash_bwd_sm90.cuh"\n',
     '#include "kernels/cuda/flash_bwd_sm90.cuh"\n#include <cstdio>\n'),
    ("flash_bwd_fused_sm90.cuh", """                               1024 + kBarrierBytes""", """                               0 + kBarrierBytes"""),
    ("flash_bwd_fused_sm90.cuh", """template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_fused_sm90_kernel(""",
     """static __device__ unsigned long long g_ph[2][16];
template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_fused_sm90_kernel("""),
    ("flash_bwd_fused_sm90.cuh", """  const std::uint32_t sK = smem_u32_base + pad;""",
     """  if (pad != 0) __trap();  // the static probe area must leave the dynamic base aligned
  const std::uint32_t sK = smem_u32_base + pad;"""),
    ("flash_bwd_fused_sm90.cuh", """  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = walk(it).y;""",
     """  __shared__ unsigned ph_s[2][16];
  unsigned* ph = ph_s[wg];
  const bool ph_on = tid == 128 || tid == 256;
  if (ph_on) { for (int k = 0; k < 15; ++k) ph[k] = 0; unsigned c_; asm volatile("mov.u32 %0, %%clock;" : "=r"(c_)); ph[15] = c_; }
  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = walk(it).y;"""),
    ("flash_bwd_fused_sm90.cuh", """s_delta + st * BQ, wg, key_wg, key0, m0, lane);""",
     """s_delta + st * BQ, wg, key_wg, key0, m0, lane, ph, ph_on);"""),
    ("flash_bwd_fused_sm90.cuh", """    named_bar_sync(kFusedBarDs, kFusedConsumers);  // both halves of dS^T are stored""",
     """    named_bar_sync(kFusedBarDs, kFusedConsumers);  // both halves of dS^T are stored
    PH(5);"""),
    ("flash_bwd_fused_sm90.cuh", """    fence_regs(dq);
    store_dq(it);""",
     """    fence_regs(dq);
    PH(6);
    store_dq(it);
    PH(7);"""),
    ("flash_bwd_fused_sm90.cuh", """    if (lane == 0) mbar_arrive(qdo_empty(st));  // Q and dO of this stage are no longer read
  }
""",
     """    if (lane == 0) mbar_arrive(qdo_empty(st));  // Q and dO of this stage are no longer read
    if (it + 1 < iters) mbar_wait(qdo_full((it + 1) % NST), static_cast<std::uint32_t>((it + 1) / NST) & 1u);
    PH(8);
  }
  if (ph_on) {
    for (int k = 0; k < 9; ++k) atomicAdd(&g_ph[wg][k], static_cast<unsigned long long>(ph[k]));
    atomicAdd(&g_ph[wg][15], static_cast<unsigned long long>(iters));
  }
"""),
    ("flash_bwd_fused_sm90.cuh", """  if (p.causal) {
    flash_bwd_fused_sm90_kernel<Tr, true>""",
     """  static unsigned long long ph_zero[2][16] = {};
  RINGATTN_CUDA_CHECK(cudaMemcpyToSymbolAsync(g_ph, ph_zero, sizeof ph_zero, 0, cudaMemcpyHostToDevice, stream));
  if (p.causal) {
    flash_bwd_fused_sm90_kernel<Tr, true>"""),
    ("flash_bwd_fused_sm90.cuh", """  RINGATTN_CUDA_CHECK(cudaGetLastError());
}""",
     """  RINGATTN_CUDA_CHECK(cudaGetLastError());
  unsigned long long h[2][16];
  RINGATTN_CUDA_CHECK(cudaMemcpyFromSymbol(h, g_ph, sizeof h));
  for (int w = 0; w < 2; ++w) {
    std::fprintf(stderr, "PH q%d kv%d causal%d wg%d per tile:", p.q_len, p.kv_len, p.causal ? 1 : 0, w);
    double tot = 0;
    for (int k = 0; k < 9; ++k) {
      const double v = static_cast<double>(h[w][k]) / static_cast<double>(h[w][15] > 0 ? h[w][15] : 1);
      std::fprintf(stderr, " %.0f", v);
      tot += v;
    }
    std::fprintf(stderr, " | total %.0f\\n", tot);
  }
}"""),
]


def phases(src_dir, out_dir):
    import os
    texts = {}
    for name, old, new in PHASE_EDITS:
        if name not in texts:
            texts[name] = open(os.path.join(src_dir, name)).read()
        texts[name] = apply_edit(texts[name], old, new, name)
    os.makedirs(out_dir, exist_ok=True)
    for name, text in texts.items():
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "phases":
        phases(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) != 3 or sys.argv[1] not in ("instrument", "analyse"):
        sys.exit(__doc__)
    (instrument if sys.argv[1] == "instrument" else analyse)(sys.argv[2])
