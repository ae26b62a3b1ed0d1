#include "ringattn/attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <utility>

#include "api/prepared_forward.hpp"
#include "comm/agreement.hpp"
#include "comm/collective.hpp"
#include "comm/mpi_util.hpp"
#include "engine/linear_attention.hpp"
#include "engine/ring_backward.hpp"
#include "plan/ring_plan.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"
#include "kernels/cuda/cuda_kernels.hpp"
#endif
#include "ringattn/error.hpp"

namespace ringattn {

namespace {

using detail::FingerprintField;

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorCode::invalid_argument, message); }

std::string dim_name(int d) {
  static const char* names[] = {"batch", "seq", "heads", "head_dim"};
  return names[d];
}

void check_view(const char* name, const TensorView& t, int ndim) {
  if (t.ndim != ndim) {
    invalid(std::string(name) + ": expected " + std::to_string(ndim) + " dimensions, got " + std::to_string(t.ndim) +
            " " + t.shape_string());
  }
  for (int d = 0; d < ndim; ++d) {
    if (t.shape[static_cast<std::size_t>(d)] < 0 || t.strides[static_cast<std::size_t>(d)] < 0) {
      invalid(std::string(name) + ": negative size or stride in dimension " + std::to_string(d));
    }
  }
  if (static_cast<int>(t.dtype) > static_cast<int>(DType::bf16)) invalid(std::string(name) + ": unknown dtype");
  if (static_cast<int>(t.device) > static_cast<int>(DeviceKind::cuda)) invalid(std::string(name) + ": unknown device");
  // Sizes and the largest offset must be countable in bytes (a wrapped count skipped the null
  // check and the kernels indexed far outside the buffer).
  std::int64_t elements = 1, last = 0;
  for (int d = 0; d < ndim; ++d) {
    const auto size = t.shape[static_cast<std::size_t>(d)], stride = t.strides[static_cast<std::size_t>(d)];
    std::int64_t reach = 0;
    if (__builtin_mul_overflow(elements, size, &elements) ||
        (size > 0 && (__builtin_mul_overflow(size - 1, stride, &reach) || __builtin_add_overflow(last, reach, &last)))) {
      invalid(std::string(name) + ": shape " + t.shape_string() + " with its strides is too large to address");
    }
  }
  std::int64_t bytes = 0;
  if (__builtin_mul_overflow(std::max(elements, last + 1), static_cast<std::int64_t>(dtype_size(t.dtype)), &bytes)) {
    invalid(std::string(name) + ": shape " + t.shape_string() + " is too large to address");
  }
  if (t.numel() > 0 && t.data == nullptr) invalid(std::string(name) + ": data pointer is null");
}

// Outputs must not alias themselves (a stride of 0 over more than one element) or each other
// (one base pointer for two outputs: one result overwrote the other). Outputs interleaved in
// one buffer (dK and dV packed as (B, S, 2, H, D)) have distinct bases and stay allowed; an
// output may alias an input.
void check_distinct_outputs(std::initializer_list<std::pair<const char*, const TensorView*>> outputs) {
  for (const auto& [name, t] : outputs) {
    if (t->data == nullptr) continue;
    for (int d = 0; d < t->ndim; ++d) {
      if (t->strides[static_cast<std::size_t>(d)] == 0 && t->shape[static_cast<std::size_t>(d)] > 1) {
        invalid(std::string(name) + ": stride 0 in dimension " + std::to_string(d) +
                " would write its results over each other");
      }
    }
    for (const auto& [other_name, other] : outputs) {
      if (other == t) break;
      if (other->data == t->data && t->numel() > 0 && other->numel() > 0) {
        invalid(std::string(other_name) + " and " + name + " are one buffer: each output needs its own memory");
      }
    }
  }
}

