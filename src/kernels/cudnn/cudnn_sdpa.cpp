// The cuDNN graph for one attention task (see cudnn_sdpa.hpp). Backend descriptors are
// created, given their attributes and finalised in the order cuDNN requires: tensors, then
// operation descriptors, the operation graph, heuristics, and one execution plan per key.
#include "kernels/cudnn/cudnn_sdpa.hpp"

#include <cudnn.h>

#include <cmath>
#include <deque>
#include <limits>
#include <string>
#include <vector>

#include "core/cuda_check.hpp"
#include "ringattn/error.hpp"

namespace ringattn::detail {

namespace {

[[noreturn]] void cudnn_fail(cudnnStatus_t status, const char* what, const char* file, int line) {
  char detail[1024] = {0};
  cudnnGetLastErrorString(detail, sizeof(detail));
  throw Error(ErrorCode::cuda, std::string(what) + " failed at " + file + ":" + std::to_string(line) + ": " +
                                   cudnnGetErrorString(status) + (detail[0] != '\0' ? std::string(" (") + detail + ")" : ""));
}

#define RINGATTN_CUDNN_CHECK(call)                                                        \
  do {                                                                                    \
    const cudnnStatus_t status_ = (call);                                                 \
    if (status_ != CUDNN_STATUS_SUCCESS) cudnn_fail(status_, #call, __FILE__, __LINE__); \
  } while (0)

// One backend descriptor, destroyed with its owner.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) { RINGATTN_CUDNN_CHECK(cudnnBackendCreateDescriptor(type, &d_)); }
  ~Desc() {
    if (d_ != nullptr) cudnnBackendDestroyDescriptor(d_);
  }
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;
  Desc(Desc&& o) noexcept : d_(o.d_) { o.d_ = nullptr; }
  cudnnBackendDescriptor_t get() const { return d_; }

  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, std::int64_t count, const void* value) {
    RINGATTN_CUDNN_CHECK(cudnnBackendSetAttribute(d_, name, type, count, value));
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, const Desc& other) {
    cudnnBackendDescriptor_t o = other.get();
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &o);
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, std::int64_t v) { return set(name, CUDNN_TYPE_INT64, 1, &v); }
  Desc& set_type(cudnnBackendAttributeName_t name, cudnnDataType_t t) { return set(name, CUDNN_TYPE_DATA_TYPE, 1, &t); }
  Desc& finalize() {
    RINGATTN_CUDNN_CHECK(cudnnBackendFinalize(d_));
    return *this;
  }

 private:
  cudnnBackendDescriptor_t d_ = nullptr;
};

cudnnDataType_t to_cudnn(DType t) {
  switch (t) {
    case DType::bf16: return CUDNN_DATA_BFLOAT16;
    case DType::f16: return CUDNN_DATA_HALF;
    case DType::f32: return CUDNN_DATA_FLOAT;
  }
  return CUDNN_DATA_FLOAT;
}

// Scratch grows when a plan is built (the engines build theirs before the ring starts), so
// that running a plan never allocates.
void grow(DeviceBuffer& buffer, std::size_t bytes) {
  if (buffer.bytes() < bytes) buffer = DeviceBuffer(bytes);
}

// Unique ids of the tensors the variant pack binds.
enum Uid : std::int64_t {
  kQ = 1, kK, kV, kO, kStats, kScale, kNegInf, kOffset, kWindow, kWindowFill,
  kDout, kDq, kDk, kDv, kSoftmaxSum, kDqAccum, kOne,  // backward
  kVirtualBase = 100
};

}  // namespace

struct CudnnSdpa::Plan {
  std::deque<Desc> keep;  // every descriptor the plan refers to (a deque: references stay valid)
  std::unique_ptr<Desc> plan;
  std::int64_t workspace = 0;
  bool causal = false, offset = false, band = false;
};

std::int64_t cudnn_version() { return static_cast<std::int64_t>(cudnnGetVersion()); }

