#include "engine/cuda_ring_backward.hpp"

#include <algorithm>
#include <optional>
#include <utility>

#include "comm/mpi_transport.hpp"
#include "comm/nccl_transport.hpp"
#include "core/cuda_check.hpp"
#include "engine/cuda_ring_forward.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#include "kernels/cudnn/cudnn_sdpa.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

using Strides = std::int64_t[3];

// The cuDNN backward problem of one task: q, out, dout rows with their tensors' strides, K/V
// rows from the packed block of the step, dq and dk/dv to the given strides.
CudnnSdpaProblem cudnn_problem(const BlockTask& t, std::int64_t step_kv_len, const AttentionShape& shape, DType dtype,
                               const Strides& q, const Strides& o, const Strides& dout, const Strides& dq,
                               const Strides& dkv) {
  CudnnSdpaProblem p = cudnn_task_problem(t, step_kv_len, shape, dtype, q, o);
  p.do_batch_stride = dout[0], p.do_row_stride = dout[1], p.do_head_stride = dout[2];
  p.dq_batch_stride = dq[0], p.dq_row_stride = dq[1], p.dq_head_stride = dq[2];
  p.dkv_batch_stride = dkv[0], p.dkv_row_stride = dkv[1], p.dkv_head_stride = dkv[2];
  return p;
}

// The hop that takes a block's rounded dK/dV sums home after the last step goes in two pieces
// from blocks of kHomeSplitMinRows rows: rows [0, R) and [R, rows), R = home_split_rows(rows)
// (seven eighths, in whole 128-key blocks), the rest in the second. The last step computes the first
// piece's keys first, so that piece travels while the kernels compute the last eighth; only
// the second piece's hop is left exposed (an eighth of the bytes). Sender and receiver both
// split by the block's row count.
constexpr std::int64_t kHomeSplitMinRows = 8192;
std::int64_t home_split_rows(std::int64_t rows) {
  if (rows < kHomeSplitMinRows) return 0;
  return rows * 7 / 8 / 128 * 128;
}

}  // namespace

