#include "engine/cuda_ring_forward.hpp"

#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "comm/mpi_transport.hpp"
#include "comm/nccl_transport.hpp"
#include "core/cuda_check.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cudnn/cudnn_sdpa.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

CudnnSdpaProblem cudnn_task_problem(const BlockTask& t, std::int64_t step_kv_len, const AttentionShape& shape, DType dtype,
                               const std::int64_t (&q_strides)[3], const std::int64_t (&o_strides)[3]) {
  CudnnSdpaProblem p;
  p.dtype = dtype;
  p.batch = shape.batch;
  p.heads = shape.heads;
  p.kv_heads = shape.kv_heads;
  p.head_dim = shape.head_dim;
  p.q_len = t.q_len;
  p.kv_len = t.kv_len;
  p.q_batch_stride = q_strides[0];
  p.q_row_stride = q_strides[1];
  p.q_head_stride = q_strides[2];
  p.kv_batch_stride = step_kv_len * shape.kv_heads * shape.head_dim;
  p.kv_row_stride = shape.kv_heads * shape.head_dim;
  p.kv_head_stride = shape.head_dim;
  p.o_batch_stride = o_strides[0];
  p.o_row_stride = o_strides[1];
  p.o_head_stride = o_strides[2];
  p.causal = t.mask != MaskKind::full;
  p.diag_offset = t.diag_offset;
  p.band = t.mask == MaskKind::band;
  p.lower_offset = t.lower_offset;
  return p;
}