std::string cudnn_sdpa_unsupported_reason(const CudnnSdpaProblem& p) {
  if (p.dtype != DType::bf16 && p.dtype != DType::f16) return "cuDNN attention needs bf16 or fp16 inputs";
  if (p.head_dim % 8 != 0 || p.head_dim > 256) return "cuDNN attention needs a head_dim that is a multiple of 8, at most 256";
  if (p.heads % p.kv_heads != 0) return "kv_heads must divide heads";
  // A row that sees no key would get LSE = -inf from the ring kernel; cuDNN's softmax would
  // produce NaN (max = -inf). Offsets below 0 mask row 0 entirely, so they stay native.
  if (p.causal && p.diag_offset < 0) return "causal sub-blocks with a negative diagonal offset run on the native kernel";
  if (p.q_len <= 0 || p.kv_len <= 0) return "empty task";
  if (p.band && !p.causal) return "a band needs the causal (upper) bound as well";
  if (p.band && p.lower_offset > 0) return "band tasks have lower_offset <= 0";
  // The sliding-window mask came with cuDNN 9.2 (cudnn-frontend's sliding_window_length).
  if (p.band && cudnn_version() < 90200) return "cuDNN's sliding-window mask needs cuDNN 9.2 or later";
  return "";
}

std::string cudnn_sdpa_backward_unsupported_reason(const CudnnSdpaProblem& p) {
  std::string reason = cudnn_sdpa_unsupported_reason(p);
  if (!reason.empty()) return reason;
  if (p.band) return "the backward pass with a sliding window is not available";
  if (p.q_len == 1 && p.kv_len == 1) return "cuDNN's attention backward needs more than one query and key";
  // cuDNN up to 9.15.0 needs a padding mask in the backward graph unless kv_len is a multiple
  // of 128 (cudnn-frontend adds one there); such tasks run on the native kernels instead.
  if (cudnn_version() <= 91500 && p.kv_len % 128 != 0) {
    return "cuDNN " + std::to_string(cudnn_version()) + "'s attention backward needs kv_len % 128 == 0 (here " +
           std::to_string(p.kv_len) + ")";
  }
  return "";
}

CudnnSdpa::CudnnSdpa() {
  cudnnHandle_t h = nullptr;
  RINGATTN_CUDNN_CHECK(cudnnCreate(&h));
  handle_ = h;
}

CudnnSdpa::~CudnnSdpa() {
  plans_.clear();
  backward_plans_.clear();
  if (handle_ != nullptr) cudnnDestroy(static_cast<cudnnHandle_t>(handle_));
}

namespace {

// Builds one operation graph: tensors and operations are created in order, and every
// descriptor stays alive in the plan's `keep`. finish() runs the heuristics and keeps the
// first engine configuration whose execution plan finalises.
class GraphBuilder {
 public:
  explicit GraphBuilder(CudnnSdpa::Plan& plan) : plan_(plan) {}