CudaRingBackward::CudaRingBackward(CudaResources& resources, RingPlan plan, const AttentionShape& shape, DType dtype,
                                   std::int64_t q_len, std::int64_t kv_capacity, KernelKind kernel)
    : resources_(resources), plan_(std::move(plan)), shape_(shape), dtype_(dtype), q_len_(q_len) {
  if (!flash_fwd_supports(dtype, shape.head_dim)) {
    throw Error(ErrorCode::invalid_argument, std::string("the CUDA backward pass supports bf16 and fp16 with head_dim "
                                                         "64 or 128, not ") +
                                                 to_string(dtype) + " with head_dim " + std::to_string(shape.head_dim));
  }
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  blocks_[0] = resources_.ring_buffer(0, kv_bytes(kv_capacity));
  acc_[0] = resources_.ring_buffer(2, acc_bytes(kv_capacity));
  if (plan_.world > 1) {
    blocks_[1] = resources_.ring_buffer(1, kv_bytes(kv_capacity));
    acc_[1] = resources_.ring_buffer(3, acc_bytes(kv_capacity));
  }
  if (!plan_.reverse_steps.empty() || plan_.sink_len > 0) home_ = resources_.scratch(Scratch::bwd_home, acc_bytes(q_len));
  if (plan_.sink_len > 0) {
    sink_block_ = resources_.scratch(Scratch::bwd_sink_block, kv_bytes(plan_.sink_len));
    sink_acc_ = resources_.scratch(Scratch::bwd_sink_acc, acc_bytes(plan_.sink_len));
  }
  const auto rows = static_cast<std::size_t>(shape.batch * shape.heads * q_len);
  dq_acc_ = resources_.scratch(Scratch::bwd_dq_acc, rows * static_cast<std::size_t>(shape.head_dim) * sizeof(float));
  lse2_ = resources_.scratch(Scratch::bwd_lse2, rows * sizeof(float));
  delta_ = resources_.scratch(Scratch::bwd_delta, rows * sizeof(float));
  one_task_ = plan_.world == 1 && plan_.steps.size() == 1 && plan_.steps[0].tasks.size() == 1 &&
              plan_.reverse_steps.empty() && plan_.sink_tasks.empty() && plan_.steps[0].tasks[0].q_begin == 0 &&
              plan_.steps[0].tasks[0].q_len == q_len;

  const FlashKernel native_kernel = flash_bwd_resolve(FlashKernel::automatic);
  fused_ = native_kernel == FlashKernel::wgmma_fused;  // head dims 64 and 128
  if (fused_) {
    FlashBwdParams sizing;
    sizing.batch = static_cast<int>(shape.batch);
    sizing.heads = static_cast<int>(shape.heads);
    sizing.q_len = static_cast<int>(q_len);
    dq_sem_ = resources_.scratch(Scratch::bwd_dq_sem,
                                 static_cast<std::size_t>(flash_bwd_semaphores(sizing)) * sizeof(unsigned int));
    if (plan_.world > 1) step_acc_ = resources_.scratch(Scratch::bwd_step_acc, acc_bytes(kv_capacity));
  }
  const std::string native = std::string("native ") + to_string(native_kernel) + (fused_ ? " backward kernel" : " backward kernels");
  kernel_description_ = native;
  if (kernel == KernelKind::native) return;
  if (!one_task_ && kernel == KernelKind::automatic) {
    // Several tasks add up to each gradient, and cuDNN hands a task's gradients over only in
    // the 16-bit dtype: every step's partial sum would be rounded (PyTorch context parallel's
    // numerics, error growing with the ring). auto keeps the exact fp32 sums; --kernel cudnn
    // takes the rounding for speed.
    kernel_description_ = native + " (cuDNN not used: its task gradients come only in " + to_string(dtype) +
                          ", which rounds every step's partial sum; --kernel cudnn accepts that)";
    return;
  }
  CudnnSdpa* sdpa = resources_.cudnn();
  std::string why_not = sdpa == nullptr ? "this build has no cuDNN" : "";
  std::size_t tasks = 0, on_cudnn = 0;
  std::int64_t max_q = 0, max_kv = 0;
  if (sdpa != nullptr) {
    // Build the plan of every task (dense tensors assumed) before the ring starts; tasks that
    // cuDNN refuses run on the native kernels.
    const std::int64_t H = shape.heads, Hkv = shape.kv_heads, D = shape.head_dim;
    const Strides dense = {q_len * H * D, H * D, D};
    for (const RingStep& step : plan_.steps) {
      for (const BlockTask& t : step.tasks) {
        ++tasks;
        const Strides dq_dense = {t.q_len * H * D, H * D, D};
        const Strides dkv_dense = {t.kv_len * Hkv * D, Hkv * D, D};
        const CudnnSdpaProblem p = cudnn_problem(t, step.kv_len, shape, dtype, dense, dense, dense,
                                                 one_task_ ? dense : dq_dense, dkv_dense);
        std::string reason = cudnn_sdpa_backward_unsupported_reason(p);
        if (reason.empty() && t.mask == MaskKind::causal && t.diag_offset < 0) {
          reason = "causal sub-blocks with a negative diagonal offset run on the native kernels";
        }
        if (reason.empty()) sdpa->try_prepare_backward(p, &reason);
        if (!reason.empty()) {
          why_not = reason;
          continue;
        }
        ++on_cudnn;
        cudnn_tasks_.insert(std::make_tuple(t.q_begin, t.q_len, t.kv_begin, t.kv_len, static_cast<int>(t.mask),
                                            t.diag_offset, step.kv_len));
        max_q = std::max(max_q, t.q_len);
        max_kv = std::max(max_kv, t.kv_len);
      }
    }
  }
  if (on_cudnn == 0) {
    if (kernel == KernelKind::cudnn) {
      throw Error(ErrorCode::invalid_argument, "kernel cudnn (--kernel cudnn): cuDNN cannot run this backward pass: " + why_not);
    }
    kernel_description_ = native + " (cuDNN not used: " + why_not + ")";
    return;
  }
  cudnn_ = sdpa;
  const std::int64_t B = shape.batch, H = shape.heads, Hkv = shape.kv_heads, D = shape.head_dim;
  const std::size_t elem = dtype_size(dtype);
  if (!one_task_) {
    dq_block_ = resources_.scratch(Scratch::bwd_dq_block, static_cast<std::size_t>(B * max_q * H * D) * elem);
    dkv_block_ = resources_.scratch(Scratch::bwd_dkv_block, 2 * static_cast<std::size_t>(B * max_kv * Hkv * D) * elem);
  }
  stats_block_ =
      resources_.scratch(Scratch::bwd_stats_block, static_cast<std::size_t>(B * H * std::max(max_q, q_len)) * sizeof(float));
  kernel_description_ = "cuDNN " + std::to_string(cudnn_version()) + " fused attention backward";
  if (!one_task_) kernel_description_ += " (task gradients rounded to " + std::string(to_string(dtype)) + ")";
  if (on_cudnn < tasks) {
    kernel_description_ += " (" + std::to_string(tasks - on_cudnn) + " of " + std::to_string(tasks) +
                           " tasks on the " + native + ": " + why_not + ")";
  }
}

bool CudaRingBackward::task_uses_cudnn(const BlockTask& t, std::int64_t step_kv_len) const {
  return cudnn_ != nullptr && cudnn_tasks_.count(std::make_tuple(t.q_begin, t.q_len, t.kv_begin, t.kv_len,
                                                                  static_cast<int>(t.mask), t.diag_offset,
                                                                  step_kv_len)) > 0;
}

std::size_t CudaRingBackward::kv_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * dtype_size(dtype_);
}

std::size_t CudaRingBackward::acc_bytes(std::int64_t kv_len) const {
  return 2 * static_cast<std::size_t>(shape_.batch * kv_len * shape_.kv_heads * shape_.head_dim) * sizeof(float);
}

