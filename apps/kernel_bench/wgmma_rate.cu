// wgmma_rate: how fast one warpgroup-MMA form runs on every SM of an H100/H200, the ceiling the
// backward kernel's tile is held against (docs/PERFORMANCE.md). Each CTA (one per SM) has 1 or
// 2 consumer warpgroups that issue back-to-back groups of 16 wgmmas of one form on operands
// resident in shared memory (values irrelevant: zeros), two accumulators alternating so that
// one group is in flight while the next is issued. Beside them a fourth warpgroup can make
// other shared-memory traffic, as the loads and stores beside a kernel's MMAs do: its 4 warps
// reading with ld.shared.v4 ("lsu") or writing with st.shared.v4 ("lsu-st"), or one thread
// loading 16 KiB chunks from global memory with bulk copies ("tma-ld", as TMA tile loads; one
// chunk in flight, or "tma-ld4": four 4 KiB copies), or adding 16 KiB chunks to global memory
// with bulk reduce-adds ("tma-red", as the backward's dQ writer), one chunk in flight.
// Prints cycles per wgmma per SM against the dense rate (2048 bf16 MACs per clock per SM), the
// shared-memory bytes the wgmmas read per clock, and the other traffic's bytes per clock.
// Then the issue depth: from an empty pipe, G wgmmas issued back to back, the cycles until the
// last issue returns (how far a warp gets ahead of the tensor cores) and until they complete.
//   ringattn_wgmma_rate [--iters N]
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "kernels/cuda/wgmma.cuh"

