// LoRA-branch kernels of the fused LoRA linear (SPEC 3.1, "graph split"), torch-free, on tensor cores (lora.cu). The
// large GEMMs x W^T and dy W stay with cuBLAS, called from Python, which adds each into the term these kernels write
// (beta = 1: cuBLAS reads it in its epilogue):
//
//   forward   u = scale * drop(x) A^T          (M, r) fp32, kept for the backward
//             T = bias + u B^T                 (M, N) in x's dtype; then y = T + x W^T
//   backward  du = scale * dy B                (M, r) fp32, in the workspace
//             dB = dy^T u[:, f:]               (N, r - f) in dB's dtype
//             dxT = keep * (du A) * inv_keep   (M, K) in x's dtype; then dx = dxT + dy W
//             dA = inv_keep * du[:, f:]^T (keep * x)   (r - f, K) in dA's dtype
//
// Rounding: every product is summed in fp32 and each output is rounded once, to its dtype. T and dxT are therefore
// rounded to the activation dtype before cuBLAS adds the base GEMM and rounds again: y = rnd(x W^T + rnd(T)) (two
// roundings, the extra one bounded by half an ulp of T). MMA operands are in the activation dtype (fp32 activations:
// three bf16 terms per value), see lora.cu.
//
// Dropout keeps element (m, c) of the logical (M, K) input with the Philox stream of device_utils.cuh keyed by a
// device {seed, offset} pair (one Philox4x32-10 draw per 4 elements), so neither the mask nor the dropped activations
// are ever stored. Frozen adapters: the first f rows of A / columns of B take part in T, du and dxT; dA and dB cover
// the trainable ranks f .. r only.
#pragma once

#include <cstdint>

#include "common.h"

namespace treelora {

// Everything the dropout stream needs; seed_offset == nullptr (or keep_threshold == 1 << 24) means no dropout.
struct LoraDropout {
  const int64_t* seed_offset;
  uint32_t keep_threshold;
};

// A strided matrix operand of a run-time dtype: element (i, j) at data[i * stride0 + j * stride1]. A is passed as
// (r, K) and B as (N, r).
struct LoraMatrix {
  const void* data;
  DType dtype;
  int64_t stride0, stride1;
};

// fp32 elements of workspace lora_forward needs (split-K partial sums of u; 0 when the batch alone fills the GPU).
int64_t lora_forward_workspace_size(int64_t M, int64_t K, int64_t N, int64_t r, DType x_dtype, int64_t num_sms);

// u (M, r) fp32 contiguous and T (M, N) in x's dtype with row stride ldt. x: (M, K) with row stride ldx (column
// stride 1); bias (N,) or null.
void lora_forward(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, int64_t N, int64_t r, LoraMatrix a,
                  LoraMatrix b, const void* bias, DType bias_dtype, float scale, LoraDropout dropout, float* u,
                  void* t, int64_t ldt, float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry);

// fp32 elements of workspace lora_backward needs for the outputs requested (du, partial sums, counters).
int64_t lora_backward_workspace_size(int64_t M, int64_t N, int64_t K, int64_t r, int64_t f, DType dtype, bool need_dx,
                                     bool need_da, bool need_db, int64_t num_sms);

// dxT (skipped when null), dA and dB (skipped when null) from dy (M, N) and x (M, K), both in `dtype`, and the
// forward's u (M, r) fp32 contiguous. dA: (r - f, K) row-major; dB: (N, r - f) row-major; dxT: row stride lddx.
void lora_backward(const void* dy, int64_t lddy, const void* x, int64_t ldx, DType dtype, int64_t M, int64_t N,
                   int64_t K, int64_t r, int64_t f, LoraMatrix a, LoraMatrix b, const float* u, float scale,
                   LoraDropout dropout, float inv_keep, void* dxt, int64_t lddx, void* da, DType da_dtype, void* db,
                   DType db_dtype, float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry);

// How lora_forward / lora_backward split a problem into blocks on a device with num_sms SMs (for the byte model of
// treelora/kernels/cuda/lora.py, which mirrors the planner and is checked against this).
struct LoraPlanInfo {
  int64_t rank_chunk, chunks, shrink_k_panels, expand_c_panels, dy_m_panels, dy_n_panels, x_m_panels;
  int64_t forward_workspace, backward_workspace, counters;
};
LoraPlanInfo lora_plan(int64_t M, int64_t K, int64_t N, int64_t r, int64_t f, DType dtype, int64_t num_sms,
                       bool need_dx, bool need_da, bool need_db);

// keep (M, C) uint8 contiguous: the dropout decisions lora_forward / lora_backward make for these parameters.
void lora_dropout_mask(LoraDropout dropout, int64_t M, int64_t C, uint8_t* keep, cudaStream_t stream,
                       const char* entry);

}  // namespace treelora