CudaRingForward::CudaRingForward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                                 std::int64_t q_len, std::int64_t kv_capacity, KernelKind kernel)
    : resources_(resources), plan_(std::move(plan)), shape_(shape), dtype_(dtype), q_len_(q_len) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  blocks_[0] = resources_.ring_buffer(0, block_bytes(kv_capacity));
  if (plan_.world > 1 && (plan_.steps.size() > 1 || !plan_.reverse_steps.empty())) {
    blocks_[1] = resources_.ring_buffer(1, block_bytes(kv_capacity));
  }
  if (plan_.sink_len > 0) sink_block_ = resources_.scratch(Scratch::fwd_sink_block, block_bytes(plan_.sink_len));
  const auto rows = static_cast<std::size_t>(shape.batch * shape.heads * q_len);
  o_acc_ = resources_.scratch(Scratch::fwd_o_acc, rows * static_cast<std::size_t>(shape.head_dim) * sizeof(float));
  lse_acc_ = resources_.scratch(Scratch::fwd_lse_acc, rows * sizeof(float));
  if (kernel != KernelKind::cudnn && flash_fwd_supports(dtype, shape.head_dim) &&
      flash_fwd_resolve(FlashKernel::automatic) == FlashKernel::wgmma_ws) {
    split_slots_ = flash_fwd_split_slots();
    split_buf_ = resources_.scratch(Scratch::fwd_split, flash_fwd_split_bytes(shape.head_dim, split_slots_), true);
  }
  one_task_ = plan_.world == 1 && plan_.steps.size() == 1 && plan_.steps[0].tasks.size() == 1 &&
              plan_.reverse_steps.empty() && plan_.sink_tasks.empty() && plan_.steps[0].tasks[0].q_begin == 0 &&
              plan_.steps[0].tasks[0].q_len == q_len;

  const std::string native = std::string("native ") + to_string(flash_fwd_resolve(FlashKernel::automatic)) + " kernel";
  kernel_description_ = native;
  if (kernel == KernelKind::native) return;
  // auto: tasks where the native kernel is measured faster than cuDNN's run on it, and need no
  // cuDNN plan; when that is every task, cuDNN stays out.
  auto_native_ = kernel == KernelKind::automatic;
  std::size_t tasks = 0, faster_native = 0;
  for_each_task([&](const BlockTask& t, std::int64_t) {
    ++tasks;
    if (auto_prefers_native(t)) ++faster_native;
  });
  const std::string why_native = " (auto: measured faster than cuDNN on these tasks)";
  if (tasks > 0 && faster_native == tasks) {
    kernel_description_ = native + why_native;
    return;
  }
  std::string why_not, band_why_not;
  CudnnSdpa* sdpa = resources_.cudnn();
  if (sdpa == nullptr) {
    why_not = "this build has no cuDNN";
  } else {
    // Build the plan of every task cuDNN may run (dense q and out) before the ring starts.
    // Band tasks (sliding window) that cuDNN refuses run on the native kernel; any other
    // refusal keeps cuDNN out of the whole ring.
    const std::int64_t H = shape.heads, D = shape.head_dim;
    const std::int64_t q_dense[3] = {q_len * H * D, H * D, D};
    std::int64_t max_rows = 0;
    bool any_band = false;
    for_each_task([&](const BlockTask& t, std::int64_t block_len) {
      // Tasks of the last two kinds stay native.
      if (!why_not.empty() || (t.mask == MaskKind::causal && t.diag_offset < 0) || auto_prefers_native(t)) return;
      const std::int64_t block_dense[3] = {t.q_len * H * D, H * D, D};
      const CudnnSdpaProblem p = cudnn_task_problem(t, block_len, shape, dtype, q_dense, one_task_ ? q_dense : block_dense);
      std::string reason = cudnn_sdpa_unsupported_reason(p);
      if (reason.empty()) sdpa->try_prepare(p, &reason);
      if (t.mask == MaskKind::band) {
        any_band = true;
        if (!reason.empty() && band_why_not.empty()) band_why_not = reason;
        if (!reason.empty()) return;
      }
      if (!reason.empty()) {
        why_not = reason;
        return;
      }
      max_rows = std::max(max_rows, t.q_len);
    });
    if (why_not.empty() && any_band && !band_why_not.empty()) cudnn_band_ = false;
    if (why_not.empty()) {
      cudnn_ = sdpa;
      o_block_ = resources_.scratch(Scratch::fwd_o_block,
                                    static_cast<std::size_t>(shape.batch * max_rows * H * D) * dtype_size(dtype));
      lse_block_ = resources_.scratch(
          Scratch::fwd_lse_block,
          static_cast<std::size_t>(shape.batch * H * std::max<std::int64_t>(max_rows, q_len)) * sizeof(float));
      kernel_description_ = "cuDNN " + std::to_string(cudnn_version()) + " fused attention";
      if (faster_native > 0) {
        kernel_description_ += ", " + std::to_string(faster_native) + " of " + std::to_string(tasks) + " tasks on the " +
                               native + why_native;
      }
      if (!cudnn_band_) kernel_description_ += " (sliding-window bands: " + native + ", cuDNN: " + band_why_not + ")";
      bool native_negative = false;
      for_each_task([&](const BlockTask& t, std::int64_t) {
        native_negative = native_negative || (t.mask == MaskKind::causal && t.diag_offset < 0);
      });
      if (native_negative) kernel_description_ += " (causal sub-blocks whose first row sees no key: " + native + ")";
      return;
    }
  }
  if (kernel == KernelKind::cudnn) {
    throw Error(ErrorCode::invalid_argument, "kernel cudnn (--kernel cudnn): cuDNN cannot run this problem: " + why_not);
  }
  kernel_description_ = native + " (cuDNN not used: " + why_not + ")";
}

template <class Fn>
void CudaRingForward::for_each_task(Fn&& fn) const {
  for (const RingStep& step : plan_.steps)
    for (const BlockTask& t : step.tasks) fn(t, step.kv_len);
  for (const RingStep& step : plan_.reverse_steps)
    for (const BlockTask& t : step.tasks) fn(t, step.kv_len);
  for (const BlockTask& t : plan_.sink_tasks) fn(t, plan_.sink_len);
}

bool CudaRingForward::auto_prefers_native(const BlockTask& t) const {
  return auto_native_ && flash_fwd_auto_prefers_native(shape_.head_dim, t, !one_task_);
}