void CudaRingBackward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv, float scale, bool communicate) {
  RINGATTN_CUDA_CHECK(cudaSetDevice(resources_.device()));
  const cudaStream_t stream = resources_.compute_stream();
  const int P = plan_.world;
  direct_ = false;
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  // Profiling: timing events around the work `fn` enqueues, filed under `step` (-1: other work).
  timer_.begin(stream);
  transfer_timer_.begin(resources_.comm_stream());
  auto span = [&](int step, auto&& fn) { timer_.span(step, stream, fn); };
  int computed = 0;  // the steps computed so far (the profile's index)
  // Dense K and V are read in place by the steps that hold the own block (every step of one
  // rank or without communication, the first of a ring, whose first hop sends a copy the copy
  // engines make beside it: pack_own_on_comm). Sinks and a reverse pass pack it themselves.
  const bool dense = k.is_contiguous() && v.is_contiguous();
  const bool kv_in_place = dense && (P == 1 || !communicate);
  // P = 1 with one task on cuDNN: cuDNN writes dq, dk, dv itself and computes its own row
  // sums, so neither the preparation kernel nor the fp32 sums (3 zeroed accumulators) are needed.
  const bool cudnn_direct = one_task_ && will_write_direct(q, out, dout, dq, dk, dv);
  if (dense && !kv_in_place) pack_own_on_comm(k, v, blocks_[0].get(), stream, resources_.comm_stream(), pack_ready_);
  span(-1, [&] {
    if (!dense) {
      auto* own = static_cast<unsigned char*>(blocks_[0].get());
      pack_rows(k, own, stream);
      pack_rows(v, own + kv_bytes(q_len_) / 2, stream);
    }
    if (!cudnn_direct) {
      backward_prep(out, dout, lse, lse2_.as<float>(), delta_.as<float>(), stream);
      RINGATTN_CUDA_CHECK(
          cudaMemsetAsync(dq_acc_.get(), 0, static_cast<std::size_t>(B * H * q_len_ * D) * sizeof(float), stream));
    }
  });

  FlashBwdParams p;
  p.q = q.data;
  p.q_batch_stride = q.strides[0];
  p.q_row_stride = q.strides[1];
  p.q_head_stride = q.strides[2];
  p.dout = dout.data;
  p.do_batch_stride = dout.strides[0];
  p.do_row_stride = dout.strides[1];
  p.do_head_stride = dout.strides[2];
  p.kv_row_stride = Hkv * D;
  p.kv_head_stride = D;
  p.lse2 = lse2_.as<float>();
  p.delta = delta_.as<float>();
  p.dq = dq_acc_.as<float>();
  p.dq_sem = dq_sem_.as<unsigned int>();
  p.dq_sem_len = static_cast<std::int64_t>(dq_sem_.bytes() / sizeof(unsigned int));
  p.s_q = q_len_;
  p.batch = static_cast<int>(B);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(Hkv);
  p.kv_group = static_cast<int>(H / Hkv);
  p.scale = scale;
  p.scale_log2 = scale * 1.4426950408889634f;

  resources_.usable();
  milestones_ = 0;
  const std::unique_ptr<Transport> kv_transport = resources_.hop(stream, timeout_s_, 0, &transfer_timer_);
  const std::unique_ptr<Transport> acc_transport = resources_.hop(stream, timeout_s_, 1, &transfer_timer_);
  // The last hop home in two pieces (home_split_rows): the first on acc_hop, the second here.
  const std::unique_ptr<Transport> home_transport = resources_.hop(stream, timeout_s_, 1, &transfer_timer_);
  Transport& kv_hop = *kv_transport;
  Transport& acc_hop = *acc_transport;
  Transport& home_hop = *home_transport;
  auto set_task = [&](const BlockTask& t) { set_task_fields(p, t); };

  // One pass of the ring over `steps` (the plan's, or its reverse steps: blocks of later ranks
  // travelling the other way, the own block sent first). K/V blocks hop ahead; each block's
  // fp32 dK/dV sums follow one hop behind, so their transfer overlaps the next step's dQ work;
  // after the last step the sums go straight back to their owner, `hops` ranks away. Returns
  // the accumulator buffer that holds this rank's own dK/dV sums.
  // With neither a reverse pass nor sinks, the sums that the last hop brings home are final:
  // the sender rounds them to the gradients' dtype (the same rounding finalize would do at
  // home) and the hop carries half the bytes. It cannot overlap any compute, so this is time
  // saved. It needs gradients whose rows are dense (the received rows are copied in).
  auto rows_dense = [&](const TensorView& t) { return t.strides[3] == 1 && t.strides[2] == D; };
  const bool extra = !plan_.reverse_steps.empty() || plan_.sink_len > 0;
  const bool round_home = !extra && rows_dense(dk) && rows_dense(dv);
  bool rounded = false;  // the forward pass's last hop brought the sums home rounded
  auto pass = [&](const std::vector<RingStep>& steps, bool reverse) {
    const int to = reverse ? plan_.recv_from : plan_.send_to, from = reverse ? plan_.send_to : plan_.recv_from;
    const int n = static_cast<int>(steps.size());
    const int hops = reverse ? n : n - 1;
    const bool ring = communicate && P > 1 && hops > 0;
    int cur = 0, acc = 0;
    std::int64_t held = q_len_;  // rows of the block held
    // The last hop home with the sums rounded (round_home): rows [r0, r1) of dK and dV, each
    // (B, held, H_kv, D) in the dtype, rounded into the K/V buffer no hop uses any more (the
    // step's own sums, if any, added in the same pass), and sent to their owner; ours arrive
    // packed into the other accumulator buffer. piece 0: all rows; 1 and 2: the rows before and
    // from home_split_rows (on acc_hop and home_hop), split alike at both ends since both know
    // the block's rows (the receiver's q_len).
    const int home_owner = (plan_.rank - (n - 1) % P + P) % P, home_mine = (plan_.rank + (n - 1)) % P;
    bool home_first_sent = false;
    auto send_home = [&](int piece, bool own_sums, std::int64_t own_row0, std::int64_t own_rows) {
      const std::int64_t split = home_split_rows(held), back = home_split_rows(q_len_);
      const std::int64_t r0 = piece == 2 ? split : 0, r1 = piece == 1 ? split : held;
      const std::int64_t b0 = piece == 2 ? back : 0, b1 = piece == 1 ? back : q_len_;
      auto* send = static_cast<unsigned char*>(blocks_[1 - cur].get());
      const std::size_t half = kv_bytes(held) / 2;
      const std::size_t row_bytes = half / static_cast<std::size_t>(B * held);
      const float* sums = acc_[acc].as<float>();
      const float* own = own_sums ? step_acc_.as<float>() : nullptr;
      const std::int64_t half_elems = B * Hkv * held * D;
      auto rows = [&](unsigned char* base) {
        TensorView v = TensorView::contiguous(base + static_cast<std::size_t>(r0) * row_bytes, dtype_,
                                              {B, r1 - r0, Hkv, D}, DeviceKind::cuda, resources_.device());
        v.strides[0] = held * Hkv * D;
        return v;
      };
      span(-1, [&] {
        finalize_output(sums, nullptr, rows(send), TensorView{}, stream, own, own_row0, own_rows, held, r0);
        finalize_output(sums + half_elems, nullptr, rows(send + half), TensorView{}, stream,
                        own != nullptr ? own + half_elems : nullptr, own_row0, own_rows, held, r0);
      });
      const std::size_t slabs = 2 * static_cast<std::size_t>(B);
      (piece == 2 ? home_hop : acc_hop)
          .start_pieces(send, slab_rows(r0, r1, held, row_bytes, slabs), home_owner, acc_[1 - acc].get(),
                        slab_rows(b0, b1, q_len_, row_bytes, slabs), home_mine);
      if (piece == 1) home_first_sent = true;
    };
    // The forward pass starts on the own block, into acc_[0]: one native task over all of its
    // keys overwrites the accumulator's rows (FlashBwdParams::dkv_store) instead of adding to
    // zeroed ones: no zeroing, and the kernel's epilogue loads nothing.
    const bool first_stores = !reverse && !steps.empty() && steps[0].kv_len == q_len_ && steps[0].tasks.size() == 1 &&
                              steps[0].tasks[0].kv_begin == 0 && steps[0].tasks[0].kv_len == steps[0].kv_len &&
                              !task_uses_cudnn(steps[0].tasks[0], steps[0].kv_len);
    span(-1, [&] {
      if (reverse && communicate) {  // the forward pass left other blocks in the buffers
        auto* own = static_cast<unsigned char*>(blocks_[0].get());
        pack_rows(k, own, stream);
        pack_rows(v, own + kv_bytes(q_len_) / 2, stream);
      }
      if (!cudnn_direct && !first_stores) {
        RINGATTN_CUDA_CHECK(cudaMemsetAsync(acc_[0].get(), 0, acc_bytes(q_len_), stream));
      }
    });
    for (int s = reverse ? -1 : 0; s < n; ++s) {
      const bool kv_transfer = ring && s + 1 < n;
      // The single-pass kernel writes into step_acc_ while the accumulator has not arrived;
      // those sums join it after the step (rows sums_row0 .. + sums_rows). A step of one
      // native task has it overwrite its rows there (FlashBwdParams::dkv_store): no zeroing,
      // and only those rows join. Otherwise every task adds into zeroed sums.
      bool step_sums = false;
      std::int64_t sums_row0 = 0, sums_rows = 0;
      if (kv_transfer) {
        // K and V: only the rows the next ranks' windows reach (all of them for the full ring;
        // the reverse pass starts with the own block, s = -1). The sums travel whole.
        const RingStep& next = steps[static_cast<std::size_t>(s) + 1];
        const RowRange send = s >= 0 ? steps[static_cast<std::size_t>(s)].send : plan_.reverse_own_send;
        const std::size_t row_bytes = kv_bytes(1) / 2 / static_cast<std::size_t>(B);
        const std::size_t slabs = 2 * static_cast<std::size_t>(B);
        kv_hop.start_pieces(blocks_[cur].get(), slab_rows(send.begin, send.end, held, row_bytes, slabs), to,
                            blocks_[1 - cur].get(), slab_rows(next.held.begin, next.held.end, next.kv_len, row_bytes, slabs),
                            from);
      }
      if (s >= 0) {
        const RingStep& step = steps[static_cast<std::size_t>(s)];
        const auto* block = static_cast<const unsigned char*>((communicate ? blocks_[cur] : blocks_[0]).get());
        const bool in_place = kv_in_place || (dense && !reverse && s == 0);  // (step 0 holds the own block)
        p.k = in_place ? k.data : block;
        p.v = in_place ? v.data : block + kv_bytes(step.kv_len) / 2;
        p.kv_batch_stride = step.kv_len * Hkv * D;
        // Without communication every step adds into the first accumulator (the same work).
        float* dk_acc = acc_[communicate ? acc : 0].as<float>();
        float* dv_acc = dk_acc + B * Hkv * step.kv_len * D;
        p.dk = dk_acc;
        p.dv = dv_acc;
        p.acc_len = step.kv_len;
        bool acc_ready = !(ring && s > (reverse ? -1 : 0));
        auto await_acc = [&] {  // this block's accumulator has arrived
          if (!acc_ready) acc_hop.wait();
          acc_ready = true;
        };
        sums_rows = step.kv_len;
        const bool store_sums =
            fused_ && !acc_ready && step.tasks.size() == 1 && !task_uses_cudnn(step.tasks[0], step.kv_len);
        if (store_sums) sums_row0 = step.tasks[0].kv_begin, sums_rows = step.tasks[0].kv_len;
        // The last step before the hop home computes the keys of the hop's first piece first,
        // so that the piece travels while the kernels compute the rest (native full and causal
        // tasks; otherwise both pieces leave after the step).
        const bool home_now = ring && s + 1 == n && !reverse && round_home;
        const std::int64_t split = home_now ? home_split_rows(step.kv_len) : 0;
        bool split_compute = split > 0 && fused_;
        for (const BlockTask& t : step.tasks) {
          split_compute = split_compute && t.mask != MaskKind::band && !task_uses_cudnn(t, step.kv_len);
        }
        auto zero_step_sums = [&] {
          if (!step_sums) RINGATTN_CUDA_CHECK(cudaMemsetAsync(step_acc_.get(), 0, acc_bytes(step.kv_len), stream));
          step_sums = true;
        };
        if (fused_ && !acc_ready && !store_sums) {
          for (const BlockTask& t : step.tasks) {
            if (!task_uses_cudnn(t, step.kv_len)) {
              span(-1, zero_step_sums);
              break;
            }
          }
        }
        // Keys [begin, end) of the step's tasks (all of them: 0, kv_len).
        auto compute = [&](std::int64_t begin, std::int64_t end) {
          for (const BlockTask& whole : step.tasks) {
            const std::optional<BlockTask> slice =
                begin == 0 && end == step.kv_len ? std::optional<BlockTask>(whole) : slice_keys(whole, begin, end);
            if (!slice) continue;
            const BlockTask& t = *slice;
            set_task(t);
            if (task_uses_cudnn(t, step.kv_len) && run_cudnn_task(t, step.kv_len, q, p.k, p.v, out, lse, dout, dq, dk,
                                                                  dv, scale, dk_acc, dv_acc, await_acc)) {
              continue;
            }
            if (s == 0 && first_stores) p.dkv_store = 1;
            if (!fused_) {
              flash_bwd(p, dtype_, D, stream, FlashBwdPart::dq);
              await_acc();
              flash_bwd(p, dtype_, D, stream, FlashBwdPart::dkv);
              p.dkv_store = 0;
              continue;
            }
            // One kernel for all three gradients: into the accumulator once it is here, else into
            // this step's own sums, so that the kernel need not wait for the accumulator's hop.
            if (acc_ready) {
              p.dk = dk_acc;
              p.dv = dv_acc;
            } else {
              if (store_sums) {  // (a slice stores its rows of the task's)
                p.dkv_store = 1;
                step_sums = true;
              } else {
                zero_step_sums();  // (zeroed above, unless cuDNN refused a task planned for it)
              }
              p.dk = step_acc_.as<float>();
              p.dv = p.dk + B * Hkv * step.kv_len * D;
            }
            flash_bwd(p, dtype_, D, stream, FlashBwdPart::both);
            p.dkv_store = 0;
          }
        };
        const int profiled = computed++;
        if (split_compute) {
          span(profiled, [&] { compute(0, split); });
          await_acc();
          send_home(1, step_sums, sums_row0, sums_rows);
          span(profiled, [&] { compute(split, step.kv_len); });
        } else {
          span(profiled, [&] { compute(0, step.kv_len); });
        }
        await_acc();
        // The sums that the last hop takes home rounded join the accumulator in the rounding.
        if (step_sums && !home_now) {  // dK then dV: (2B, H_kv, kv_len, D) in both buffers
          const Strides sums = {Hkv * step.kv_len * D, step.kv_len * D, D};
          span(-1, [&] {
            accumulate_rows(dk_acc, step.kv_len, sums_row0, step_acc_.as<float>() + sums_row0 * D, DType::f32, 2 * B,
                            Hkv, sums_rows, D, sums, stream);
          });
          step_sums = false;
        }
        // A milestone for the watchdog: this step's kernels are done.
        if (milestones_ >= static_cast<int>(step_events_.size())) step_events_.emplace_back();
        RINGATTN_CUDA_CHECK(cudaEventRecord(step_events_[static_cast<std::size_t>(milestones_++)], stream));
      }
      if (ring) {
        // Pass this block's sums on; after the last step, send them home and receive ours.
        const bool last = s + 1 == n;
        const int owner = reverse ? (plan_.rank + hops) % P : (plan_.rank - hops % P + P) % P;
        const int mine = reverse ? (plan_.rank - hops % P + P) % P : (plan_.rank + hops) % P;
        const std::int64_t next_len = last ? q_len_ : steps[static_cast<std::size_t>(s) + 1].kv_len;
        if (last && !reverse && round_home) {
          if (home_split_rows(held) == 0) {
            send_home(0, step_sums, sums_row0, sums_rows);
          } else {
            if (!home_first_sent) send_home(1, step_sums, sums_row0, sums_rows);
            send_home(2, step_sums, sums_row0, sums_rows);
          }
          rounded = true;
        } else {
          acc_hop.start(acc_[acc].get(), acc_bytes(held), last ? owner : to, acc_[1 - acc].get(),
                        acc_bytes(next_len), last ? mine : from);
        }
        acc = 1 - acc;
      }
      if (kv_transfer) {
        kv_hop.wait();
        held = steps[static_cast<std::size_t>(s) + 1].kv_len;
        cur = 1 - cur;
      }
    }
    // (The hop home that brings rounded sums is awaited after dQ's rounding: see below.)
    if (ring && !rounded) acc_hop.wait();
    return ring ? acc : 0;
  };

  const int acc = pass(plan_.steps, false);
  const float* grads = acc_[acc].as<float>();
  if (extra) {
    // The reverse pass and the sinks reuse the buffers: keep this rank's sums aside.
    span(-1, [&] {
      RINGATTN_CUDA_CHECK(cudaMemcpyAsync(home_.get(), grads, acc_bytes(q_len_), cudaMemcpyDeviceToDevice, stream));
    });
    grads = home_.as<float>();
  }
  const Strides acc_strides = {Hkv * q_len_ * D, q_len_ * D, D};  // (B, H_kv, rows, D) fp32
  if (!plan_.reverse_steps.empty()) {
    const int back = pass(plan_.reverse_steps, true);
    const float* r = acc_[back].as<float>();
    span(-1, [&] {
      accumulate_rows(home_.as<float>(), q_len_, 0, r, DType::f32, B, Hkv, q_len_, D, acc_strides, stream);
      accumulate_rows(home_.as<float>() + B * Hkv * q_len_ * D, q_len_, 0, r + B * Hkv * q_len_ * D, DType::f32, B,
                      Hkv, q_len_, D, acc_strides, stream);
    });
  }
  if (plan_.sink_len > 0) {
    // The sink tokens' K, V from their owners; every rank's sink tasks add to one set of sums,
    // summed over the ranks; each owner keeps its rows.
    const std::int64_t L = plan_.sink_len;
    auto* own = static_cast<unsigned char*>(blocks_[0].get());
    span(-1, [&] {
      pack_rows(k, own, stream);
      pack_rows(v, own + kv_bytes(q_len_) / 2, stream);
    });
    gather_sink_block(resources_, plan_, shape_, dtype_, own, q_len_, sink_block_.get(), communicate, timeout_s_, stream);
    auto* sink = static_cast<unsigned char*>(sink_block_.get());
    float* sink_acc = sink_acc_.as<float>();
    span(-1, [&] { RINGATTN_CUDA_CHECK(cudaMemsetAsync(sink_acc, 0, acc_bytes(L), stream)); });
    p.k = sink;
    p.v = sink + kv_bytes(L) / 2;
    p.kv_batch_stride = L * Hkv * D;
    p.dk = sink_acc;
    p.dv = sink_acc + B * Hkv * L * D;
    p.acc_len = L;
    span(computed++, [&] {
      for (const BlockTask& t : plan_.sink_tasks) {
        set_task(t);
        flash_bwd(p, dtype_, D, stream, FlashBwdPart::both);
      }
    });
    if (communicate && P > 1) {
      RINGATTN_NCCL_CHECK(ncclAllReduce(sink_acc, sink_acc, acc_bytes(L) / sizeof(float), ncclFloat, ncclSum,
                                        resources_.nccl(), stream));
      resources_.settle(timeout_s_);
    }
    std::int64_t begin = 0;
    for (int r = 0; r < plan_.rank; ++r) begin += plan_.sink_rows[static_cast<std::size_t>(r)];
    const std::int64_t mine = plan_.sink_rows[static_cast<std::size_t>(plan_.rank)];
    if (mine > 0) {
      const Strides sink_strides = {Hkv * L * D, L * D, D};
      span(-1, [&] {
        accumulate_rows(home_.as<float>(), q_len_, 0, sink_acc + begin * D, DType::f32, B, Hkv, mine, D, sink_strides,
                        stream);
        accumulate_rows(home_.as<float>() + B * Hkv * q_len_ * D, q_len_, 0, sink_acc + B * Hkv * L * D + begin * D,
                        DType::f32, B, Hkv, mine, D, sink_strides, stream);
      });
    }
  }
  bytes_sent_per_run_ = kv_hop.bytes_sent() + acc_hop.bytes_sent() + home_hop.bytes_sent();
  kv_bytes_received_ = static_cast<double>(kv_hop.bytes_received());
  sums_bytes_received_ = static_cast<double>(acc_hop.bytes_received() + home_hop.bytes_received());
  if (cudnn_direct && !direct_) {
    throw Error(ErrorCode::internal, "the cuDNN backward was planned to write the gradients but did not run");
  }
  // The gradients in the caller's tensors (unless cuDNN wrote them itself).
  span(-1, [&] {
    if (!direct_) finalize_output(dq_acc_.as<float>(), nullptr, dq, TensorView{}, stream);
  });
  if (rounded) {  // dQ's rounding above ran while the last hop home was in flight
    acc_hop.wait();
    home_hop.wait();
  }
  span(-1, [&] {
    if (direct_) return;
    if (rounded) {  // dK then dV arrived in the dtype, packed (B, q_len, H_kv, D): copy the rows in
      const auto* home = static_cast<const unsigned char*>(acc_[acc].get());
      const auto elem = static_cast<std::size_t>(dtype_size(dtype_));
      const std::size_t row = static_cast<std::size_t>(Hkv * D) * elem;
      for (int which = 0; which < 2; ++which) {
        const TensorView& t = which == 0 ? dk : dv;
        for (std::int64_t b = 0; b < B; ++b) {
          RINGATTN_CUDA_CHECK(cudaMemcpy2DAsync(
              static_cast<unsigned char*>(t.data) + static_cast<std::size_t>(b * t.strides[0]) * elem,
              static_cast<std::size_t>(t.strides[1]) * elem,
              home + (static_cast<std::size_t>(which * B + b) * static_cast<std::size_t>(q_len_)) * row, row, row,
              static_cast<std::size_t>(q_len_), cudaMemcpyDeviceToDevice, stream));
        }
      }
      return;
    }
    finalize_output(grads, nullptr, dk, TensorView{}, stream);
    finalize_output(grads + B * Hkv * q_len_ * D, nullptr, dv, TensorView{}, stream);
  });
  timer_.end(stream);
  transfer_timer_.end(resources_.comm_stream());
  profiled_steps_ = computed;
}