  const Desc& tensor(std::int64_t uid, cudnnDataType_t type, std::vector<std::int64_t> dims,
                     std::vector<std::int64_t> strides, bool is_virtual, bool by_value = false) {
    Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const std::int64_t alignment = 16;
    const bool v = is_virtual, bv = by_value;
    t.set_type(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, static_cast<std::int64_t>(dims.size()), dims.data())
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, static_cast<std::int64_t>(strides.size()), strides.data())
        .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, alignment)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
    if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &bv);
    t.finalize();
    return keep(std::move(t));
  }
  // A virtual tensor with the given strides, or packed row-major ones.
  const Desc& virt(cudnnDataType_t type, std::vector<std::int64_t> dims, std::vector<std::int64_t> strides = {}) {
    if (strides.empty()) {
      strides.assign(dims.size(), 1);
      for (int i = static_cast<int>(dims.size()) - 2; i >= 0; --i) strides[i] = strides[i + 1] * dims[i + 1];
    }
    return tensor(next_virtual_++, type, dims, strides, true);
  }
  const Desc& scalar(std::int64_t uid, cudnnDataType_t type) {
    return tensor(uid, type, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t prec, const Desc& x, const Desc* b, const Desc& y,
                 const Desc* t = nullptr, std::int64_t axis = -1) {
    Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode).set_type(CUDNN_ATTR_POINTWISE_MATH_PREC, prec);
    if (axis >= 0) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.finalize();
    const Desc& pwd = keep(std::move(pw));
    Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pwd).set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, *b);
    if (t != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, *t);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y);
    add_op(std::move(op));
  }
  void reduction(cudnnReduceTensorOp_t mode, const Desc& x, const Desc& y) {
    Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &mode)
        .set_type(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .finalize();
    const Desc& rd = keep(std::move(red));
    Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, rd);
    add_op(std::move(op));
  }
  void matmul(const Desc& a, const Desc& b, const Desc& c) {
    Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm.set_type(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize();
    const Desc& mmd = keep(std::move(mm));
    Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mmd);
    add_op(std::move(op));
  }
  // A view of x with other dims / strides (the transposes of the backward graph).
  void reshape(const Desc& x, const Desc& y) {
    Desc op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x).set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y);
    add_op(std::move(op));
  }

  void finish(cudnnHandle_t handle) {
    Desc graph(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    graph.set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<std::int64_t>(ops_.size()),
              ops_.data())
        .set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
        .finalize();
    const Desc& graph_ref = keep(std::move(graph));

    Desc heur(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
    cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
    heur.set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, graph_ref)
        .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
        .finalize();
    std::int64_t n_cfg = 0;
    RINGATTN_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                  CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &n_cfg, nullptr));
    if (n_cfg <= 0) throw Error(ErrorCode::invalid_argument, "cuDNN found no engine for this attention graph");
    std::vector<Desc> cfgs;
    std::vector<cudnnBackendDescriptor_t> raw;
    for (std::int64_t i = 0; i < n_cfg; ++i) {
      cfgs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
      raw.push_back(cfgs.back().get());
    }
    std::int64_t got = 0;
    RINGATTN_CUDNN_CHECK(cudnnBackendGetAttribute(heur.get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                                  CUDNN_TYPE_BACKEND_DESCRIPTOR, n_cfg, &got, raw.data()));
    std::string last_error = "no engine configuration";
    for (std::int64_t i = 0; i < got; ++i) {
      auto candidate = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      cudnnBackendDescriptor_t cfg = raw[static_cast<std::size_t>(i)];
      candidate->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
          .set(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &cfg);
      const cudnnStatus_t st = cudnnBackendFinalize(candidate->get());
      if (st != CUDNN_STATUS_SUCCESS) {
        char detail[512] = {0};
        cudnnGetLastErrorString(detail, sizeof(detail));
        last_error = std::string(cudnnGetErrorString(st)) + (detail[0] != '\0' ? std::string(": ") + detail : "");
        continue;
      }
      std::int64_t ws = 0, ws_count = 0;
      RINGATTN_CUDNN_CHECK(cudnnBackendGetAttribute(candidate->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE,
                                                    CUDNN_TYPE_INT64, 1, &ws_count, &ws));
      plan_.workspace = ws;
      plan_.plan = std::move(candidate);
      for (Desc& c : cfgs) keep(std::move(c));
      return;
    }
    throw Error(ErrorCode::invalid_argument, "cuDNN cannot run this attention graph: " + last_error);
  }

 private:
  const Desc& keep(Desc d) {
    plan_.keep.push_back(std::move(d));
    return plan_.keep.back();
  }
  void add_op(Desc op) {
    op.finalize();
    ops_.push_back(keep(std::move(op)).get());
  }

  CudnnSdpa::Plan& plan_;
  std::int64_t next_virtual_ = kVirtualBase;
  std::vector<cudnnBackendDescriptor_t> ops_;
};