bool CudaRingForward::task_uses_cudnn(const BlockTask& t) const {
  if (cudnn_ == nullptr) return false;
  if (t.mask == MaskKind::band) return cudnn_band_;
  return t.mask != MaskKind::causal || t.diag_offset >= 0;
}

std::size_t CudaRingForward::block_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

Pieces CudaRingForward::rows_of(const RowRange& rows, std::int64_t kv_len) const {
  return slab_rows(rows.begin, rows.end, kv_len, block_bytes(1) / 2 / static_cast<std::size_t>(shape_.batch),
                   2 * static_cast<std::size_t>(shape_.batch));
}

std::uint64_t gather_sink_block(CudaResources& resources, const RingPlan& plan, const AttentionShape& shape, DType dtype,
                                const void* own_block, std::int64_t own_len, void* sink_block, bool communicate,
                                double timeout_s, cudaStream_t stream) {
  // Contiguous layout: each rank's first plan.sink_rows[r] rows are sink tokens. Every rank
  // copies its own into place in the sink block (B, sink_len, H_kv, D) for K, then V, and
  // each owner broadcasts its rows in place.
  const int P = plan.world;
  const std::int64_t B = shape.batch;
  const auto row_bytes = static_cast<std::size_t>(shape.kv_heads * shape.head_dim) * dtype_size(dtype);
  const std::size_t half_sink = static_cast<std::size_t>(B * plan.sink_len) * row_bytes;
  const std::size_t half_own = static_cast<std::size_t>(B * own_len) * row_bytes;
  std::vector<std::int64_t> begin(static_cast<std::size_t>(P) + 1, 0);
  for (int r = 0; r < P; ++r) {
    begin[static_cast<std::size_t>(r) + 1] = begin[static_cast<std::size_t>(r)] + plan.sink_rows[static_cast<std::size_t>(r)];
  }
  auto* sink = static_cast<unsigned char*>(sink_block);
  const auto* own = static_cast<const unsigned char*>(own_block);
  const std::int64_t mine = plan.sink_rows[static_cast<std::size_t>(plan.rank)];
  // Without communication (the bench's comparison run) the other owners' rows stay as they
  // are: zeros, rather than whatever the kept buffer last held (possibly never written).
  if (!communicate && P > 1) RINGATTN_CUDA_CHECK(cudaMemsetAsync(sink, 0, 2 * half_sink, stream));
  for (int which = 0; which < 2; ++which) {
    unsigned char* dst = sink + static_cast<std::size_t>(which) * half_sink +
                         static_cast<std::size_t>(begin[static_cast<std::size_t>(plan.rank)]) * row_bytes;
    const unsigned char* src = own + static_cast<std::size_t>(which) * half_own;
    if (mine > 0) {
      RINGATTN_CUDA_CHECK(cudaMemcpy2DAsync(dst, static_cast<std::size_t>(plan.sink_len) * row_bytes, src,
                                            static_cast<std::size_t>(own_len) * row_bytes,
                                            static_cast<std::size_t>(mine) * row_bytes, static_cast<std::size_t>(B),
                                            cudaMemcpyDeviceToDevice, stream));
    }
  }
  if (!communicate || P == 1) return 0;
  if (resources.loopback()) {
    throw Error(ErrorCode::invalid_argument, "attention sinks need NCCL: members of a local group on one GPU cannot "
                                             "broadcast the sink tokens");
  }
  RINGATTN_NCCL_CHECK(ncclGroupStart());
  for (int r = 0; r < P; ++r) {
    const std::int64_t rows = plan.sink_rows[static_cast<std::size_t>(r)];
    if (rows == 0) continue;
    for (int which = 0; which < 2; ++which) {
      for (std::int64_t b = 0; b < B; ++b) {
        unsigned char* at = sink + static_cast<std::size_t>(which) * half_sink +
                            static_cast<std::size_t>(b * plan.sink_len + begin[static_cast<std::size_t>(r)]) * row_bytes;
        RINGATTN_NCCL_CHECK(ncclBroadcast(at, at, static_cast<std::size_t>(rows) * row_bytes, ncclUint8, r,
                                          resources.nccl(), stream));
      }
    }
  }
  RINGATTN_NCCL_CHECK(ncclGroupEnd());
  nccl_settle(resources.nccl(), timeout_s);
  return 2 * static_cast<std::uint64_t>(B * mine) * row_bytes * static_cast<std::uint64_t>(P - 1);
}

