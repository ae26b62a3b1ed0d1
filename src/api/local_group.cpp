#include "ringattn/local_group.hpp"

#include <cmath>
#include <exception>
#include <string>
#include <thread>

#include "api/prepared_forward.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "core/cuda_check.hpp"
#include "engine/cuda_resources.hpp"
#include "plan/ring_plan.hpp"
#endif

namespace ringattn {

#ifdef RINGATTN_HAVE_CUDA

LocalGroup::LocalGroup(const std::vector<int>& devices) : devices_(devices) {
  if (devices.empty()) throw Error(ErrorCode::invalid_argument, "a local group needs at least one GPU");
  const int count = detail::cuda_device_count();
  for (std::size_t i = 0; i < devices.size(); ++i) {
    if (devices[i] < 0 || devices[i] >= count) {
      throw Error(ErrorCode::invalid_argument, "local group: cuda:" + std::to_string(devices[i]) + " does not exist (" +
                                                   std::to_string(count) + " GPUs visible)");
    }
    for (std::size_t j = 0; j < i; ++j) {
      if (devices[j] == devices[i]) {
        throw Error(ErrorCode::invalid_argument, "local group: cuda:" + std::to_string(devices[i]) + " appears twice");
      }
    }
  }
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  RINGATTN_NCCL_CHECK(ncclCommInitAll(comms.data(), static_cast<int>(devices.size()), devices.data()));
  for (std::size_t i = 0; i < devices.size(); ++i) {
    try {
      resources_.push_back(std::make_unique<detail::CudaResources>(devices[i], comms[i]));
    } catch (...) {
      for (std::size_t j = i; j < comms.size(); ++j) ncclCommDestroy(comms[j]);  // not yet owned
      throw;
    }
  }
}

#else

LocalGroup::LocalGroup(const std::vector<int>& devices) : devices_(devices) {
  throw Error(ErrorCode::invalid_argument, "a local GPU group needs a build with the CUDA backend");
}

#endif

LocalGroup::~LocalGroup() = default;

detail::CudaResources& LocalGroup::resources(int member) { return *resources_.at(static_cast<std::size_t>(member)); }

void forward(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
             const std::vector<TensorView>& v, const std::vector<TensorView>& out, const std::vector<TensorView>& lse,
             const AttentionOptions& options) {
#ifdef RINGATTN_HAVE_CUDA
  using namespace detail;
  const int N = group.size();
  const auto n = static_cast<std::size_t>(N);
  if (q.size() != n || k.size() != n || v.size() != n || out.size() != n || lse.size() != n) {
    throw Error(ErrorCode::invalid_argument, "local group of " + std::to_string(N) +
                                                 " GPUs: pass one q, k, v, out and lse view per GPU");
  }
  // 1. Every member's tensors, then what the members must agree on.
  std::int64_t seq = 0;
  for (int i = 0; i < N; ++i) {
    const auto at = static_cast<std::size_t>(i);
    auto member_error = [&](const std::string& what) {
      throw Error(ErrorCode::invalid_argument, "GPU " + std::to_string(i) + " (cuda:" +
                                                   std::to_string(group.devices()[at]) + "): " + what);
    };
    try {
      validate_forward_inputs(q[at], k[at], v[at], out[at], lse[at], options);
    } catch (const Error& e) {
      member_error(e.what());
    }
    if (q[at].device != DeviceKind::cuda || q[at].device_index != group.devices()[at]) {
      member_error("q must be on cuda:" + std::to_string(group.devices()[at]) + ", the group's device " +
                   std::to_string(i));
    }
    for (int d : {0, 2, 3}) {
      if (q[at].shape[static_cast<std::size_t>(d)] != q[0].shape[static_cast<std::size_t>(d)] ||
          k[at].shape[static_cast<std::size_t>(d)] != k[0].shape[static_cast<std::size_t>(d)]) {
        member_error("q and k must have the same batch, heads and head_dim on every GPU");
      }
    }
    if (q[at].dtype != q[0].dtype) member_error("q must have the same dtype on every GPU");
    seq += q[at].shape[1];
  }
  if (options.seq_len > 0 && options.seq_len != seq) {
    throw Error(ErrorCode::invalid_argument, "seq_len " + std::to_string(options.seq_len) +
                                                 " differs from the sum of the GPUs' lengths " + std::to_string(seq));
  }
  const Layout layout(options.layout, seq, N);
  for (int i = 0; i < N; ++i) {
    if (q[static_cast<std::size_t>(i)].shape[1] != layout.local_length(i)) {
      throw Error(ErrorCode::invalid_argument,
                  "GPU " + std::to_string(i) + ": holds " + std::to_string(q[static_cast<std::size_t>(i)].shape[1]) +
                      " tokens but the " + to_string(options.layout) + " layout of " + std::to_string(seq) +
                      " tokens over " + std::to_string(N) + " GPUs gives it " + std::to_string(layout.local_length(i)));
    }
  }

  // 2. Plans and engines for every member, before any transfer.
  const TensorView& q0 = q[0];
  const AttentionShape shape{q0.shape[0], q0.shape[2], k[0].shape[2], q0.shape[3]};
  const float scale = static_cast<float>(options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q0.shape[3]))));
  std::vector<std::unique_ptr<CudaRingForward>> rings(n);
  std::vector<std::unique_ptr<CudaLinearAttention>> linears(n);
  for (int i = 0; i < N; ++i) {
    CudaResources& res = group.resources(i);
    const auto at = static_cast<std::size_t>(i);
    if (options.attention == AttentionKind::linear) {
      linears[at] = make_cuda_linear(res, linear_problem(shape, options), layout, i, q0.dtype, options);
    } else {
      rings[at] = std::make_unique<CudaRingForward>(res, plan_for(layout, options, i), shape, q0.dtype,
                                                    layout.local_length(i), layout.max_local_length(), options.kernel);
      rings[at]->set_timeout(options.timeout_s, {});
    }
  }

  // 3. One thread per GPU; each waits for its device. A failure is reported after all joined.
  std::vector<std::exception_ptr> errors(n);
  std::vector<std::thread> threads;
  for (int i = 0; i < N; ++i) {
    threads.emplace_back([&, i] {
      const auto at = static_cast<std::size_t>(i);
      try {
        CudaResources& res = group.resources(i);
        RINGATTN_CUDA_CHECK(cudaSetDevice(res.device()));
        // Start after the legacy default stream's work (plain cudaMemcpy of the inputs).
        CudaEvent inputs_ready;
        RINGATTN_CUDA_CHECK(cudaEventRecord(inputs_ready, cudaStreamLegacy));
        RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(res.compute_stream(), inputs_ready, 0));
        if (linears[at]) {
          linears[at]->run(q[at], k[at], v[at], out[at]);
          linears[at]->wait();  // bounded by options.timeout_s
        } else {
          rings[at]->run(q[at], k[at], v[at], out[at], lse[at], scale);
          rings[at]->wait();
        }
      } catch (...) {
        errors[at] = std::current_exception();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors) {
    if (e) std::rethrow_exception(e);
  }
#else
  (void)group, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)options;
  throw Error(ErrorCode::invalid_argument, "a local GPU group needs a build with the CUDA backend");
#endif
}

}  // namespace ringattn