// q, k, v, out: (B, S_local, heads, D); lse: (B, H, S_local) fp32 or no data.
void validate(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const TensorView& lse, const AttentionOptions& options) {
  check_view("q", q, 4);
  check_view("k", k, 4);
  check_view("v", v, 4);
  check_view("out", out, 4);
  for (const auto& [name, t] : {std::pair{"q", &q}, {"k", &k}, {"v", &v}, {"out", &out}}) {
    if (t->strides[3] != 1 && t->shape[3] > 1) invalid(std::string(name) + ": head_dim must be contiguous (stride 1)");
  }
  for (const auto& [name, t] : {std::pair{"k", &k}, {"v", &v}, {"out", &out}}) {
    if (t->dtype != q.dtype) {
      invalid(std::string(name) + ": dtype " + to_string(t->dtype) + " differs from q's " + to_string(q.dtype));
    }
  }
  for (int d : {0, 1, 3}) {
    for (const auto& [name, t] : {std::pair{"k", &k}, {"v", &v}}) {
      if (t->shape[static_cast<std::size_t>(d)] != q.shape[static_cast<std::size_t>(d)]) {
        invalid(std::string(name) + ": " + dim_name(d) + " " + std::to_string(t->shape[static_cast<std::size_t>(d)]) +
                " differs from q's " + std::to_string(q.shape[static_cast<std::size_t>(d)]));
      }
    }
  }
  if (v.shape[2] != k.shape[2]) {
    invalid("v: kv-heads " + std::to_string(v.shape[2]) + " differs from k's " + std::to_string(k.shape[2]));
  }
  if (q.shape[0] < 1) invalid("q: batch must be >= 1");
  if (q.shape[1] < 1) invalid("q: this rank holds no tokens (every rank needs at least one)");
  if (q.shape[2] < 1) invalid("q: heads must be >= 1");
  if (k.shape[2] < 1) invalid("k: kv-heads must be >= 1");
  if (q.shape[3] < 1) invalid("q: head_dim must be >= 1");
  if (q.shape[2] % k.shape[2] != 0) {
    invalid("k: kv-heads " + std::to_string(k.shape[2]) + " does not divide q's heads " + std::to_string(q.shape[2]));
  }
  for (const auto& [name, t] : {std::pair{"k", &k}, {"v", &v}, {"out", &out}, {"lse", &lse}}) {
    if (t->data != nullptr && (t->device != q.device || t->device_index != q.device_index)) {
      invalid(std::string(name) + ": on " + to_string(t->device) + ":" + std::to_string(t->device_index) +
              " but q is on " + to_string(q.device) + ":" + std::to_string(q.device_index));
    }
  }
  if (q.device == DeviceKind::cpu && q.shape[3] > detail::CpuForwardKernel::kMaxHeadDim) {
    invalid("q: head_dim " + std::to_string(q.shape[3]) + " exceeds the CPU kernel's maximum of " +
            std::to_string(detail::CpuForwardKernel::kMaxHeadDim));
  }
  if (q.device == DeviceKind::cuda) {
#ifdef RINGATTN_HAVE_CUDA
    if (!detail::flash_fwd_supports(q.dtype, q.shape[3])) {
      invalid(std::string("q: the CUDA kernel supports bf16 and fp16 with head_dim 64 or 128, not ") +
              to_string(q.dtype) + " with head_dim " + std::to_string(q.shape[3]));
    }
    // The kernel moves q and out in 16-byte pieces (K and V are repacked, so any layout works).
    for (const auto& [name, t] : {std::pair{"q", &q}, {"out", &out}}) {
      const bool aligned = reinterpret_cast<std::uintptr_t>(t->data) % 16 == 0 && t->strides[0] % 8 == 0 &&
                           t->strides[1] % 8 == 0 && t->strides[2] % 8 == 0;
      if (!aligned) {
        invalid(std::string(name) + ": on cuda the data pointer must be 16-byte aligned and the batch, sequence and "
                                    "head strides multiples of 8 elements");
      }
    }
#else
    invalid("q: device cuda, but this build of ringattn has no CUDA backend");
#endif
  }
  for (int d = 0; d < 4; ++d) {
    if (out.shape[static_cast<std::size_t>(d)] != q.shape[static_cast<std::size_t>(d)]) {
      invalid("out: shape " + out.shape_string() + " differs from q's " + q.shape_string());
    }
  }
  if (lse.data != nullptr) {
    check_view("lse", lse, 3);
    if (lse.dtype != DType::f32) invalid(std::string("lse: dtype must be fp32, got ") + to_string(lse.dtype));
    if (lse.shape[0] != q.shape[0] || lse.shape[1] != q.shape[2] || lse.shape[2] != q.shape[1]) {
      invalid("lse: shape " + lse.shape_string() + " must be (batch, heads, seq) = (" + std::to_string(q.shape[0]) +
              ", " + std::to_string(q.shape[2]) + ", " + std::to_string(q.shape[1]) + ")");
    }
  }
  if (static_cast<int>(options.layout) > static_cast<int>(LayoutKind::striped)) invalid("layout: unknown value");
  if (static_cast<int>(options.kernel) > static_cast<int>(KernelKind::native)) invalid("kernel: unknown value");
  if (static_cast<int>(options.attention) > static_cast<int>(AttentionKind::linear)) invalid("attention: unknown value");
  if (static_cast<int>(options.feature_map) > static_cast<int>(FeatureMap::identity)) {
    invalid("feature_map: unknown value");
  }
  check_distinct_outputs({{"out", &out}, {"lse", &lse}});
  // The kernels take the scale in fp32 (times log2(e) on GPUs): a value it cannot hold would
  // silently become inf or 0.
  if (options.scale && !(*options.scale > 0.0 && *options.scale <= kMaxScale && static_cast<float>(*options.scale) > 0.0f)) {
    char shown[32];
    std::snprintf(shown, sizeof shown, "%g", *options.scale);
    invalid(std::string("scale must be a positive number that fp32 can hold, at most 2.36e38, got ") + shown);
  }
  if (options.seq_len < 0) invalid("seq_len must be >= 0 (0 = sum of the local lengths)");
  if (!(options.timeout_s >= 0.0)) invalid("timeout must be >= 0 seconds (0: none)");
}

