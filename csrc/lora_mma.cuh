// Tensor-core primitives of the LoRA kernels (lora.cu): ldmatrix, mma.sync m16n8k16 with fp32 accumulators, 16-byte
// shared-memory stores, and the XOR-swizzled shared-memory tile layout that keeps all three free of bank conflicts.
//
// Under nvcc every primitive is one PTX instruction, the same for sm_80 and sm_90a (HMMA.16816.F32[.BF16] and LDSM in
// the SASS of both). Under the CUDA emulator (tests/cuda_emulator defines TREELORA_CUDA_EMULATOR) each one calls the
// emulator, which gathers the operands of the warp's 32 lanes and hands every lane its part with the per-thread
// fragment layouts of the PTX ISA (below): a kernel that indexes a fragment wrongly computes a wrong result there too.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), lane = 4 g + t:
//   A (16 x 16, row-major), four .b32 registers of two elements each, the lower column in the low half:
//     a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, "col": stored n-major), two registers:  b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C / D (16 x 8, fp32): c0 = C[g][2t]  c1 = C[g][2t+1]  c2 = C[g+8][2t]  c3 = C[g+8][2t+1]
// ldmatrix.x4 loads four 8 x 8 matrices of 16-bit elements; lanes 8i .. 8i+7 give the addresses of matrix i's rows
// (16 bytes each) and register i of lane 4g + t receives row g, elements 2t and 2t+1 of matrix i (.trans: rows 2t and
// 2t+1 of column g). The four fragment loaders below arrange the matrices so that a tile stored either way round
// (A or its transpose, B or its transpose) yields the A and B fragments above.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace treelora {
namespace tc {

// --- shared-memory tile layout -----------------------------------------------------------------------------------

// A tile of 16-bit elements stored as rows of kChunks 16-byte chunks (8 elements each), chunk c of row r at uint4
// index swizzle<kChunks>(r, c). The XOR spreads any 8 consecutive rows' chunk c over the 8 distinct 16-byte groups of
// the 32 banks: an ldmatrix (8 rows x 16 bytes per matrix) and the 16-byte stores of 8 consecutive lanes writing
// consecutive chunks of a row-major walk each take one shared-memory wavefront.
//   kChunks >= 8: chunk ^ (r mod 8)      (rows of 128 bytes or more: 8 rows share a bank offset)
//   kChunks = 4:  chunk ^ ((r / 2) mod 4) (2 rows fill the 128 bytes of the banks)
//   kChunks = 2:  chunk ^ ((r / 4) mod 2)
//   kChunks = 1:  no swizzle (8 consecutive rows are 8 distinct 16-byte groups)
template <int kChunks>
__host__ __device__ __forceinline__ int swizzle(int row, int chunk) {
  static_assert(kChunks == 1 || kChunks == 2 || kChunks == 4 || kChunks % 8 == 0, "unsupported row width");
  if constexpr (kChunks >= 8) {
    return row * kChunks + (chunk ^ (row & 7));
  } else {
    return row * kChunks + (chunk ^ ((row * kChunks / 8) % kChunks));
  }
}

// --- 16-bit element bits ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ uint32_t bits16(T v) {
  static_assert(sizeof(T) == 2, "16-bit element expected");
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

// Two elements packed as an MMA operand register: `lo` (the lower column / row index) in bits 0..15.
template <typename T>
__device__ __forceinline__ uint32_t pack2(T lo, T hi) {
  return bits16(lo) | (bits16(hi) << 16);
}

// --- instructions -------------------------------------------------------------------------------------------------

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 with this lane's row address (16-byte aligned, in shared memory).
template <bool kTrans>
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
#ifdef TREELORA_CUDA_EMULATOR
  ::emu::ptx_ldmatrix_x4(r, kTrans, row);
#else
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (kTrans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
  }
#endif
}

// d += A B with mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 (T is the operands' type).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef TREELORA_CUDA_EMULATOR
  const uint32_t b[2] = {b0, b1};
  ::emu::ptx_mma_m16n8k16(std::is_same_v<T, __nv_bfloat16>, d, a, b);
#else
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>, "mma_16816 takes bf16 or fp16 operands");
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#endif
}

// A 16-byte store to shared memory (st.shared.v4.b32). Warp-collective under the emulator, which counts the store's
// bank conflicts (every lane of the warp must execute it; out-of-range data is stored as zeros, never skipped).
__device__ __forceinline__ void sts128(uint4* dst, const uint4& v) {
#ifdef TREELORA_CUDA_EMULATOR
  ::emu::ptx_st_shared_16B(dst, &v);
#else
  *dst = v;
#endif
}

// A 16-byte global store (st.global.v4.b32, one STG.E.128). Written as PTX because a uint4 assignment through a
// reinterpreted 16-bit pointer is sometimes split into four 32-bit stores by the compiler.
__device__ __forceinline__ void stg128(void* dst, const uint4& v) {
#ifdef TREELORA_CUDA_EMULATOR
  *static_cast<uint4*>(dst) = v;
#else
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(dst), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w));
#endif
}

// --- fragment loaders ---------------------------------------------------------------------------------------------
// `tile` is a swizzled tile (swizzle<kChunks>) of 16-bit elements; rows and columns are element indices, columns a
// multiple of 8.

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) & 31; }

// A fragment of the 16 x 16 block at (r0, k0) of a tile that stores A row-major (rows m, columns k).
template <int kChunks>
__device__ __forceinline__ void frag_a(uint32_t (&a)[4], const uint4* tile, int r0, int k0) {
  const int lane = lane_id();
  ldsm_x4<false>(a, tile + swizzle<kChunks>(r0 + (lane & 7) + ((lane >> 3) & 1) * 8, (k0 >> 3) + (lane >> 4)));
}

// A fragment of A[m0 .. m0+16][k0 .. k0+16] from a tile that stores A transposed (rows k, columns m).
template <int kChunks>
__device__ __forceinline__ void frag_a_trans(uint32_t (&a)[4], const uint4* tile, int m0, int k0) {
  const int lane = lane_id();
  ldsm_x4<true>(a, tile + swizzle<kChunks>(k0 + (lane & 7) + (lane >> 4) * 8, (m0 >> 3) + ((lane >> 3) & 1)));
}

// B fragments of two n8 tiles, B[k0 .. k0+16][n0 .. n0+16], from a tile that stores B n-major (rows n, columns k):
// b[0], b[1] for columns n0 .. n0+8 and b[2], b[3] for n0+8 .. n0+16.
template <int kChunks>
__device__ __forceinline__ void frag_b(uint32_t (&b)[4], const uint4* tile, int n0, int k0) {
  const int lane = lane_id(), i = lane >> 3;
  ldsm_x4<false>(b, tile + swizzle<kChunks>(n0 + (i >> 1) * 8 + (lane & 7), (k0 >> 3) + (i & 1)));
}

// The same two n8 tiles from a tile that stores B k-major (rows k, columns n).
template <int kChunks>
__device__ __forceinline__ void frag_b_trans(uint32_t (&b)[4], const uint4* tile, int n0, int k0) {
  const int lane = lane_id(), i = lane >> 3;
  ldsm_x4<true>(b, tile + swizzle<kChunks>(k0 + (i & 1) * 8 + (lane & 7), (n0 >> 3) + (i >> 1)));
}

}  // namespace tc
}  // namespace treelora
