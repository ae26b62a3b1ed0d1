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
"""
import struct, sys

# (anchor, replacement) pairs applied to the kernel header, each anchor exactly once.
EDITS = [
    ('#include "kernels/cuda/flash_bwd_sm90.cuh"\n','#include "kernels/cuda/flash_bwd_sm90.cuh"\n#include <cstdio>\n#include <cstdlib>\n#include <vector>\n#include <algorithm>\n'),
    ("""template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)""","""constexpr int kTlFields = 12, kTlMax = 1 << 16;
static __device__ unsigned long long g_bwd_timeline[kTlMax * kTlFields];
__device__ __forceinline__ unsigned int tl_smid() { unsigned int r; asm volatile("mov.u32 %0, %%smid;" : "=r"(r)); return r; }
#define TL_SLOT (g_bwd_timeline + static_cast<std::int64_t>(min(static_cast<long long>(blockIdx.x) + static_cast<long long>(gridDim.x) * (blockIdx.y + static_cast<long long>(gridDim.y) * blockIdx.z), static_cast<long long>(kTlMax - 1))) * kTlFields)

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
    ("""  mbar_wait(kv_full, 0);
  for (int it = 0; it < iters; ++it) {""","""  mbar_wait(kv_full, 0);
  const long long tl_c1 = clock64();
  for (int it = 0; it < iters; ++it) {"""),
    ("""    mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u);""","""    { const long long tl_a = clock64(); mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u); tl_qw += clock64() - tl_a; }"""),
    ("""    named_bar_sync(kFusedBarDs, kFusedConsumers);  // both halves of dS^T are stored""",
"""    { const long long tl_a = clock64(); named_bar_sync(kFusedBarDs, kFusedConsumers); tl_ds += clock64() - tl_a; }"""),
    ("""  add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane);
#elif""","""  const long long tl_c2 = clock64();
  add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane);
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


def instrument(path):
    s = open(path).read()
    for old, new in EDITS:
        if s.count(old) != 1:
            sys.exit("bwd_timeline.py: anchor not found once in %s:\n%s" % (path, old))
        s = s.replace(old, new)
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


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("instrument", "analyse"):
        sys.exit(__doc__)
    (instrument if sys.argv[1] == "instrument" else analyse)(sys.argv[2])