std::int64_t double_bits(double x) {
  std::int64_t bits = 0;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

std::string show_dtype(std::int64_t v) { return to_string(static_cast<DType>(v)); }
std::string show_layout(std::int64_t v) { return to_string(static_cast<LayoutKind>(v)); }
std::string show_bool(std::int64_t v) { return v ? "true" : "false"; }
std::string show_device(std::int64_t v) { return to_string(static_cast<DeviceKind>(v)); }
std::string show_kernel(std::int64_t v) { return to_string(static_cast<KernelKind>(v)); }
std::string show_attention(std::int64_t v) { return to_string(static_cast<AttentionKind>(v)); }
std::string show_feature_map(std::int64_t v) { return to_string(static_cast<FeatureMap>(v)); }

// FNV-1a over the decays' bits: ranks with different decays disagree on it.
std::int64_t decay_hash(const std::vector<double>& decay) {
  std::uint64_t h = 1469598103934665603ull;
  for (double d : decay) {
    std::uint64_t bits = 0;
    std::memcpy(&bits, &d, sizeof bits);
    for (int i = 0; i < 8; ++i) h = (h ^ ((bits >> (8 * i)) & 0xffu)) * 1099511628211ull;
  }
  return static_cast<std::int64_t>(h);
}

#ifdef RINGATTN_HAVE_CUDA
// GPU tensors must sit on the device this rank runs on.
void check_rank_device(const TensorView& q, const detail::CudaResources& resources) {
  if (q.device_index != resources.device()) {
    invalid("q: on cuda:" + std::to_string(q.device_index) + " but this rank runs on cuda:" +
            std::to_string(resources.device()));
  }
}
#endif

// Sliding-window rules (on top of validate()).
void validate_window(const TensorView& k, const AttentionOptions& options) {
  if (options.sinks < 0) invalid("sinks must be >= 0, got " + std::to_string(options.sinks));
  if (options.window < 0) {
    if (options.window != -1) invalid("window must be >= 0 (or -1: none), got " + std::to_string(options.window));
    if (options.sinks > 0) invalid("sinks need a sliding window (window >= 0, --window)");
    return;
  }
  if (options.attention != AttentionKind::softmax) invalid("a sliding window applies to softmax attention only");
  if (options.layout != LayoutKind::contiguous) {
    invalid(std::string("a sliding window needs the contiguous layout (windows then reach few ranks), not ") +
            to_string(options.layout));
  }
  const double sink_bytes =
      static_cast<double>(options.sinks) * static_cast<double>(k.shape[2] * k.shape[3]) * dtype_size(k.dtype);
  if (sink_bytes >= 2147483647.0) invalid("sinks: " + std::to_string(options.sinks) + " tokens exceed 2 GiB of K rows");
}

// Linear attention's own rules (on top of validate()).
void validate_linear(const TensorView& q, const TensorView& lse, const AttentionOptions& options) {
  if (options.layout != LayoutKind::contiguous) {
    invalid(std::string("linear attention (--attention linear) needs the contiguous layout (its prefix scan follows the ranks' order), "
                        "not ") + to_string(options.layout));
  }
  if (lse.data != nullptr) invalid("lse: linear attention has no LSE (pass none)");
  if (options.scale) invalid("scale: linear attention has no softmax scale (leave it unset)");
  const std::size_t H = static_cast<std::size_t>(q.shape[2]);
  if (!options.decay.empty() && options.decay.size() != 1 && options.decay.size() != H) {
    invalid("decay: " + std::to_string(options.decay.size()) + " values for " + std::to_string(H) +
            " heads (give none, one, or one per query head)");
  }
  for (double g : options.decay) {
    if (!(g > 0.0 && g <= 1.0)) invalid("decay: every value must lie in (0, 1], got " + std::to_string(g));
    if (g != 1.0 && !options.causal) invalid("decay: a decay below 1 needs causal attention");
  }
}
std::string show_double(std::int64_t v) {
  double x = 0.0;
  std::memcpy(&x, &v, sizeof x);
  return std::to_string(x);
}

// Steps 2 and 3 of every pass: the ranks agree on everything but their local lengths, then
// on the layout those lengths must follow. Returns the layout.
std::unique_ptr<Layout> agree_on_problem(Context& ctx, const TensorView& q, const TensorView& k,
                                         const AttentionOptions& options, double scale, const char* pass) {
  MPI_Comm comm = ctx.comm();
  const std::int64_t D = q.shape[3];
  const std::vector<FingerprintField> fields = {
      {"dtype", static_cast<std::int64_t>(q.dtype), show_dtype},
      {"batch", q.shape[0]},
      {"heads", q.shape[2]},
      {"kv-heads", k.shape[2]},
      {"head_dim", D},
      {"causal", options.causal ? 1 : 0, show_bool},
      {"layout", static_cast<std::int64_t>(options.layout), show_layout},
      {"scale", double_bits(scale), show_double},
      {"seq_len", options.seq_len},
      {"device", static_cast<std::int64_t>(q.device), show_device},
      {"kernel", static_cast<std::int64_t>(options.kernel), show_kernel},
      {"attention", static_cast<std::int64_t>(options.attention), show_attention},
      {"feature-map", static_cast<std::int64_t>(options.feature_map), show_feature_map},
      {"decay", decay_hash(options.decay)},
      {"window", options.window},
      {"sinks", options.sinks},
  };
  detail::agree_fingerprint(comm, fields, pass);

  std::vector<std::int64_t> local_lengths(static_cast<std::size_t>(ctx.size()));
  const std::int64_t mine = q.shape[1];
  detail::bounded_allgather(comm, &mine, 1, MPI_INT64_T, local_lengths.data(), "the gathering of sequence lengths");
  std::int64_t total = 0;
  for (std::int64_t n : local_lengths) total += n;
  const std::int64_t seq_len = options.seq_len > 0 ? options.seq_len : total;

  // Every rank sees every length, so each reaches the same verdict without another round.
  std::unique_ptr<Layout> layout;
  detail::agree_on(comm, [&] { layout = std::make_unique<Layout>(options.layout, seq_len, ctx.size()); });
  for (int r = 0; r < ctx.size(); ++r) {
    const std::int64_t expected = layout->local_length(r);
    if (local_lengths[static_cast<std::size_t>(r)] != expected) {
      throw Error(ErrorCode::invalid_argument,
                  "rank " + std::to_string(r) + ": q holds " + std::to_string(local_lengths[static_cast<std::size_t>(r)]) +
                      " tokens, but the " + to_string(options.layout) + " layout of seq_len " + std::to_string(seq_len) +
                      " over " + std::to_string(ctx.size()) + " ranks assigns it " + std::to_string(expected),
                  /*on_all_ranks=*/true);
    }
  }
  return layout;
}

// The backward pass's extra arguments: lse is required, gradients mirror their inputs.
void validate_backward(const TensorView& q, const TensorView& k, const TensorView& lse, const TensorView& dout,
                       const TensorView& dq, const TensorView& dk, const TensorView& dv, bool linear) {
  if (lse.data == nullptr && !linear) invalid("lse: the backward pass needs the forward pass's lse");
  for (const auto& [name, t, like, like_name] :
       {std::tuple{"dout", &dout, &q, "q"}, {"dq", &dq, &q, "q"}, {"dk", &dk, &k, "k"}, {"dv", &dv, &k, "k"}}) {
    check_view(name, *t, 4);
    if (t->dtype != like->dtype) {
      invalid(std::string(name) + ": dtype " + to_string(t->dtype) + " differs from " + like_name + "'s " +
              to_string(like->dtype));
    }
    for (int d = 0; d < 4; ++d) {
      if (t->shape[static_cast<std::size_t>(d)] != like->shape[static_cast<std::size_t>(d)]) {
        invalid(std::string(name) + ": shape " + t->shape_string() + " differs from " + like_name + "'s " +
                like->shape_string());
      }
    }
    if (t->strides[3] != 1 && t->shape[3] > 1) invalid(std::string(name) + ": head_dim must be contiguous (stride 1)");
    if (t->device != q.device) invalid(std::string(name) + ": on a different device than q");
  }
  check_distinct_outputs({{"dq", &dq}, {"dk", &dk}, {"dv", &dv}});
}

}  // namespace

