// The GPU ring engines at 2 and 3 ranks on one GPU: a LocalGroup whose members share a device
// moves the ring's hops by device copies (LoopbackTransport), so the engines' multi-rank paths
// run where only one GPU is lent: double-buffered K/V hops, the backward's dK/dV accumulators
// travelling one hop behind, the single-pass kernel's step sums added once the accumulator has
// arrived, zigzag's two tasks per step, a sliding window's reverse pass, the last hop home in
// two pieces behind the last step's two key slices (from 8,192 rows per member).
//
// Each case computes forward() and then backward() on the group (options.kernel = native, the
// kernels the 1.5x rule is stated for) and checks, against the fp64 reference of the whole
// sequence:
//   out within output_tolerance, LSE within lse_tolerance (element by element);
//   dQ, dK, dV (as stored, in the dtype) within gradient_tolerance of the largest reference
//   gradient, and no more than 1.5x (+1e-7) the error of a one-member group on the same inputs;
//   a second backward on the same group gives bitwise-identical gradients.
// Where two GPUs are visible, the same case on distinct devices (NCCL) must give the same
// bytes as the loopback group, with the ring buffers registered with NCCL
// (RINGATTN_NCCL_REGISTER=1: zero-copy send/recv) and without (staged through NCCL's
// FIFOs). Skips where no GPU is present.
//
// AutoKernel: where --kernel auto gives a forward task to the native kernel for speed, its
// output is the native kernel's.
#include <gtest/gtest.h>

#include "common/attention_case.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "core/cuda_span_timer.hpp"
#include "comm/loopback_transport.hpp"
#include "core/dtype.hpp"
#include "core/synthetic.hpp"
#include "engine/cuda_resources.hpp"
#include "engine/cuda_ring_forward.hpp"
#include "engine/reference.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/error.hpp"
#include "ringattn/local_group.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using Case = ringattn::testing::AttentionCase;
using ringattn::testing::generate;
using ringattn::testing::name;
using ringattn::testing::to_f32;

bool have_gpu() { return cuda_device_count() > 0; }

// One group run's results, gathered back into natural order (B, S, heads, D) in the dtype;
// lse (B, H, S) fp32.
struct Gathered {
  std::vector<unsigned char> out, dq, dk, dv;
  std::vector<float> lse;
  std::vector<unsigned char> dq2, dk2, dv2;  // the second backward
  bool registered = false;                   // member 0's ring buffers registered with NCCL
};

