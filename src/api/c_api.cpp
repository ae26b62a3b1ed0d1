// The C API (ringattn/ringattn.h) over the C++ API: converts views and options, and turns
// every exception into a status with the message kept per thread.
#include "ringattn/ringattn.h"

#include <cmath>
#include <exception>
#include <new>
#include <string>

#include "api/prepared_forward.hpp"
#include "comm/agreement.hpp"
#include "ringattn/ringattn.hpp"

struct ringattn_context {
  ringattn::Context ctx;
};

namespace {

thread_local std::string last_error;

ringattn_status status_of(ringattn::ErrorCode code) {
  using ringattn::ErrorCode;
  switch (code) {
    case ErrorCode::invalid_argument: return RINGATTN_ERR_INVALID_ARGUMENT;
    case ErrorCode::mismatch: return RINGATTN_ERR_MISMATCH;
    case ErrorCode::io: return RINGATTN_ERR_IO;
    case ErrorCode::mpi: return RINGATTN_ERR_MPI;
    case ErrorCode::cuda: return RINGATTN_ERR_CUDA;
    case ErrorCode::nccl: return RINGATTN_ERR_NCCL;
    case ErrorCode::out_of_memory: return RINGATTN_ERR_OUT_OF_MEMORY;
    case ErrorCode::timeout: return RINGATTN_ERR_TIMEOUT;
    case ErrorCode::internal: return RINGATTN_ERR_INTERNAL;
  }
  return RINGATTN_ERR_INTERNAL;
}

// Runs fn, mapping what it throws to a status and this thread's message.
template <class Fn>
ringattn_status guarded(Fn&& fn) {
  try {
    fn();
    last_error.clear();
    return RINGATTN_OK;
  } catch (const ringattn::Error& e) {
    last_error = e.what();
    return status_of(e.code());
  } catch (const std::bad_alloc&) {
    last_error = "out of host memory";
    return RINGATTN_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& e) {
    last_error = e.what();
    return RINGATTN_ERR_INTERNAL;
  } catch (...) {
    last_error = "unknown failure";
    return RINGATTN_ERR_INTERNAL;
  }
}

[[noreturn]] void invalid(const std::string& message) {
  throw ringattn::Error(ringattn::ErrorCode::invalid_argument, message);
}

// A NULL pointer (for an optional tensor) becomes a view with no data.
ringattn::TensorView view(const ringattn_tensor* t, const char* name, bool optional = false) {
  ringattn::TensorView v;
  if (t == nullptr) {
    if (!optional) invalid(std::string(name) + ": NULL tensor");
    return v;
  }
  if (t->ndim < 0 || t->ndim > 4) invalid(std::string(name) + ": ndim must be 0..4, got " + std::to_string(t->ndim));
  if (t->dtype < RINGATTN_F32 || t->dtype > RINGATTN_BF16) invalid(std::string(name) + ": unknown dtype");
  if (t->device != RINGATTN_CPU && t->device != RINGATTN_CUDA) invalid(std::string(name) + ": unknown device");
  v.data = t->data;
  v.dtype = static_cast<ringattn::DType>(t->dtype);
  v.device = static_cast<ringattn::DeviceKind>(t->device);
  v.device_index = t->device_index;
  v.ndim = t->ndim;
  for (int d = 0; d < t->ndim; ++d) {
    v.shape[static_cast<std::size_t>(d)] = t->shape[d];
    v.strides[static_cast<std::size_t>(d)] = t->strides[d];
  }
  return v;
}

// The bound on the call's first agreement, before the options are checked (NULL: the
// default; a bad value means no bound here, and the agreed checks then refuse it).
double timeout_of(const ringattn_options* o) {
  return o == nullptr ? ringattn::AttentionOptions{}.timeout_s : o->timeout_s;
}

ringattn::AttentionOptions options_of(const ringattn_options* o) {
  ringattn::AttentionOptions a;
  if (o == nullptr) return a;
  if (o->initialized != RINGATTN_OPTIONS_INITIALIZED) {
    invalid("options: not from ringattn_options_init (fill a struct it initialised; a zeroed one would mean window 0)");
  }
  if (o->causal != 0 && o->causal != 1) invalid("options: causal must be 0 or 1, got " + std::to_string(o->causal));
  if (o->layout < RINGATTN_CONTIGUOUS || o->layout > RINGATTN_STRIPED) invalid("options: unknown layout");
  if (o->kernel < RINGATTN_KERNEL_AUTO || o->kernel > RINGATTN_KERNEL_NATIVE) invalid("options: unknown kernel");
  a.causal = o->causal == 1;
  if (o->scale > 0.0 || std::isnan(o->scale)) a.scale = o->scale;  // NaN is refused, not the default
  a.layout = static_cast<ringattn::LayoutKind>(o->layout);
  a.kernel = static_cast<ringattn::KernelKind>(o->kernel);
  a.seq_len = o->seq_len;
  a.timeout_s = o->timeout_s;
  a.window = o->window;
  a.sinks = o->sinks;
  return a;
}

}  // namespace