namespace {

using namespace ringattn::detail::flash;
using bf16 = __nv_bfloat16;

// The forms, named as the backward kernel uses them.
enum Form : int {
  kSsN64 = 0,    // ss m64n64k16, A and B K-major: S^T = K Q^T, dP^T = V dO^T
  kSsTtN64 = 1,  // ss m64n64k16, A and B MN-major: dQ = dS K
  kRsTnN64 = 2,  // rs m64n64k16, B MN-major
  kSsN128 = 3,   // ss m64n128k16, A and B K-major
  kRsN128 = 4,   // rs m64n128k16, B K-major: the forward's S = Q K^T
  kRsTnN128 = 5, // rs m64n128k16, B MN-major: dV += P^T dO, dK += dS^T Q
  kForms = 6
};
const char* kFormNames[kForms] = {"ss   m64n64k16  (S^T, dP^T)", "ss   m64n64k16  MN-major (dQ)",
                                  "rs   m64n64k16  B MN-major", "ss   m64n128k16",
                                  "rs   m64n128k16 (fwd S)", "rs   m64n128k16 B MN-major (dV, dK)"};
constexpr int kN[kForms] = {64, 64, 64, 128, 128, 128};
constexpr bool kRs[kForms] = {false, false, true, false, true, true};
constexpr int kGroup = 16;  // wgmmas per commit group

constexpr int kOperandBytes = 32 * 1024;  // A region, B region
constexpr int kNoiseBytes = 16 * 1024;
constexpr int kSmem = 2 * kOperandBytes + kNoiseBytes + 1024 + 64;
enum Noise : int { kNone = 0, kLsu = 1, kLsuStore = 2, kTmaLoad = 3, kTmaLoad4 = 4, kTmaReduce = 5, kNoises = 6 };
const char* kNoiseNames[kNoises] = {"", "+lsu", "+lsu-st", "+tma-ld", "+tma-ld4", "+tma-red"};

template <int F, int NACC>
__device__ __forceinline__ void issue(float (&d)[NACC], const std::uint32_t (&a)[4], std::uint32_t sa, std::uint32_t sb,
                                      int kk) {
  // k16 slice kk (0..7) of a 64- or 128-row operand: K-major slices 32 bytes apart in an atom
  // column (kk / 4 picks the column, 8 KiB or 16 KiB on), MN-major slices 16 rows (2 KiB) apart.
  if constexpr (F == kSsN64) {
    Wgmma<bf16, 64>::ss(d, smem_desc_sw128(sa + (kk / 4) * 8192 + (kk % 4) * 32, 16, 1024),
                        smem_desc_sw128(sb + (kk / 4) * 8192 + (kk % 4) * 32, 16, 1024), 1);
  } else if constexpr (F == kSsTtN64) {
    Wgmma<bf16, 64>::ss_tt(d, smem_desc_sw128(sa + kk * 2048, 128 * 128, 1024),
                           smem_desc_sw128(sb + kk * 2048, 128 * 128, 1024), 1);
  } else if constexpr (F == kRsTnN64) {
    Wgmma<bf16, 64>::rs_tn(d, a, smem_desc_sw128(sb + kk * 2048, 128 * 128, 1024));
  } else if constexpr (F == kSsN128) {
    Wgmma<bf16, 128>::ss(d, smem_desc_sw128(sa + (kk / 4) * 8192 + (kk % 4) * 32, 16, 1024),
                         smem_desc_sw128(sb + (kk / 4) * 16384 + (kk % 4) * 32, 16, 1024), 1);
  } else if constexpr (F == kRsN128) {
    Wgmma<bf16, 128>::rs(d, a, smem_desc_sw128(sb + (kk / 4) * 16384 + (kk % 4) * 32, 16, 1024), 1);
  } else {
    Wgmma<bf16, 128>::rs_tn(d, a, smem_desc_sw128(sb + kk * 2048, 64 * 128 * 2, 1024));
  }
}

// out[cta]: the consumers' loop cycles (the slowest warpgroup); noise_bytes[cta]: what the
// noise warp read meanwhile.
template <int F, int WGS>
__global__ void __launch_bounds__(WGS * 128 + 128, 1)
    rate_kernel(int iters, int noise, unsigned long long* out, unsigned long long* noise_bytes, float* sink,
                float* global_chunks) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NACC = kN[F] / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  const std::uint32_t sa = (base + 1023u) & ~1023u, sb = sa + kOperandBytes, sn = sb + kOperandBytes;
  volatile int* done = reinterpret_cast<volatile int*>(smem_raw + (sn + kNoiseBytes - base));
  unsigned long long* slowest = reinterpret_cast<unsigned long long*>(smem_raw + (sn + kNoiseBytes - base) + 8);
  const std::uint32_t mbar = sn + kNoiseBytes + 16;  // 4 mbarriers (tma-ld4: one per 4 KiB quarter)
  for (int i = threadIdx.x; i < (2 * kOperandBytes + kNoiseBytes) / 4; i += blockDim.x) {
    reinterpret_cast<std::uint32_t*>(smem_raw + (sa - base))[i] = 0;
  }
  if (threadIdx.x == 0) {
    *done = 0, *slowest = 0;
    for (int q = 0; q < 4; ++q) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(mbar + 8 * q) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  fence_proxy_async();
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (warp >= WGS * 4) {  // the other traffic
    if (noise == kNone) return;
    unsigned long long bytes = 0;
    if (noise == kLsu || noise == kLsuStore) {
      float acc = 0.0f;
      const int w = warp - WGS * 4;
      while (*done < WGS) {
        if (noise == kLsu) {
#pragma unroll 4
          for (int i = 0; i < kNoiseBytes / 2048; ++i) {
            float4 v;
            asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];\n"
                         : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                         : "r"(sn + (i * 4 + w) * 512 + lane * 16));
            acc += v.x;
          }
        } else {
#pragma unroll 4
          for (int i = 0; i < kNoiseBytes / 2048; ++i) {
            asm volatile("st.shared.v4.f32 [%0], {%1, %1, %1, %1};\n" ::"r"(sn + (i * 4 + w) * 512 + lane * 16),
                         "f"(0.0f)
                         : "memory");
          }
        }
        bytes += kNoiseBytes / 4;
      }
      if (acc != 0.0f) *sink = acc;
      atomicAdd(reinterpret_cast<unsigned long long*>(noise_bytes + blockIdx.x), lane == 0 ? bytes : 0ull);
      return;
    }
    if (threadIdx.x != WGS * 128) return;
    float* chunk = global_chunks + static_cast<std::size_t>(blockIdx.x) * (kNoiseBytes / 4);
    std::uint32_t phase = 0;
    while (*done < WGS) {
      if (noise == kTmaLoad4) {  // four 4 KiB loads in flight
        for (int q = 0; q < 4; ++q) {
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mbar + 8 * q),
                       "r"(kNoiseBytes / 4)
                       : "memory");
          asm volatile(
              "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
                  sn + q * (kNoiseBytes / 4)),
              "l"(chunk + q * (kNoiseBytes / 16)), "r"(kNoiseBytes / 4), "r"(mbar + 8 * q)
              : "memory");
        }
        for (int q = 0; q < 4; ++q) {
          asm volatile(
              "{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(
                  mbar + 8 * q),
              "r"(phase)
              : "memory");
        }
        phase ^= 1u;
      } else if (noise == kTmaLoad) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mbar), "r"(kNoiseBytes)
                     : "memory");
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(sn),
            "l"(chunk), "r"(kNoiseBytes), "r"(mbar)
            : "memory");
        asm volatile(
            "{\n.reg .pred p;\nW: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n@!p bra W;\n}\n" ::"r"(mbar),
            "r"(phase)
            : "memory");
        phase ^= 1u;
      } else {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(chunk),
                     "r"(sn), "r"(kNoiseBytes)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
      }
      bytes += kNoiseBytes;
    }
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    noise_bytes[blockIdx.x] = bytes;
    return;
  }
  float d0[NACC], d1[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) d0[i] = d1[i] = 0.0f;
  std::uint32_t a[4] = {threadIdx.x, threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u};
  const unsigned long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    wgmma_fence();
    if (it % 2 == 0) {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) issue<F>(d0, a, sa, sb, g % 8);
    } else {
#pragma unroll
      for (int g = 0; g < kGroup; ++g) issue<F>(d1, a, sa, sb, g % 8);
    }
    wgmma_commit();
    wgmma_wait<1>();
  }
  wgmma_wait<0>();
  fence_regs(d0);
  fence_regs(d1);
  const unsigned long long t1 = clock64();
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < NACC; ++i) s += d0[i] + d1[i];
  if (s != 0.0f) *sink = s;
  if (threadIdx.x % 128 == 0) {
    atomicMax(slowest, t1 - t0);
    atomicAdd(const_cast<int*>(done), 1);
  }
  __syncwarp();
  // (warpgroups finish at about the same time; the first thread of the CTA reports)
  if (threadIdx.x == 0) {
    while (*done < WGS) {
    }
    out[blockIdx.x] = *slowest;
  }