Gathered run_group(const Case& c, const std::vector<int>& devices, const std::vector<unsigned char>& q_all,
                   const std::vector<unsigned char>& k_all, const std::vector<unsigned char>& v_all,
                   const std::vector<unsigned char>& do_all) {
  const int N = static_cast<int>(devices.size());
  const Layout layout(c.layout, c.seq, N);
  const std::size_t elem = dtype_size(c.dtype);
  const std::int64_t B = c.batch, H = c.heads, Hk = c.kv_heads, D = c.dim;
  LocalGroup group(devices);

  struct Member {
    std::vector<std::int64_t> pos;
    DeviceBuffer q, k, v, dout, out, lse, dq, dk, dv;
  };
  std::vector<Member> m(static_cast<std::size_t>(N));
  std::vector<TensorView> qs, ks, vs, dos, outs, lses, dqs, dks, dvs;
  // Rows `pos` of a natural-order (B, S, heads, D) tensor, and back.
  auto rows = [&](const std::vector<unsigned char>& all, std::int64_t heads, const std::vector<std::int64_t>& pos) {
    const std::size_t row = static_cast<std::size_t>(heads * D) * elem;
    std::vector<unsigned char> out(static_cast<std::size_t>(B) * pos.size() * row);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::size_t i = 0; i < pos.size(); ++i)
        std::memcpy(out.data() + (static_cast<std::size_t>(b) * pos.size() + i) * row,
                    all.data() + static_cast<std::size_t>(b * c.seq + pos[i]) * row, row);
    return out;
  };
  auto scatter = [&](std::vector<unsigned char>& all, const DeviceBuffer& d, std::int64_t heads,
                     const std::vector<std::int64_t>& pos) {
    std::vector<unsigned char> h(d.bytes());
    RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), d.get(), h.size(), cudaMemcpyDeviceToHost));
    const std::size_t row = static_cast<std::size_t>(heads * D) * elem;
    all.resize(static_cast<std::size_t>(B * c.seq) * row);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::size_t i = 0; i < pos.size(); ++i)
        std::memcpy(all.data() + static_cast<std::size_t>(b * c.seq + pos[i]) * row,
                    h.data() + (static_cast<std::size_t>(b) * pos.size() + i) * row, row);
  };
  for (int i = 0; i < N; ++i) {
    Member& x = m[static_cast<std::size_t>(i)];
    const int dev = devices[static_cast<std::size_t>(i)];
    RINGATTN_CUDA_CHECK(cudaSetDevice(dev));
    x.pos = layout.positions(i);
    const auto n = static_cast<std::int64_t>(x.pos.size());
    auto upload = [&](DeviceBuffer& d, const std::vector<unsigned char>& h) {
      d = DeviceBuffer(h.size());
      RINGATTN_CUDA_CHECK(cudaMemcpy(d.get(), h.data(), h.size(), cudaMemcpyHostToDevice));
    };
    upload(x.q, rows(q_all, H, x.pos));
    upload(x.k, rows(k_all, Hk, x.pos));
    upload(x.v, rows(v_all, Hk, x.pos));
    upload(x.dout, rows(do_all, H, x.pos));
    x.out = DeviceBuffer(static_cast<std::size_t>(B * n * H * D) * elem);
    x.dq = DeviceBuffer(x.out.bytes());
    x.dk = DeviceBuffer(static_cast<std::size_t>(B * n * Hk * D) * elem);
    x.dv = DeviceBuffer(x.dk.bytes());
    x.lse = DeviceBuffer(static_cast<std::size_t>(B * H * n) * sizeof(float));
    auto view = [&](DeviceBuffer& d, std::int64_t heads) {
      return TensorView::contiguous(d.get(), c.dtype, {B, n, heads, D}, DeviceKind::cuda, dev);
    };
    qs.push_back(view(x.q, H));
    ks.push_back(view(x.k, Hk));
    vs.push_back(view(x.v, Hk));
    dos.push_back(view(x.dout, H));
    outs.push_back(view(x.out, H));
    dqs.push_back(view(x.dq, H));
    dks.push_back(view(x.dk, Hk));
    dvs.push_back(view(x.dv, Hk));
    lses.push_back(TensorView::contiguous(x.lse.get(), DType::f32, {B, H, n}, DeviceKind::cuda, dev));
  }
  AttentionOptions options;
  options.causal = c.causal;
  options.layout = c.layout;
  options.window = c.window;
  options.kernel = KernelKind::native;
  options.timeout_s = 120.0;
  forward(group, qs, ks, vs, outs, lses, options);
  backward(group, qs, ks, vs, outs, lses, dos, dqs, dks, dvs, options);

  Gathered g;
  g.registered = group.resources(0).ring_buffers_registered();
  g.lse.resize(static_cast<std::size_t>(B * H * c.seq));
  for (int i = 0; i < N; ++i) {
    Member& x = m[static_cast<std::size_t>(i)];
    scatter(g.out, x.out, H, x.pos);
    scatter(g.dq, x.dq, H, x.pos);
    scatter(g.dk, x.dk, Hk, x.pos);
    scatter(g.dv, x.dv, Hk, x.pos);
    const auto n = static_cast<std::int64_t>(x.pos.size());
    std::vector<float> l(static_cast<std::size_t>(B * H * n));
    RINGATTN_CUDA_CHECK(cudaMemcpy(l.data(), x.lse.get(), l.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (std::int64_t bh = 0; bh < B * H; ++bh)
      for (std::int64_t r = 0; r < n; ++r)
        g.lse[static_cast<std::size_t>(bh * c.seq + x.pos[static_cast<std::size_t>(r)])] =
            l[static_cast<std::size_t>(bh * n + r)];
  }
  for (Member& x : m) {  // the second backward must not see the first one's results
    RINGATTN_CUDA_CHECK(cudaMemset(x.dq.get(), 0, x.dq.bytes()));
    RINGATTN_CUDA_CHECK(cudaMemset(x.dk.get(), 0, x.dk.bytes()));
    RINGATTN_CUDA_CHECK(cudaMemset(x.dv.get(), 0, x.dv.bytes()));
  }
  backward(group, qs, ks, vs, outs, lses, dos, dqs, dks, dvs, options);
  for (int i = 0; i < N; ++i) {
    Member& x = m[static_cast<std::size_t>(i)];
    scatter(g.dq2, x.dq, H, x.pos);
    scatter(g.dk2, x.dk, Hk, x.pos);
    scatter(g.dv2, x.dv, Hk, x.pos);
  }
  return g;
}

// max |got - ref| / max |ref|.
double relative_error(DType dtype, const std::vector<unsigned char>& got, const std::vector<double>& ref) {
  const std::vector<float> g = to_f32(dtype, got);
  double err = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, ringattn::testing::abs_err(g[i], ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  return err / std::max(scale, 1e-30);
}

class LoopbackRing : public ::testing::TestWithParam<Case> {};

TEST_P(LoopbackRing, MatchesReferenceAndOneMember) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  const Case& c = GetParam();
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  const auto q = generate(c, SyntheticTensor::q, all, c.heads);
  const auto k = generate(c, SyntheticTensor::k, all, c.kv_heads);
  const auto v = generate(c, SyntheticTensor::v, all, c.kv_heads);
  const auto dout = generate(c, SyntheticTensor::dout, all, c.heads);
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  const ReferenceProblem ref{c.batch, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale, c.window, c.sinks};
  const std::vector<float> q32 = to_f32(c.dtype, q), k32 = to_f32(c.dtype, k), v32 = to_f32(c.dtype, v),
                           do32 = to_f32(c.dtype, dout);
  std::vector<double> o_ref, lse_ref, rdq, rdk, rdv;
  reference_forward(ref, all, q32, k32, v32, o_ref, lse_ref);
  reference_backward(ref, q32, k32, v32, do32, rdq, rdk, rdv);

  const Gathered many = run_group(c, std::vector<int>(static_cast<std::size_t>(c.world), 0), q, k, v, dout);
  const Gathered one = run_group(c, {0}, q, k, v, dout);

  // The forward pass, element by element.
  double max_v = 0.0;
  for (float x : v32) max_v = std::max(max_v, static_cast<double>(std::abs(x)));
  const Tolerance ot = output_tolerance(c.dtype, max_v), lt = lse_tolerance();
  const std::vector<float> out = to_f32(c.dtype, many.out);
  std::size_t bad_out = 0, bad_lse = 0;
  for (std::size_t i = 0; i < o_ref.size(); ++i) bad_out += std::abs(out[i] - o_ref[i]) > ot.atol + ot.rtol * std::abs(o_ref[i]);
  for (std::size_t i = 0; i < lse_ref.size(); ++i)
    bad_lse += std::abs(many.lse[i] - lse_ref[i]) > lt.atol + lt.rtol * std::abs(lse_ref[i]);
  EXPECT_EQ(bad_out, 0u) << "output elements outside the tolerance";
  EXPECT_EQ(bad_lse, 0u) << "lse elements outside the tolerance";

  // The gradients: tolerance, growth against one member, bitwise repeat.
  const double tol = gradient_tolerance(c.dtype);
  const struct {
    const char* what;
    const std::vector<unsigned char>& got;
    const std::vector<unsigned char>& again;
    const std::vector<unsigned char>& alone;
    const std::vector<double>& ref;
  } grads[] = {{"dq", many.dq, many.dq2, one.dq, rdq}, {"dk", many.dk, many.dk2, one.dk, rdk},
               {"dv", many.dv, many.dv2, one.dv, rdv}};
  for (const auto& g : grads) {
    const double err = relative_error(c.dtype, g.got, g.ref), err_one = relative_error(c.dtype, g.alone, g.ref);
    std::printf("[   info   ] %s: error %.3g at %d members, %.3g at one (tolerance %.3g)\n", g.what, err, c.world,
                err_one, tol);
    EXPECT_LE(err, tol) << g.what;
    EXPECT_LE(err, 1.5 * err_one + 1e-7) << g.what << ": error on one member " << err_one;
    EXPECT_TRUE(g.got == g.again) << g.what << ": a second backward gave different bits";
  }

  if (cuda_device_count() >= c.world) {  // distinct GPUs over NCCL: the same bytes
    std::vector<int> devices;
    for (int i = 0; i < c.world; ++i) devices.push_back(i);
    EXPECT_FALSE(many.registered) << "a loopback group has no communicator to register with";
    const char* user = std::getenv("RINGATTN_NCCL_REGISTER");
    const std::string saved = user != nullptr ? user : "";
    for (const bool registered : {true, false}) {
      setenv("RINGATTN_NCCL_REGISTER", registered ? "1" : "0", 1);
      Gathered nccl;
      try {
        nccl = run_group(c, devices, q, k, v, dout);
      } catch (...) {
        user != nullptr ? setenv("RINGATTN_NCCL_REGISTER", saved.c_str(), 1) : unsetenv("RINGATTN_NCCL_REGISTER");
        throw;
      }
      user != nullptr ? setenv("RINGATTN_NCCL_REGISTER", saved.c_str(), 1) : unsetenv("RINGATTN_NCCL_REGISTER");
      const char* how = registered ? " (RINGATTN_NCCL_REGISTER=1)" : " (RINGATTN_NCCL_REGISTER=0)";
      EXPECT_EQ(nccl.registered, registered) << how;
      EXPECT_TRUE(nccl.out == many.out) << "out differs between NCCL and loopback" << how;
      EXPECT_TRUE(nccl.dq == many.dq && nccl.dk == many.dk && nccl.dv == many.dv)
          << "gradients differ between NCCL and loopback" << how;
    }
  }
}

// Sizes on 128-row tiles where the layout allows (the wgmma kernels), one uneven case (the
// mma.sync fallback for ragged tiles goes through the same engine code).
INSTANTIATE_TEST_SUITE_P(
    Engines, LoopbackRing,
    ::testing::Values(Case{1, 1024, 4, 2, 128, true, LayoutKind::zigzag, 2, DType::bf16},
                      Case{1, 1024, 4, 4, 128, false, LayoutKind::contiguous, 2, DType::bf16},
                      Case{1, 1536, 4, 1, 128, true, LayoutKind::zigzag, 3, DType::bf16},
                      Case{2, 768, 2, 2, 64, false, LayoutKind::zigzag, 3, DType::f16},
                      Case{1, 1536, 2, 2, 64, true, LayoutKind::contiguous, 3, DType::bf16},
                      Case{1, 1024, 2, 2, 128, false, LayoutKind::contiguous, 3, DType::bf16, 300},
                      Case{1, 1000, 2, 1, 64, true, LayoutKind::zigzag, 2, DType::bf16},
                      // 8,192 rows per member: the last hop home goes in two pieces, the last
                      // step computed in two key slices (full; causal, member 1's task all in
                      // the first slice).
                      Case{1, 16384, 1, 1, 64, false, LayoutKind::contiguous, 2, DType::bf16},
                      Case{1, 16384, 2, 1, 64, true, LayoutKind::zigzag, 2, DType::bf16}),
    [](const ::testing::TestParamInfo<Case>& info) { return "case" + std::to_string(info.index); });

// The ring buffers a group member keeps across calls: a request that fits returns the slot's
// buffer, a larger one replaces it while an engine's hold on the old one keeps that valid.
TEST(RingBuffers, KeptAcrossCallsAndGrown) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  LocalGroup group({0, 0});
  CudaResources& res = group.resources(0);
  EXPECT_FALSE(res.ring_buffers_registered());
  const RingBufferRef a = res.ring_buffer(0, 4096);
  ASSERT_NE(a.get(), nullptr);
  EXPECT_EQ(a.bytes(), 4096u);
  EXPECT_EQ(res.ring_buffer(0, 1000).get(), a.get()) << "a request that fits got a new buffer";
  EXPECT_NE(res.ring_buffer(1, 1000).get(), a.get()) << "two slots share a buffer";
  RINGATTN_CUDA_CHECK(cudaMemset(a.get(), 0x5a, a.bytes()));
  const RingBufferRef b = res.ring_buffer(0, 8192);
  EXPECT_NE(b.get(), a.get());
  EXPECT_EQ(b.bytes(), 8192u);
  EXPECT_EQ(res.ring_buffer(0, 100).get(), b.get());
  std::vector<unsigned char> h(a.bytes());  // the old buffer is still there and intact
  RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), a.get(), h.size(), cudaMemcpyDeviceToHost));
  EXPECT_TRUE(std::all_of(h.begin(), h.end(), [](unsigned char x) { return x == 0x5a; }));
}

