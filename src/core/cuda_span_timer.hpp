// core/cuda_span_timer.hpp: timing events around the work one run enqueues on a stream,
// filed under integer tags: the GPU engines' breakdowns that `ringattn bench` prints. A run
// calls begin() (event 0, when enabled), wraps its work in span(tag, ...) and calls end()
// (the last event); once the stream has finished, total_ms() and for_each_span() read the
// elapsed times. Disabled, span() only runs the work. The events are reused from run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <vector>

#include "core/cuda_check.hpp"
#include "core/cuda_raii.hpp"

namespace ringattn::detail {

// One kind of transfer in a profiled run: how many, their time on the communication stream in
// all (from the moment the compute stream reached each one to its end), and the bytes received.
struct TransferProfile {
  int count = 0;
  double ms = 0.0;
  double bytes = 0.0;
  double gbps() const { return ms > 0.0 ? bytes / (ms * 1e-3) / 1e9 : 0.0; }
};

class CudaSpanTimer {
 public:
  void set_enabled(bool on) { enabled_ = on; }
  bool enabled() const { return enabled_; }

  void begin(cudaStream_t stream) {
    used_ = 0;
    spans_.clear();
    finished_ = false;
    if (enabled_) mark(stream);
  }
  template <class Fn>
  void span(int tag, cudaStream_t stream, Fn&& fn) {
    if (!enabled_) {
      fn();
      return;
    }
    const int from = mark(stream);
    fn();
    spans_.push_back({tag, from, mark(stream)});
  }
  void end(cudaStream_t stream) {
    if (!enabled_) return;
    mark(stream);
    finished_ = true;
  }

  // Whether the last run was timed from begin() to end() (a run that threw was not).
  bool finished() const { return finished_ && used_ >= 2; }
  double total_ms() const { return elapsed(0, used_ - 1); }
  template <class F>
  void for_each_span(F&& f) const {
    for (const Span& s : spans_) f(s.tag, elapsed(s.from, s.to));
  }
  // The spans filed under `tag` (count and time; the caller adds the bytes).
  TransferProfile tally(int tag) const {
    TransferProfile t;
    if (!finished()) return t;
    for (const Span& s : spans_) {
      if (s.tag != tag) continue;
      ++t.count;
      t.ms += elapsed(s.from, s.to);
    }
    return t;
  }

 private:
  struct Span {
    int tag, from, to;
  };
  int mark(cudaStream_t stream) {
    if (used_ >= static_cast<int>(events_.size())) events_.emplace_back(true);
    RINGATTN_CUDA_CHECK(cudaEventRecord(events_[static_cast<std::size_t>(used_)], stream));
    return used_++;
  }
  double elapsed(int from, int to) const {
    float ms = 0.0f;
    RINGATTN_CUDA_CHECK(
        cudaEventElapsedTime(&ms, events_[static_cast<std::size_t>(from)], events_[static_cast<std::size_t>(to)]));
    return static_cast<double>(ms);
  }

  bool enabled_ = false, finished_ = false;
  std::vector<CudaEvent> events_;
  int used_ = 0;
  std::vector<Span> spans_;
};

}  // namespace ringattn::detail