namespace detail {

RingPlan plan_for(const Layout& layout, const AttentionOptions& options, int member) {
  if (options.window >= 0) return make_window_plan(layout, options.window, options.sinks, member, options.causal);
  return make_ring_plan(layout, options.causal ? MaskKind::causal : MaskKind::full, member);
}

LinearAttentionProblem linear_problem(const AttentionShape& shape, const AttentionOptions& options) {
  LinearAttentionProblem lp{shape.batch, shape.heads, shape.kv_heads, shape.head_dim, options.causal,
                            options.feature_map, {}};
  lp.decay.assign(static_cast<std::size_t>(shape.heads), 1.0);
  for (std::size_t h = 0; h < lp.decay.size(); ++h) {
    if (!options.decay.empty()) lp.decay[h] = options.decay[options.decay.size() == 1 ? 0 : h];
  }
  return lp;
}

#ifdef RINGATTN_HAVE_CUDA
std::unique_ptr<CudaLinearAttention> make_cuda_linear(CudaResources& resources, const LinearAttentionProblem& lp,
                                                      const Layout& layout, int member, DType dtype,
                                                      const AttentionOptions& options) {
  std::vector<std::int64_t> lengths;
  for (int r = 0; r < layout.world(); ++r) lengths.push_back(layout.local_length(r));
  auto linear = std::make_unique<CudaLinearAttention>(resources, lp, lengths, member, dtype);
  linear->set_timeout(options.timeout_s);
  return linear;
}
#endif

void validate_forward_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                             const TensorView& lse, const AttentionOptions& options) {
  validate(q, k, v, out, lse, options);
  validate_window(k, options);
  if (options.attention == AttentionKind::linear) validate_linear(q, lse, options);
}