// The causal mask of both graphs: logits where row + diag_offset >= col, else -inf.
const Desc& causal_mask(GraphBuilder& g, CudnnSdpa::Plan& plan, const CudnnSdpaProblem& p, const Desc& logits) {
  const std::int64_t B = p.batch, H = p.heads, Sq = p.q_len, Skv = p.kv_len;
  plan.causal = true;
  const Desc& row = g.virt(CUDNN_DATA_INT32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, logits, nullptr, row, nullptr, 2);
  const Desc& col = g.virt(CUDNN_DATA_INT32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_INT32, logits, nullptr, col, nullptr, 3);
  const Desc* bound = &row;
  if (p.diag_offset != 0) {
    plan.offset = true;
    const Desc& off = g.scalar(kOffset, CUDNN_DATA_INT32);
    const Desc& shifted = g.virt(CUDNN_DATA_INT32, {B, H, Sq, Skv});
    g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_INT32, row, &off, shifted);
    bound = &shifted;
  }
  const Desc& keep_mask = g.virt(CUDNN_DATA_BOOLEAN, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, *bound, &col, keep_mask);
  const Desc& neg_inf = g.scalar(kNegInf, CUDNN_DATA_FLOAT);
  const Desc& masked = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, logits, &neg_inf, masked, &keep_mask);
  return masked;
}

// The lower edge of a band, after the causal mask: logits where col + window > row (window =
// 1 - lower_offset, so col >= row + lower_offset), else a large negative. This is the shape
// cudnn-frontend gives its sliding_window_length (a float window added to the column index,
// CMP_GT, BINARY_SELECT), which cuDNN's fused attention engine recognises.
const Desc& band_mask(GraphBuilder& g, CudnnSdpa::Plan& plan, const CudnnSdpaProblem& p, const Desc& logits) {
  const std::int64_t B = p.batch, H = p.heads, Sq = p.q_len, Skv = p.kv_len;
  plan.band = true;
  const Desc& row = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, logits, nullptr, row, nullptr, 2);
  const Desc& col = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, logits, nullptr, col, nullptr, 3);
  const Desc& window = g.scalar(kWindow, CUDNN_DATA_FLOAT);
  const Desc& shifted = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, col, &window, shifted, nullptr, 3);
  const Desc& keep_mask = g.virt(CUDNN_DATA_BOOLEAN, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_CMP_GT, CUDNN_DATA_BOOLEAN, shifted, &row, keep_mask);
  const Desc& fill = g.scalar(kWindowFill, CUDNN_DATA_FLOAT);
  const Desc& masked = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, logits, &fill, masked, &keep_mask);
  return masked;
}

}  // namespace

CudnnSdpa::Plan& CudnnSdpa::plan_for(const CudnnSdpaProblem& p) {
  auto it = plans_.find(p.key());
  if (it != plans_.end()) return *it->second;
  const std::string reason = cudnn_sdpa_unsupported_reason(p);
  if (!reason.empty()) throw Error(ErrorCode::invalid_argument, reason);

  auto plan = std::make_unique<Plan>();
  GraphBuilder g(*plan);
  const std::int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, Sq = p.q_len, Skv = p.kv_len, D = p.head_dim;
  const cudnnDataType_t io = to_cudnn(p.dtype);

  // Tensors in (b, h, s, d) order with the caller's strides; K enters transposed (b, h, d, s).
  const Desc& q = g.tensor(kQ, io, {B, H, Sq, D}, {p.q_batch_stride, p.q_head_stride, p.q_row_stride, 1}, false);
  const Desc& kt = g.tensor(kK, io, {B, Hk, D, Skv}, {p.kv_batch_stride, p.kv_head_stride, 1, p.kv_row_stride}, false);
  const Desc& v = g.tensor(kV, io, {B, Hk, Skv, D}, {p.kv_batch_stride, p.kv_head_stride, p.kv_row_stride, 1}, false);
  const Desc& o = g.tensor(kO, io, {B, H, Sq, D}, {p.o_batch_stride, p.o_head_stride, p.o_row_stride, 1}, false);
  const Desc& stats = g.tensor(kStats, CUDNN_DATA_FLOAT, {B, H, Sq, 1}, {H * Sq, Sq, 1, 1}, false);
  const Desc& scale = g.scalar(kScale, CUDNN_DATA_FLOAT);

  const Desc& s = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.matmul(q, kt, s);
  const Desc& s_scaled = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_MUL, CUDNN_DATA_FLOAT, s, &scale, s_scaled);
  const Desc* logits = p.causal ? &causal_mask(g, *plan, p, s_scaled) : &s_scaled;
  if (p.band) logits = &band_mask(g, *plan, p, *logits);
  // Softmax with statistics: LSE = max + log(sum exp(S - max)).
  const Desc& mx = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, 1});
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, *logits, mx);
  const Desc& centred = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_SUB, CUDNN_DATA_FLOAT, *logits, &mx, centred);
  const Desc& ex = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_EXP, CUDNN_DATA_FLOAT, centred, nullptr, ex);
  const Desc& sum = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, 1});
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, ex, sum);
  const Desc& log_sum = g.virt(CUDNN_DATA_FLOAT, {B, H, Sq, 1});
  g.pointwise(CUDNN_POINTWISE_LOG, CUDNN_DATA_FLOAT, sum, nullptr, log_sum);
  g.pointwise(CUDNN_POINTWISE_ADD, CUDNN_DATA_FLOAT, mx, &log_sum, stats);
  const Desc& prob = g.virt(io, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_DIV, CUDNN_DATA_FLOAT, ex, &sum, prob);
  g.matmul(prob, v, o);

  g.finish(static_cast<cudnnHandle_t>(handle_));
  grow(workspace_, static_cast<std::size_t>(plan->workspace));
  Plan& ref = *plan;
  plans_.emplace(p.key(), std::move(plan));
  return ref;
}

