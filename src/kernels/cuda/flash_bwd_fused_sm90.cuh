// kernels/cuda/flash_bwd_fused_sm90.cuh: the single-pass Hopper (sm_90a) flash backward for one
// plan task (FlashKernel::wgmma_fused in flash_bwd, part both, head dims 64 and 128): the 5
// matmuls the backward needs, where the two-kernel pair (flash_bwd_sm90.cuh) executes 7.
//
// A CTA owns 128 keys of one KV head (64 per consumer warpgroup) and walks the 64-row query
// tiles of every query head of the group, as the pair's dkv kernel does:
//   S^T = K Q^T, dP^T = V dO^T (ss), P^T and dS^T in registers,
//   dV += P^T dO, dK += dS^T Q (rs; dK and dV stay in registers for the whole walk),
// and adds each tile's dQ = scale dS K to the fp32 dQ accumulator itself:
//   - each warpgroup stores its dS^T half (64 keys x 64 rows, 16-bit, 128-byte swizzle) in
//     shared memory, double-buffered; after a named barrier of the two warpgroups, warpgroup w
//     computes dQ's columns 64w .. 64w + 63 over all 128 keys (ss wgmma, A = dS read MN-major
//     from the stored dS^T, B = K read MN-major); at head dim 64, columns 32w .. 32w + 31
//     (m64n32, B = a K-major copy of K^T made once per CTA: an MN-major B of 32 columns would
//     start mid-swizzle-atom). H100, 64k fwd+bwd, same call, against the pair it replaced at
//     head dim 64: 429.6-431.3 / 405.1-408.8 TFLOP/s full / causal against 380.0-381.5 /
//     373.9-376.0; GQA 32/8 428.8 / 422.2 against 374.8 / 380.0; 16k +10% full, causal -1%;
//   - the fp32 tile goes to shared memory (D / 32 TMA boxes of 32 columns x 64 rows, 128-byte
//     swizzle), stored while the tile's dK MMAs run, issued after dQ's (register A operand:
//     they leave shared memory half idle, where the S^T MMAs the store ran under before
//     read it at its full rate; dK, dV, dQ and dS^T take 192 registers per thread there),
//     in a lane order free of bank conflicts;
//     a dQ-writer warp of the producer warpgroup adds it to global memory with TMA
//     reduce-adds (cp.reduce.async.bulk.tensor .add, performed in L2). Two writer warps take
//     alternate tiles, so one waits for its adds to complete (and polls the next semaphore)
//     while the other serves the next tile.
// Determinism without free atomics: the adds to a query tile happen in a fixed order, the key
// blocks' ascending order, through a per-(batch, head, tile) semaphore in global memory
// (FlashBwdParams::dq_sem, zeroed by the launch): the writer of key block j waits (acquire)
// until the blocks before j that visit the tile have added, issues its reduce-adds, waits for
// them to complete and releases the count. Every fp32 sum is then formed in one order, run
// after run. A CTA only ever waits for CTAs of lower key block of its (batch, KV head). CUDA
// does not promise that CTAs are dispatched in index order, so a CTA does not take its key
// block from blockIdx: it draws a ticket (an atomic counter after the semaphores, zeroed with
// them), the ticket gives its unit (the ticket itself, but for the split key blocks of "The
// last wave" below), and unit t means batch t / (blocks * kv_heads) and, with
// tb = t % (blocks * kv_heads), key block (tb % hc blocks) / hc of KV head
// hc (tb / hc blocks) + tb % hc (in a whole chunk; a last, partial chunk of h < hc heads the
// same with h): the KV heads go in chunks of hc whose tickets interleave (hc = 1: blocks fastest; see "The head chunk" below). Either way a
// lower key block of the same head has a lower ticket. Every CTA it
// waits for drew a lower ticket, so has started: it is
// resident or finished, and it waits only for lower tickets still, so the chain ends. The
// hardware dispatches in index order in practice, and tickets follow it (a trace on an H100:
// the first wave's tickets permuted across its blocks, then ticket == blockIdx). In a causal
// task the first key blocks visit the most query tiles, so the longest CTAs start first and
// the launch ends with short ones (the reverse order, tried first, left the longest for last:
// 484 against 505-510 TFLOP/s at 64k causal on an H100). Every CTA walks its query tiles last
// to first, so the CTAs of a wave meet on the same tile one add after another: CTA j of a head
// starts ~j adds late (the adds to the last tile go one by one). In a full task the CTAs keep
// that stagger wave after wave, but causal CTAs differ in length, new ones start out of step,
// and the queue forms again: at head dim 64, 16k causal, a CTA's loop took ~84,000 cycles
// more than its tiles (~2,640 each) explain. Interleaving 4 heads makes each head's queue a
// quarter as long (H100, fwd+bwd, same call: head dim 64 16k causal 365 -> 389 TFLOP/s, 64k
// causal +2%, head dim 128 16k causal +1-3%). A wait that exceeds 60 s traps (a launch
// error, never a hang), should a bug ever break that argument.
// The head chunk (fused_bwd_head_chunk): even in step, the CTAs of one head that run at once
// form a chain of ordered adds, each about a tile's time after the one before (an estimate
// from what the chain costs: a 32 KiB reduce-add completing in a loaded L2, then the
// semaphore), and the launch pays that chain's length at its start and in its tail: 17% of a
// 2k-row task, 2% of 16k (H100, against a diagnostic build with the adds unordered).
// With hc heads interleaved, a head has ~1 / hc of the SMs and its chain is that much shorter,
// but hc heads' Q, dO and dQ rows are in use at once; past the L2 the tiles come from HBM
// again (heads fastest over all 32 heads at 64k: 0.67x). So hc is the largest power of two
// that keeps the rows its CTAs walk within kFusedBwdChunkRows, and at least
// kFusedBwdCausalHeadChunk for causal MHA tasks (H100, P = 1 fwd+bwd at head dim 128 full,
// hc = 1 -> the rule: 2k 380 -> 434 TFLOP/s, 4k 485 -> 542, 8k 581 -> 603; at 16k the rule's
// hc = 2 is level with 1; GQA 32/8 causal 4k, hc 2 -> 4: 367 -> 432; docs/PERFORMANCE.md).
//
// The last wave: a CTA per key block holds an SM for the whole walk over the query tiles, and
// a full-mask launch's CTAs all take about as long, so they run in waves of one CTA per SM,
// and a launch of N CTAs on W SMs whose last wave is partial (N % W = r > 0) runs that wave
// with W - r SMs idle for a CTA's whole time (a 64k ring of two GPUs: 8,192 CTAs, 62 waves and
// 8 CTAs). There the last r key blocks (in ticket order) each go to `parts` CTAs (2, 4 or 8)
// that walk consecutive shares of the query tiles, so the tail is r x parts CTAs of 1 / parts
// the length. Each share's dQ tiles see this key block once, as before; the dK/dV sums of a
// block are added by its parts in order: part i waits (acquire) for a per-block count after
// the ticket counter to reach i, adds (part 0 stores where dkv_store says so), and releases
// it. A part waits only for lower tickets, so the chain argument above still holds. A launch
// of fewer blocks than SMs is all last wave: GQA 16/2 at 2k, 32 CTAs unsplit on 132 SMs, ran
// 2.2x faster in 4 parts (H100, fwd+bwd). Causal CTAs differ in length and the launch ends
// with the shortest, so a causal launch's partial last wave is left alone; but one that fills
// at most half of the SMs waits for its longest CTA, and there every block splits (GQA 16/2
// at 1k causal: 2.1x). A causal share may hold no tile (the last blocks visit 2); it still
// takes its turn. The split blocks' dK/dV sums are formed part by part, so their bits depend
// on W (the device's SMs): repeatable on one kind of GPU, not across kinds.
//
// Pipelines as the pair's kernels: a TMA producer warp streams Q/dO tiles and their per-row
// statistics through kStages stages (full/empty mbarriers), setmaxnreg 40/232. Named
// barriers: 1 (the two consumer warpgroups: dS stored), 2 + parity (consumers -> that tile's
// writer: the dQ tile is in shared memory), 4 + parity (writer -> consumers: the dQ buffer
// has been read).
//
// Test: tests/gpu/test_flash_bwd.cpp (against the fp64 reference, bitwise repeat; ctest -L gpu).
#pragma once

