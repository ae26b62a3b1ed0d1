#include "ringattn/local_group.hpp"

#include <atomic>
#include <cmath>
#include <exception>
#include <functional>
#include <string>
#include <thread>

#include "api/prepared_forward.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#ifdef RINGATTN_HAVE_CUDA
#include "comm/loopback_transport.hpp"
#include "core/cuda_check.hpp"
#include "engine/cuda_resources.hpp"
#include "plan/ring_plan.hpp"
#endif

namespace ringattn {

#ifdef RINGATTN_HAVE_CUDA

LocalGroup::LocalGroup(const std::vector<int>& devices) : devices_(devices) {
  if (devices.empty()) throw Error(ErrorCode::invalid_argument, "a local group needs at least one GPU");
  const int count = detail::cuda_device_count();
  bool shared = false;
  for (std::size_t i = 0; i < devices.size(); ++i) {
    if (devices[i] < 0 || devices[i] >= count) {
      throw Error(ErrorCode::invalid_argument, "local group: cuda:" + std::to_string(devices[i]) + " does not exist (" +
                                                   std::to_string(count) + " GPUs visible)");
    }
    for (std::size_t j = 0; j < i; ++j) shared = shared || devices[j] == devices[i];
  }
  if (shared) {  // NCCL refuses two ranks on one device: device copies instead
    hub_ = std::make_shared<detail::LoopbackHub>(static_cast<int>(devices.size()));
    for (std::size_t i = 0; i < devices.size(); ++i) {
      resources_.push_back(std::make_unique<detail::CudaResources>(devices[i], hub_, static_cast<int>(i)));
    }
    return;
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

#ifdef RINGATTN_HAVE_CUDA
namespace {

using namespace detail;

// Every member's tensors (check(i) throws Error; rethrown naming the member), then what the
// members must agree on; returns the layout of the group.
Layout check_members(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
                     const AttentionOptions& options, const std::function<void(std::size_t)>& check) {
  const int N = group.size();
  std::int64_t seq = 0;
  for (int i = 0; i < N; ++i) {
    const auto at = static_cast<std::size_t>(i);
    auto member_error = [&](const std::string& what) {
      throw Error(ErrorCode::invalid_argument, "GPU " + std::to_string(i) + " (cuda:" +
                                                   std::to_string(group.devices()[at]) + "): " + what);
    };
    try {
      check(at);
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
  if (group.loopback() && N > 1) {
    if (options.attention == AttentionKind::linear) {
      throw Error(ErrorCode::invalid_argument, "linear attention needs NCCL's collectives: give the local group's "
                                               "members distinct GPUs");
    }
    if (options.window >= 0 && options.sinks > 0) {
      throw Error(ErrorCode::invalid_argument, "attention sinks need NCCL's broadcast: give the local group's members "
                                               "distinct GPUs");
    }
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
  return layout;
}

// body(i) on one thread per member, on the member's device, ordered after the legacy default
// stream's work (plain cudaMemcpy of the inputs). Returns when all have joined; rethrows the
// first failure (a loopback group's other members are woken from their waits for it).
void on_members(LocalGroup& group, const std::function<void(std::size_t)>& body) {
  const auto n = static_cast<std::size_t>(group.size());
  if (group.loopback() && group.loopback()->aborted()) {
    // Its hops may hold offers of the failed run: start over with a new group.
    throw Error(ErrorCode::internal, "local group: a member failed in an earlier call; create a new LocalGroup");
  }
  std::vector<std::exception_ptr> errors(n);
  std::atomic<int> first{-1};
  std::vector<std::thread> threads;
  for (std::size_t at = 0; at < n; ++at) {
    threads.emplace_back([&, at] {
      try {
        CudaResources& res = group.resources(static_cast<int>(at));
        RINGATTN_CUDA_CHECK(cudaSetDevice(res.device()));
        CudaEvent inputs_ready;
        RINGATTN_CUDA_CHECK(cudaEventRecord(inputs_ready, cudaStreamLegacy));
        RINGATTN_CUDA_CHECK(cudaStreamWaitEvent(res.compute_stream(), inputs_ready, 0));
        body(at);
      } catch (...) {
        errors[at] = std::current_exception();
        int none = -1;
        first.compare_exchange_strong(none, static_cast<int>(at));
        if (group.loopback()) group.loopback()->abort();
      }
    });
  }
  for (std::thread& t : threads) t.join();
  if (first.load() >= 0) std::rethrow_exception(errors[static_cast<std::size_t>(first.load())]);
}

AttentionShape shape_of(const std::vector<TensorView>& q, const std::vector<TensorView>& k) {
  return AttentionShape{q[0].shape[0], q[0].shape[2], k[0].shape[2], q[0].shape[3]};
}

float scale_of(const std::vector<TensorView>& q, const AttentionOptions& options) {
  return static_cast<float>(options.scale.value_or(1.0 / std::sqrt(static_cast<double>(q[0].shape[3]))));
}

}  // namespace
#endif

void forward(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
             const std::vector<TensorView>& v, const std::vector<TensorView>& out, const std::vector<TensorView>& lse,
             const AttentionOptions& options) {
#ifdef RINGATTN_HAVE_CUDA
  const int N = group.size();
  const auto n = static_cast<std::size_t>(N);
  if (q.size() != n || k.size() != n || v.size() != n || out.size() != n || lse.size() != n) {
    throw Error(ErrorCode::invalid_argument, "local group of " + std::to_string(N) +
                                                 " GPUs: pass one q, k, v, out and lse view per GPU");
  }
  // 1. Every member's tensors, then what the members must agree on.
  const Layout layout = check_members(group, q, k, options, [&](std::size_t at) {
    validate_forward_inputs(q[at], k[at], v[at], out[at], lse[at], options);
  });

  // 2. Plans and engines for every member, before any transfer.
  const AttentionShape shape = shape_of(q, k);
  const float scale = scale_of(q, options);
  std::vector<std::unique_ptr<CudaRingForward>> rings(n);
  std::vector<std::unique_ptr<CudaLinearAttention>> linears(n);
  for (int i = 0; i < N; ++i) {
    CudaResources& res = group.resources(i);
    const auto at = static_cast<std::size_t>(i);
    if (options.attention == AttentionKind::linear) {
      linears[at] = make_cuda_linear(res, linear_problem(shape, options), layout, i, q[0].dtype, options);
    } else {
      rings[at] = std::make_unique<CudaRingForward>(res, plan_for(layout, options, i), shape, q[0].dtype,
                                                    layout.local_length(i), layout.max_local_length(), options.kernel);
      rings[at]->set_timeout(options.timeout_s, {});
    }
  }

  // 3. One thread per GPU; each waits for its device (bounded by options.timeout_s).
  on_members(group, [&](std::size_t at) {
    if (linears[at]) {
      linears[at]->run(q[at], k[at], v[at], out[at]);
      linears[at]->wait();
    } else {
      rings[at]->run(q[at], k[at], v[at], out[at], lse[at], scale);
      rings[at]->wait();
    }
  });
#else
  (void)group, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)options;
  throw Error(ErrorCode::invalid_argument, "a local GPU group needs a build with the CUDA backend");
#endif
}

void backward(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
              const std::vector<TensorView>& v, const std::vector<TensorView>& out,
              const std::vector<TensorView>& lse, const std::vector<TensorView>& dout,
              const std::vector<TensorView>& dq, const std::vector<TensorView>& dk,
              const std::vector<TensorView>& dv, const AttentionOptions& options) {
#ifdef RINGATTN_HAVE_CUDA
  const int N = group.size();
  const auto n = static_cast<std::size_t>(N);
  for (const auto* views : {&q, &k, &v, &out, &lse, &dout, &dq, &dk, &dv}) {
    if (views->size() != n) {
      throw Error(ErrorCode::invalid_argument, "local group of " + std::to_string(N) +
                                                   " GPUs: pass one q, k, v, out, lse, dout, dq, dk and dv view per GPU");
    }
  }
  const Layout layout = check_members(group, q, k, options, [&](std::size_t at) {
    validate_backward_inputs(q[at], k[at], v[at], out[at], lse[at], dout[at], dq[at], dk[at], dv[at], options);
  });

  const AttentionShape shape = shape_of(q, k);
  const float scale = scale_of(q, options);
  std::vector<std::unique_ptr<CudaRingBackward>> rings(n);
  std::vector<std::unique_ptr<CudaLinearAttention>> linears(n);
  for (int i = 0; i < N; ++i) {
    CudaResources& res = group.resources(i);
    const auto at = static_cast<std::size_t>(i);
    if (options.attention == AttentionKind::linear) {
      linears[at] = make_cuda_linear(res, linear_problem(shape, options), layout, i, q[0].dtype, options);
      linears[at]->allocate_backward();
    } else {
      rings[at] = std::make_unique<CudaRingBackward>(res, plan_for(layout, options, i), shape, q[0].dtype,
                                                     layout.local_length(i), layout.max_local_length(), options.kernel);
      rings[at]->set_timeout(options.timeout_s, {});
    }
  }

  on_members(group, [&](std::size_t at) {
    if (linears[at]) {
      linears[at]->backward(q[at], k[at], v[at], out[at], dout[at], dq[at], dk[at], dv[at]);
      linears[at]->wait();
    } else {
      rings[at]->run(q[at], k[at], v[at], out[at], lse[at], dout[at], dq[at], dk[at], dv[at], scale);
      rings[at]->wait();
    }
  });
#else
  (void)group, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)dout, (void)dq, (void)dk, (void)dv,
      (void)options;
  throw Error(ErrorCode::invalid_argument, "a local GPU group needs a build with the CUDA backend");
#endif
}

}  // namespace ringattn