namespace {

// Runs a plan build; a refusal becomes false and its reason.
template <class Build>
bool try_build(Build&& build, std::string* why_not) {
  try {
    build();
    return true;
  } catch (const Error& e) {
    if (why_not != nullptr) *why_not = e.what();
    return false;
  }
}

}  // namespace

bool CudnnSdpa::try_prepare(const CudnnSdpaProblem& problem, std::string* why_not) {
  return try_build([&] { plan_for(problem); }, why_not);
}

void CudnnSdpa::forward(const CudnnSdpaProblem& problem, const void* q, const void* k, const void* v, void* o, float* lse,
                        float scale, cudaStream_t stream) {
  Plan& plan = plan_for(problem);  // built (and its scratch allocated) before the ring
  RINGATTN_CUDNN_CHECK(cudnnSetStream(static_cast<cudnnHandle_t>(handle_), stream));
  float scale_value = scale;
  float neg_inf = -std::numeric_limits<float>::infinity();
  std::int32_t offset = static_cast<std::int32_t>(problem.diag_offset);
  std::vector<std::int64_t> uids = {kQ, kK, kV, kO, kStats, kScale};
  std::vector<void*> ptrs = {const_cast<void*>(q), const_cast<void*>(k), const_cast<void*>(v), o, lse, &scale_value};
  if (plan.causal) {
    uids.push_back(kNegInf);
    ptrs.push_back(&neg_inf);
  }
  if (plan.offset) {
    uids.push_back(kOffset);
    ptrs.push_back(&offset);
  }
  float window = static_cast<float>(1 - problem.lower_offset);
  float window_fill = -1024.0f * 1024.0f * 1024.0f;
  if (plan.band) {
    uids.push_back(kWindow);
    ptrs.push_back(&window);
    uids.push_back(kWindowFill);
    ptrs.push_back(&window_fill);
  }
  execute(plan, uids, ptrs);
}