#include <algorithm>

#include "kernels/cuda/flash_bwd_sm90.cuh"

namespace ringattn::detail::flash {

template <typename T_, int kHeadDim_>
struct Sm90FusedBwdTraits {
  using T = T_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kAtoms = kHeadDim / 64;
  static constexpr int kThreads = 384;  // a producer warpgroup (loads, dQ writer) + 2 consumer warpgroups
  static constexpr int kStages = 3;
  static constexpr int kRowBytes = kHeadDim * 2;
  static constexpr int kKeys = 128;   // keys per CTA, 64 per consumer warpgroup
  static constexpr int kBlockQ = 64;  // query rows per tile
  static constexpr int kDqBoxCols = 32;                                   // fp32 columns per TMA box (128 bytes)
  static constexpr int kDqBoxBytes = kBlockQ * kDqBoxCols * 4;            // 8 KiB
  static constexpr int kDsBytes = kKeys * kBlockQ * 2;                    // one dS^T buffer, 16 KiB
  static constexpr int kDqBytes = kBlockQ * kHeadDim * 4;                 // the fp32 dQ tile, 32 KiB at D = 128
  // Head dim 64: K^T, K-major over the keys (D rows of 128 keys: 2 atom columns), the B operand
  // of the m64n32 dQ slices (an MN-major B can't start mid-atom).
  static constexpr int kKtBytes = kHeadDim == 64 ? kKeys * kRowBytes : 0;
  static constexpr int kBarrierBytes = 8 * (1 + 2 * kStages) + 8;  // mbarriers, the CTA's ticket (8-byte slot)
  // K, V resident; kStages (Q, dO) pairs; 2 dS^T buffers; the dQ tile; alignment slack;
  // mbarriers and the ticket; the staged statistics (lse2, delta per stage). (All of it
  // dynamic: a static __shared__ variable would add 1 KiB to keep the dynamic base aligned.)
  static constexpr int kSmem = 2 * kKeys * kRowBytes + kStages * 2 * kBlockQ * kRowBytes + 2 * kDsBytes + kDqBytes + kKtBytes +
                               1024 + kBarrierBytes + kStages * 2 * kBlockQ * static_cast<int>(sizeof(float));
  static_assert(kHeadDim == 64 || kHeadDim == 128,
                "each consumer warpgroup computes half of dQ's columns (m64n64 or m64n32 wgmma)");
  static_assert(kSmem <= 227 * 1024, "an H100/H200 CTA has at most 227 KiB");
};

// Named barrier ids and sizes (threads).
// dQ buffer barriers come in pairs, one per writer warp (tile parity): ids 2 + parity (full)
// and 4 + parity (empty).
constexpr int kFusedBarDs = 1, kFusedBarDqFull = 2, kFusedBarDqEmpty = 4;
constexpr int kFusedConsumers = 256, kFusedConsumersAndWriter = 288;

__device__ __forceinline__ std::uint64_t global_timer_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
  return t;
}