#else
  (void)iters, (void)noise, (void)out, (void)noise_bytes, (void)sink, (void)global_chunks;
#endif
}

// How far a warp gets ahead of the tensor cores: from an empty pipe, a warpgroup issues G
// wgmmas of form F back to back (one group) and reads the clock when the last issue returns
// and when the group has completed. issue_out/done_out[cta]: the first warpgroup's cycles,
// summed over `reps` repetitions.
template <int F, int WGS, int G>
__global__ void __launch_bounds__(WGS * 128, 1)
    depth_kernel(int reps, unsigned long long* issue_out, unsigned long long* done_out, float* sink) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int NACC = kN[F] / 2;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  const std::uint32_t base = static_cast<std::uint32_t>(__cvta_generic_to_shared(smem_raw));
  const std::uint32_t sa = (base + 1023u) & ~1023u, sb = sa + kOperandBytes;
  for (int i = threadIdx.x; i < 2 * kOperandBytes / 4; i += blockDim.x) {
    reinterpret_cast<std::uint32_t*>(smem_raw + (sa - base))[i] = 0;
  }
  fence_proxy_async();
  __syncthreads();
  float d[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) d[i] = 0.0f;
  std::uint32_t a[4] = {threadIdx.x, threadIdx.x * 3u, threadIdx.x * 5u, threadIdx.x * 7u};
  unsigned long long sum_issue = 0, sum_done = 0;
  for (int r = 0; r < reps; ++r) {
    asm volatile("bar.sync 1, %0;\n" ::"n"(WGS * 128) : "memory");  // warpgroups start together
    const unsigned long long t0 = clock64();
    wgmma_fence();
#pragma unroll
    for (int g = 0; g < G; ++g) issue<F>(d, a, sa, sb, g % 8);
    wgmma_commit();
    const unsigned long long t1 = clock64();
    wgmma_wait<0>();
    fence_regs(d);
    const unsigned long long t2 = clock64();
    sum_issue += t1 - t0, sum_done += t2 - t0;
  }
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < NACC; ++i) s += d[i];
  if (s != 0.0f) *sink = s;
  if (threadIdx.x == 0) issue_out[blockIdx.x] = sum_issue, done_out[blockIdx.x] = sum_done;