void validate_backward_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                              const TensorView& lse, const TensorView& dout, const TensorView& dq,
                              const TensorView& dk, const TensorView& dv, const AttentionOptions& options) {
  validate_forward_inputs(q, k, v, out, lse, options);
  validate_backward(q, k, lse, dout, dq, dk, dv, options.attention == AttentionKind::linear);
}

void check_usable(const Context& ctx) {
  if (ctx.comm() == MPI_COMM_NULL) invalid("the context is empty (moved from)");
  if (ctx.collectives_abandoned()) {
    invalid("an earlier call on this context failed with its host collectives out of step across the ranks (" +
            ctx.failure() + "); its communicator can carry no further call: create a new Context");
  }
}

// Inside the first agreement of a call: no earlier call may have failed mid-ring on any rank
// (the ranks whose part of that call succeeded must not go on alone).
void refuse_if_failed(const Context& ctx) {
  if (!ctx.failure().empty()) {
    invalid("an earlier call on this context failed mid-ring (" + ctx.failure() +
            "); its messages may still be in flight: create a new Context");
  }
}

// prepare_forward without its check and bound (which the wrapper below, or forward(), sets).
static PreparedForward prepare_forward_unbounded(Context& ctx, const TensorView& q, const TensorView& k,
                                                 const TensorView& v, const TensorView& out, const TensorView& lse,
                                                 const AttentionOptions& options) {
  MPI_Comm comm = ctx.comm();
  // 1. Each rank checks its own tensors; one bad rank fails all of them with its message.
  detail::agree_on(comm, [&] {
    refuse_if_failed(ctx);
    validate_forward_inputs(q, k, v, out, lse, options);
  });

  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.shape[3])));
  std::unique_ptr<Layout> layout = agree_on_problem(ctx, q, k, options, scale, "attention arguments");
  const std::int64_t D = q.shape[3];

  // 4. Allocate everything before the first transfer and agree on the outcome.
  detail::AttentionShape shape{q.shape[0], q.shape[2], k.shape[2], D};
  PreparedForward prepared;
  prepared.scale = static_cast<float>(scale);
  if (options.attention == AttentionKind::linear) {
    const LinearAttentionProblem lp = linear_problem(shape, options);
    if (q.device == DeviceKind::cuda) {
#ifdef RINGATTN_HAVE_CUDA
      CudaResources& resources = ctx.cuda();
      detail::agree_on(comm, [&] {
        check_rank_device(q, resources);
        prepared.cuda_linear = make_cuda_linear(resources, lp, *layout, ctx.rank(), q.dtype, options);
      });
#endif
      return prepared;
    }
    prepared.linear = std::make_unique<PreparedForward::Linear>(PreparedForward::Linear{comm, lp, ctx.cpu_threads()});
    prepared.host_collectives = true;
    return prepared;
  }
  if (q.device == DeviceKind::cuda) {
#ifdef RINGATTN_HAVE_CUDA
    CudaResources& resources = ctx.cuda();
    detail::agree_on(comm, [&] {
      check_rank_device(q, resources);
      RingPlan plan = plan_for(*layout, options, ctx.rank());
      prepared.cuda = std::make_unique<CudaRingForward>(resources, std::move(plan), shape, q.dtype, q.shape[1],
                                                        layout->max_local_length(), options.kernel);
      prepared.cuda->set_timeout(options.timeout_s, ctx.node_peer_pids());
    });
#endif
  } else {
    detail::agree_on(comm, [&] {
      RingPlan plan = plan_for(*layout, options, ctx.rank());
      prepared.host_collectives = plan.sink_len > 0;
      prepared.cpu = std::make_unique<CpuRingForward>(comm, std::move(plan), shape, q.dtype,
                                                      q.shape[1], layout->max_local_length(), ctx.cpu_threads(),
                                                      ctx.mpi_progress_from_threads());
      prepared.cpu->set_timeout(options.timeout_s, ctx.node_peer_pids());
    });
  }
  return prepared;
}

