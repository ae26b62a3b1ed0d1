/* ringattn/ringattn.h: the C API. A thin layer over the C++ API (ringattn.hpp) for programs
 * and language bindings that cannot use C++. Every function returns a status: no C++
 * exception crosses it, and the library never exits or aborts. On failure,
 * ringattn_last_error() holds the message for the calling thread. Errors that stem from one
 * rank's inputs are agreed across ranks first, so every rank returns the same status and
 * message.
 *
 *   ringattn_context* ctx;
 *   ringattn_context_create(MPI_COMM_WORLD, NULL, NULL, &ctx);  // borrows, never frees, comm
 *   ringattn_options opt;
 *   ringattn_options_init(&opt);
 *   opt.causal = 1;
 *   ringattn_tensor q = ringattn_tensor_contiguous(q_ptr, RINGATTN_BF16, b, s_local, h, d);
 *   ...
 *   if (ringattn_forward(ctx, &q, &k, &v, &out, &lse, &opt) != RINGATTN_OK)
 *     fprintf(stderr, "%s\n", ringattn_last_error());
 *   ringattn_context_destroy(ctx);
 */
#ifndef RINGATTN_RINGATTN_H
#define RINGATTN_RINGATTN_H

#include <mpi.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  RINGATTN_OK = 0,
  RINGATTN_ERR_INVALID_ARGUMENT = 1, /* a tensor, option or file the caller got wrong */
  RINGATTN_ERR_MISMATCH = 2,         /* ranks disagree on shapes or options */
  RINGATTN_ERR_IO = 3,
  RINGATTN_ERR_MPI = 4,
  RINGATTN_ERR_CUDA = 5,
  RINGATTN_ERR_NCCL = 6,
  RINGATTN_ERR_OUT_OF_MEMORY = 7,
  RINGATTN_ERR_TIMEOUT = 8, /* a wait for other ranks exceeded options.timeout_s */
  RINGATTN_ERR_INTERNAL = 9
} ringattn_status;

typedef enum { RINGATTN_F32 = 0, RINGATTN_F16 = 1, RINGATTN_BF16 = 2 } ringattn_dtype;
typedef enum { RINGATTN_CPU = 0, RINGATTN_CUDA = 1 } ringattn_device;
typedef enum { RINGATTN_CONTIGUOUS = 0, RINGATTN_ZIGZAG = 1, RINGATTN_STRIPED = 2 } ringattn_layout;
typedef enum { RINGATTN_KERNEL_AUTO = 0, RINGATTN_KERNEL_CUDNN = 1, RINGATTN_KERNEL_NATIVE = 2 } ringattn_kernel;

/* A non-owning view: up to 4 dimensions, strides in elements (innermost stride 1). Shapes as
 * in the C++ API: q, out (B, S_local, H, D); k, v (B, S_local, H_kv, D); lse (B, H, S_local). */
typedef struct {
  void* data;
  ringattn_dtype dtype;
  ringattn_device device;
  int device_index;
  int ndim;
  int64_t shape[4];
  int64_t strides[4];
} ringattn_tensor;

/* Stamped into ringattn_options.initialized by ringattn_options_init. */
#define RINGATTN_OPTIONS_INITIALIZED 0x52414f31u

typedef struct {
  /* Set by ringattn_options_init, which every options struct must come from: a struct filled
   * in by hand or zeroed (where window 0 would mean "each query sees only itself") is refused
   * with RINGATTN_ERR_INVALID_ARGUMENT. NULL options mean the defaults. */
  unsigned int initialized;
  int causal;            /* 0 or 1 */
  double scale;          /* <= 0: 1 / sqrt(head_dim); NaN or above 2.36e38: an error */
  ringattn_layout layout;
  ringattn_kernel kernel;
  int64_t seq_len;       /* 0: the sum of the ranks' local lengths */
  double timeout_s;      /* bound on each wait for other ranks (ring and agreements), seconds; 0: none */
  int64_t window;        /* sliding window (causal, or two-sided when causal = 0); -1: none */
  int64_t sinks;         /* attention sinks with a window */
} ringattn_options;

typedef struct ringattn_context ringattn_context;

/* Defaults: non-causal, default scale, contiguous, auto kernel, timeout 300 s, no window. */
void ringattn_options_init(ringattn_options* options);

/* A dense row-major 4-D view on the CPU; set .device / .device_index for GPU memory. */
ringattn_tensor ringattn_tensor_contiguous(void* data, ringattn_dtype dtype, int64_t d0, int64_t d1, int64_t d2,
                                           int64_t d3);

/* Collective over comm. nccl_comm (an ncclComm_t over the same ranks) and cuda_stream (a
 * cudaStream_t) may be NULL; when given they are borrowed and never destroyed (with
 * RINGATTN_NCCL_REGISTER=1 the GPU ring registers its buffers with nccl_comm, which must then
 * outlive the context; see ringattn::ContextOptions). */
ringattn_status ringattn_context_create(MPI_Comm comm, void* nccl_comm, void* cuda_stream, ringattn_context** out);
void ringattn_context_destroy(ringattn_context* ctx);

/* Collective. lse may be NULL. */
ringattn_status ringattn_forward(ringattn_context* ctx, const ringattn_tensor* q, const ringattn_tensor* k,
                                 const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                 const ringattn_options* options);
/* Collective. Gradients of sum(out * dout); lse from ringattn_forward with the same options. */
ringattn_status ringattn_backward(ringattn_context* ctx, const ringattn_tensor* q, const ringattn_tensor* k,
                                  const ringattn_tensor* v, const ringattn_tensor* out, const ringattn_tensor* lse,
                                  const ringattn_tensor* dout, const ringattn_tensor* dq, const ringattn_tensor* dk,
                                  const ringattn_tensor* dv, const ringattn_options* options);

/* The message of this thread's last failure ("" when none). Valid until the next call. */
const char* ringattn_last_error(void);
const char* ringattn_status_string(ringattn_status status);

#ifdef __cplusplus
}
#endif

#endif /* RINGATTN_RINGATTN_H */
