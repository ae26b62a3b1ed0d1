/* The C API from C (this file is compiled as C, so ringattn.h must be valid C), under mpirun:
 * a causal forward pass on CPU tensors against a naive C reference, and errors as statuses:
 * a malformed tensor gives RINGATTN_ERR_INVALID_ARGUMENT with a message on every rank, a
 * NULL context likewise. Prints "c_api: ok" and exits 0, or names what failed. */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ringattn/ringattn.h"

enum { S = 61, H = 2, HKV = 1, D = 8 };

static float value(int which, int pos, int h, int d) { return (float)sin(0.37 * (which * 101 + pos * 7 + h * 3 + d)); }

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0, world = 1, failed = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  /* Contiguous layout: the first S % world ranks hold one token more. */
  const int base = S / world, extra = S % world;
  const int n = base + (rank < extra ? 1 : 0);
  const int begin = rank * base + (rank < extra ? rank : extra);
  float* q = malloc(sizeof(float) * n * H * D);
  float* k = malloc(sizeof(float) * n * HKV * D);
  float* v = malloc(sizeof(float) * n * HKV * D);
  float* out = malloc(sizeof(float) * n * H * D);
  float* lse = malloc(sizeof(float) * H * n);
  for (int i = 0; i < n; ++i)
    for (int d = 0; d < D; ++d) {
      for (int h = 0; h < H; ++h) q[(i * H + h) * D + d] = value(0, begin + i, h, d);
      k[i * D + d] = value(1, begin + i, 0, d);
      v[i * D + d] = value(2, begin + i, 0, d);
    }

  ringattn_context* ctx = NULL;
  ringattn_status st = ringattn_context_create(MPI_COMM_WORLD, NULL, NULL, &ctx);
  if (st != RINGATTN_OK) {
    fprintf(stderr, "context: %s: %s\n", ringattn_status_string(st), ringattn_last_error());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  ringattn_options opt;
  ringattn_options_init(&opt);
  opt.causal = 1;
  ringattn_tensor tq = ringattn_tensor_contiguous(q, RINGATTN_F32, 1, n, H, D);
  ringattn_tensor tk = ringattn_tensor_contiguous(k, RINGATTN_F32, 1, n, HKV, D);
  ringattn_tensor tv = ringattn_tensor_contiguous(v, RINGATTN_F32, 1, n, HKV, D);
  ringattn_tensor to = ringattn_tensor_contiguous(out, RINGATTN_F32, 1, n, H, D);
  ringattn_tensor tl = ringattn_tensor_contiguous(lse, RINGATTN_F32, 1, H, n, 1);
  tl.ndim = 3;
  st = ringattn_forward(ctx, &tq, &tk, &tv, &to, &tl, &opt);
  if (st != RINGATTN_OK) {
    fprintf(stderr, "rank %d: forward: %s: %s\n", rank, ringattn_status_string(st), ringattn_last_error());
    failed = 1;
  } else {
    /* Naive causal softmax attention in double for this rank's rows. */
    double worst = 0.0;
    for (int i = 0; i < n; ++i) {
      const int p = begin + i;
      for (int h = 0; h < H; ++h) {
        double s[S], mx = -INFINITY, sum = 0.0, o[D] = {0};
        for (int t = 0; t <= p; ++t) {
          double dot = 0.0;
          for (int d = 0; d < D; ++d) dot += (double)q[(i * H + h) * D + d] * value(1, t, 0, d);
          s[t] = dot / sqrt((double)D);
          if (s[t] > mx) mx = s[t];
        }
        for (int t = 0; t <= p; ++t) sum += (s[t] = exp(s[t] - mx));
        for (int t = 0; t <= p; ++t)
          for (int d = 0; d < D; ++d) o[d] += s[t] / sum * value(2, t, 0, d);
        for (int d = 0; d < D; ++d) {
          const double e = fabs(o[d] - out[(i * H + h) * D + d]);
          if (e > worst) worst = e;
        }
        const double e = fabs(mx + log(sum) - lse[h * n + i]);
        if (e > worst) worst = e;
      }
    }
    if (!(worst < 1e-5)) {
      fprintf(stderr, "rank %d: forward: max error %g\n", rank, worst);
      failed = 1;
    }
  }

  /* A 3-D q: every rank must return the same invalid-argument status with a message. */
  ringattn_tensor bad = tq;
  bad.ndim = 3;
  st = ringattn_forward(ctx, &bad, &tk, &tv, &to, NULL, &opt);
  int lo = st, hi = st;
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (st != RINGATTN_ERR_INVALID_ARGUMENT || lo != hi || strlen(ringattn_last_error()) == 0) {
    fprintf(stderr, "rank %d: bad q: status %d (%s), message '%s'\n", rank, (int)st, ringattn_status_string(st),
            ringattn_last_error());
    failed = 1;
  }
  /* A malformed struct on the last rank only: every rank returns the same status (the others
     waited forever in forward()'s collectives). */
  ringattn_tensor odd = tq;
  if (rank == world - 1) odd.ndim = 5;
  st = ringattn_forward(ctx, &odd, &tk, &tv, &to, NULL, &opt);
  lo = st, hi = st;
  MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (st != RINGATTN_ERR_INVALID_ARGUMENT || lo != hi) {
    fprintf(stderr, "rank %d: ndim 5 on one rank: status %d (%s)\n", rank, (int)st, ringattn_last_error());
    failed = 1;
  }
  /* A NaN scale is refused (only a scale <= 0 means the default); so is one fp32 cannot hold. */
  ringattn_options bad_scale = opt;
  bad_scale.scale = NAN;
  if (ringattn_forward(ctx, &tq, &tk, &tv, &to, NULL, &bad_scale) != RINGATTN_ERR_INVALID_ARGUMENT) {
    fprintf(stderr, "rank %d: NaN scale accepted\n", rank);
    failed = 1;
  }
  bad_scale.scale = 1e300;
  if (ringattn_forward(ctx, &tq, &tk, &tv, &to, NULL, &bad_scale) != RINGATTN_ERR_INVALID_ARGUMENT) {
    fprintf(stderr, "rank %d: scale 1e300 accepted\n", rank);
    failed = 1;
  }
  /* A zeroed struct (window 0: each query would see only itself) is refused, not run; so is
   * a causal flag other than 0 or 1. */
  ringattn_options zeroed;
  memset(&zeroed, 0, sizeof zeroed);
  st = ringattn_forward(ctx, &tq, &tk, &tv, &to, NULL, &zeroed);
  if (st != RINGATTN_ERR_INVALID_ARGUMENT || strstr(ringattn_last_error(), "ringattn_options_init") == NULL) {
    fprintf(stderr, "rank %d: zeroed options: status %d (%s)\n", rank, (int)st, ringattn_last_error());
    failed = 1;
  }
  ringattn_options causal2 = opt;
  causal2.causal = 2;
  if (ringattn_forward(ctx, &tq, &tk, &tv, &to, NULL, &causal2) != RINGATTN_ERR_INVALID_ARGUMENT) {
    fprintf(stderr, "rank %d: causal = 2 accepted\n", rank);
    failed = 1;
  }
  if (ringattn_forward(NULL, &tq, &tk, &tv, &to, NULL, &opt) != RINGATTN_ERR_INVALID_ARGUMENT) {
    fprintf(stderr, "rank %d: NULL context accepted\n", rank);
    failed = 1;
  }
  ringattn_context_destroy(ctx);

  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (rank == 0) printf(failed ? "c_api: FAILED\n" : "c_api: ok\n");
  free(q);
  free(k);
  free(v);
  free(out);
  free(lse);
  MPI_Finalize();
  return failed;
}