PreparedForward prepare_forward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v,
                                const TensorView& out, const TensorView& lse, const AttentionOptions& options) {
  check_usable(ctx);
  return bounded_call(ctx, options.timeout_s,
                      [&] { return prepare_forward_unbounded(ctx, q, k, v, out, lse, options); });
}

void PreparedForward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                          const TensorView& lse, const std::function<void(int, int)>& on_step) {
  if (linear) {
    linear_attention_cpu(linear->comm, linear->problem, q, k, v, out, linear->threads);
    if (on_step) on_step(1, 1);  // one scan, no ring
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  if (cuda) {
    cuda->run(q, k, v, out, lse, scale);
    if (on_step) on_step(1, 1);  // the GPU ring is enqueued as a whole
    return;
  }
  if (cuda_linear) {
    cuda_linear->run(q, k, v, out);
    if (on_step) on_step(1, 1);
    return;
  }
#endif
  cpu->run(q, k, v, out, lse, scale, on_step);
}

}  // namespace detail

namespace {

// Runs the ring; a failure inside it abandons the prepared engine (its transfers may still be
// in flight) and leaves the context unusable. The caller's on_step is wrapped: an exception it
// throws is kept until the ring has finished on this rank (leaving the ring early would strand
// the other ranks' transfers), then rethrown.
template <class Prepared, class Run>
void run_ring(Context& ctx, Prepared& prepared, const std::function<void(int, int)>& on_step, Run&& run) {
  std::exception_ptr callback_error;
  std::function<void(int, int)> guarded_step;
  if (on_step) {
    guarded_step = [&](int done, int total) {
      if (callback_error) return;
      try {
        on_step(done, total);
      } catch (...) {
        callback_error = std::current_exception();
      }
    };
  }
  const auto fail = [&](const std::string& why) {
    prepared.abandon();
    if (prepared.host_collectives) {
      ctx.mark_collectives_abandoned(why);
    } else {
      ctx.mark_failed(why);
    }
  };
  try {
    run(guarded_step);
  } catch (const std::exception& e) {
    fail(e.what());
    throw;
  } catch (...) {
    fail("unknown failure");
    throw;
  }
  if (callback_error) std::rethrow_exception(callback_error);
}

}  // namespace