#else
  (void)reps, (void)issue_out, (void)done_out, (void)sink;
#endif
}

template <int F, int WGS, int G>
void depth(int sms, unsigned long long* d_issue, unsigned long long* d_done, float* sink) {
  constexpr int reps = 200;
  auto kernel = depth_kernel<F, WGS, G>;
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  for (int rep = 0; rep < 2; ++rep) {
    kernel<<<sms, WGS * 128, kSmem>>>(reps, d_issue, d_done, sink);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
    RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<unsigned long long> issue(sms), done(sms);
  RINGATTN_CUDA_CHECK(cudaMemcpy(issue.data(), d_issue, sms * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(done.data(), d_done, sms * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  double i = 0, d = 0;
  for (int k = 0; k < sms; ++k) i += static_cast<double>(issue[k]), d += static_cast<double>(done[k]);
  i /= static_cast<double>(sms) * reps, d /= static_cast<double>(sms) * reps;
  std::printf("%-38s %d WG%s %2d wgmmas: issued after %6.0f cycles, complete after %6.0f (work %5.0f)\n",
              kFormNames[F], WGS, WGS > 1 ? "s" : " ", G, i, d, G * WGS * 64.0 * kN[F] * 16 / 2048);
}

template <int F, int WGS>
void depths(int sms, unsigned long long* d_issue, unsigned long long* d_done, float* sink) {
  depth<F, WGS, 1>(sms, d_issue, d_done, sink);
  depth<F, WGS, 2>(sms, d_issue, d_done, sink);
  depth<F, WGS, 4>(sms, d_issue, d_done, sink);
  depth<F, WGS, 8>(sms, d_issue, d_done, sink);
  depth<F, WGS, 16>(sms, d_issue, d_done, sink);
  depth<F, WGS, 32>(sms, d_issue, d_done, sink);
}

struct Result {
  double cycles_per_wgmma;  // per SM: loop cycles / (wgmmas of all warpgroups)
  double noise_bytes_per_clock;
};

struct Buffers {
  unsigned long long* out;
  unsigned long long* noise;
  float* sink;
  float* chunks;
};

template <int F, int WGS>
Result run(int sms, int iters, int noise, const Buffers& buf) {
  auto kernel = rate_kernel<F, WGS>;
  RINGATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
  for (int rep = 0; rep < 2; ++rep) {  // the first launch warms up
    RINGATTN_CUDA_CHECK(cudaMemset(buf.noise, 0, sms * sizeof(unsigned long long)));
    kernel<<<sms, WGS * 128 + 128, kSmem>>>(iters, noise, buf.out, buf.noise, buf.sink, buf.chunks);
    RINGATTN_CUDA_CHECK(cudaGetLastError());
    RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());
  }
  std::vector<unsigned long long> cycles(sms), bytes(sms);
  RINGATTN_CUDA_CHECK(cudaMemcpy(cycles.data(), buf.out, sms * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(bytes.data(), buf.noise, sms * sizeof(unsigned long long), cudaMemcpyDeviceToHost));
  double c = 0, b = 0;
  for (int i = 0; i < sms; ++i) c += static_cast<double>(cycles[i]), b += static_cast<double>(bytes[i]);
  c /= sms, b /= sms;
  return {c / (static_cast<double>(iters) * kGroup * WGS), b / c};
}

template <int F>
void report(int sms, int iters, const Buffers& buf) {
  const double macs = 64.0 * kN[F] * 16.0;
  const double ideal = macs / 2048.0;                                        // cycles at the dense rate
  const double smem_bytes = (kRs[F] ? 0.0 : 64.0 * 16 * 2) + kN[F] * 16.0 * 2;  // per wgmma
  for (int wgs = 1; wgs <= 2; ++wgs) {
    for (int noise = 0; noise < kNoises; ++noise) {
      const Result r = wgs == 1 ? run<F, 1>(sms, iters, noise, buf) : run<F, 2>(sms, iters, noise, buf);
      std::printf("%-38s %d WG%s %-8s %7.1f cycles (ideal %4.0f: %5.1f%%)  wgmma smem %6.1f B/clk  other %6.1f B/clk\n",
                  kFormNames[F], wgs, wgs > 1 ? "s" : " ", kNoiseNames[noise], r.cycles_per_wgmma, ideal,
                  100.0 * ideal / r.cycles_per_wgmma, smem_bytes / r.cycles_per_wgmma, r.noise_bytes_per_clock);
    }
  }
}

int run(int iters) {
  int dev = 0, major = 0, minor = 0, sms = 0;
  RINGATTN_CUDA_CHECK(cudaGetDevice(&dev));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  RINGATTN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  if (major != 9 || minor != 0) {
    std::fprintf(stderr, "wgmma needs an sm_90 GPU (this one is sm_%d%d)\n", major, minor);
    return 1;
  }
  using ringattn::detail::DeviceBuffer;
  const auto per_sm = static_cast<std::size_t>(sms) * sizeof(unsigned long long);
  const DeviceBuffer out(per_sm), noise(per_sm), sink(sizeof(float)),
      chunks(static_cast<std::size_t>(sms) * kNoiseBytes);
  RINGATTN_CUDA_CHECK(cudaMemset(chunks.get(), 0, chunks.bytes()));
  const Buffers buf{out.as<unsigned long long>(), noise.as<unsigned long long>(), sink.as<float>(), chunks.as<float>()};
  std::printf("wgmma forms, bf16, one CTA per SM on %d SMs, %d groups of %d per warpgroup\n", sms, iters, kGroup);
  report<kSsN64>(sms, iters, buf);
  report<kSsTtN64>(sms, iters, buf);
  report<kRsTnN64>(sms, iters, buf);
  report<kSsN128>(sms, iters, buf);
  report<kRsN128>(sms, iters, buf);
  report<kRsTnN128>(sms, iters, buf);
  std::printf("issue depth: G wgmmas issued from an empty pipe, cycles (work: at the dense rate)\n");
  depths<kSsN64, 1>(sms, buf.out, buf.noise, buf.sink);
  depths<kSsN64, 2>(sms, buf.out, buf.noise, buf.sink);
  depths<kRsTnN128, 1>(sms, buf.out, buf.noise, buf.sink);
  depths<kRsTnN128, 2>(sms, buf.out, buf.noise, buf.sink);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int iters = 2000;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--iters") == 0 && i + 1 < argc) {
      iters = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--iters N]\n", argv[0]);
      return 2;
    }
  }
  if (iters < 2) {
    std::fprintf(stderr, "--iters must be at least 2\n");
    return 2;
  }
  try {
    return run(iters);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ringattn_wgmma_rate: %s\n", e.what());
    return 1;
  }
}
