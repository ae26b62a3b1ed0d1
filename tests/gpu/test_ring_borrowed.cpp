// The GPU ring with handles borrowed from an embedding program: its own NCCL communicator and
// CUDA stream. The result must match the fp64 reference, forward() must order its work on the
// borrowed stream, and both handles must still work after the Context is gone (the library
// never destroys what it borrowed). And a Context's kept device buffers: calls of different
// shapes on one Context give what fresh Contexts give. Runs under mpirun (np 1 and 2); skips
// where the node has fewer GPUs than ranks.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include "common/mpi_world.hpp"
#include <mpi.h>
#include <nccl.h>

#include <cmath>
#include <vector>

#include "common/attention_case.hpp"
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "engine/reference.hpp"
#include "ringattn/ringattn.hpp"

using namespace ringattn;
using namespace ringattn::detail;

namespace {

using ringattn::testing::world_rank;
using ringattn::testing::world_size;

// Whether every rank has a GPU of its own (the same answer on every rank: they skip together).
bool one_gpu_per_rank() {
  int enough = cuda_device_count() >= world_size() ? 1 : 0, all_enough = 0;
  MPI_Allreduce(&enough, &all_enough, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return all_enough != 0;
}

}  // namespace

TEST(RingBorrowed, UsesAndKeepsTheCallersCommunicatorAndStream) {
  if (!one_gpu_per_rank()) GTEST_SKIP() << "needs one GPU per rank";

  const int rank = world_rank(), world = world_size();
  RINGATTN_CUDA_CHECK(cudaSetDevice(rank));
  ncclUniqueId id{};
  if (rank == 0) RINGATTN_NCCL_CHECK(ncclGetUniqueId(&id));
  MPI_Bcast(&id, sizeof(id), MPI_BYTE, 0, MPI_COMM_WORLD);
  ncclComm_t comm = nullptr;
  RINGATTN_NCCL_CHECK(ncclCommInitRank(&comm, world, id, rank));
  cudaStream_t stream = nullptr;
  RINGATTN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  const ringattn::testing::AttentionCase c{1, 777, 8, 2, 128, true, LayoutKind::zigzag, world, DType::bf16};
  const Layout layout(c.layout, c.seq, world);
  const auto pos = layout.positions(rank);
  const auto n = static_cast<std::int64_t>(pos.size());
  const auto q = ringattn::testing::generate(c, SyntheticTensor::q, pos, c.heads);
  const auto k = ringattn::testing::generate(c, SyntheticTensor::k, pos, c.kv_heads);
  const auto v = ringattn::testing::generate(c, SyntheticTensor::v, pos, c.kv_heads);
  DeviceBuffer dq(q.size()), dk(k.size()), dv(v.size()), dout(q.size());
  DeviceBuffer dlse(static_cast<std::size_t>(c.heads * n) * sizeof(float));
  RINGATTN_CUDA_CHECK(cudaMemcpy(dq.get(), q.data(), q.size(), cudaMemcpyHostToDevice));
  RINGATTN_CUDA_CHECK(cudaMemcpy(dk.get(), k.data(), k.size(), cudaMemcpyHostToDevice));
  RINGATTN_CUDA_CHECK(cudaMemcpy(dv.get(), v.data(), v.size(), cudaMemcpyHostToDevice));

  {
    ContextOptions options;
    options.nccl_comm = comm;
    options.cuda_stream = stream;
    Context ctx(MPI_COMM_WORLD, options);
    AttentionOptions attention;
    attention.causal = c.causal;
    attention.layout = c.layout;
    auto view = [&](const DeviceBuffer& b, DType dt, std::initializer_list<std::int64_t> shape) {
      return TensorView::contiguous(b.get(), dt, shape, DeviceKind::cuda, rank);
    };
    forward(ctx, view(dq, c.dtype, {1, n, c.heads, c.dim}), view(dk, c.dtype, {1, n, c.kv_heads, c.dim}),
            view(dv, c.dtype, {1, n, c.kv_heads, c.dim}), view(dout, c.dtype, {1, n, c.heads, c.dim}),
            view(dlse, DType::f32, {1, c.heads, n}), attention);
    // The work was ordered on the borrowed stream: synchronising it makes the result visible.
    RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  }  // the Context is destroyed here; the borrowed handles must survive it

  std::vector<unsigned char> out(q.size());
  std::vector<float> lse(static_cast<std::size_t>(c.heads * n));
  RINGATTN_CUDA_CHECK(cudaMemcpy(out.data(), dout.get(), out.size(), cudaMemcpyDeviceToHost));
  RINGATTN_CUDA_CHECK(cudaMemcpy(lse.data(), dlse.get(), lse.size() * sizeof(float), cudaMemcpyDeviceToHost));
  std::vector<std::int64_t> all(static_cast<std::size_t>(c.seq));
  for (std::int64_t t = 0; t < c.seq; ++t) all[static_cast<std::size_t>(t)] = t;
  std::vector<double> ref_out, ref_lse;
  const double scale = 1.0 / std::sqrt(static_cast<double>(c.dim));
  reference_forward({1, c.seq, c.heads, c.kv_heads, c.dim, c.causal, scale}, pos, ringattn::testing::to_f32(c.dtype, q),
                    ringattn::testing::to_f32(c.dtype, ringattn::testing::generate(c, SyntheticTensor::k, all, c.kv_heads)),
                    ringattn::testing::to_f32(c.dtype, ringattn::testing::generate(c, SyntheticTensor::v, all, c.kv_heads)), ref_out,
                    ref_lse);
  const Tolerance tol = output_tolerance(c.dtype, 1.7320508075688772);
  const std::vector<float> got = ringattn::testing::to_f32(c.dtype, out);
  int wrong = 0;
  for (std::size_t i = 0; i < ref_out.size(); ++i) {
    if (!(std::fabs(got[i] - ref_out[i]) <= tol.atol + tol.rtol * std::fabs(ref_out[i]))) ++wrong;
  }
  for (std::size_t i = 0; i < ref_lse.size(); ++i) {
    if (!(std::fabs(lse[i] - ref_lse[i]) <= 1e-3)) ++wrong;
  }
  EXPECT_EQ(wrong, 0);

  // Both handles still work: an all-reduce on the caller's communicator and stream.
  DeviceBuffer one(sizeof(float));
  const float value = 1.0f;
  RINGATTN_CUDA_CHECK(cudaMemcpy(one.get(), &value, sizeof value, cudaMemcpyHostToDevice));
  RINGATTN_NCCL_CHECK(ncclAllReduce(one.get(), one.get(), 1, ncclFloat, ncclSum, comm, stream));
  RINGATTN_CUDA_CHECK(cudaStreamSynchronize(stream));
  float sum = 0.0f;
  RINGATTN_CUDA_CHECK(cudaMemcpy(&sum, one.get(), sizeof sum, cudaMemcpyDeviceToHost));
  EXPECT_EQ(sum, static_cast<float>(world));
  RINGATTN_NCCL_CHECK(ncclCommDestroy(comm));
  RINGATTN_CUDA_CHECK(cudaStreamDestroy(stream));
}

// A Context keeps its device buffers across calls (the ring's and the engines' working
// buffers, the sink tokens' included) and grows a slot when a call needs more. Calls of
// different shapes on one Context, a large problem after a small one and the small one again,
// forward then backward, must give the bits a fresh Context gives for each: nothing a call
// leaves in a kept buffer may reach the next (sliding windows with sinks, a plain zigzag ring).
TEST(RingBorrowed, KeptBuffersCarryNothingBetweenCallsOfDifferentShapes) {
  if (!one_gpu_per_rank()) GTEST_SKIP() << "needs one GPU per rank";
  const int rank = world_rank(), world = world_size();
  RINGATTN_CUDA_CHECK(cudaSetDevice(rank));

  struct Shape {
    std::int64_t seq, heads, kv_heads, dim;
    bool causal;
    std::int64_t window, sinks;
  };
  // Each call's O, LSE, dQ, dK, dV bytes, one after another.
  auto call = [&](Context& ctx, const Shape& s) {
    const ringattn::testing::AttentionCase c{1, s.seq, s.heads, s.kv_heads, s.dim, s.causal,
                                             s.window >= 0 ? LayoutKind::contiguous : LayoutKind::zigzag, world,
                                             DType::bf16};
    const Layout layout(c.layout, c.seq, world);
    const auto pos = layout.positions(rank);
    const auto n = static_cast<std::int64_t>(pos.size());
    const auto q = ringattn::testing::generate(c, SyntheticTensor::q, pos, c.heads);
    const auto k = ringattn::testing::generate(c, SyntheticTensor::k, pos, c.kv_heads);
    const auto v = ringattn::testing::generate(c, SyntheticTensor::v, pos, c.kv_heads);
    const auto g = ringattn::testing::generate(c, SyntheticTensor::dout, pos, c.heads);
    DeviceBuffer bq(q.size()), bk(k.size()), bv(v.size()), bo(q.size()), bg(g.size());
    DeviceBuffer blse(static_cast<std::size_t>(c.heads * n) * sizeof(float));
    DeviceBuffer bdq(q.size()), bdk(k.size()), bdv(v.size());
    RINGATTN_CUDA_CHECK(cudaMemcpy(bq.get(), q.data(), q.size(), cudaMemcpyHostToDevice));
    RINGATTN_CUDA_CHECK(cudaMemcpy(bk.get(), k.data(), k.size(), cudaMemcpyHostToDevice));
    RINGATTN_CUDA_CHECK(cudaMemcpy(bv.get(), v.data(), v.size(), cudaMemcpyHostToDevice));
    RINGATTN_CUDA_CHECK(cudaMemcpy(bg.get(), g.data(), g.size(), cudaMemcpyHostToDevice));
    AttentionOptions a;
    a.causal = c.causal;
    a.layout = c.layout;
    a.window = s.window;
    a.sinks = s.sinks;
    a.kernel = KernelKind::native;  // (bitwise reproducible; cuDNN's dQ adds need not be)
    auto qv = [&](const DeviceBuffer& b) {
      return TensorView::contiguous(b.get(), c.dtype, {1, n, c.heads, c.dim}, DeviceKind::cuda, rank);
    };
    auto kv = [&](const DeviceBuffer& b) {
      return TensorView::contiguous(b.get(), c.dtype, {1, n, c.kv_heads, c.dim}, DeviceKind::cuda, rank);
    };
    const TensorView lse = TensorView::contiguous(blse.get(), DType::f32, {1, c.heads, n}, DeviceKind::cuda, rank);
    forward(ctx, qv(bq), kv(bk), kv(bv), qv(bo), lse, a);
    backward(ctx, qv(bq), kv(bk), kv(bv), qv(bo), lse, qv(bg), qv(bdq), kv(bdk), kv(bdv), a);
    RINGATTN_CUDA_CHECK(cudaDeviceSynchronize());
    std::vector<unsigned char> bytes;
    for (const DeviceBuffer* b : {&bo, &blse, &bdq, &bdk, &bdv}) {
      const std::size_t at = bytes.size();
      bytes.resize(at + b->bytes());
      RINGATTN_CUDA_CHECK(cudaMemcpy(bytes.data() + at, b->get(), b->bytes(), cudaMemcpyDeviceToHost));
    }
    return bytes;
  };
  const std::vector<Shape> shapes = {
      {640, 4, 2, 128, true, 150, 12},    // a small window with sinks
      {1536, 8, 2, 128, true, 400, 40},   // larger everywhere: every slot grows
      {640, 4, 2, 128, true, 150, 12},    // the small one again, in the grown buffers
      {1024, 4, 4, 64, false, -1, 0},     // a plain zigzag ring, head dim 64
      {640, 4, 2, 128, false, 100, 24},   // two-sided window, more sinks than before
  };
  std::vector<std::vector<unsigned char>> fresh;
  for (const Shape& s : shapes) {
    Context ctx(MPI_COMM_WORLD);
    fresh.push_back(call(ctx, s));
  }
  Context kept(MPI_COMM_WORLD);
  for (std::size_t i = 0; i < shapes.size(); ++i) {
    const std::vector<unsigned char> got = call(kept, shapes[i]);
    EXPECT_TRUE(got == fresh[i]) << "call " << i << " (S=" << shapes[i].seq << ", window " << shapes[i].window
                                 << ", sinks " << shapes[i].sinks << ") differs from a fresh Context's";
  }
}