CudnnSdpa::Plan& CudnnSdpa::backward_plan_for(const CudnnSdpaProblem& p) {
  auto it = backward_plans_.find(p.key());
  if (it != backward_plans_.end()) return *it->second;
  const std::string reason = cudnn_sdpa_backward_unsupported_reason(p);
  if (!reason.empty()) throw Error(ErrorCode::invalid_argument, reason);

  // The graph cuDNN's fusion engine recognises as the attention backward (the one
  // cudnn-frontend's sdpa_backward builds on cuDNN 9.x): delta = rowsum(dO * O) into a
  // non-virtual fp32 tensor, P = exp(scale S - LSE) [masked], dV = P^T dO, dS = P (dO V^T -
  // delta) scale, dK = dS^T Q, dQ = dS K through a non-virtual fp32 accumulator. Transposes
  // are RESHAPEs to permuted strides; GQA computes dK, dV per query head (in the io dtype, as
  // cuDNN's own frontend does) and reduces.
  auto plan = std::make_unique<Plan>();
  GraphBuilder g(*plan);
  const std::int64_t B = p.batch, H = p.heads, Hk = p.kv_heads, Sq = p.q_len, Skv = p.kv_len, D = p.head_dim;
  const cudnnDataType_t io = to_cudnn(p.dtype);
  const cudnnDataType_t f32 = CUDNN_DATA_FLOAT;

  const Desc& q = g.tensor(kQ, io, {B, H, Sq, D}, {p.q_batch_stride, p.q_head_stride, p.q_row_stride, 1}, false);
  const Desc& kt = g.tensor(kK, io, {B, Hk, D, Skv}, {p.kv_batch_stride, p.kv_head_stride, 1, p.kv_row_stride}, false);
  const Desc& vt = g.tensor(kV, io, {B, Hk, D, Skv}, {p.kv_batch_stride, p.kv_head_stride, 1, p.kv_row_stride}, false);
  const Desc& o = g.tensor(kO, io, {B, H, Sq, D}, {p.o_batch_stride, p.o_head_stride, p.o_row_stride, 1}, false);
  const Desc& dout = g.tensor(kDout, io, {B, H, Sq, D}, {p.do_batch_stride, p.do_head_stride, p.do_row_stride, 1}, false);
  const Desc& stats = g.tensor(kStats, f32, {B, H, Sq, 1}, {H * Sq, Sq, 1, 1}, false);
  const cudnnDataType_t grad = io;  // fp32 here builds for MHA but computes wrong values (9.14)
  const Desc& dq = g.tensor(kDq, grad, {B, H, Sq, D}, {p.dq_batch_stride, p.dq_head_stride, p.dq_row_stride, 1}, false);
  const Desc& dk = g.tensor(kDk, grad, {B, Hk, Skv, D}, {p.dkv_batch_stride, p.dkv_head_stride, p.dkv_row_stride, 1}, false);
  const Desc& dv = g.tensor(kDv, grad, {B, Hk, Skv, D}, {p.dkv_batch_stride, p.dkv_head_stride, p.dkv_row_stride, 1}, false);
  const Desc& scale = g.scalar(kScale, f32);
  const Desc& one = g.scalar(kOne, f32);

  // delta = rowsum(dO * O)
  const Desc& prod = g.virt(f32, {B, H, Sq, D});
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dout, &o, prod);
  const Desc& rowsum = g.virt(f32, {B, H, Sq, 1});
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, prod, rowsum);
  const Desc& delta = g.tensor(kSoftmaxSum, f32, {B, H, Sq, 1}, {H * Sq, Sq, 1, 1}, false);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, rowsum, &one, delta);
  // P = exp(scale Q K^T - LSE), masked
  const Desc& s = g.virt(f32, {B, H, Sq, Skv});
  g.matmul(q, kt, s);
  const Desc& s_scaled = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_MUL, f32, s, &scale, s_scaled);
  const Desc& centred = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_SUB, f32, s_scaled, &stats, centred);
  const Desc* logits = p.causal ? &causal_mask(g, *plan, p, centred) : &centred;
  const Desc& prob = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_EXP, f32, *logits, nullptr, prob);
  const std::vector<std::int64_t> transposed = {H * Sq * Skv, Sq * Skv, 1, Skv};
  // dV = P^T dO (per query head, summed over each KV head's group under GQA)
  const Desc& prob_t = g.virt(io, {B, H, Skv, Sq}, transposed);
  g.reshape(prob, prob_t);
  if (Hk == H) {
    g.matmul(prob_t, dout, dv);
  } else {
    const Desc& dv_full = g.virt(io, {B, H, Skv, D});
    g.matmul(prob_t, dout, dv_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dv_full, dv);
  }
  // dS = P (dO V^T - delta) scale
  const Desc& dp = g.virt(f32, {B, H, Sq, Skv});
  g.matmul(dout, vt, dp);
  const Desc& dp_centred = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_SUB, f32, dp, &delta, dp_centred);
  const Desc& ds_unscaled = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dp_centred, &prob, ds_unscaled);
  const Desc& ds = g.virt(f32, {B, H, Sq, Skv});
  g.pointwise(CUDNN_POINTWISE_MUL, f32, ds_unscaled, &scale, ds);
  // dK = dS^T Q
  const Desc& ds_t = g.virt(io, {B, H, Skv, Sq}, transposed);
  g.reshape(ds, ds_t);
  if (Hk == H) {
    g.matmul(ds_t, q, dk);
  } else {
    const Desc& dk_full = g.virt(io, {B, H, Skv, D});
    g.matmul(ds_t, q, dk_full);
    g.reduction(CUDNN_REDUCE_TENSOR_ADD, dk_full, dk);
  }
  // dQ = dS K through the fp32 accumulator
  const Desc& k_rows = g.virt(f32, {B, Hk, Skv, D}, {p.kv_batch_stride, p.kv_head_stride, p.kv_row_stride, 1});
  g.reshape(kt, k_rows);
  const Desc& dq_acc = g.tensor(kDqAccum, f32, {B, H, Sq, D}, {H * Sq * D, Sq * D, D, 1}, false);
  g.matmul(ds, k_rows, dq_acc);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, f32, dq_acc, nullptr, dq);

  g.finish(static_cast<cudnnHandle_t>(handle_));
  const auto rows = static_cast<std::size_t>(B * H * Sq);
  grow(workspace_, static_cast<std::size_t>(plan->workspace));
  grow(delta_, rows * sizeof(float));
  grow(dq_accum_, rows * static_cast<std::size_t>(D) * sizeof(float));
  Plan& ref = *plan;
  backward_plans_.emplace(p.key(), std::move(plan));
  return ref;
}