void forward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
             const TensorView& lse, const AttentionOptions& options) {
  detail::check_usable(ctx);
  // The ring's host collectives (linear attention's scan, the sinks' sums) are bounded too.
  detail::bounded_call(ctx, options.timeout_s, [&] {
    detail::PreparedForward prepared = detail::prepare_forward_unbounded(ctx, q, k, v, out, lse, options);
#ifdef RINGATTN_HAVE_CUDA
    // Without a borrowed stream the caller has no stream to order against: start after the
    // legacy default stream's work (what plain cudaMemcpy uses) and return with the result ready.
    const bool own_stream = prepared.cuda_stream() != nullptr && ctx.options().cuda_stream == nullptr;
    if (own_stream) {
      detail::CudaEvent inputs_ready;
      RINGATTN_CUDA_CHECK(cudaEventRecord(inputs_ready, cudaStreamLegacy));
      RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(prepared.cuda_stream(), inputs_ready, 0));
    }
#endif
    // 5. The ring.
    run_ring(ctx, prepared, options.on_step, [&](const std::function<void(int, int)>& on_step) {
      prepared.run(q, k, v, out, lse, on_step);
#ifdef RINGATTN_HAVE_CUDA
      if (own_stream) prepared.wait_cuda();  // bounded by options.timeout_s (the watchdog)
#endif
    });
  });
}