// Waits until *sem == want (acquire, GPU scope); traps after 60 s.
__device__ __forceinline__ void sem_wait_eq(const unsigned int* sem, unsigned int want) {
  const std::uint64_t start = global_timer_ns();
  for (;;) {
    unsigned int v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(sem) : "memory");
    if (v == want) return;
    if (global_timer_ns() - start > 60ull * 1000 * 1000 * 1000) __trap();
    __nanosleep(64);
  }
}
__device__ __forceinline__ void sem_release_add(unsigned int* sem) {
  asm volatile("red.release.gpu.global.add.u32 [%0], 1;\n" ::"l"(sem) : "memory");
}

// The dQ semaphores: one per (batch, head, 64-row tile), at the start of FlashBwdParams::dq_sem.
__host__ __device__ inline std::int64_t fused_bwd_semaphores(const FlashBwdParams& p) {
  return static_cast<std::int64_t>(p.batch) * p.heads * ((p.q_len + 63) / 64);
}
// The most key blocks a launch splits (fewer than its SMs: the last wave's).
constexpr int kFusedBwdSplitBlocks = 1024;
// What a launch needs there: the semaphores, the CTAs' ticket counter after them, then one
// count per split key block.
inline std::int64_t fused_bwd_sem_words(const FlashBwdParams& p) {
  return fused_bwd_semaphores(p) + 1 + kFusedBwdSplitBlocks;
}

// The tail split of a launch of `units` key blocks, each walking `q_tiles` query tiles, on
// `sms` SMs (one CTA each): how many CTAs each of the last `split` blocks becomes (1: none).
struct FusedBwdSplit {
  int parts = 1, split = 0;
};
inline FusedBwdSplit fused_bwd_split(const FlashBwdParams& p, int units, int q_tiles, int sms) {
  FusedBwdSplit s;
  if (p.split_parts == 1 || sms <= 0) return s;
  if (p.split_parts > 1) {  // forced (tests): the last half of the blocks (causal parts may get no tile)
    if (q_tiles >= p.split_parts) s = {p.split_parts, std::min(std::max(1, units / 2), kFusedBwdSplitBlocks)};
    return s;
  }
  if (p.causal) {
    // Causal CTAs differ in length (block 0 walks every tile) and the launch ends with the
    // shortest, so a partial last wave costs little; but a launch that leaves half of the SMs
    // idle waits for its longest CTA: there every block goes to k CTAs, the most that fit.
    if (2 * units > sms || units > kFusedBwdSplitBlocks) return s;
    for (int k : {2, 4, 8}) {
      if (units * k <= sms && q_tiles >= 2 * k) s = {k, units};
    }
    return s;
  }
  const int r = units % sms;
  if (r == 0) return s;
  // The tail's length in CTA times: 1 unsplit; ceil(r k / W) / k split in k. Each part walks at
  // least 2 tiles (the K/V load and the epilogue are a part's fixed cost).
  double best = 1.0;
  for (int k : {2, 4, 8}) {
    if (q_tiles < 2 * k || r > kFusedBwdSplitBlocks) continue;
    const double tail = static_cast<double>((r * k + sms - 1) / sms) / k;
    if (tail < best - 1e-9) best = tail, s = {k, r};
  }
  return s;
}