void pack_own_on_comm(const TensorView& k, const TensorView& v, void* block, cudaStream_t compute,
                      cudaStream_t comm, cudaEvent_t ready) {
  const std::size_t half = static_cast<std::size_t>(k.numel()) * dtype_size(k.dtype);
  RINGATTN_CUDA_CHECK(cudaEventRecord(ready, compute));
  RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(comm, ready, 0));
  RINGATTN_CUDA_CHECK(cudaMemcpyAsync(block, k.data, half, cudaMemcpyDeviceToDevice, comm));
  RINGATTN_CUDA_CHECK(cudaMemcpyAsync(static_cast<unsigned char*>(block) + half, v.data, half,
                                      cudaMemcpyDeviceToDevice, comm));
}

std::uint64_t CudaRingForward::gather_sinks(const void* own_block, bool communicate, cudaStream_t stream) {
  const std::uint64_t sent = gather_sink_block(resources_, plan_, shape_, dtype_, own_block, q_len_, sink_block_.get(),
                                               communicate, timeout_s_, stream);
  if (communicate && plan_.world > 1) record_hop("the broadcast of the sink tokens from their owners", stream);
  return sent;
}

void CudaRingForward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, float scale, bool communicate) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  resources_.usable();
  hops_.clear();
  const cudaStream_t stream = resources_.compute_stream();
  const int P = plan_.world;
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  const auto elem = static_cast<std::int64_t>(dtype_size(dtype_));
  // Profiling: timing events around the work `fn` enqueues, filed under `what`.
  timer_.begin(stream);
  transfer_timer_.begin(resources_.comm_stream());
  auto span = [&](Span what, auto&& fn) { timer_.span(static_cast<int>(what), stream, fn); };
  auto* own = static_cast<unsigned char*>(blocks_[0].get());
  auto pack_own = [&](unsigned char* dst) {
    span(Span::copy, [&] {
      pack_rows(k, dst, stream);
      pack_rows(v, dst + block_bytes(q_len_) / 2, stream);
    });
  };
  // Dense K and V are read where they are by the steps that hold the own block (no packing
  // copy on the compute stream: ~10% of a 4k forward at P = 1): every step of one rank or
  // without communication, the first of a ring, whose first hop sends a copy the copy engines
  // make beside it (pack_own_on_comm). Sinks gather from the packed block.
  const bool dense = k.is_contiguous() && v.is_contiguous() && plan_.sink_len == 0;
  const bool kv_in_place = dense && (P == 1 || !communicate);
  if (!dense) {
    pack_own(own);
  } else if (communicate && P > 1) {
    pack_own_on_comm(k, v, own, stream, resources_.comm_stream(), pack_ready_);
  }
  std::uint64_t sink_bytes = 0;
  // The sink tokens first: each owner broadcasts its rows of the packed block.
  if (plan_.sink_len > 0) span(Span::copy, [&] { sink_bytes = gather_sinks(own, communicate, stream); });
  // One step with one task covering every row (P = 1): the kernel writes the final output
  // itself, with no fp32 running state to initialise, merge or convert.
  bool single_task = one_task_;
  // cuDNN writes LSE packed (B, H, S): other lse strides take the merge path.
  if (single_task && task_uses_cudnn(plan_.steps[0].tasks[0]) && lse.data != nullptr &&
      (lse.strides[2] != 1 || lse.strides[1] != q_len_ || lse.strides[0] != H * q_len_)) {
    single_task = false;
  }
  if (!single_task) span(Span::copy, [&] { fill_neg_inf(lse_acc_.as<float>(), B * H * q_len_, stream); });

  const std::unique_ptr<Transport> hop = resources_.hop(stream, timeout_s_, 0, &transfer_timer_);
  Transport& transport = *hop;
  FlashFwdParams p;
  p.q = q.data;
  p.q_batch_stride = q.strides[0];
  p.q_row_stride = q.strides[1];
  p.q_head_stride = q.strides[2];
  p.kv_row_stride = Hkv * D;
  p.kv_head_stride = D;
  p.o_acc = o_acc_.as<float>();
  p.lse = lse_acc_.as<float>();
  p.s_q = q_len_;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_group = static_cast<int>(H / Hkv);
  p.scale_log2 = scale * 1.4426950408889634f;
  p.split_buf = split_buf_.as<float>();
  p.split_slots = split_slots_;
  if (single_task) {
    p.out = out.data;
    p.out_batch_stride = out.strides[0];
    p.out_row_stride = out.strides[1];
    p.out_head_stride = out.strides[2];
    if (lse.data != nullptr) {
      p.lse_out = static_cast<float*>(lse.data);
      p.lse_batch_stride = lse.strides[0];
      p.lse_head_stride = lse.strides[1];
      p.lse_row_stride = lse.strides[2];
    }
  }

  // A ring whose last step is one full task over every query row, computed by the native
  // kernel, has it write the output (FlashFwdParams::merge_out): no fp32 output written and
  // read back by a finalize pass.
  const RingStep* last_step = plan_.steps.empty() ? nullptr : &plan_.steps.back();
  const BlockTask* writes_out = nullptr;
  if (!single_task && last_step != nullptr && plan_.reverse_steps.empty() && plan_.sink_len == 0 &&
      last_step->tasks.size() == 1) {
    const BlockTask& t = last_step->tasks[0];
    if (t.mask == MaskKind::full && t.q_begin == 0 && t.q_len == q_len_ && t.kv_len > 0) writes_out = &t;
  }
  bool wrote_out = false;
  // The tasks of one held block: K at k_base, V at v_base, (B, block_len, H_kv, D) dense.
  auto compute = [&](const std::vector<BlockTask>& tasks, const void* k_base, const void* v_base,
                     std::int64_t block_len) {
    p.k = k_base;
    p.v = v_base;
    p.kv_batch_stride = block_len * Hkv * D;
    for (const BlockTask& t : tasks) {
      set_task_fields(p, t);
      const std::int64_t q_strides[3] = {q.strides[0], q.strides[1], q.strides[2]};
      const std::int64_t out_strides[3] = {out.strides[0], out.strides[1], out.strides[2]};
      const std::int64_t block_strides[3] = {t.q_len * H * D, H * D, D};
      // Plans for dense q and out were built before the ring; other strides build theirs now,
      // and a refusal then falls back to the native kernel on this rank rather than failing
      // it alone mid-ring.
      const CudnnSdpaProblem problem =
          cudnn_task_problem(t, block_len, shape_, dtype_, q_strides, single_task ? out_strides : block_strides);
      if (!task_uses_cudnn(t) || auto_prefers_native(t) || !cudnn_->try_prepare(problem)) {
        if (&t == writes_out) {
          p.out = out.data;
          p.out_batch_stride = out.strides[0];
          p.out_row_stride = out.strides[1];
          p.out_head_stride = out.strides[2];
          p.lse_out = static_cast<float*>(lse.data);
          p.lse_batch_stride = lse.strides[0];
          p.lse_head_stride = lse.strides[1];
          p.lse_row_stride = lse.strides[2];
          p.merge_out = 1;
          wrote_out = true;
        }
        span(Span::kernel, [&] { flash_fwd(p, dtype_, D, stream); });
        if (&t == writes_out) p.out = nullptr, p.lse_out = nullptr, p.merge_out = 0;
        continue;
      }
      const auto* q_rows = static_cast<const unsigned char*>(q.data) + t.q_begin * q.strides[1] * elem;
      const auto* k_rows = static_cast<const unsigned char*>(k_base) + t.kv_begin * Hkv * D * elem;
      const auto* v_rows = static_cast<const unsigned char*>(v_base) + t.kv_begin * Hkv * D * elem;
      // One task writes the final O and LSE; otherwise the block result goes to scratch and
      // is merged into the running state.
      void* o_dst = single_task ? out.data : o_block_.get();
      float* lse_dst = single_task && lse.data != nullptr ? static_cast<float*>(lse.data) : lse_block_.as<float>();
      span(Span::kernel, [&] { cudnn_->forward(problem, q_rows, k_rows, v_rows, o_dst, lse_dst, scale, stream); });
      if (!single_task) {
        span(Span::merge, [&] {
          merge_block_result(o_acc_.as<float>(), lse_acc_.as<float>(), q_len_, t.q_begin, t.q_len, B, H, D,
                             o_block_.get(), dtype_, lse_block_.as<float>(), stream);
        });
      }
    }
  };
  auto block_of = [&](int index, std::int64_t block_len, bool held) {
    const auto* block = static_cast<const unsigned char*>((held ? blocks_[index] : blocks_[0]).get());
    return std::make_pair(static_cast<const void*>(block), static_cast<const void*>(block + block_bytes(block_len) / 2));
  };

  // Blocks of earlier ranks (all P of them without a window), each passed on to the next rank.
  const int steps = static_cast<int>(plan_.steps.size());
  int cur = 0;
  for (int s = 0; s < steps; ++s) {
    const RingStep& step = plan_.steps[static_cast<std::size_t>(s)];
    const bool transfer = communicate && s + 1 < steps;
    if (transfer) {
      // Only the rows the next ranks' windows reach travel (all of them for the full ring).
      const RingStep& next = plan_.steps[static_cast<std::size_t>(s) + 1];
      transport.start_pieces(blocks_[cur].get(), rows_of(step.send, step.kv_len), plan_.send_to, blocks_[1 - cur].get(),
                             rows_of(next.held, next.kv_len), plan_.recv_from);
      record_hop("ring step " + std::to_string(s + 1) + ": the block of rank " +
                 std::to_string(plan_.steps[static_cast<std::size_t>(s) + 1].kv_source) + " from rank " +
                 std::to_string(plan_.recv_from) + " (this rank sends to rank " + std::to_string(plan_.send_to) + ")");
    }
    if (kv_in_place || (dense && s == 0)) {  // (step 0 holds the own block)
      compute(step.tasks, k.data, v.data, step.kv_len);
    } else {
      const auto [kb, vb] = block_of(cur, step.kv_len, communicate);
      compute(step.tasks, kb, vb, step.kv_len);
    }
    record_hop("ring step " + std::to_string(s) + "'s blocks", stream);
    if (transfer) transport.wait();
    if (communicate) cur = 1 - cur;
  }
  // Two-sided window: blocks of later ranks travel the other way, the own block first.
  const int reverse = static_cast<int>(plan_.reverse_steps.size());
  if (reverse > 0) {
    if (communicate) pack_own(static_cast<unsigned char*>(blocks_[cur].get()));
    std::int64_t held = q_len_;
    for (int j = -1; j < reverse; ++j) {
      // Hop j + 1 brings reverse step j + 1's block while step j computes (j = -1: the first).
      const bool transfer = communicate && j + 1 < reverse;
      if (transfer) {
        // The rows the windows behind reach (the own block first: j = -1).
        const RingStep& next = plan_.reverse_steps[static_cast<std::size_t>(j + 1)];
        const RowRange& send = j < 0 ? plan_.reverse_own_send : plan_.reverse_steps[static_cast<std::size_t>(j)].send;
        const std::int64_t next_len = next.kv_len;
        transport.start_pieces(blocks_[cur].get(), rows_of(send, held), plan_.recv_from, blocks_[1 - cur].get(),
                               rows_of(next.held, next_len), plan_.send_to);
        record_hop("ring step " + std::to_string(steps + j + 1) + " (the other way): the block of rank " +
                   std::to_string(plan_.reverse_steps[static_cast<std::size_t>(j + 1)].kv_source) + " from rank " +
                   std::to_string(plan_.send_to) + " (this rank sends to rank " + std::to_string(plan_.recv_from) + ")");
        held = next_len;
      }
      if (j >= 0) {
        const RingStep& step = plan_.reverse_steps[static_cast<std::size_t>(j)];
        const auto [kb, vb] = block_of(cur, step.kv_len, communicate);
        compute(step.tasks, kb, vb, step.kv_len);
        record_hop("ring step " + std::to_string(steps + j + 1) + "'s blocks (the other way)", stream);
      }
      if (transfer) {
        transport.wait();
        cur = 1 - cur;
      }
    }
  }
  if (plan_.sink_len > 0) {
    const auto* sink = static_cast<const unsigned char*>(sink_block_.get());
    compute(plan_.sink_tasks, sink, sink + block_bytes(plan_.sink_len) / 2, plan_.sink_len);
  }
  bytes_sent_per_run_ = transport.bytes_sent() + sink_bytes;
  kv_bytes_received_ = static_cast<double>(transport.bytes_received());
  if (!single_task && !wrote_out) {
    span(Span::copy, [&] { finalize_output(o_acc_.as<float>(), lse_acc_.as<float>(), out, lse, stream); });
  }
  timer_.end(stream);
  transfer_timer_.end(resources_.comm_stream());
  profiled_steps_ = static_cast<int>(plan_.steps.size() + plan_.reverse_steps.size());
}

