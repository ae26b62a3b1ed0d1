// kernels/cuda/cuda_kernels.hpp: host entry points of the CUDA kernels (no CUDA types but
// cudaStream_t, so host .cpp files can call them).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "kernels/cuda/flash_bwd_params.hpp"
#include "kernels/cuda/flash_fwd_params.hpp"
#include "plan/ring_plan.hpp"
#include "ringattn/tensor.hpp"

namespace ringattn::detail {

// A plan task's rows, offsets and mask into a native kernel's arguments (FlashFwdParams or
// FlashBwdParams, whose task fields share their names).
template <class Params>
void set_task_fields(Params& p, const BlockTask& t) {
  p.q_begin = static_cast<int>(t.q_begin);
  p.q_len = static_cast<int>(t.q_len);
  p.kv_begin = static_cast<int>(t.kv_begin);
  p.kv_len = static_cast<int>(t.kv_len);
  p.causal = t.mask != MaskKind::full;
  p.diag_offset = static_cast<int>(t.diag_offset);
  p.band = t.mask == MaskKind::band;
  p.lower_offset = static_cast<int>(t.lower_offset);
}

// The native flash forward kernels: mma.sync (sm_80 and later) and wgmma (sm_90a: H100,
// H200). wgmma_ws: the warp-specialised wgmma kernel (TMA producer warp, intra-warpgroup
// overlap; flash_fwd_sm90_ws.cuh) where TMA can describe the tensors, else the wgmma kernel
// (wgmma_fused, a backward kernel, means wgmma_ws for the forward). automatic picks
// wgmma_ws where the current device and the build allow it, else mma.sync
// (RINGATTN_NATIVE_KERNEL overrides it for A/B runs).
enum class FlashKernel { automatic, mma_sync, wgmma, wgmma_ws, wgmma_fused };
const char* to_string(FlashKernel kernel);

// Head dims the native kernels are instantiated for.
bool flash_fwd_supports(DType dtype, std::int64_t head_dim);

// Whether the wgmma kernel can run on the current device (compute capability 9.0 and a build
// with sm_90a code).
bool flash_fwd_wgmma_available();

// What `automatic` resolves to on the current device.
FlashKernel flash_fwd_resolve(FlashKernel kernel);

// --kernel auto's choice for one forward task between the native kernel and cuDNN's fused
// attention, from rates measured side by side (docs/PERFORMANCE.md, twenty-first session;
// B=1, H=32, bf16). `merged`: the task's result joins a running state (a ring, or sinks), where
// the native kernel merges in its epilogue and cuDNN's result needs a merge pass after it;
// otherwise the task is the rank's only one and writes the output.
//   - Head dim 128, the only task (one H200, cuDNN 9.14, MHA and GQA 32/8): the
//     warp-specialised kernel runs 1.04-1.10x cuDNN from 8k rows up, level at 4k, 0.89-0.94x
//     below: native from kFlashFwdAutoNativeRows query rows and keys.
//   - Head dim 128, merged (one rank's share of 2- and 8-rank rings, H100): native 1.07-1.46x
//     on every task size measured (256 to 64k rows): always native.
//   - Head dim 64, the only task: cuDNN 1.05-1.17x at every length: cuDNN. Merged: native
//     1.01-1.7x on tasks of up to 2048 query rows (0.99-1.07x at 2048); from 4096 rows level
//     to cuDNN 1.09x ahead: native up to kFlashFwdAutoNative64Rows query rows (whatever the
//     keys: a zigzag ring's task reads one or two chunks of them).
//   - Band tasks (sliding windows; measured at --window 4096, head dim 128, one task,
//     1.09-1.11x): as above where the band is at least kFlashFwdAutoNativeRows keys wide (a
//     band is W + 1 keys for a causal window, 2W + 1 two-sided: causal W >= 4095, two-sided
//     W >= 2048; two-sided windows were measured at W = 4096 only); narrower bands are not
//     measured and stay with cuDNN where it takes them.
// Measured in bf16 with B = 1 and H = 32, MHA (the one-task rule also GQA 32/8); applied to
// fp16, GQA and batches as well (the same kernels).
// Only where automatic resolves to the warp-specialised kernel (H100/H200 and a build with
// sm_90a code). (Where TMA cannot describe q, k or v, flash_fwd runs the plain wgmma kernel
// instead, ~0.75x cuDNN: q views whose rows are not 16-byte aligned, which attention inputs
// practically never are.)
constexpr std::int64_t kFlashFwdAutoNativeRows = 4096;
constexpr std::int64_t kFlashFwdAutoNative64Rows = 2048;  // the most query rows, head dim 64
bool flash_fwd_auto_prefers_native(std::int64_t head_dim, const BlockTask& task, bool merged);

// Runs one task (see FlashFwdParams) on `stream`. dtype: f16 or bf16. Throws when the chosen
// kernel cannot run here.
void flash_fwd(const FlashFwdParams& params, DType dtype, std::int64_t head_dim, cudaStream_t stream,
               FlashKernel kernel = FlashKernel::automatic);

// The warp-specialised kernel's split of query tiles over key-tile shares (flash_fwd_sm90_ws.cuh,
// "The last wave": a full-mask launch's last wave, every tile of a launch on at most half of
// the SMs): the bytes of FlashFwdParams::split_buf for `slots` parts at head_dim (the
// counts included), the slots the ring engine gives it (two per SM of the current device), and
// the split of a launch of `units` query tiles of `key_tiles` key tiles each on `sms` SMs:
// {CTAs per split tile (1: none), how many of the last tiles split} (exposed for tests).
std::size_t flash_fwd_split_bytes(std::int64_t head_dim, int slots);
int flash_fwd_split_slots();
std::pair<int, int> flash_fwd_split(const FlashFwdParams& params, int units, int key_tiles, int sms);

// Folds one block result into the running state (see kernels/cpu/merge.hpp for the rule):
// rows q_begin .. q_begin + q_len of o_acc (B, H, s_q, D) fp32 and lse (B, H, s_q) take
// o_b (B, q_len, H, D, dense, dtype f16 or bf16) and lse_b (B, H, q_len) fp32.
void merge_block_result(float* o_acc, float* lse, std::int64_t s_q, std::int64_t q_begin, std::int64_t q_len,
                        std::int64_t batch, std::int64_t heads, std::int64_t head_dim, const void* o_b, DType dtype,
                        const float* lse_b, cudaStream_t stream);

// lse[i] = -inf for n entries: the running state before the first block.
void fill_neg_inf(float* lse, std::int64_t n, cudaStream_t stream);

// Copies a strided (B, S, Hh, D) tensor into a dense (B, S, Hh, D) buffer of the same dtype.
void pack_rows(const TensorView& src, void* dst, cudaStream_t stream);

// out (B, S, H, D) in out.dtype with out's strides <- o_acc (B, H, S, D) fp32, plus `add`
// (same layout as o_acc) in rows add_row0 .. add_row0 + add_rows when add is set (one fp32
// add before the rounding: a ring step's own dK/dV sums joining the arrived ones);
// lse (B, H, S) with lse's strides <- lse_acc (B, H, S), when lse.data is set.
// A row window: o_acc and add of acc_rows rows (B, H, acc_rows, D), out's S rows their rows
// acc_row0 .. acc_row0 + S (add_row0 in the accumulator's rows); not with lse.
void finalize_output(const float* o_acc, const float* lse_acc, const TensorView& out, const TensorView& lse,
                     cudaStream_t stream, const float* add = nullptr, std::int64_t add_row0 = 0,
                     std::int64_t add_rows = 0, std::int64_t acc_rows = 0, std::int64_t acc_row0 = 0);

// The native flash backward of one task (see FlashBwdParams): adds the task's share of dQ
// (part dq), of dK and dV (part dkv), or of all three to the fp32 accumulators. The parts
// are separate launches so that the ring can compute dQ while dK/dV accumulators travel.
// dtype: f16 or bf16; head dims as the forward kernels. kernel:
//  - mma_sync (flash_bwd_kernel.cuh), any sm_80+ GPU;
//  - wgmma (flash_bwd_sm90.cuh): the warp-specialised TMA pair (a dq and a dkv kernel, 7
//    matmuls), sm_90a; wgmma_ws means the same;
//  - wgmma_fused (flash_bwd_fused_sm90.cuh): one kernel of 5 matmuls adding dQ through ordered
//    TMA reduce-adds, sm_90a, part both (head dims 64 and 128) with params.dq_sem set; other
//    launches run the wgmma pair.
// Tensors TMA cannot describe fall back to mma_sync. automatic is wgmma_fused where the device
// and the build allow it, else mma_sync (RINGATTN_NATIVE_BWD_KERNEL=mma_sync|wgmma|wgmma_fused
// overrides it for A/B runs). Every kernel is deterministic (bitwise-repeatable gradients).
enum class FlashBwdPart { dq, dkv, both };
void flash_bwd(const FlashBwdParams& params, DType dtype, std::int64_t head_dim, cudaStream_t stream,
               FlashBwdPart part = FlashBwdPart::both, FlashKernel kernel = FlashKernel::automatic);

// What the backward's `automatic` resolves to on the current device (mma_sync, wgmma or
// wgmma_fused).
FlashKernel flash_bwd_resolve(FlashKernel kernel);

// Whether the wgmma backward can take these tensors (TMA: 16-byte aligned, strides multiples
// of 8 elements); flash_bwd falls back to mma_sync where not.
bool flash_bwd_wgmma_supports(const FlashBwdParams& params);
// Whether a both-parts launch with kernel wgmma_fused runs the single-pass kernel (else the pair).
bool flash_bwd_fused_supports(const FlashBwdParams& params);

// The words of FlashBwdParams::dq_sem (dQ semaphores, a ticket counter, the split blocks' counts) the single-pass
// kernel needs for a launch with these batch, heads and q_len: allocate at least this many
// for the largest task.
std::int64_t flash_bwd_semaphores(const FlashBwdParams& params);
// How many KV heads' key blocks the single-pass kernel interleaves in its launch order for
// this task (flash_bwd_fused_sm90.cuh, "the head chunk"): exposed for tests.
int flash_bwd_head_chunk(const FlashBwdParams& params);
// The single-pass kernel's tail split of a launch of `units` key blocks of `q_tiles` query tiles
// each on `sms` SMs: {CTAs per split block (1: none), how many of the last blocks split}.
std::pair<int, int> flash_bwd_split(const FlashBwdParams& params, int units, int q_tiles, int sms);

// Before the backward ring: delta = rowsum(dO * O) and lse2 = LSE * log2(e) (+inf where LSE
// is -inf), both (B, H, S) dense fp32. out, dout: (B, S, H, D) f16 or bf16; lse (B, H, S).
void backward_prep(const TensorView& out, const TensorView& dout, const TensorView& lse, float* lse2, float* delta,
                   cudaStream_t stream);

// acc (B, heads, acc_rows, D) fp32, rows row0 .. row0 + n, += src (B, heads, n, D) of
// src_dtype with element strides {batch, head, row} (unit head-dim stride).
void accumulate_rows(float* acc, std::int64_t acc_rows, std::int64_t row0, const void* src, DType src_dtype,
                     std::int64_t batch, std::int64_t heads, std::int64_t n, std::int64_t head_dim,
                     const std::int64_t (&src_strides)[3], cudaStream_t stream);

// dst (B, H, n) fp32 packed <- rows row0 .. row0 + n of lse (B, H, S) with lse's strides.
void gather_lse(const TensorView& lse, std::int64_t row0, std::int64_t n, float* dst, cudaStream_t stream);

}  // namespace ringattn::detail
