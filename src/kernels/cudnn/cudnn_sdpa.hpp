// kernels/cudnn/cudnn_sdpa.hpp: cuDNN's fused flash attention (forward) for one plan task,
// through cuDNN's graph (backend descriptor) API.
//
// The graph is the one cuDNN's runtime fusion engine recognises as scaled-dot-product
// attention: S = Q K^T (fp32), S *= scale, [causal: S = (row + diag_offset >= col) ? S : -inf
// from two GEN_INDEX ops], [band: S = (col + 1 - lower_offset > row) ? S : -2^30], softmax with statistics (max, exp, sum, log: LSE = max + log(sum),
// fp32), P = exp / sum in the 16-bit dtype, O = P V. Execution plans are built once per
// problem key (shape, strides, mask, dtype) and cached; the workspace grows once and is
// reused.
//
// Layouts: q (B, q_len, H, D), k and v (B, kv_len, H_kv, D) with unit head-dim stride and the
// given batch/row/head strides; o (B, q_len, H, D) in the input dtype with its own strides;
// lse (B, H, q_len) fp32, packed.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "core/cuda_raii.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

struct CudnnSdpaProblem {
  DType dtype = DType::bf16;
  std::int64_t batch = 1, heads = 1, kv_heads = 1, q_len = 0, kv_len = 0, head_dim = 0;
  std::int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  std::int64_t kv_batch_stride = 0, kv_row_stride = 0, kv_head_stride = 0;
  std::int64_t o_batch_stride = 0, o_row_stride = 0, o_head_stride = 0;
  bool causal = false;
  std::int64_t diag_offset = 0;  // causal: row i sees key l iff l <= i + diag_offset
  bool band = false;             // with causal: row i also needs l >= i + lower_offset (<= 0)
  std::int64_t lower_offset = 0;
  // Backward only: dO (like q), dQ (like q), dK and dV (like k) strides; o is then an input.
  std::int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  std::int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  std::int64_t dkv_batch_stride = 0, dkv_row_stride = 0, dkv_head_stride = 0;

  auto key() const {
    return std::make_tuple(static_cast<int>(dtype), batch, heads, kv_heads, q_len, kv_len, head_dim, q_batch_stride,
                           q_row_stride, q_head_stride, kv_batch_stride, kv_row_stride, kv_head_stride, o_batch_stride,
                           o_row_stride, o_head_stride, causal, diag_offset, band, lower_offset,
                           std::make_tuple(do_batch_stride, do_row_stride, do_head_stride, dq_batch_stride, dq_row_stride,
                                           dq_head_stride, dkv_batch_stride, dkv_row_stride, dkv_head_stride));
  }
};

// The library's cuDNN version (cudnnGetVersion), 0 when built without cuDNN.
std::int64_t cudnn_version();

// Why cuDNN cannot run the problem here, or "" when it can try (the plan may still be refused
// by cuDNN at build time: see CudnnSdpa::forward).
std::string cudnn_sdpa_unsupported_reason(const CudnnSdpaProblem& problem);

// The same for the backward graph (stricter: see the .cpp).
std::string cudnn_sdpa_backward_unsupported_reason(const CudnnSdpaProblem& problem);

class CudnnSdpa {
 public:
  CudnnSdpa();
  ~CudnnSdpa();
  CudnnSdpa(const CudnnSdpa&) = delete;
  CudnnSdpa& operator=(const CudnnSdpa&) = delete;

  // Builds (once per problem key) and runs the graph on `stream`. Throws Error on a cuDNN
  // failure, with cuDNN's message.
  void forward(const CudnnSdpaProblem& problem, const void* q, const void* k, const void* v, void* o, float* lse,
               float scale, cudaStream_t stream);

  // Whether a plan for the problem can be built (builds and caches it; no execution).
  bool try_prepare(const CudnnSdpaProblem& problem, std::string* why_not = nullptr);

  // The backward pass of one task: dq (q's shape), dk, dv (k's shape) in the io dtype, written
  // (not added), from q, k, v, o, dout and lse (B, H, q_len) fp32 packed, the forward's
  // natural-log LSE. Only io-dtype gradients are offered: measured on cuDNN 9.14, the graph's
  // fp32 dQ accumulator does not hold dQ after a run, a graph with fp32 dq/dk/dv outputs builds
  // for MHA but computes wrong values, and with GQA it is refused.
  void backward(const CudnnSdpaProblem& problem, const void* q, const void* k, const void* v, const void* o,
                const void* dout, const float* lse, void* dq, void* dk, void* dv, float scale, cudaStream_t stream);
  bool try_prepare_backward(const CudnnSdpaProblem& problem, std::string* why_not = nullptr);

  struct Plan;

 private:
  Plan& plan_for(const CudnnSdpaProblem& problem);
  Plan& backward_plan_for(const CudnnSdpaProblem& problem);
  void execute(const Plan& plan, const std::vector<std::int64_t>& uids, const std::vector<void*>& ptrs);

  void* handle_ = nullptr;  // cudnnHandle_t
  std::map<decltype(CudnnSdpaProblem{}.key()), std::unique_ptr<Plan>> plans_;
  std::map<decltype(CudnnSdpaProblem{}.key()), std::unique_ptr<Plan>> backward_plans_;
  DeviceBuffer workspace_;
  DeviceBuffer delta_;     // the backward graph's rowsum(dO * O), fp32
  DeviceBuffer dq_accum_;  // its fp32 dQ accumulator
};

}  // namespace ringattn::detail