CudaRingForward::Breakdown CudaRingForward::breakdown() const {
  Breakdown b;
  if (!timer_.finished()) return b;
  b.total_ms = timer_.total_ms();
  timer_.for_each_span([&](int tag, double ms) {
    const auto what = static_cast<Span>(tag);
    (what == Span::kernel ? b.kernel_ms : what == Span::merge ? b.merge_ms : b.copy_ms) += ms;
  });
  b.steps = profiled_steps_;
  b.kv = transfer_timer_.tally(0);
  b.kv.bytes = kv_bytes_received_;
  return b;
}

void CudaRingForward::record_hop(std::string what, cudaStream_t stream) {
  if (hops_.size() >= hop_events_.size()) hop_events_.emplace_back();
  RINGATTN_CUDA_CHECK(cudaEventRecord(hop_events_[hops_.size()], stream != nullptr ? stream : resources_.comm_stream()));
  hops_.push_back({std::move(what)});
}

int CudaRingForward::milestones() const {
  int done = 0;
  for (std::size_t i = 0; i < hops_.size(); ++i) done += cudaEventQuery(hop_events_[i]) == cudaSuccess ? 1 : 0;
  return done;
}

std::string CudaRingForward::stalled() const {
  std::string pending = "the ring's kernels (every transfer had completed)";
  for (std::size_t i = 0; i < hops_.size(); ++i) {
    if (cudaEventQuery(hop_events_[i]) == cudaErrorNotReady) {
      pending = hops_[i].what;
      break;
    }
  }
  const std::string cause = stalled_node_peers(peer_pids_, plan_.rank);
  return "rank " + std::to_string(plan_.rank) + ": " + pending +
         (cause.empty() ? std::string() : "; " + cause);
}

void CudaRingForward::wait() {
  CudaEvent finished;
  RINGATTN_CUDA_CHECK(cudaEventRecord(finished, resources_.compute_stream()));
  wait(finished);
}

void CudaRingForward::wait(cudaEvent_t event) {
  resources_.wait(event, timeout_s_, [this] { return stalled(); }, [this] { return milestones(); });
}

}  // namespace ringattn::detail