// The rows of Q, dO and dQ per KV head that the CTAs of a head chunk may walk at once: 32k
// (at head dim 128 that is 32 MiB of the 50 MiB L2; head dim 64 measured best at the same
// rows). A causal launch's CTAs walk half of its rows on average. Causal MHA tasks interleave
// at least kFusedBwdCausalHeadChunk heads whatever their length.
constexpr std::int64_t kFusedBwdChunkRows = 32768;
constexpr int kFusedBwdCausalHeadChunk = 4;

// KV heads whose key blocks interleave in the launch order (the header's "head chunk"):
// FlashBwdParams::head_chunk where a test sets it, else the rule.
inline int fused_bwd_head_chunk(const FlashBwdParams& p) {
  if (p.head_chunk > 0) return std::min(p.head_chunk, p.kv_heads);
  const std::int64_t rows = static_cast<std::int64_t>(p.q_len) * p.kv_group / (p.causal ? 2 : 1);
  int hc = 1;
  while (2 * hc <= p.kv_heads && 2 * hc * rows <= kFusedBwdChunkRows) hc *= 2;
  if (p.causal && p.kv_group == 1) hc = std::max(hc, std::min(kFusedBwdCausalHeadChunk, p.kv_heads));
  return hc;
}

template <class Tr, bool kCausal>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    flash_bwd_fused_sm90_kernel(const FlashBwdParams p, const __grid_constant__ CUtensorMap tm_q,
                                const __grid_constant__ CUtensorMap tm_do, const __grid_constant__ CUtensorMap tm_k,
                                const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_dq,
                                int head_chunk, int blocks, int split_from, int split_parts) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim, BN = Tr::kKeys, BQ = Tr::kBlockQ, NST = Tr::kStages;
  constexpr int NO = D / 2, NQ = D / 4;  // NQ: a warpgroup's 64 x D/2 dQ accumulator
  constexpr int kKeysBytes = BN * Tr::kRowBytes, kTile = BQ * Tr::kRowBytes;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t smem_u32_base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  const std::uint32_t pad = ((smem_u32_base + 1023u) & ~1023u) - smem_u32_base;
  const std::uint32_t sK = smem_u32_base + pad;
  const std::uint32_t sV = sK + kKeysBytes;
  const std::uint32_t sQ = sV + kKeysBytes;  // NST stages of Q, then NST of dO
  const std::uint32_t sdO = sQ + NST * kTile;
  const std::uint32_t sdS = sdO + NST * kTile;  // 2 buffers
  const std::uint32_t sdQ = sdS + 2 * Tr::kDsBytes;
  const std::uint32_t sKt = sdQ + Tr::kDqBytes;  // head dim 64 only
  const std::uint32_t bars = sKt + Tr::kKtBytes;
  const std::uint32_t kv_full = bars;
  auto qdo_full = [&](int s) { return bars + 8u * (1 + s); };
  auto qdo_empty = [&](int s) { return bars + 8u * (1 + NST + s); };
  int* s_ticket = reinterpret_cast<int*>(smem_raw + pad + (bars + 8 * (1 + 2 * NST) - sK));
  float* s_lse2 = reinterpret_cast<float*>(smem_raw + pad + (bars + Tr::kBarrierBytes - sK));
  float* s_delta = s_lse2 + NST * BQ;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // Key blocks in ticket order (see the header), blocks fastest (or a few heads, then blocks),
  // so that the CTAs running at once share their query tiles. (Heads fastest over all heads,
  // tried for causal tasks: 0.67x at 64k on an H100, the tiles no longer shared in L2.)
  if (tid == 0) {
    *s_ticket = static_cast<int>(atomicAdd(p.dq_sem + fused_bwd_semaphores(p), 1u));
    init_dkv_barriers_sm90<NST>(bars);
  }
  __syncthreads();
  // Tickets from split_from on are the split key blocks' parts ("The last wave"): `unit` is the
  // key block in ticket order (as the ticket itself before), `part` this CTA's share of it.
  const int ticket = *s_ticket;
  int unit = ticket, part = 0, parts = 1;
  if (ticket >= split_from) {
    unit = split_from + (ticket - split_from) / split_parts;
    part = (ticket - split_from) % split_parts;
    parts = split_parts;
  }
  // The units of batch b go to chunks of `hc` KV heads (the last chunk may have fewer), and
  // within a chunk to the heads fastest, then the key blocks (hc = 1: blocks fastest).
  const int hc = head_chunk;
  const int per_batch = blocks * p.kv_heads, b = unit / per_batch, tb = unit % per_batch;
  const int chunk = tb / (blocks * hc), heads_here = min(hc, p.kv_heads - chunk * hc);
  const int tc = tb - chunk * blocks * hc;
  const int j = tc / heads_here;
  const int n0 = j * BN, kvh = chunk * hc + tc % heads_here;
  // The query tiles this CTA visits, as the pair's dkv kernel: [m_first, m_first + q_tiles).
  int m_first = dkv_first_tile<kCausal, BQ>(p, n0);
  int q_tiles = dkv_tile_count<kCausal, BN, BQ>(p, n0);
  if (parts > 1) {  // this part's share of the tiles (the host splits only where each gets one)
    const int lo = part * q_tiles / parts, hi = (part + 1) * q_tiles / parts;
    m_first += lo;
    q_tiles = hi - lo;
  }
  const int iters = q_tiles > 0 ? q_tiles * p.kv_group : 0;
  // Iteration it: query head kvh * group + it % group, tile m_last - it / group (walk(it): the
  // head within the group, the tile's first row). Every CTA walks the tiles last to first, so
  // the CTAs running at once (consecutive key blocks) read the same Q/dO tiles and add to the
  // same dQ tile close together in time: L2 hits. (First to last, causal CTAs would each be on
  // a different tile, and the dQ and Q/dO traffic of a 64k causal backward would exceed HBM
  // bandwidth.) The heads of a group are the inner loop: with the heads outer, a causal CTA
  // of block j (2j tiles fewer per head than block 0) reached head h + 1 2j tiles before
  // block 0 did and queued for block 0's adds there, at every head (H100, GQA 32/8, 64k
  // causal fwd+bwd: 475 -> 500 TFLOP/s with the heads inner; full and MHA unchanged).
  const int m_last = m_first + q_tiles - 1;
  const int group = p.kv_group;
  auto walk = [&](int it) { return make_int2(it % group, (m_last - it / group) * BQ); };

  if (iters <= 0) {  // no row of the task sees a key of this CTA
    if (parts == 1) {
      if (p.dkv_store) zero_dkv_rows_sm90<D>(p, b, kvh, n0, BN, tid, static_cast<int>(blockDim.x));
      return;
    }
    // A split causal block's share may hold no tile; it still takes its turn (part 0 zeroing
    // the rows in store mode), since the next part waits for it.
    unsigned int* turn = p.dq_sem + fused_bwd_semaphores(p) + 1 + (unit - split_from);
    if (part > 0 && tid == 0) sem_wait_eq(turn, static_cast<unsigned int>(part));
    __syncthreads();
    if (part == 0 && p.dkv_store) zero_dkv_rows_sm90<D>(p, b, kvh, n0, BN, tid, static_cast<int>(blockDim.x));
    if (part + 1 < parts) {
      __syncthreads();
      if (tid == 0) {
        __threadfence();
        sem_release_add(turn);
      }
    }
    return;
  }

  if (warp < 4) {  // the producer warpgroup
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory");
    if (warp == 0) {  // loads: K and V once, then Q, dO and the statistics per tile
      load_dkv_tiles_sm90<Tr, BN, BQ>(p, &tm_q, &tm_do, &tm_k, &tm_v, sK, sV, sQ, sdO, bars, s_lse2, s_delta, n0, kvh,
                                      b, iters, lane, walk);
    } else if (warp <= 2) {  // the dQ writers: warp 1 takes the even iterations, warp 2 the odd ones
      const int parity = warp - 1;
      const int sem_tiles = (p.q_len + BQ - 1) / BQ;
      for (int it = parity; it < iters; it += 2) {
        const int2 w = walk(it);
        const int hq = kvh * group + w.x, tile = w.y / BQ;
        unsigned int* sem = p.dq_sem + (static_cast<std::int64_t>(b) * p.heads + hq) * sem_tiles + tile;
        if (lane == 0) {
          // The blocks before j that visit this tile add first: all of them (the first visited
          // tile grows with the block, the last never shrinks), or, with a band, those whose last
          // visited tile is at least `tile`. Polled before the tile is ready, while the
          // consumers compute it.
          int first = 0;
          if constexpr (kCausal) {
            if (p.band) {
              int hi = j;
              while (first < hi) {
                const int mid = (first + hi) / 2;
                if (dkv_first_tile<kCausal, BQ>(p, mid * BN) + dkv_tile_count<kCausal, BN, BQ>(p, mid * BN) > tile) {
                  hi = mid;
                } else {
                  first = mid + 1;
                }
              }
            }
          }
          sem_wait_eq(sem, static_cast<unsigned int>(j - first));
          fence_proxy_async_global();
        }
        __syncwarp();
        named_bar_sync(kFusedBarDqFull + parity, kFusedConsumersAndWriter);  // the tile is in shared memory
        if (lane == 0) {
#pragma unroll
          for (int c = 0; c < D / Tr::kDqBoxCols; ++c) {
            tma_reduce_add_4d(&tm_dq, sdQ + c * Tr::kDqBoxBytes, c * Tr::kDqBoxCols, p.q_begin + tile * BQ, hq, b);
          }
          bulk_commit();
          bulk_wait_read();
        }
        __syncwarp();
        if (it + 1 < iters) named_bar_arrive(kFusedBarDqEmpty + parity, kFusedConsumersAndWriter);  // buffer free
        if (lane == 0) {
          bulk_wait_done();  // the adds are performed ...
          fence_proxy_async_global();
          sem_release_add(sem);  // ... before the next block may add; meanwhile the other warp serves the next tile
        }
        __syncwarp();
      }
    }
    return;
  }

  // The consumers: warpgroup wg owns keys n0 + 64 wg .. + 63 (task-relative).
  asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory");
  const int wg = warp / 4 - 1, warp_in_wg = warp % 4;
  const int key_wg = n0 + wg * 64;
  const int key0 = key_wg + warp_in_wg * 16 + lane / 4;  // this thread's keys: key0, key0 + 8
  // The row of the stored dS^T whose address this lane gives stmatrix (see the store), and its
  // byte offset there with the part of the swizzled chunk (2 kk + hi) ^ (stm_r % 8) that does not
  // depend on kk: (hi ^ stm_r) % 2; the rest is 2 kk ^ (stm_r & 6), stm_r = stm_base / 128.
  const int stm_r = wg * 64 + warp_in_wg * 16 + 8 * ((lane / 8) & 1) + lane % 8;
  const std::uint32_t stm_base = stm_r * 128 + ((((lane / 16) ^ stm_r) & 1) << 4);

  float dk[NO], dv[NO];