CudaRingBackward::Breakdown CudaRingBackward::breakdown() const {
  Breakdown b;
  if (!timer_.finished()) return b;
  b.total_ms = timer_.total_ms();
  b.step_kernel_ms.assign(static_cast<std::size_t>(profiled_steps_), 0.0);
  timer_.for_each_span([&](int step, double ms) {
    if (step < 0) {
      b.other_ms += ms;
    } else {
      b.step_kernel_ms[static_cast<std::size_t>(step)] += ms;
    }
  });
  b.kv = transfer_timer_.tally(0);
  b.kv.bytes = kv_bytes_received_;
  b.sums = transfer_timer_.tally(1);
  b.sums.bytes = sums_bytes_received_;
  return b;
}

CudnnSdpaProblem CudaRingBackward::task_problem(const BlockTask& t, std::int64_t step_kv_len, const TensorView& q,
                                                const TensorView& out, const TensorView& dout, const TensorView& dq,
                                                const TensorView& dk, bool direct) const {
  // direct: one task covers every row of one rank and cuDNN writes the gradients themselves
  // (dk and dv share strides: one plan describes both); else it writes dense task blocks.
  const std::int64_t H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  const Strides qs = {q.strides[0], q.strides[1], q.strides[2]};
  const Strides os = {out.strides[0], out.strides[1], out.strides[2]};
  const Strides ds = {dout.strides[0], dout.strides[1], dout.strides[2]};
  const Strides dq_s = {direct ? dq.strides[0] : t.q_len * H * D, direct ? dq.strides[1] : H * D,
                        direct ? dq.strides[2] : D};
  const Strides dkv_s = {direct ? dk.strides[0] : t.kv_len * Hkv * D, direct ? dk.strides[1] : Hkv * D,
                         direct ? dk.strides[2] : D};
  return cudnn_problem(t, step_kv_len, shape_, dtype_, qs, os, ds, dq_s, dkv_s);
}