// --kernel auto runs a forward task on the native kernel where that is measured faster than
// cuDNN's (flash_fwd_auto_prefers_native): there auto's output is the native kernel's, byte for
// byte, at one member, on loopback rings of two and for a sliding window of 4096.
TEST(AutoKernel, ForwardIsNativeWhereMeasuredFaster) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  RINGATTN_CUDA_CHECK(cudaSetDevice(0));
  const bool ws = flash_fwd_resolve(FlashKernel::automatic) == FlashKernel::wgmma_ws;
  auto task = [](std::int64_t q_len, std::int64_t kv_len, MaskKind mask, std::int64_t lower_offset = 0) {
    BlockTask t;
    t.q_len = q_len;
    t.kv_len = kv_len;
    t.mask = mask;
    t.lower_offset = lower_offset;
    return t;
  };
  for (const bool merged : {false, true}) {  // the only task, or one whose result is merged
    EXPECT_EQ(flash_fwd_auto_prefers_native(128, task(4096, 4096, MaskKind::full), merged), ws);
    EXPECT_EQ(flash_fwd_auto_prefers_native(128, task(8192, 8192, MaskKind::causal), merged), ws);
    EXPECT_EQ(flash_fwd_auto_prefers_native(128, task(8192, 8192, MaskKind::band, -4095), merged), ws);  // keys i-4095 .. i
    EXPECT_FALSE(flash_fwd_auto_prefers_native(128, task(8192, 8192, MaskKind::band, -4094), merged));
    EXPECT_EQ(flash_fwd_auto_prefers_native(128, task(4095, 8192, MaskKind::full), merged), ws && merged);
    EXPECT_EQ(flash_fwd_auto_prefers_native(128, task(256, 256, MaskKind::causal), merged), ws && merged);
    EXPECT_EQ(flash_fwd_auto_prefers_native(64, task(2048, 2048, MaskKind::full), merged), ws && merged);
    EXPECT_EQ(flash_fwd_auto_prefers_native(64, task(1024, 4096, MaskKind::causal), merged), ws && merged);
    EXPECT_FALSE(flash_fwd_auto_prefers_native(64, task(2049, 1024, MaskKind::full), merged));
    EXPECT_FALSE(flash_fwd_auto_prefers_native(64, task(8192, 8192, MaskKind::full), merged));
  }
  if (!ws) GTEST_SKIP() << "the warp-specialised kernel does not run here: auto never prefers it";
  const std::int64_t B = 1, H = 2;
  // (members, S, causal, window (-1: none), head dim): one task; a ring of two (zigzag causal:
  // tasks of 4096 rows); one band task (keys i - 4096 .. i); a ring of two at head dim 64 (tasks
  // of 512 rows). (A window of 0 would be a band of one key, which auto leaves to cuDNN: its
  // LSE then differs in the last bits.)
  using C = std::tuple<int, std::int64_t, bool, std::int64_t, std::int64_t>;
  // Each member's O (bf16) and LSE (fp32) bytes, one after another.
  auto forward_with = [&](const C& c, KernelKind kernel) {
    const auto& [members, seq, causal, window, D] = c;
    const Layout layout(members == 1 ? LayoutKind::contiguous : LayoutKind::zigzag, seq, members);
    LocalGroup group(std::vector<int>(static_cast<std::size_t>(members), 0));
    std::vector<DeviceBuffer> bufs;
    std::vector<TensorView> q, k, v, out, lse;
    for (int i = 0; i < members; ++i) {
      const std::vector<std::int64_t> pos = layout.positions(i);
      const auto n = static_cast<std::int64_t>(pos.size());
      const std::size_t bytes = static_cast<std::size_t>(B * n * H * D) * 2;
      std::vector<unsigned char> h(bytes);
      for (SyntheticTensor t : {SyntheticTensor::q, SyntheticTensor::k, SyntheticTensor::v}) {
        fill_synthetic(11, t, DType::bf16, B, pos, H, D, h.data());
        bufs.emplace_back(bytes);
        RINGATTN_CUDA_CHECK(cudaMemcpy(bufs.back().get(), h.data(), bytes, cudaMemcpyHostToDevice));
        auto& dst = t == SyntheticTensor::q ? q : t == SyntheticTensor::k ? k : v;
        dst.push_back(TensorView::contiguous(bufs.back().get(), DType::bf16, {B, n, H, D}, DeviceKind::cuda, 0));
      }
      bufs.emplace_back(bytes);
      out.push_back(TensorView::contiguous(bufs.back().get(), DType::bf16, {B, n, H, D}, DeviceKind::cuda, 0));
      bufs.emplace_back(static_cast<std::size_t>(B * H * n) * sizeof(float));
      lse.push_back(TensorView::contiguous(bufs.back().get(), DType::f32, {B, H, n}, DeviceKind::cuda, 0));
    }
    AttentionOptions options;
    options.causal = causal;
    options.layout = layout.kind();
    options.window = window;
    options.kernel = kernel;
    forward(group, q, k, v, out, lse, options);
    std::vector<unsigned char> result;
    for (int i = 0; i < members; ++i) {
      for (const TensorView& t : {out[static_cast<std::size_t>(i)], lse[static_cast<std::size_t>(i)]}) {
        const std::size_t bytes = static_cast<std::size_t>(t.numel()) * dtype_size(t.dtype);
        std::vector<unsigned char> h(bytes);
        RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), t.data, bytes, cudaMemcpyDeviceToHost));
        result.insert(result.end(), h.begin(), h.end());
      }
    }
    return result;
  };
  for (const C& c : {C{1, 4096, false, -1, 128}, C{2, 16384, true, -1, 128}, C{1, 8192, true, 4096, 128},
                     C{2, 2048, true, -1, 64}}) {
    const auto& [members, seq, causal, window, D] = c;
    const std::vector<unsigned char> native = forward_with(c, KernelKind::native);
    const std::vector<unsigned char> automatic = forward_with(c, KernelKind::automatic);
    ASSERT_EQ(native.size(), automatic.size());
    const auto diff = std::mismatch(native.begin(), native.end(), automatic.begin());
    EXPECT_TRUE(diff.first == native.end()) << members << " member(s), S = " << seq << ", window " << window << ", D = " << D
                                            << ": auto's output differs from the native kernel's from byte "
                                            << (diff.first - native.begin()) << " of " << native.size();
  }

  // A ring whose tasks the rule splits (head dim 64, zigzag causal, S = 8192 over 3: member 1's
  // tasks of 1365-1366 query rows go native, its 2731-row one to cuDNN): where the build has
  // cuDNN, the engine says how many tasks run natively, and auto's output agrees with the
  // native kernel's to the dtype's rounding (cuDNN computes the other tasks).
  const C split{3, 8192, true, -1, 64};
  const Layout layout(LayoutKind::zigzag, 8192, 3);
  const RingPlan plan = make_ring_plan(layout, MaskKind::causal, 1);
  std::size_t tasks = 0, natives = 0;
  for (const RingStep& step : plan.steps) {
    for (const BlockTask& t : step.tasks) {
      ++tasks;
      if (flash_fwd_auto_prefers_native(64, t, true)) ++natives;
    }
  }
  ASSERT_TRUE(natives > 0 && natives < tasks) << natives << " of " << tasks << ": the case no longer splits";
  LocalGroup group({0, 0, 0});
  if (group.resources(1).cudnn() == nullptr) GTEST_SKIP() << "no cuDNN in this build: nothing to split";
  const CudaRingForward ring(group.resources(1), plan, AttentionShape{B, H, H, 64}, DType::bf16, layout.local_length(1),
                             layout.max_local_length(), KernelKind::automatic);
  const std::string said = ring.kernel_description();
  EXPECT_NE(said.find(std::to_string(natives) + " of " + std::to_string(tasks) + " tasks on the native"), std::string::npos)
      << said;
  const std::vector<unsigned char> native = forward_with(split, KernelKind::native);
  const std::vector<unsigned char> automatic = forward_with(split, KernelKind::automatic);
  ASSERT_EQ(native.size(), automatic.size());
  std::size_t at = 0;
  for (int m = 0; m < 3; ++m) {
    const auto rows = static_cast<std::size_t>(layout.local_length(m) * H);
    const std::size_t out_bytes = rows * 64 * 2, lse_bytes = rows * sizeof(float);
    const std::vector<unsigned char> on(native.begin() + static_cast<std::ptrdiff_t>(at),
                                        native.begin() + static_cast<std::ptrdiff_t>(at + out_bytes));
    const std::vector<unsigned char> oa(automatic.begin() + static_cast<std::ptrdiff_t>(at),
                                        automatic.begin() + static_cast<std::ptrdiff_t>(at + out_bytes));
    const std::vector<float> fn = to_f32(DType::bf16, on), fa = to_f32(DType::bf16, oa);
    float out_err = 0.0f, lse_err = 0.0f;
    for (std::size_t i = 0; i < fn.size(); ++i) out_err = std::max(out_err, std::abs(fn[i] - fa[i]));
    for (std::size_t i = 0; i < rows; ++i) {
      float ln = 0.0f, la = 0.0f;
      std::memcpy(&ln, native.data() + at + out_bytes + i * sizeof(float), sizeof(float));
      std::memcpy(&la, automatic.data() + at + out_bytes + i * sizeof(float), sizeof(float));
      lse_err = std::max(lse_err, std::abs(ln - la));
    }
    // |O| <= max |V| ~ 1.7 (unit-variance uniform values): two bf16 roundings apart at most.
    EXPECT_LE(out_err, 2e-2f) << "member " << m;
    EXPECT_LE(lse_err, 1e-3f) << "member " << m;
    at += out_bytes + lse_bytes;
  }
}

