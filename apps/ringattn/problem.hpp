// apps/ringattn/problem.hpp: the inputs of `run` and `verify`, generated or read from .npy.
#pragma once

#include <CLI/CLI.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/synthetic.hpp"
#include "io/npy.hpp"
#include "ringattn/ringattn.hpp"

namespace ringattn::cli {

// The flags shared by run and verify.
struct ProblemOptions {
  std::int64_t batch = 1;
  std::int64_t seq = 4096;
  std::int64_t heads = 8;
  std::int64_t kv_heads = 0;  // 0 = heads
  std::int64_t head_dim = 64;
  bool causal = false;
  std::string layout = "contiguous";
  std::string dtype = "auto";
  std::optional<double> scale;
  std::uint64_t seed = 42;
  std::string device = "cpu";
  std::string kernel = "auto";  // GPU block kernel: auto, cudnn or native
  std::string q_path, k_path, v_path;
  bool backward = false;    // also compute gradients (run, verify, bench)
  std::string attention = "softmax";   // softmax or linear
  std::string feature_map = "elu1";    // linear attention: elu1 or identity
  std::optional<double> decay;         // linear attention, causal: every head's decay
  std::int64_t window = -1;            // causal sliding window (-1: none)
  std::int64_t sinks = 0;              // attention sinks with a window
  double timeout = 300.0;              // bound on each wait for other ranks (ring transfers, host collectives), seconds
  int gpus = 0;                        // > 0: one process drives this many local GPUs (no mpirun)
  std::string dout_path;    // dO for --backward: a .npy shaped like q, or seeded values
  // Which shape flags the user gave explicitly (they must then agree with the files).
  bool explicit_batch = false, explicit_seq = false, explicit_heads = false, explicit_kv_heads = false,
       explicit_head_dim = false, explicit_device = false;
};

void add_problem_options(CLI::App& cmd, ProblemOptions& options);
// An integer flag's check with a readable message ("must be an integer >= 1, got '0'").
CLI::Validator at_least(std::int64_t minimum);
// A tolerance flag's check: a finite number >= 0 (NaN and negative values refused).
CLI::Validator non_negative_finite();
// After parsing: records which flags were given.
void note_explicit_options(const CLI::App& cmd, ProblemOptions& options);

// One rank's share of the problem: dense (B, S_local, H or H_kv, D) buffers of `dtype`.
struct Problem {
  std::int64_t batch = 1, seq = 1, heads = 1, kv_heads = 1, head_dim = 1;
  bool causal = false;
  LayoutKind layout = LayoutKind::contiguous;
  DType dtype = DType::f32;
  DeviceKind device = DeviceKind::cpu;
  KernelKind kernel = KernelKind::automatic;
  std::optional<double> scale;
  std::uint64_t seed = 42;
  bool from_files = false;
  bool batched_files = false;       // q.npy had a leading batch dimension
  io::NpyDType out_file_dtype = io::NpyDType::f4;
  std::vector<std::int64_t> positions;  // global position of each local row
  std::vector<unsigned char> q, k, v;
  std::vector<unsigned char> dout;  // with --backward: (B, S_local, H, D)
  bool backward = false;
  AttentionKind attention = AttentionKind::softmax;
  FeatureMap feature_map = FeatureMap::elu1;
  std::vector<double> decay;  // empty, or one value for every head
  std::int64_t window = -1, sinks = 0;
  double timeout = 300.0;
  int gpus = 0;  // > 0: the whole problem on this process, computed on that many local GPUs