bool CudaRingBackward::will_write_direct(const TensorView& q, const TensorView& out, const TensorView& dout,
                                         const TensorView& dq, const TensorView& dk, const TensorView& dv) const {
  if (!one_task_ || dk.strides != dv.strides) return false;
  const RingStep& step = plan_.steps[0];
  const BlockTask& t = step.tasks[0];
  return task_uses_cudnn(t, step.kv_len) &&
         cudnn_->try_prepare_backward(task_problem(t, step.kv_len, q, out, dout, dq, dk, true));
}

bool CudaRingBackward::run_cudnn_task(const BlockTask& t, std::int64_t step_kv_len, const TensorView& q,
                                      const void* k, const void* v, const TensorView& out, const TensorView& lse,
                                      const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                      const TensorView& dv, float scale, float* dk_acc, float* dv_acc,
                                      const std::function<void()>& await_acc) {
  const cudaStream_t stream = resources_.compute_stream();
  const std::int64_t B = shape_.batch, H = shape_.heads, Hkv = shape_.kv_heads, D = shape_.head_dim;
  const auto elem = static_cast<std::int64_t>(dtype_size(dtype_));
  const bool direct = one_task_ && dk.strides == dv.strides;
  const CudnnSdpaProblem problem = task_problem(t, step_kv_len, q, out, dout, dq, dk, direct);
  // Plans for dense tensors were built before the ring; other strides build theirs now, and a
  // refusal falls back to the native kernels on this rank.
  if (!cudnn_->try_prepare_backward(problem)) return false;
  auto rows = [&](const void* base, std::int64_t row, std::int64_t row_stride) {
    return static_cast<const unsigned char*>(base) + row * row_stride * elem;
  };
  gather_lse(lse, t.q_begin, t.q_len, stats_block_.as<float>(), stream);
  const void* k_rows = rows(k, t.kv_begin, Hkv * D);
  const void* v_rows = rows(v, t.kv_begin, Hkv * D);
  if (direct) {
    cudnn_->backward(problem, q.data, k_rows, v_rows, out.data, dout.data, stats_block_.as<float>(), dq.data, dk.data,
                     dv.data, scale, stream);
    direct_ = true;
    return true;
  }
  const DType grad_dtype = dtype_;
  auto* dk_blk = static_cast<unsigned char*>(dkv_block_.get());
  unsigned char* dv_blk = dk_blk + B * t.kv_len * Hkv * D * static_cast<std::int64_t>(dtype_size(grad_dtype));
  cudnn_->backward(problem, rows(q.data, t.q_begin, q.strides[1]), k_rows, v_rows,
                   rows(out.data, t.q_begin, out.strides[1]), rows(dout.data, t.q_begin, dout.strides[1]),
                   stats_block_.as<float>(), dq_block_.get(), dk_blk, dv_blk, scale, stream);
  // The task's gradients, (B, rows, heads, D), join the fp32 sums.
  const Strides dq_blk_s = {t.q_len * H * D, D, H * D};
  accumulate_rows(dq_acc_.as<float>(), q_len_, t.q_begin, dq_block_.get(), grad_dtype, B, H, t.q_len, D, dq_blk_s,
                  stream);
  await_acc();
  const Strides dkv_blk_s = {t.kv_len * Hkv * D, D, Hkv * D};
  accumulate_rows(dk_acc, step_kv_len, t.kv_begin, dk_blk, grad_dtype, B, Hkv, t.kv_len, D, dkv_blk_s, stream);
  accumulate_rows(dv_acc, step_kv_len, t.kv_begin, dv_blk, grad_dtype, B, Hkv, t.kv_len, D, dkv_blk_s, stream);
  return true;
}

void CudaRingBackward::wait() {
  CudaEvent finished;
  RINGATTN_CUDA_CHECK(cudaEventRecord(finished, resources_.compute_stream()));
  resources_.wait(
      finished, timeout_s_,
      [this] {
        int done = 0;
        while (done < milestones_ && cudaEventQuery(step_events_[static_cast<std::size_t>(done)]) == cudaSuccess) ++done;
        const std::string cause = stalled_node_peers(peer_pids_, plan_.rank);
        return "rank " + std::to_string(plan_.rank) + ": the backward ring after " + std::to_string(done) + " of " +
               std::to_string(milestones_) + " steps (K, V and the dK, dV sums exchanged with ranks " +
               std::to_string(plan_.recv_from) + " and " + std::to_string(plan_.send_to) + ")" +
               (cause.empty() ? std::string() : "; " + cause);
      },
      [this] {
        int done = 0;
        for (int i = 0; i < milestones_; ++i) done += cudaEventQuery(step_events_[static_cast<std::size_t>(i)]) == cudaSuccess;
        return done;
      });
}

}  // namespace ringattn::detail
