// `run --gpus N` / `verify --gpus N`: the whole problem in this process, split over N local
// GPUs by the layout, computed by a LocalGroup (one thread per GPU), gathered back; with
// --backward the gradients too.
#include <chrono>
#include <cstring>

#include "problem.hpp"
#include "ringattn/error.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "core/dtype.hpp"
#endif

namespace ringattn::cli {

LocalGpuTimes run_on_local_gpus(const Problem& p, std::vector<unsigned char>& out, std::vector<float>& lse,
                                LocalGradients* grads) {
#ifdef RINGATTN_HAVE_CUDA
  const int N = p.gpus;
  std::vector<int> devices;
  for (int i = 0; i < N; ++i) devices.push_back(i);
  LocalGroup group(devices);

  const Layout layout(p.layout, p.seq, N);
  const std::size_t elem = dtype_size(p.dtype);
  const std::int64_t B = p.batch, S = p.local_len(), H = p.heads, Hk = p.kv_heads, D = p.head_dim;
  // Row of each global position in the loaded (whole) problem.
  std::vector<std::int64_t> row_of(static_cast<std::size_t>(p.seq), -1);
  for (std::int64_t r = 0; r < S; ++r) row_of[static_cast<std::size_t>(p.positions[static_cast<std::size_t>(r)])] = r;

  struct Member {
    std::vector<std::int64_t> rows;  // rows of the whole problem, in the member's order
    detail::DeviceBuffer q, k, v, out, lse, dout, dq, dk, dv;
  };
  std::vector<Member> members(static_cast<std::size_t>(N));
  std::vector<TensorView> qs, ks, vs, outs, lses, douts, dqs, dks, dvs;
  const bool backward = p.backward && grads != nullptr;
  const bool linear = p.attention == AttentionKind::linear;
  // Rows `rows` of a (B, S, heads, D) host tensor, packed.
  auto gather = [&](const std::vector<unsigned char>& src, std::int64_t heads, const std::vector<std::int64_t>& rows) {
    const std::size_t row_bytes = static_cast<std::size_t>(heads * D) * elem;
    std::vector<unsigned char> dst(static_cast<std::size_t>(B) * rows.size() * row_bytes);
    for (std::int64_t b = 0; b < B; ++b)
      for (std::size_t i = 0; i < rows.size(); ++i)
        std::memcpy(dst.data() + (static_cast<std::size_t>(b) * rows.size() + i) * row_bytes,
                    src.data() + static_cast<std::size_t>(b * S + rows[i]) * row_bytes, row_bytes);
    return dst;
  };
  for (int i = 0; i < N; ++i) {
    Member& m = members[static_cast<std::size_t>(i)];
    for (std::int64_t pos : layout.positions(i)) m.rows.push_back(row_of[static_cast<std::size_t>(pos)]);
    const auto n = static_cast<std::int64_t>(m.rows.size());
    RINGATTN_CUDA_CHECK(cudaSetDevice(i));
    auto upload = [&](detail::DeviceBuffer& buf, const std::vector<unsigned char>& host) {
      buf = detail::DeviceBuffer(host.size());
      RINGATTN_CUDA_CHECK(cudaMemcpy(buf.get(), host.data(), host.size(), cudaMemcpyHostToDevice));
    };
    upload(m.q, gather(p.q, H, m.rows));
    upload(m.k, gather(p.k, Hk, m.rows));
    upload(m.v, gather(p.v, Hk, m.rows));
    m.out = detail::DeviceBuffer(static_cast<std::size_t>(B * n * H * D) * elem);
    if (backward) {
      upload(m.dout, gather(p.dout, H, m.rows));
      m.dq = detail::DeviceBuffer(m.out.bytes());
      m.dk = detail::DeviceBuffer(static_cast<std::size_t>(B * n * Hk * D) * elem);
      m.dv = detail::DeviceBuffer(m.dk.bytes());
      douts.push_back(TensorView::contiguous(m.dout.get(), p.dtype, {B, n, H, D}, DeviceKind::cuda, i));
      dqs.push_back(TensorView::contiguous(m.dq.get(), p.dtype, {B, n, H, D}, DeviceKind::cuda, i));
      dks.push_back(TensorView::contiguous(m.dk.get(), p.dtype, {B, n, Hk, D}, DeviceKind::cuda, i));
      dvs.push_back(TensorView::contiguous(m.dv.get(), p.dtype, {B, n, Hk, D}, DeviceKind::cuda, i));
    }
    qs.push_back(TensorView::contiguous(m.q.get(), p.dtype, {B, n, H, D}, DeviceKind::cuda, i));
    ks.push_back(TensorView::contiguous(m.k.get(), p.dtype, {B, n, Hk, D}, DeviceKind::cuda, i));
    vs.push_back(TensorView::contiguous(m.v.get(), p.dtype, {B, n, Hk, D}, DeviceKind::cuda, i));
    outs.push_back(TensorView::contiguous(m.out.get(), p.dtype, {B, n, H, D}, DeviceKind::cuda, i));
    if (linear) {
      lses.emplace_back();
    } else {
      m.lse = detail::DeviceBuffer(static_cast<std::size_t>(B * H * n) * sizeof(float));
      lses.push_back(TensorView::contiguous(m.lse.get(), DType::f32, {B, H, n}, DeviceKind::cuda, i));
    }
  }
  AttentionOptions options = p.attention_options();
  LocalGpuTimes times;
  auto start = std::chrono::steady_clock::now();
  forward(group, qs, ks, vs, outs, lses, options);
  times.forward_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (backward) {
    start = std::chrono::steady_clock::now();
    ringattn::backward(group, qs, ks, vs, outs, lses, douts, dqs, dks, dvs, options);
    times.backward_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    grads->dq.assign(p.q.size(), 0);
    grads->dk.assign(p.k.size(), 0);
    grads->dv.assign(p.v.size(), 0);
  }

  // Scatter every member's rows back into the problem's order.
  for (int i = 0; i < N; ++i) {
    Member& m = members[static_cast<std::size_t>(i)];
    const auto n = static_cast<std::int64_t>(m.rows.size());
    RINGATTN_CUDA_CHECK(cudaSetDevice(i));
    auto scatter = [&](std::vector<unsigned char>& dst, const detail::DeviceBuffer& src, std::int64_t heads) {
      const std::size_t row_bytes = static_cast<std::size_t>(heads * D) * elem;
      std::vector<unsigned char> o(static_cast<std::size_t>(B * n) * row_bytes);
      RINGATTN_CUDA_CHECK(cudaMemcpy(o.data(), src.get(), o.size(), cudaMemcpyDeviceToHost));
      for (std::int64_t b = 0; b < B; ++b)
        for (std::int64_t r = 0; r < n; ++r)
          std::memcpy(dst.data() + static_cast<std::size_t>(b * S + m.rows[static_cast<std::size_t>(r)]) * row_bytes,
                      o.data() + static_cast<std::size_t>(b * n + r) * row_bytes, row_bytes);
    };
    scatter(out, m.out, H);
    if (backward) {
      scatter(grads->dq, m.dq, H);
      scatter(grads->dk, m.dk, Hk);
      scatter(grads->dv, m.dv, Hk);
    }
    if (!linear) {
      std::vector<float> l(static_cast<std::size_t>(B * H * n));
      RINGATTN_CUDA_CHECK(cudaMemcpy(l.data(), m.lse.get(), l.size() * sizeof(float), cudaMemcpyDeviceToHost));
      for (std::int64_t bh = 0; bh < B * H; ++bh)
        for (std::int64_t r = 0; r < n; ++r)
          lse[static_cast<std::size_t>(bh * S + m.rows[static_cast<std::size_t>(r)])] =
              l[static_cast<std::size_t>(bh * n + r)];
    }
  }
  return times;
#else
  (void)p, (void)out, (void)lse, (void)grads;
  throw Error(ErrorCode::invalid_argument, "--gpus needs a build with the CUDA backend");
#endif
}

}  // namespace ringattn::cli
