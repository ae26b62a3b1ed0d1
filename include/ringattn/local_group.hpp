// ringattn/local_group.hpp: several GPUs of one machine driven by one process, no MPI.
//
// A LocalGroup opens N devices with one NCCL communicator each (ncclCommInitAll); forward()
// and backward() then run the same plans and kernels as the MPI ring, one host thread per
// GPU, device i in the role of rank i. Results are the same as `mpirun -np N` with one GPU
// per rank.
//
// Members may share a GPU (devices {0, 0}): NCCL refuses two ranks on one device, so such a
// group moves its ring hops by device copies instead (a loopback transport), with the same
// plans, kernels and results; it is meant for testing a ring's code paths on one GPU, not for
// speed. It cannot run what needs NCCL collectives: attention sinks and linear attention.
#pragma once

#include <memory>
#include <vector>

#include "ringattn/options.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn {

namespace detail {
class CudaResources;
class LoopbackHub;
}

class LocalGroup {
 public:
  // devices: the CUDA device of each member, in ring order (repeated devices: a loopback
  // group, see above). Throws Error where the build has no CUDA backend or a device does not
  // exist.
  explicit LocalGroup(const std::vector<int>& devices);
  ~LocalGroup();
  LocalGroup(const LocalGroup&) = delete;
  LocalGroup& operator=(const LocalGroup&) = delete;

  int size() const { return static_cast<int>(devices_.size()); }
  const std::vector<int>& devices() const { return devices_; }
  detail::CudaResources& resources(int member);
  // Members share a GPU: hops are device copies (nullptr: NCCL).
  const std::shared_ptr<detail::LoopbackHub>& loopback() const { return hub_; }

 private:
  std::vector<int> devices_;
  std::shared_ptr<detail::LoopbackHub> hub_;
  std::vector<std::unique_ptr<detail::CudaResources>> resources_;
};

// Attention over the group: member i's share of the sequence (options.layout over size()
// members) in q[i], k[i], v[i], on device devices()[i], with out[i] and lse[i] (lse may have
// no data; none for linear attention) like forward(Context&, ...). Checks every member's
// tensors first (one Error naming the member); returns when every device has finished.
void forward(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
             const std::vector<TensorView>& v, const std::vector<TensorView>& out, const std::vector<TensorView>& lse,
             const AttentionOptions& options = {});

// Gradients over the group, like backward(Context&, ...): member i's shards in q[i] .. dv[i],
// lse[i] from forward() with the same options (required). Returns when every device has
// finished.
void backward(LocalGroup& group, const std::vector<TensorView>& q, const std::vector<TensorView>& k,
              const std::vector<TensorView>& v, const std::vector<TensorView>& out,
              const std::vector<TensorView>& lse, const std::vector<TensorView>& dout,
              const std::vector<TensorView>& dq, const std::vector<TensorView>& dk,
              const std::vector<TensorView>& dv, const AttentionOptions& options = {});

}  // namespace ringattn
