// kernels/cuda/cuda_kernels.hpp: host entry points of the CUDA kernels (no CUDA types but
// cudaStream_t, so host .cpp files can call them).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/flash_fwd_params.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// Head dims the native kernel is instantiated for.
bool flash_fwd_supports(DType dtype, std::int64_t head_dim);

// Runs one task (see FlashFwdParams) on `stream`. dtype: f16 or bf16.
void flash_fwd(const FlashFwdParams& params, DType dtype, std::int64_t head_dim, cudaStream_t stream);

// lse[i] = -inf for n entries: the running state before the first block.
void fill_neg_inf(float* lse, std::int64_t n, cudaStream_t stream);

// Copies a strided (B, S, Hh, D) tensor into a dense (B, S, Hh, D) buffer of the same dtype.
void pack_rows(const TensorView& src, void* dst, cudaStream_t stream);

// out (B, S, H, D) in out.dtype with out's strides <- o_acc (B, H, S, D) fp32;
// lse (B, H, S) with lse's strides <- lse_acc (B, H, S), when lse.data is set.
void finalize_output(const float* o_acc, const float* lse_acc, const TensorView& out, const TensorView& lse,
                     cudaStream_t stream);

}  // namespace ringattn::detail