namespace detail {

// prepare_backward without its check and bound (which the wrapper below, or backward(), sets).
static PreparedBackward prepare_backward_unbounded(Context& ctx, const TensorView& q, const TensorView& k,
                                                   const TensorView& v, const TensorView& out, const TensorView& lse,
                                                   const TensorView& dout, const TensorView& dq, const TensorView& dk,
                                                   const TensorView& dv, const AttentionOptions& options) {
  MPI_Comm comm = ctx.comm();
  detail::agree_on(comm, [&] {
    refuse_if_failed(ctx);
    validate_backward_inputs(q, k, v, out, lse, dout, dq, dk, dv, options);
  });
  const double scale = options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q.shape[3])));
  std::unique_ptr<Layout> layout = agree_on_problem(ctx, q, k, options, scale, "backward arguments");
  const detail::AttentionShape shape{q.shape[0], q.shape[2], k.shape[2], q.shape[3]};
  PreparedBackward prepared;
  prepared.scale = static_cast<float>(scale);
  if (options.attention == AttentionKind::linear) {
    const LinearAttentionProblem lp = linear_problem(shape, options);
    if (q.device == DeviceKind::cuda) {
#ifdef RINGATTN_HAVE_CUDA
      CudaResources& resources = ctx.cuda();
      detail::agree_on(comm, [&] {
        check_rank_device(q, resources);
        prepared.cuda_linear = make_cuda_linear(resources, lp, *layout, ctx.rank(), q.dtype, options);
        prepared.cuda_linear->allocate_backward();
      });
#endif
      return prepared;
    }
    prepared.linear = std::make_unique<PreparedForward::Linear>(PreparedForward::Linear{comm, lp, ctx.cpu_threads()});
    prepared.host_collectives = true;
    return prepared;
  }
  if (q.device == DeviceKind::cuda) {
#ifdef RINGATTN_HAVE_CUDA
    CudaResources& resources = ctx.cuda();
    detail::agree_on(comm, [&] {
      check_rank_device(q, resources);
      RingPlan plan = plan_for(*layout, options, ctx.rank());
      prepared.cuda = std::make_unique<CudaRingBackward>(resources, std::move(plan), shape, q.dtype, q.shape[1],
                                                         layout->max_local_length(), options.kernel);
      prepared.cuda->set_timeout(options.timeout_s, ctx.node_peer_pids());
    });
#endif
  } else {
    detail::agree_on(comm, [&] {
      RingPlan plan = plan_for(*layout, options, ctx.rank());
      prepared.host_collectives = plan.sink_len > 0;
      prepared.cpu = std::make_unique<CpuRingBackward>(comm, std::move(plan), shape, q.dtype, q.shape[1],
                                                       layout->max_local_length(), ctx.cpu_threads());
      prepared.cpu->set_timeout(options.timeout_s, ctx.node_peer_pids());
    });
  }
  return prepared;
}

PreparedBackward prepare_backward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v,
                                  const TensorView& out, const TensorView& lse, const TensorView& dout,
                                  const TensorView& dq, const TensorView& dk, const TensorView& dv,
                                  const AttentionOptions& options) {
  check_usable(ctx);
  return bounded_call(ctx, options.timeout_s,
                      [&] { return prepare_backward_unbounded(ctx, q, k, v, out, lse, dout, dq, dk, dv, options); });
}

void PreparedBackward::run(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
                           const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
                           const TensorView& dv) {
  if (linear) {
    linear_attention_backward_cpu(linear->comm, linear->problem, q, k, v, dout, dq, dk, dv, linear->threads);
    return;
  }
#ifdef RINGATTN_HAVE_CUDA
  if (cuda) {
    cuda->run(q, k, v, out, lse, dout, dq, dk, dv, scale);
    return;
  }
  if (cuda_linear) {
    cuda_linear->backward(q, k, v, out, dout, dq, dk, dv);
    return;
  }
#endif
  cpu->run(q, k, v, out, lse, dout, dq, dk, dv, scale);
}

}  // namespace detail

void backward(Context& ctx, const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& out,
              const TensorView& lse, const TensorView& dout, const TensorView& dq, const TensorView& dk,
              const TensorView& dv, const AttentionOptions& options) {
  detail::check_usable(ctx);
  detail::bounded_call(ctx, options.timeout_s, [&] {  // as forward()
    detail::PreparedBackward prepared =
        detail::prepare_backward_unbounded(ctx, q, k, v, out, lse, dout, dq, dk, dv, options);
#ifdef RINGATTN_HAVE_CUDA
    // As forward(): without a borrowed stream, order after the legacy default stream and return
    // with the gradients ready.
    const bool own_stream = prepared.cuda_stream() != nullptr && ctx.options().cuda_stream == nullptr;
    if (own_stream) {
      detail::CudaEvent inputs_ready;
      RINGATTN_CUDA_CHECK(cudaEventRecord(inputs_ready, cudaStreamLegacy));
      RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(prepared.cuda_stream(), inputs_ready, 0));
    }
#endif
    run_ring(ctx, prepared, nullptr, [&](const std::function<void(int, int)>&) {
      prepared.run(q, k, v, out, lse, dout, dq, dk, dv);
#ifdef RINGATTN_HAVE_CUDA
      if (own_stream) prepared.wait_cuda();
#endif
    });
  });
}

}  // namespace ringattn