// With a timer, a transport times each received block's transfer on its communication stream
// (what `bench` reports per kind of hop) and counts the bytes it received; without one it
// records nothing. Two members of one hub on one GPU, one thread each (a hop blocks its host
// until the peer has offered), each sending its buffer to the other: pieces of 3 runs of 1 MiB.
TEST(LoopbackTransport, TimesItsTransfersWhenProfiled) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  RINGATTN_CUDA_CHECK(cudaSetDevice(0));
  auto hub = std::make_shared<LoopbackHub>(2);
  const std::size_t run = std::size_t{1} << 20, stride = 2 * run;
  const Pieces pieces{run / 2, run, stride, 3};
  struct Member {
    DeviceBuffer send, recv;
    CudaStream compute, comm;
    CudaSpanTimer timer;
    std::uint64_t received = 0;
    TransferProfile profile;
  };
  std::vector<Member> m(2);
  for (int i = 0; i < 2; ++i) {
    m[i].send = DeviceBuffer(3 * stride);
    m[i].recv = DeviceBuffer(3 * stride);
    RINGATTN_CUDA_CHECK(cudaMemset(m[i].send.get(), 0x10 + i, 3 * stride));
    RINGATTN_CUDA_CHECK(cudaMemset(m[i].recv.get(), 0, 3 * stride));
    m[i].timer.set_enabled(i == 0);  // member 1 runs without a timer
  }
  RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<std::thread> threads;
  std::vector<std::string> errors(2);
  for (int i = 0; i < 2; ++i) {
    threads.emplace_back([&, i] {
      try {
        RINGATTN_CUDA_CHECK(cudaSetDevice(0));
        Member& x = m[static_cast<std::size_t>(i)];
        x.timer.begin(static_cast<cudaStream_t>(x.comm));
        LoopbackTransport hop(hub, i, 7, static_cast<cudaStream_t>(x.compute), static_cast<cudaStream_t>(x.comm), 30.0, &x.timer);
        for (int rep = 0; rep < 2; ++rep) {
          hop.start_pieces(x.send.get(), pieces, 1 - i, x.recv.get(), pieces, 1 - i);
          hop.wait();
        }
        x.timer.end(static_cast<cudaStream_t>(x.comm));
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(x.compute)));
        RINGATTN_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(x.comm)));
        x.received = hop.bytes_received();
        x.profile = x.timer.tally(7);
      } catch (const std::exception& e) {
        errors[static_cast<std::size_t>(i)] = e.what();
        hub->abort();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (int i = 0; i < 2; ++i) {
    ASSERT_EQ(errors[i], "") << "member " << i;
    EXPECT_EQ(m[i].received, 2 * pieces.total()) << "member " << i;
    std::vector<unsigned char> h(3 * stride);
    RINGATTN_CUDA_CHECK(cudaMemcpy(h.data(), m[i].recv.get(), h.size(), cudaMemcpyDeviceToHost));
    for (std::size_t at = 0; at < h.size(); ++at) {  // the pieces arrived, nothing else was written
      const bool in_piece = at >= pieces.offset && (at - pieces.offset) % stride < run;
      ASSERT_EQ(h[at], in_piece ? 0x10 + (1 - i) : 0) << "member " << i << ", byte " << at;
    }
  }
  EXPECT_EQ(m[0].profile.count, 2);
  EXPECT_GT(m[0].profile.ms, 0.0);
  EXPECT_EQ(m[0].timer.tally(0).count, 0) << "spans filed under another tag";
  EXPECT_EQ(m[1].profile.count, 0) << "a disabled timer recorded spans";
  m[0].profile.bytes = static_cast<double>(m[0].received);
  EXPECT_NEAR(m[0].profile.gbps(), 6.0 * run / (m[0].profile.ms * 1e-3) / 1e9, 1e-9);
}

