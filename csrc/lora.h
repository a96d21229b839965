// LoRA-branch kernels of the fused LoRA linear (SPEC 3.1, "graph split"), torch-free. The large GEMMs x W^T and dy W
// stay with cuBLAS (called from Python); these kernels do the rank-r work around them:
//
//   shrink       u  = scale * drop(x) A^T                      (M, r) fp32, split-K with deterministic partials
//   expand       out = bias + scale * keep (.) (u P^T)         (M, C) in the activation dtype, written once; cuBLAS
//                                                              then accumulates the base GEMM into it (beta = 1)
//   backward_dy  du = scale * dy B  and  dB = dy^T u[:, f:]    one read of dy for both
//   grad_a       dA = scale * du[:, f:]^T drop(x)              split-M with deterministic partials
//   dropout_mask the keep mask of a forward, regenerated (for tests)
//
// Operands are addressed with explicit strides so that A (r, K) and B (N, r) serve both as the row-dot operand
// P(c, j) = p[c * p_stride_c + j * p_stride_j] of the panel kernel and as the expand operand. Dropout keeps element
// (m, c) of the logical (M, K) input with the Philox stream of device_utils.cuh keyed by a device {seed, offset}
// pair, so neither the mask nor the dropped activations are ever stored.
#pragma once

#include <cstdint>

#include "common.h"

namespace treelora {

// Everything the dropout stream needs; seed_offset == nullptr (or keep_threshold == 1 << 24) means no dropout.
struct LoraDropout {
  const int64_t* seed_offset;
  uint32_t keep_threshold;
};

// fp32 elements of workspace the panel kernels need for an (M, C) input with `r_row` row-dot outputs per row and
// `r_col` column-sum outputs per column (0 when that part is not computed), on a device with `num_sms` SMs.
int64_t lora_panel_workspace_size(int64_t M, int64_t C, int64_t r_row, int64_t r_col, int64_t num_sms);

// u (M, r) fp32 contiguous = scale * drop(x) A^T. x: (M, K) with row stride ldx (elements, column stride 1).
void lora_shrink(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, const void* a, DType a_dtype,
                 int64_t a_stride_k, int64_t a_stride_j, int64_t r, float scale, LoraDropout dropout, float* workspace,
                 float* u, int64_t num_sms, cudaStream_t stream, const char* entry);

// du (M, r) fp32 contiguous = scale * dy B (skipped when du == nullptr) and dB (N, r_t) = dy^T u[:, f:f + r_t] in
// db_dtype with row stride r_t (skipped when db == nullptr). u: (M, ldu) fp32. One pass over dy.
void lora_backward_dy(const void* dy, DType dy_dtype, int64_t lddy, int64_t M, int64_t N, const void* b, DType b_dtype,
                      int64_t b_stride_n, int64_t b_stride_j, int64_t r, float scale, float* du, const float* u,
                      int64_t ldu, int64_t f, int64_t r_t, void* db, DType db_dtype, float* workspace,
                      int64_t num_sms, cudaStream_t stream, const char* entry);

// dA (r_t, K) in da_dtype, row stride K = scale * du[:, f:f + r_t]^T drop(x). du: (M, ldu) fp32.
void lora_grad_a(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, const float* du, int64_t ldu,
                 int64_t f, int64_t r_t, float scale, LoraDropout dropout, void* da, DType da_dtype,
                 float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry);

// out (M, C) row stride ldo, out_dtype = bias[c] + scale * keep(m, c) * sum_j u[m, j] P(c, j); u (M, ldu) fp32,
// P(c, j) = p[c * p_stride_c + j * p_stride_j], j < r; bias may be null; keep applies only with dropout.
void lora_expand(const float* u, int64_t ldu, int64_t M, int64_t C, int64_t r, const void* p, DType p_dtype,
                 int64_t p_stride_c, int64_t p_stride_j, const void* bias, DType bias_dtype, float scale,
                 LoraDropout dropout, void* out, DType out_dtype, int64_t ldo, cudaStream_t stream, const char* entry);

// keep (M, C) uint8 contiguous: the dropout decisions lora_shrink / lora_expand / lora_grad_a make for these
// parameters.
void lora_dropout_mask(LoraDropout dropout, int64_t M, int64_t C, uint8_t* keep, cudaStream_t stream,
                       const char* entry);

}  // namespace treelora