extern "C" {

void ringattn_options_init(ringattn_options* o) {
  if (o == nullptr) return;
  const ringattn::AttentionOptions d;
  o->initialized = RINGATTN_OPTIONS_INITIALIZED;
  o->causal = 0;
  o->scale = 0.0;
  o->layout = RINGATTN_CONTIGUOUS;
  o->kernel = RINGATTN_KERNEL_AUTO;
  o->seq_len = 0;
  o->timeout_s = d.timeout_s;
  o->window = d.window;
  o->sinks = d.sinks;
}

ringattn_tensor ringattn_tensor_contiguous(void* data, ringattn_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                                           int64_t d3) {
  ringattn_tensor t{};
  t.data = data;
  t.dtype = dtype;
  t.device = RINGATTN_CPU;
  t.ndim = 4;
  const int64_t shape[4] = {d0, d1, d2, d3};
  int64_t stride = 1;
  for (int d = 3; d >= 0; --d) {
    t.shape[d] = shape[d];
    t.strides[d] = stride;
    stride *= shape[d];
  }
  return t;
}

ringattn_status ringattn_context_create(MPI_Comm comm, void* nccl_comm, void* cuda_stream, ringattn_context** out) {
  return guarded([&] {
    if (out == nullptr) invalid("ringattn_context_create: out is NULL");
    *out = nullptr;
    ringattn::ContextOptions options;
    options.nccl_comm = nccl_comm;
    options.cuda_stream = cuda_stream;
    *out = new ringattn_context{ringattn::Context(comm, options)};
  });
}

void ringattn_context_destroy(ringattn_context* ctx) { delete ctx; }

ringattn_status ringattn_forward(ringattn_context* ctx, const ringattn_tensor* q, const ringattn_tensor* k,
                                 const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                 const ringattn_options* options) {
  return guarded([&] {
    if (ctx == nullptr) invalid("ringattn_forward: NULL context");
    // Converted under agreement: a bad struct on one rank must fail every rank, not leave the
    // others waiting in forward()'s collectives.
    ringattn::TensorView tq, tk, tv, tout, tlse;
    ringattn::AttentionOptions opts;
    ringattn::detail::check_usable(ctx->ctx);
    ringattn::detail::bounded_call(ctx->ctx, timeout_of(options), [&] {
      ringattn::detail::agree_on(ctx->ctx.comm(), [&] {
        tq = view(q, "q"), tk = view(k, "k"), tv = view(v, "v"), tout = view(out, "out"), tlse = view(lse, "lse", true);
        opts = options_of(options);
      });
    });
    ringattn::forward(ctx->ctx, tq, tk, tv, tout, tlse, opts);
  });
}

ringattn_status ringattn_backward(ringattn_context* ctx, const ringattn_tensor* q, const ringattn_tensor* k,
                                  const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                  const ringattn_tensor* dout, const ringattn_tensor* dq, const ringattn_tensor* dk,
                                  const ringattn_tensor* dv, const ringattn_options* options) {
  return guarded([&] {
    if (ctx == nullptr) invalid("ringattn_backward: NULL context");
    ringattn::TensorView t[9];
    ringattn::AttentionOptions opts;
    ringattn::detail::check_usable(ctx->ctx);  // as in ringattn_forward
    ringattn::detail::bounded_call(ctx->ctx, timeout_of(options), [&] {
      ringattn::detail::agree_on(ctx->ctx.comm(), [&] {
        t[0] = view(q, "q"), t[1] = view(k, "k"), t[2] = view(v, "v"), t[3] = view(out, "out"), t[4] = view(lse, "lse");
        t[5] = view(dout, "dout"), t[6] = view(dq, "dq"), t[7] = view(dk, "dk"), t[8] = view(dv, "dv");
        opts = options_of(options);
      });
    });
    ringattn::backward(ctx->ctx, t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], opts);
  });
}

const char* ringattn_last_error(void) { return last_error.c_str(); }

const char* ringattn_status_string(ringattn_status status) {
  switch (status) {
    case RINGATTN_OK: return "ok";
    case RINGATTN_ERR_INVALID_ARGUMENT: return "invalid argument";
    case RINGATTN_ERR_MISMATCH: return "ranks disagree";
    case RINGATTN_ERR_IO: return "i/o error";
    case RINGATTN_ERR_MPI: return "MPI error";
    case RINGATTN_ERR_CUDA: return "CUDA error";
    case RINGATTN_ERR_NCCL: return "NCCL error";
    case RINGATTN_ERR_OUT_OF_MEMORY: return "out of memory";
    case RINGATTN_ERR_TIMEOUT: return "timeout";
    case RINGATTN_ERR_INTERNAL: return "internal error";
  }
  return "unknown status";
}

}  // extern "C"