#pragma unroll
  for (int i = 0; i < NO; ++i) dk[i] = dv[i] = 0.0f;

  // Tile i's dQ (this warpgroup's D / 2 columns), scaled, into the TMA boxes once the writer of
  // tile i - 1 has read them: column (D / 2) wg + 8 t + 2 (lane % 4) + e of row r is box
  // (D / 64) wg + t / 4,
  // 16-byte chunk 2 (t % 4) + (lane % 4) / 2, swizzled with r % 8. Stored while the tile's
  // dK MMAs run. A warp's 64-bit stores go to shared memory a half-warp at a time;
  // rows r % 8 = 0..3 (or 4..7) of one t would put two lanes on each of 4 chunks, so lane
  // group g = (lane / 4) % 4 stores t % 4 = u ^ g at step u: 8 distinct chunks per half-warp.
  float dq[NQ];
  const int row_base = warp_in_wg * 16 + lane / 4;
  const int sw = (lane / 4) % 4;
  auto store_dq = [&](int i) {
    if (i > 0) named_bar_sync(kFusedBarDqEmpty + (i - 1) % 2, kFusedConsumersAndWriter);  // tile i - 1 was read
#pragma unroll
    for (int box = 0; box < NQ / 16; ++box) {
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float x[4][2];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
#pragma unroll
          for (int e = 0; e < 2; ++e) x[u][e] = dq[4 * (4 * box + u) + 2 * hr + e] * p.scale;
        }
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // x[u] <- x[u ^ sw]
          if (sw & 1) {
            const float a = x[0][e], c = x[2][e];
            x[0][e] = x[1][e], x[1][e] = a, x[2][e] = x[3][e], x[3][e] = c;
          }
          if (sw & 2) {
            const float a = x[0][e], c = x[1][e];
            x[0][e] = x[2][e], x[2][e] = a, x[1][e] = x[3][e], x[3][e] = c;
          }
        }
        const int r = row_base + hr * 8;
        const std::uint32_t row = sdQ + (wg * (NQ / 16) + box) * Tr::kDqBoxBytes + r * 128 + (lane & 1) * 8;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          const int chunk = 2 * (u ^ sw) + (lane % 4) / 2;
          asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(row + ((chunk ^ (r & 7)) << 4)), "f"(x[u][0]),
                       "f"(x[u][1])
                       : "memory");
        }
      }
    }
    fence_proxy_async();  // visible to the TMA reduce-adds
    named_bar_arrive(kFusedBarDqFull + i % 2, kFusedConsumersAndWriter);
  };

  mbar_wait(kv_full, 0);
  if constexpr (D == 64) {
    // K^T for the dQ slices, once: element (key n, column c) of the K tile (row n, 16-byte chunk
    // c / 8 at c / 8 ^ n % 8) to row c of atom column n / 64 (chunk (n % 64) / 8 ^ c % 8) of
    // the K-major K^T tile. 32 elements per consumer thread; the stores conflict, once per CTA.
    const int ct = tid - 128;
#pragma unroll 8
    for (int i = 0; i < BN * D / kFusedConsumers; ++i) {
      const int idx = ct + i * kFusedConsumers, n = idx / D, c = idx % D;
      unsigned short x;
      asm volatile("ld.shared.u16 %0, [%1];\n"
                   : "=h"(x)
                   : "r"(sK + n * 128 + (((c / 8) ^ (n % 8)) << 4) + (c % 8) * 2));
      asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(sKt + (n / 64) * D * 128 + c * 128 +
                                                        ((((n % 64) / 8) ^ (c % 8)) << 4) + (n % 8) * 2),
                   "h"(x)
                   : "memory");
    }
    fence_proxy_async();  // visible to wgmma's reads
    named_bar_sync(kFusedBarDs, kFusedConsumers);
  }
  // A tile's MMA groups, in issue order: S^T, dP^T, dV (dkv_step_sm90), dQ, dK; all have
  // completed when the tile ends. (Leaving dQ in flight into the next tile, so that its S^T
  // queues behind it, was tried: ptxas cannot follow a group in flight across the loop's back
  // edge and serialises every wgmma of the kernel, C7512 / C7514.)
  for (int it = 0; it < iters; ++it) {
    const int st = it % NST;
    const int m0 = walk(it).y;
    const std::uint32_t ds_buf = sdS + (it & 1) * Tr::kDsBytes;
    mbar_wait(qdo_full(st), static_cast<std::uint32_t>(it / NST) & 1u);
    const std::uint32_t q_tile = sQ + st * kTile, do_tile = sdO + st * kTile;
    std::uint32_t ap[BQ / 16][4], ads[BQ / 16][4];  // live until the dV / dK MMAs complete
    // Every warpgroup runs the step, also one that sees none of the tile's rows (its P and dS
    // are masked to zero): a branch around the step cost every causal tile ~240 cycles.
    dkv_step_sm90<T, D, BN, BQ, kCausal, true>(dk, dv, ap, ads, p, sK, sV, q_tile, do_tile, s_lse2 + st * BQ,
                                               s_delta + st * BQ, wg, key_wg, key0, m0, lane);
    // dS^T to shared memory: row r (the CTA's key r) holds the tile's 64 query rows, 16-byte
    // chunk t (rows 8t .. 8t + 7) at chunk t ^ (r % 8). ads[kk][m] are the four 8 x 8 matrices
    // of a warp's 16 keys x 16 rows (keys + 8 (m & 1), rows 16 kk + 8 (m >> 1)) in stmatrix's
    // register layout: one stmatrix.x4 per kk, lane l giving the address of row l % 8 of
    // matrix l / 8 (4 stores per thread where 32-bit stores took 32; H100, 64k fwd+bwd:
    // +0.9% full, causal unchanged).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      const std::uint32_t addr = ds_buf + stm_base + (((2 * kk) ^ ((stm_base >> 7) & 6)) << 4);
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(ads[kk][0]),
                   "r"(ads[kk][1]), "r"(ads[kk][2]), "r"(ads[kk][3])
                   : "memory");
    }
    fence_proxy_async();  // the stores, visible to wgmma's reads
    named_bar_sync(kFusedBarDs, kFusedConsumers);  // both halves of dS^T are stored
    wgmma_fence();
    if constexpr (D == 128) {
      // dQ[:, 64 wg ..] = dS K[:, 64 wg ..], over the 128 keys (the first MMA overwrites: dq is
      // dead from its store to here, through S^T and dP^T, which keeps the peak at 192 registers).
      const SmemDescSw128 dds(ds_buf, BN * 128, 1024), dkk(sK + wg * BN * 128, BN * 128, 1024);
      Wgmma<T, 64>::ss_tt_zero(dq, dds.at(0), dkk.at(0));
#pragma unroll
      for (int kk = 1; kk < BN / 16; ++kk) Wgmma<T, 64>::ss_tt(dq, dds.at(kk * 16 * 128), dkk.at(kk * 16 * 128), 1);
    } else {
      // dQ[:, 32 wg ..] = dS K[:, 32 wg ..]: B = rows 32 wg .. of K^T, K-major (k16 slice kk of
      // the keys: atom column kk / 4, 32 (kk % 4) bytes in).
      const SmemDescSw128 dds(ds_buf, BN * 128, 1024), dkt(sKt + wg * 32 * 128, 16, 1024);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        Wgmma<T, 32>::ss_ta(dq, dds.at(kk * 16 * 128), dkt.at((kk / 4) * D * 128 + (kk % 4) * 32), kk > 0);
      }
    }
    wgmma_commit();
    fence_regs(dk);
    issue_xb_sm90<T, D, BQ>(dk, ads, q_tile);  // dK += dS^T Q, after dQ: its stores run under dK's MMAs
    wgmma_commit();
    wgmma_wait<1>();  // dV and dQ have landed
    fence_regs(dq);
    store_dq(it);
    wgmma_wait<0>();
    fence_regs(dv);
    fence_regs(dk);
    fence_regs_u32(ap);
    fence_regs_u32(ads);
    __syncwarp();
    if (lane == 0) mbar_arrive(qdo_empty(st));  // Q and dO of this stage are no longer read
  }

  if (parts == 1) {
    add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane, p.dkv_store != 0);
  } else {
    // The parts of a split key block add in order (see "The last wave").
    unsigned int* turn = p.dq_sem + fused_bwd_semaphores(p) + 1 + (unit - split_from);
    if (part > 0) {
      if (tid == 128) sem_wait_eq(turn, static_cast<unsigned int>(part));
      named_bar_sync(kFusedBarDs, kFusedConsumers);
    }
    add_dkv_sums_sm90<D>(p, dk, dv, b, kvh, key0, lane, part == 0 && p.dkv_store != 0);
    if (part + 1 < parts) {
      named_bar_sync(kFusedBarDs, kFusedConsumers);  // every consumer's rows are written ...
      if (tid == 128) {
        __threadfence();
        sem_release_add(turn);  // ... before the next part reads them
      }
    }
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // built without sm_90a code: the dispatcher never launches it then
#endif
}