bool CudnnSdpa::try_prepare_backward(const CudnnSdpaProblem& problem, std::string* why_not) {
  return try_build([&] { backward_plan_for(problem); }, why_not);
}

void CudnnSdpa::backward(const CudnnSdpaProblem& problem, const void* q, const void* k, const void* v, const void* o,
                         const void* dout, const float* lse, void* dq, void* dk, void* dv, float scale,
                         cudaStream_t stream) {
  Plan& plan = backward_plan_for(problem);  // built (and its scratch allocated) before the ring
  RINGATTN_CUDNN_CHECK(cudnnSetStream(static_cast<cudnnHandle_t>(handle_), stream));
  float scale_value = scale, one = 1.0f;
  float neg_inf = -std::numeric_limits<float>::infinity();
  std::int32_t offset = static_cast<std::int32_t>(problem.diag_offset);
  std::vector<std::int64_t> uids = {kQ, kK, kV, kO, kDout, kStats, kDq, kDk, kDv, kSoftmaxSum, kDqAccum, kScale, kOne};
  std::vector<void*> ptrs = {const_cast<void*>(q),    const_cast<void*>(k), const_cast<void*>(v),
                             const_cast<void*>(o),    const_cast<void*>(dout), const_cast<float*>(lse),
                             dq,                      dk,                    dv,
                             delta_.get(),            dq_accum_.get(),       &scale_value,
                             &one};
  if (plan.causal) {
    uids.push_back(kNegInf);
    ptrs.push_back(&neg_inf);
  }
  if (plan.offset) {
    uids.push_back(kOffset);
    ptrs.push_back(&offset);
  }
  execute(plan, uids, ptrs);
}

void CudnnSdpa::execute(const Plan& plan, const std::vector<std::int64_t>& uids, const std::vector<void*>& ptrs) {
  void* ws = workspace_.get();
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<std::int64_t>(uids.size()), uids.data())
      .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<std::int64_t>(ptrs.size()), ptrs.data())
      .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &ws)
      .finalize();
  RINGATTN_CUDNN_CHECK(cudnnBackendExecute(static_cast<cudnnHandle_t>(handle_), plan.plan->get(), pack.get()));
}

}  // namespace ringattn::detail