TEST(LoopbackGroup, RefusesWhatNeedsNccl) {
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  LocalGroup group({0, 0});
  ASSERT_TRUE(group.loopback() != nullptr);
  const std::int64_t B = 1, n = 128, H = 2, D = 64;
  std::vector<DeviceBuffer> bufs;
  std::vector<TensorView> t, lse;
  for (int i = 0; i < 2; ++i) {
    bufs.emplace_back(static_cast<std::size_t>(B * n * H * D) * 2);
    t.push_back(TensorView::contiguous(bufs.back().get(), DType::bf16, {B, n, H, D}, DeviceKind::cuda, 0));
    bufs.emplace_back(static_cast<std::size_t>(B * H * n) * sizeof(float));
    lse.push_back(TensorView::contiguous(bufs.back().get(), DType::f32, {B, H, n}, DeviceKind::cuda, 0));
  }
  AttentionOptions linear;
  linear.attention = AttentionKind::linear;
  linear.layout = LayoutKind::contiguous;
  const std::vector<TensorView> none(2, TensorView{});
  try {
    forward(group, t, t, t, t, none, linear);
    ADD_FAILURE() << "linear attention ran on a loopback group";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("distinct GPUs"), std::string::npos) << e.what();
  }
  AttentionOptions sinks;
  sinks.window = 16;
  sinks.sinks = 4;
  try {
    forward(group, t, t, t, t, lse, sinks);
    ADD_FAILURE() << "attention sinks ran on a loopback group";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("distinct GPUs"), std::string::npos) << e.what();
  }
}

}  // namespace