// --- host side ---

// The tensors TMA must describe (sm90_bwd_supports), the dQ accumulator 16-byte aligned, and
// room for the semaphores.
inline bool sm90_fused_bwd_supports(const FlashBwdParams& p) {
  return sm90_bwd_supports(p) && tma_aligned(p.dq) && p.dq_sem != nullptr && p.dq_sem_len >= fused_bwd_sem_words(p);
}

template <class Tr>
void launch_flash_bwd_fused_sm90_traits(const FlashBwdParams& p, cudaStream_t stream) {
  using T = typename Tr::T;
  constexpr int D = Tr::kHeadDim;
  if (p.q_len <= 0 || p.kv_len <= 0) return;
  static const bool configured = [] {
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_fused_sm90_kernel<Tr, true>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmem));
    RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(flash_bwd_fused_sm90_kernel<Tr, false>,
                                             cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmem));
    return true;
  }();
  (void)configured;
  RINGATTN_CUDA_CHECK(
      cudaMemsetAsync(p.dq_sem, 0, static_cast<std::size_t>(fused_bwd_sem_words(p)) * sizeof(unsigned int), stream));
  const std::int64_t q_rows = p.q_begin + p.q_len, kv_rows = p.kv_begin + p.kv_len;
  const CUtensorMap tq = make_tile_map<T>(p.q, D, q_rows, p.heads, p.batch, p.q_row_stride, p.q_head_stride,
                                          p.q_batch_stride, Tr::kBlockQ);
  const CUtensorMap tdo = make_tile_map<T>(p.dout, D, q_rows, p.heads, p.batch, p.do_row_stride, p.do_head_stride,
                                           p.do_batch_stride, Tr::kBlockQ);
  const CUtensorMap tk = make_tile_map<T>(p.k, D, kv_rows, p.kv_heads, p.batch, p.kv_row_stride, p.kv_head_stride,
                                          p.kv_batch_stride, Tr::kKeys);
  const CUtensorMap tv = make_tile_map<T>(p.v, D, kv_rows, p.kv_heads, p.batch, p.kv_row_stride, p.kv_head_stride,
                                          p.kv_batch_stride, Tr::kKeys);
  // dQ (B, H, s_q, D) fp32; rows past the task's are outside the map, so never written.
  const CUtensorMap tdq = make_f32_tile_map(p.dq, D, q_rows, p.heads, p.batch, p.s_q * D,
                                            static_cast<std::int64_t>(p.heads) * p.s_q * D, Tr::kBlockQ);
  const int blocks = (p.kv_len + Tr::kKeys - 1) / Tr::kKeys;
  const int units = blocks * p.kv_heads * p.batch;
  const int hc = fused_bwd_head_chunk(p);
  int device = 0, sms = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&device));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const FusedBwdSplit split = fused_bwd_split(p, units, (p.q_len + Tr::kBlockQ - 1) / Tr::kBlockQ, sms);
  const int split_from = units - split.split;
  const dim3 grid(static_cast<unsigned>(split_from + split.split * split.parts));
  if (p.causal) {
    flash_bwd_fused_sm90_kernel<Tr, true>
        <<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p, tq, tdo, tk, tv, tdq, hc, blocks, split_from, split.parts);
  } else {
    flash_bwd_fused_sm90_kernel<Tr, false>
        <<<grid, Tr::kThreads, Tr::kSmem, stream>>>(p, tq, tdo, tk, tv, tdq, hc, blocks, split_from, split.parts);
  }
  RINGATTN_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int kHeadDim>
void launch_flash_bwd_fused_sm90(const FlashBwdParams& p, cudaStream_t stream) {
  launch_flash_bwd_fused_sm90_traits<Sm90FusedBwdTraits<T, kHeadDim>>(p, stream);
}

}  // namespace ringattn::detail::flash