  std::int64_t local_len() const { return static_cast<std::int64_t>(positions.size()); }
  double flops() const;  // 4*B*S^2*H*D, halved when causal; linear attention: 4*B*S*H*D^2
  AttentionOptions attention_options() const;
  TensorView q_view();
  TensorView k_view();
  TensorView v_view();
};

// Collective: agrees on the options across ranks, then builds this rank's shard. Every
// failure is agreed, so all ranks throw the same Error.
Problem load_problem(Context& ctx, const ProblemOptions& options);

// The tensors forward() sees: the host buffers themselves (cpu), or copies on this rank's GPU
// (cuda), uploaded at construction; download() brings O and LSE back into the host buffers.
// --gpus N: the whole problem (loaded by this one process) on N local GPUs, each holding its
// layout share; out (B, S, H, D) and lse (B, H, S) in the problem's order, and with
// problem.backward and `grads` the gradients (dense like q, k, v). Returns the seconds the
// GPUs took for each pass.
struct LocalGradients {
  std::vector<unsigned char> dq, dk, dv;
};
struct LocalGpuTimes {
  double forward_s = 0.0, backward_s = 0.0;
};
LocalGpuTimes run_on_local_gpus(const Problem& problem, std::vector<unsigned char>& out, std::vector<float>& lse,
                                LocalGradients* grads = nullptr);

class ProblemTensors {
 public:
  ProblemTensors(Context& ctx, Problem& problem, std::vector<unsigned char>& out, std::vector<float>& lse);
  ~ProblemTensors();
  ProblemTensors(const ProblemTensors&) = delete;
  ProblemTensors& operator=(const ProblemTensors&) = delete;
  void download();

  TensorView q, k, v, out, lse;

 private:
  struct Device;
  std::unique_ptr<Device> device_;
  std::vector<unsigned char>& host_out_;
  std::vector<float>& host_lse_;
};

// The backward pass's tensors: dO (from problem.dout) and dQ, dK, dV, on the host (cpu) or
// on this rank's GPU (cuda, dO uploaded at construction); download() brings the gradients
// into dq, dk, dv.
class GradientTensors {
 public:
  GradientTensors(Context& ctx, Problem& problem);
  ~GradientTensors();
  GradientTensors(const GradientTensors&) = delete;
  GradientTensors& operator=(const GradientTensors&) = delete;
  void download();

  std::vector<unsigned char> dq, dk, dv;  // host copies, dense like q, k, v
  TensorView dout_view, dq_view, dk_view, dv_view;

 private:
  struct Device;
  std::unique_ptr<Device> device_;
};

// Collective: throws the same Error on every rank if one of this rank's `values` (dense
// (B, S_local, heads, D) in the problem's dtype) is NaN or inf, naming the first; `what` names
// the tensor ("O", "dQ"). Inputs are checked when loaded, so such a value means an overflow.
void check_finite(Context& ctx, const Problem& p, const char* what, const std::vector<unsigned char>& values,
                  std::int64_t heads);
// The same for the (B, H, S_local) LSE: an infinite one means a row's largest score overflowed,
// even where the kernel still wrote a finite O.
void check_finite_lse(Context& ctx, const Problem& p, const std::vector<float>& lse);

// Collective: writes (B, S_local, H, D) `out` and (B, H, S_local) `lse` into natural-order
// .npy files (out in q's file dtype, or float32 for generated bf16 / fp32 and float16 for fp16).
void write_outputs(Context& ctx, const Problem& problem, const std::string& out_path, const std::string& lse_path,
                   const std::vector<unsigned char>& out, const std::vector<float>& lse);

// The whole sequence's K and V as fp32 values as stored, (B, S, H_kv, D) each, for references.
void load_full_kv(Context& ctx, const Problem& problem, const ProblemOptions& options, std::vector<float>& k,
                  std::vector<float>& v);
// The whole sequence of a query-shaped input (q or dout), (B, S, H, D) fp32 as stored.
std::vector<float> load_full_rows(Context& ctx, const Problem& problem, detail::SyntheticTensor which,
                                  const std::string& path);

// Collective: writes dq (q's file shape and dtype) and dk, dv (k's) in natural order; empty
// paths are skipped.
void write_gradients(Context& ctx, const Problem& problem, const std::string& dq_path, const std::string& dk_path,
                     const std::string& dv_path, const std::vector<unsigned char>& dq,
                     const std::vector<unsigned char>& dk, const std::vector<unsigned char>& dv);

// For agree_fingerprint: a string's fingerprint (FNV-1a, 63 bits), and how a field whose
// values are such fingerprints shows in the error ("(a different value)").
std::int64_t hash_string(const std::string& s);
std::string show_other(std::int64_t);

}  // namespace ringattn::cli
