// LoRA-branch kernels on tensor cores: see lora.h for the contract and docs/cuda_lora_design.md for the byte and launch
// model that chose this design (cuBLAS keeps the two base GEMMs; these kernels do the rank-r work around them). In
// short, per forward + backward at M = 8192, K = N = 4096, r = 16, bf16: these kernels move 371 MB (x twice, dy once,
// T and dxT written once, 32 MB of partial sums) in 4 launches plus a memset, and cuBLAS reads T and dxT in its
// epilogues (134 MB, nearly free in a compute-bound GEMM): 1.15 to 1.17 x the base linear's time on an H100 SXM if
// cuBLAS runs at 600 to 700 TFLOP/s. A GEMM with the LoRA term fused would save the T / dxT traffic but must come
// within ~5 % of cuBLAS to win, which an mma.sync GEMM cannot on sm_90 and a wgmma one cannot be shown to without a
// GPU.
//
// Kernels (all names start with "lora"; every one issues mma.sync.m16n8k16 with fp32 accumulators):
//   lora_shrink_kernel   u = scale * drop(x) A^T, split-K partials when M alone gives too few blocks
//   lora_expand_kernel   T = bias + u B^T in the activation dtype (cuBLAS then adds x W^T with beta = 1); sums the
//                        shrink's partials on load and writes the final u
//   lora_bwd_dy_kernel   du = s * dy B and dB = dy^T u from one pass over dy (2-D panels: du partials over column
//                        panels, finished by the last block of each row tile; dB partials over row panels)
//   lora_bwd_x_kernel    dxT = keep * (du A) / (1 - p) (cuBLAS then adds dy W) and dA = du^T drop(x) / (1 - p) from one
//                        pass over x (the Philox mask drawn once for both); finishes dB in its prologue and dA through
//                        the last block of each column tile
//
// Precision. Operands enter the tensor cores in the activation dtype (SPEC 3.1): bf16 / fp16 activations are exact
// MMA operands and the adapters, u and du are rounded to that dtype once, when staged. fp32 activations use three
// bf16 terms per value (v = h0 + h1 + h2, exact to 2^-24 relative) and the six products h_i h'_j with i + j <= 2,
// smallest first, which matches fp32 FMA accuracy without tf32's 2^-11 rounding. Every sum accumulates in fp32 (the
// MMA accumulators, then fixed-order sums of partial slabs): results are bitwise reproducible run to run.
//
// Shared memory. Every tile is stored in 16-byte chunks with the XOR swizzle of lora_mma.cuh and read only through
// ldmatrix; every store into it is a 16-byte store of 8 consecutive elements by consecutive lanes along a row: both
// take one wavefront per phase (no bank conflicts; the CUDA emulator counts them and the tests require zero).
// Activation tiles (x, dy) are double-buffered: the next tile's global loads are in flight while the tensor cores
// work on the current one. Outputs leave the MMA fragments through a quad transpose of shuffles, so every lane owns
// 8 consecutive bf16/fp16 (or 4 fp32) elements and stores them with one 128-bit store.
#include <algorithm>
#include <type_traits>

#include "device_utils.cuh"
#include "lora.h"
#include "lora_mma.cuh"

namespace treelora {
namespace {

// --- compile-time configuration -----------------------------------------------------------------------------------

constexpr int kRows = 64;                // rows of an activation tile: 4 warps x 16 (the MMA's M)
constexpr int kStreamThreads = 128;      // shrink, expand: 4 warps, one 16-row slice each
constexpr int kWideThreads = 256;        // bwd_dy (warps 0-3 accumulate du, 4-7 dB) and bwd_x (two column halves)
constexpr uint32_t kKeepAll = 1u << 24;  // a keep threshold of 2^24 keeps every element
// Blocks per SM the planners aim for: 4 of 128 threads (2 of 256) keep ~16 KB of loads in flight per SM, what HBM3
// needs at ~3 TB/s and ~0.6 us latency over 132 SMs; the kernels' shared memory (<= 48 KB) and registers (<= 128 per
// thread, __launch_bounds__) allow it.
constexpr int kStreamBlocksPerSm = 4;
constexpr int kWideBlocksPerSm = 2;

// Minimum resident blocks per SM promised to the compiler (__launch_bounds__) for the 128-thread kernels: 4 caps them
// at 128 registers; rank chunks of 64 need a few more (their u / A fragments are 4 times as wide), so 3 (168).
template <int RC>
constexpr int stream_min_blocks() {
  return RC == 64 ? 3 : kStreamBlocksPerSm;
}

enum class Prec { kBF16, kF16, kF32 };

// Activations in memory (Act), the MMA operand type (Elem), 16-bit terms per value and the activation tile width.
// fp32 tiles are 32 columns wide: three bf16 planes of a 64-wide tile would not fit 48 KB of shared memory with the
// kernels' other tiles.
template <Prec P>
struct Precision;
template <>
struct Precision<Prec::kBF16> {
  using Act = __nv_bfloat16;
  using Elem = __nv_bfloat16;
  static constexpr int kTerms = 1, kTileC = 64;
};
template <>
struct Precision<Prec::kF16> {
  using Act = __half;
  using Elem = __half;
  static constexpr int kTerms = 1, kTileC = 64;
};
template <>
struct Precision<Prec::kF32> {
  using Act = float;
  using Elem = __nv_bfloat16;
  static constexpr int kTerms = 3, kTileC = 32;
};

// Largest rank chunk: 64 for 16-bit activations; 32 for fp32, whose three terms per value triple every tile.
constexpr int max_rank_chunk(Prec p) { return p == Prec::kF32 ? 32 : 64; }

// Column tiles of one bwd_dy panel: its B tiles stay in shared memory and its dB accumulators in registers,
// kMaxNT x RC / 2 floats per dB thread; 32 at most keeps the kernel within 128 registers.
template <Prec P, int RC>
constexpr int dy_max_tiles() {
  return P == Prec::kF32 ? 1 : 64 / RC;
}

// --- operand values -----------------------------------------------------------------------------------------------

// v as kTerms 16-bit terms, largest first: v = t0 + t1 + t2 up to 2^-24 |v| (one term: v rounded to Elem).
template <class Elem, int kTerms>
__device__ __forceinline__ void split(float v, uint32_t (&bits)[kTerms]) {
#pragma unroll
  for (int i = 0; i < kTerms; ++i) {
    const Elem e = from_float<Elem>(v);
    bits[i] = tc::bits16(e);
    if (i + 1 < kTerms) v -= to_float(e);
  }
}

// Eight consecutive values as kTerms 16-byte chunks (one per term plane).
template <class Elem, int kTerms>
__device__ __forceinline__ void split8(const float (&v)[8], uint4 (&out)[kTerms]) {
  uint32_t words[kTerms][4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint32_t lo[kTerms], hi[kTerms];
    split<Elem, kTerms>(v[2 * i], lo);
    split<Elem, kTerms>(v[2 * i + 1], hi);
#pragma unroll
    for (int t = 0; t < kTerms; ++t) words[t][i] = lo[t] | (hi[t] << 16);
  }
#pragma unroll
  for (int t = 0; t < kTerms; ++t) {
    out[t].x = words[t][0];
    out[t].y = words[t][1];
    out[t].z = words[t][2];
    out[t].w = words[t][3];
  }
}

// A matrix of a run-time dtype seen as (rows, cols): element (i, j) = p[i * s_i + j * s_j], zero outside.
struct Strided {
  const void* p;
  DType dt;
  int64_t s_i, s_j, rows, cols;

  // Elements (i, j .. j + 8) as floats: one or two 16-byte loads when they are contiguous and aligned.
  __device__ __forceinline__ void load8(int64_t i, int64_t j, float (&v)[8]) const {
    const int64_t at = i * s_i + j * s_j;
    const int size = dtype_size(dt);
    if (i < rows && s_j == 1 && j + 8 <= cols && aligned16(static_cast<const char*>(p) + at * size)) {
      if (dt == DType::kFloat32) {
        load_vec<float, 8>(static_cast<const float*>(p) + at, v);
      } else if (dt == DType::kBFloat16) {
        load_vec<__nv_bfloat16, 8>(static_cast<const __nv_bfloat16*>(p) + at, v);
      } else {
        load_vec<__half, 8>(static_cast<const __half*>(p) + at, v);
      }
      return;
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (i < rows && j + e < cols) ? load_as_float(p, dt, at + e * s_j) : 0.f;
  }
};

// An fp32 (rows, cols) matrix with row stride ld given as the sum of `count` slabs `slab` floats apart, times scale.
struct SlabSum {
  const float* p;
  int64_t count, slab, ld, rows, cols;
  float scale;

  __device__ __forceinline__ float at(int64_t i, int64_t j) const {
    if (i >= rows || j >= cols) return 0.f;
    float s = 0.f;
    for (int64_t q = 0; q < count; ++q) s += __ldcg(p + q * slab + i * ld + j);
    return scale * s;
  }

  __device__ __forceinline__ void load8(int64_t i, int64_t j, float (&v)[8]) const {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = at(i, j + e);
  }
};

// Stages the kR x kC tile whose element (i, j) is load8's (i0 + i, j0 + j) into kTerms swizzled planes of kR x kC/8
// chunks. Chunks go to the block's threads in row-major order; warps with nothing to store skip as a whole.
template <class Elem, int kTerms, int kR, int kC, int kThreads, class Loader>
__device__ __forceinline__ void stage_tile(uint4* planes, const Loader& src, int64_t i0, int64_t j0) {
  constexpr int kChunks = kC / 8, kTotal = kR * kChunks, kPlane = kR * kChunks;
  static_assert(kTotal % 32 == 0, "a tile must be whole warps of chunks");
#pragma unroll
  for (int base = 0; base < kTotal; base += kThreads) {
    if (base + (static_cast<int>(threadIdx.x) & ~31) >= kTotal) continue;  // uniform per warp
    const int linear = base + static_cast<int>(threadIdx.x), row = linear / kChunks, chunk = linear % kChunks;
    float v[8];
    src.load8(i0 + row, j0 + chunk * 8, v);
    uint4 out[kTerms];
    split8<Elem, kTerms>(v, out);
#pragma unroll
    for (int t = 0; t < kTerms; ++t) tc::sts128(planes + t * kPlane + tc::swizzle<kChunks>(row, chunk), out[t]);
  }
}

// --- activation tiles (x, dy): register prefetch, then a masked store into shared memory ---------------------------

template <Prec P, int kThreads>
struct ActTile {
  using Tr = Precision<P>;
  using Act = typename Tr::Act;
  static constexpr int kC = Tr::kTileC, kChunks = kC / 8, kTerms = Tr::kTerms;
  static constexpr int kPlane = kRows * kChunks;  // chunks per term plane
  static constexpr int kRuns = kRows * kChunks / kThreads;
  static constexpr int kWords = static_cast<int>(sizeof(Act)) * 2;  // 32-bit words of 8 elements: 4 or 8
  static_assert(kRuns >= 1 && kRows * kChunks % kThreads == 0, "the tile must split evenly over the threads");

  uint32_t raw[kRuns][kWords];

  __device__ __forceinline__ static int row_of(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) / kChunks;
  }
  __device__ __forceinline__ static int chunk_of(int i) {
    return (static_cast<int>(threadIdx.x) + i * kThreads) % kChunks;
  }

  // Loads rows m0 .. m0 + 64, columns c0 .. c0 + kC of the (M, C) matrix x (row stride ld) into registers; zero
  // outside the matrix. vec_ok: x and every row start are 16-byte aligned.
  __device__ __forceinline__ void fetch(const Act* x, int64_t ld, int64_t M, int64_t C, int64_t m0, int64_t c0,
                                        bool vec_ok) {
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const int64_t m = m0 + row_of(i), c = c0 + chunk_of(i) * 8;
      if (m < M && vec_ok && c + 8 <= C) {
        const uint4* src = reinterpret_cast<const uint4*>(x + m * ld + c);
#pragma unroll
        for (int q = 0; q < kWords / 4; ++q) {
          const uint4 w = src[q];
          raw[i][4 * q] = w.x;
          raw[i][4 * q + 1] = w.y;
          raw[i][4 * q + 2] = w.z;
          raw[i][4 * q + 3] = w.w;
        }
      } else {
#pragma unroll
        for (int w = 0; w < kWords; ++w) raw[i][w] = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (m < M && c + e < C) {
            const Act v = x[m * ld + c + e];
            if constexpr (sizeof(Act) == 4) {
              raw[i][e] = __float_as_uint(v);
            } else {
              raw[i][e / 2] |= tc::bits16(v) << (16 * (e % 2));
            }
          }
        }
      }
    }
  }

  // Stores the fetched runs into the kTerms planes (swizzled). With dropout, dropped elements are zeroed and, when
  // keep_bits is given, each run's 8 keep bits go to keep_bits[row * kChunks + chunk]. (The stream is passed by
  // reference with a flag: a pointer that may be null would put it in local memory.)
  __device__ __forceinline__ void commit(uint4* planes, int64_t M, int64_t C, int64_t m0, int64_t c0, bool dropout,
                                         const DropoutStream& drop, uint8_t* keep_bits) {
#pragma unroll
    for (int i = 0; i < kRuns; ++i) {
      const int row = row_of(i), chunk = chunk_of(i);
      const int64_t m = m0 + row, c = c0 + chunk * 8;
      if (dropout) {
        const uint32_t bits = m < M && c < C ? drop.keep_bits(m * C + c, static_cast<int>(min(int64_t(8), C - c))) : 0u;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (!((bits >> e) & 1u)) {
            if constexpr (sizeof(Act) == 4) {
              raw[i][e] = 0;
            } else {
              raw[i][e / 2] &= ~(0xffffu << (16 * (e % 2)));
            }
          }
        }
        if (keep_bits != nullptr) keep_bits[row * kChunks + chunk] = static_cast<uint8_t>(bits);
      }
      uint4 out[kTerms];
      if constexpr (sizeof(Act) == 4) {
        float v[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = __uint_as_float(raw[i][e]);
        split8<typename Tr::Elem, kTerms>(v, out);
      } else {
        out[0].x = raw[i][0];
        out[0].y = raw[i][1];
        out[0].z = raw[i][2];
        out[0].w = raw[i][3];
      }
#pragma unroll
      for (int t = 0; t < kTerms; ++t) tc::sts128(planes + t * kPlane + tc::swizzle<kChunks>(row, chunk), out[t]);
    }
  }
};

// --- warp-level MMA over term planes ------------------------------------------------------------------------------

// d0 += A B[:, 0:8] and d1 += A B[:, 8:16] summed over the term products a_i b_j with i + j < kTerms (smallest first).
template <class Elem, int kTerms>
__device__ __forceinline__ void mma_pair(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[kTerms][4],
                                         const uint32_t (&b)[kTerms][4]) {
#pragma unroll
  for (int s = kTerms - 1; s >= 0; --s) {
#pragma unroll
    for (int i = 0; i <= s; ++i) {
      tc::mma_16816<Elem>(d0, a[i], b[s - i][0], b[s - i][1]);
      tc::mma_16816<Elem>(d1, a[i], b[s - i][2], b[s - i][3]);
    }
  }
}

template <int kChunks, int kTerms, int kPlane>
__device__ __forceinline__ void load_a(uint32_t (&a)[kTerms][4], const uint4* tile, int r0, int k0) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) tc::frag_a<kChunks>(a[t], tile + t * kPlane, r0, k0);
}
template <int kChunks, int kTerms, int kPlane>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[kTerms][4], const uint4* tile, int m0, int k0) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) tc::frag_a_trans<kChunks>(a[t], tile + t * kPlane, m0, k0);
}
template <int kChunks, int kTerms, int kPlane>
__device__ __forceinline__ void load_b(uint32_t (&b)[kTerms][4], const uint4* tile, int n0, int k0) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) tc::frag_b<kChunks>(b[t], tile + t * kPlane, n0, k0);
}
template <int kChunks, int kTerms, int kPlane>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[kTerms][4], const uint4* tile, int n0, int k0) {
#pragma unroll
  for (int t = 0; t < kTerms; ++t) tc::frag_b_trans<kChunks>(b[t], tile + t * kPlane, n0, k0);
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int i = 0; i < kN; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[i][e] = 0.f;
}

// --- output fragments -> 128-bit stores ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t select4(const uint32_t (&w)[4], int i) {
  return i == 0 ? w[0] : (i == 1 ? w[1] : (i == 2 ? w[2] : w[3]));
}

// Within each quad of lanes (same g, t = 0..3): w[i] holds the word of columns 8i + 2t, 8i + 2t + 1 of one row; after
// the call it holds columns 8t + 2i, 8t + 2i + 1, i.e. each lane owns the 8 consecutive columns 8t .. 8t + 8.
__device__ __forceinline__ void quad_transpose(uint32_t (&w)[4]) {
  const int t = tc::lane_id() & 3;
  uint32_t out[4] = {w[0], w[1], w[2], w[3]};
#pragma unroll
  for (int k = 1; k < 4; ++k) {
    const int p = t ^ k;  // the partner sends w[t] of its own; it wants our w[p]
    const uint32_t got = __shfl_xor_sync(0xffffffffu, select4(w, p), k);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (i == p) out[i] = got;
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = out[i];
}

// Stores 8 consecutive elements (packed 16-bit words) at out[row, col .. col + 8) of an (M, C) matrix: one 128-bit
// store when all 8 are inside and rows are 16-byte aligned, else element by element.
template <class Act>
__device__ __forceinline__ void store8(Act* out, int64_t ld, int64_t M, int64_t C, int64_t row, int64_t col,
                                       const uint32_t (&w)[4], bool vec_ok) {
  if (row >= M) return;
  Act* dst = out + row * ld + col;
  if (vec_ok && col + 8 <= C) {
    uint4 v;
    v.x = w[0];
    v.y = w[1];
    v.z = w[2];
    v.w = w[3];
    tc::stg128(dst, v);
    return;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    if (col + e < C) {
      const uint16_t bits = static_cast<uint16_t>(w[e / 2] >> (16 * (e % 2)));
      Act v;
      memcpy(&v, &bits, 2);
      dst[e] = v;
    }
  }
}

// A warp's 16 x (8 kNT) output block, v in the accumulator layout (v[n][0..3] = rows g, g, g+8, g+8 and columns
// 8n + 2t, 8n + 2t + 1), stored at rows row0 .. row0 + 16, columns col0 .. of the (M, C) matrix out.
template <class Act, int kNT>
__device__ __forceinline__ void store_block(Act* out, int64_t ld, int64_t M, int64_t C, int64_t row0, int64_t col0,
                                            const float (&v)[kNT][4], bool vec_ok) {
  const int lane = tc::lane_id(), g = lane >> 2, t = lane & 3;
  if constexpr (sizeof(Act) == 4) {
    // fp32: lane pairs (t, t ^ 1) trade halves, so that even lanes own 4 columns of row g and odd lanes 4 of g + 8.
    const bool odd = t & 1;
#pragma unroll
    for (int n = 0; n < kNT; ++n) {
      const float s0 = odd ? v[n][0] : v[n][2], s1 = odd ? v[n][1] : v[n][3];
      const float r0 = __shfl_xor_sync(0xffffffffu, s0, 1), r1 = __shfl_xor_sync(0xffffffffu, s1, 1);
      const float q[4] = {odd ? r0 : v[n][0], odd ? r1 : v[n][1], odd ? v[n][2] : r0, odd ? v[n][3] : r1};
      const int64_t row = row0 + g + (odd ? 8 : 0), col = col0 + 8 * n + 2 * (t & ~1);
      if (row >= M) continue;
      float* dst = reinterpret_cast<float*>(out) + row * ld + col;
      if (vec_ok && col + 4 <= C) {
        uint4 v;
        v.x = __float_as_uint(q[0]);
        v.y = __float_as_uint(q[1]);
        v.z = __float_as_uint(q[2]);
        v.w = __float_as_uint(q[3]);
        tc::stg128(dst, v);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (col + e < C) dst[e] = q[e];
      }
    }
  } else {
    static_assert(kNT % 4 == 0, "16-bit outputs leave in groups of 4 n8 tiles");
#pragma unroll
    for (int q = 0; q < kNT / 4; ++q) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t w[4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
          w[i] = tc::pack2(from_float<Act>(v[4 * q + i][2 * h]), from_float<Act>(v[4 * q + i][2 * h + 1]));
        quad_transpose(w);
        store8<Act>(out, ld, M, C, row0 + g + 8 * h, col0 + 32 * q + 8 * t, w, vec_ok);
      }
    }
  }
}

// --- cross-block reductions ---------------------------------------------------------------------------------------

// Every thread of the block calls this after writing its share of a partial slab. Returns, in every thread, whether
// this block is the last of `expected` blocks to arrive at *counter (which must be zero before the first): that block
// then sums all slabs in a fixed order, so the result does not depend on which block it is.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned expected) {
  __shared__ unsigned ticket;
  __threadfence();  // this thread's partials are visible device-wide before the block is counted
  __syncthreads();
  if (threadIdx.x == 0) ticket = atomicAdd(counter, 1u);
  __syncthreads();
  return ticket == expected - 1;
}

// --- shrink: u = scale * drop(x) A^T --------------------------------------------------------------------------------

struct ShrinkArgs {
  const void* x;
  int64_t ldx, M, K;
  bool vec_ok;            // x and its rows 16-byte aligned
  Strided a;              // A as (rank j, column k)
  LoraDropout dropout;    // seed_offset null: no dropout
  float scale;            // applied when writing u directly (one K panel)
  float* out;             // u (M, r) when num_k_panels == 1, else slabs [panel][M][r] of unscaled partial sums
  int64_t r, k_tiles, k_tiles_per_panel, num_k_panels;
};

template <Prec P, int RC>
__global__ void __launch_bounds__(kStreamThreads, stream_min_blocks<RC>()) lora_shrink_kernel(ShrinkArgs a) {
  using Tr = Precision<P>;
  using Elem = typename Tr::Elem;
  constexpr int kT = Tr::kTerms, kC = Tr::kTileC, kXC = kC / 8;
  constexpr int kXPlane = kRows * kXC, kAPlane = RC * kXC;
  __shared__ __align__(128) uint4 xs[2 * kT * kXPlane];
  __shared__ __align__(128) uint4 as[2 * kT * kAPlane];

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = tc::lane_id();
  const int64_t mt = blockIdx.x / a.num_k_panels, kp = blockIdx.x % a.num_k_panels;
  const int64_t m0 = mt * kRows, j0 = int64_t(blockIdx.y) * RC;
  const int64_t kt0 = kp * a.k_tiles_per_panel, kt1 = min(a.k_tiles, kt0 + a.k_tiles_per_panel);
  const typename Tr::Act* x = static_cast<const typename Tr::Act*>(a.x);
  const bool dropout = a.dropout.seed_offset != nullptr && a.dropout.keep_threshold < kKeepAll;
  const DropoutStream stream =
      dropout ? DropoutStream(a.dropout.seed_offset, a.dropout.keep_threshold) : DropoutStream();

  float acc[RC / 8][4];
  zero(acc);
  ActTile<P, kStreamThreads> tile;
  tile.fetch(x, a.ldx, a.M, a.K, m0, kt0 * kC, a.vec_ok);
  tile.commit(xs, a.M, a.K, m0, kt0 * kC, dropout, stream, nullptr);
  stage_tile<Elem, kT, RC, kC, kStreamThreads>(as, a.a, j0, kt0 * kC);
  __syncthreads();
  for (int64_t kt = kt0; kt < kt1; ++kt) {
    const int buf = static_cast<int>((kt - kt0) & 1);
    const bool more = kt + 1 < kt1;
    if (more) tile.fetch(x, a.ldx, a.M, a.K, m0, (kt + 1) * kC, a.vec_ok);  // in flight during the MMAs
    const uint4* xt = xs + buf * kT * kXPlane;
    const uint4* at = as + buf * kT * kAPlane;
#pragma unroll
    for (int ks = 0; ks < kC / 16; ++ks) {
      uint32_t fa[kT][4];
      load_a<kXC, kT, kXPlane>(fa, xt, 16 * warp, 16 * ks);
#pragma unroll
      for (int p = 0; p < RC / 16; ++p) {
        uint32_t fb[kT][4];
        load_b<kXC, kT, kAPlane>(fb, at, 16 * p, 16 * ks);
        mma_pair<Elem, kT>(acc[2 * p], acc[2 * p + 1], fa, fb);
      }
    }
    if (more) {
      tile.commit(xs + (buf ^ 1) * kT * kXPlane, a.M, a.K, m0, (kt + 1) * kC, dropout, stream, nullptr);
      stage_tile<Elem, kT, RC, kC, kStreamThreads>(as + (buf ^ 1) * kT * kAPlane, a.a, j0, (kt + 1) * kC);
    }
    __syncthreads();
  }

  const bool direct = a.num_k_panels == 1;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int n = 0; n < RC / 8; ++n) {
    const int64_t j = j0 + 8 * n + 2 * t;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + 16 * warp + g + 8 * h;
      if (m >= a.M || j >= a.r) continue;
      const float v0 = direct ? a.scale * acc[n][2 * h] : acc[n][2 * h];
      const float v1 = direct ? a.scale * acc[n][2 * h + 1] : acc[n][2 * h + 1];
      float* dst = a.out + (kp * a.M + m) * a.r + j;
      if ((a.r & 1) == 0 && j + 1 < a.r) {
        *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
      } else {
        dst[0] = v0;
        if (j + 1 < a.r) dst[1] = v1;
      }
    }
  }
}

// --- expand: T = bias + u B^T ---------------------------------------------------------------------------------------

struct ExpandArgs {
  SlabSum u;                // u (M, r): the shrink's slabs, summed and scaled on load
  float* u_out;             // when set, blocks of column panel 0 write u (M, r) (the shrink left partials)
  Strided b;                // B as (column n, rank j)
  const void* bias;         // (N,) or null
  DType bias_dtype;
  void* out;                // T (M, N) in the activation dtype, row stride ldo
  int64_t ldo, M, N, r, num_chunks, c_tiles, c_tiles_per_panel, num_c_panels;
  bool vec_ok;              // out and its rows 16-byte aligned
};

template <Prec P, int RC>
__global__ void __launch_bounds__(kStreamThreads, stream_min_blocks<RC>()) lora_expand_kernel(ExpandArgs a) {
  using Tr = Precision<P>;
  using Elem = typename Tr::Elem;
  constexpr int kT = Tr::kTerms, kRC = RC / 8, kOutCols = Tr::kTileC, kPPlane = kOutCols * kRC;
  __shared__ __align__(128) uint4 ps[kT * kPPlane];

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = tc::lane_id(), g = lane >> 2, t = lane & 3;
  const int64_t mt = blockIdx.x / a.num_c_panels, cp = blockIdx.x % a.num_c_panels;
  const int64_t m0 = mt * kRows + 16 * warp;
  const int64_t ct0 = cp * a.c_tiles_per_panel, ct1 = min(a.c_tiles, ct0 + a.c_tiles_per_panel);

  // A operand: this warp's 16 rows of u, chunk c, as kT terms (ua[ks][term][reg]).
  uint32_t ua[RC / 16][kT][4];
  auto build_u = [&](int64_t c, bool write) {
#pragma unroll
    for (int ks = 0; ks < RC / 16; ++ks) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + g + 8 * (i & 1), j = c * RC + 16 * ks + 2 * t + 8 * (i >> 1);
        const float v0 = a.u.at(m, j), v1 = a.u.at(m, j + 1);
        if (write && m < a.M) {
          if (j < a.r) a.u_out[m * a.r + j] = v0;
          if (j + 1 < a.r) a.u_out[m * a.r + j + 1] = v1;
        }
        uint32_t lo[kT], hi[kT];
        split<Elem, kT>(v0, lo);
        split<Elem, kT>(v1, hi);
#pragma unroll
        for (int s = 0; s < kT; ++s) ua[ks][s][i] = lo[s] | (hi[s] << 16);
      }
    }
  };

  for (int64_t ct = ct0; ct < ct1; ++ct) {
    const int64_t n0 = ct * kOutCols;
    float acc[kOutCols / 8][4];
    zero(acc);
    for (int64_t c = 0; c < a.num_chunks; ++c) {
      if (a.num_chunks > 1 || ct == ct0) build_u(c, a.u_out != nullptr && cp == 0 && ct == ct0);
      __syncthreads();  // the previous step is done with ps
      stage_tile<Elem, kT, kOutCols, RC, kStreamThreads>(ps, a.b, n0, c * RC);
      __syncthreads();
#pragma unroll
      for (int ks = 0; ks < RC / 16; ++ks) {
#pragma unroll
        for (int p = 0; p < kOutCols / 16; ++p) {
          uint32_t fb[kT][4];
          load_b<kRC, kT, kPPlane>(fb, ps, 16 * p, 16 * ks);
          mma_pair<Elem, kT>(acc[2 * p], acc[2 * p + 1], ua[ks], fb);
        }
      }
    }
    if (a.bias != nullptr) {
#pragma unroll
      for (int n = 0; n < kOutCols / 8; ++n) {
        const int64_t col = n0 + 8 * n + 2 * t;
        const float b0 = col < a.N ? load_as_float(a.bias, a.bias_dtype, col) : 0.f;
        const float b1 = col + 1 < a.N ? load_as_float(a.bias, a.bias_dtype, col + 1) : 0.f;
        acc[n][0] += b0;
        acc[n][1] += b1;
        acc[n][2] += b0;
        acc[n][3] += b1;
      }
    }
    store_block<typename Tr::Act, kOutCols / 8>(static_cast<typename Tr::Act*>(a.out), a.ldo, a.M, a.N, m0, n0, acc,
                                                a.vec_ok);
  }
}

// --- backward over dy: du = s dy B and dB = dy^T u ------------------------------------------------------------------

struct BwdDyArgs {
  const void* dy;
  int64_t lddy, M, N, r, f;
  bool vec_ok;               // dy and its rows 16-byte aligned
  Strided b;                 // B as (column n, rank j)
  SlabSum u;                 // u (M, r) fp32 (one slab)
  float* du;                 // (M, r) fp32 result
  float* du_part;            // [n panel][M][r] partials when num_n_panels > 1
  unsigned* du_counters;     // [m tile][chunk], zero before the launch
  float du_scale;            // s
  float* db_part;            // [m panel][N][r - f] partials when num_m_panels > 1
  void* db;                  // (N, r - f) when num_m_panels == 1
  DType db_dtype;
  bool do_du, do_db;
  int64_t m_tiles, n_tiles, m_tiles_per_panel, n_tiles_per_panel, num_m_panels, num_n_panels, num_chunks;
};

template <Prec P, int RC>
__global__ void __launch_bounds__(kWideThreads, kWideBlocksPerSm) lora_bwd_dy_kernel(BwdDyArgs a) {
  using Tr = Precision<P>;
  using Elem = typename Tr::Elem;
  constexpr int kT = Tr::kTerms, kC = Tr::kTileC, kYC = kC / 8, kRC = RC / 8;
  constexpr int kYPlane = kRows * kYC, kBPlane = kC * kRC, kUPlane = kRows * kRC;
  constexpr int kMaxNT = dy_max_tiles<P, RC>();
  // dB work of the 4 dB warps: (n m16 tile, rank pair) items, kNM x RC / 16 of them, warp w' takes w', w' + 4, ...
  constexpr int kNM = kC / 16, kItems = kNM * (RC / 16), kItemsPerWarp = (kItems + 3) / 4;
  __shared__ __align__(128) uint4 dys[2 * kT * kYPlane];
  __shared__ __align__(128) uint4 bs[kMaxNT * kT * kBPlane];
  __shared__ __align__(128) uint4 us[kT * kUPlane];

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = tc::lane_id(), g = lane >> 2, t = lane & 3;
  const bool du_warp = warp < 4;
  const int dw = warp - 4;  // dB warp index
  const int64_t mp = blockIdx.x / a.num_n_panels, np = blockIdx.x % a.num_n_panels;
  const int64_t chunk = blockIdx.y, j0 = chunk * RC, r_t = a.r - a.f;
  const int64_t mt0 = mp * a.m_tiles_per_panel, mt1 = min(a.m_tiles, mt0 + a.m_tiles_per_panel);
  const int64_t nt0 = np * a.n_tiles_per_panel, nt1 = min(a.n_tiles, nt0 + a.n_tiles_per_panel);
  const int nnt = static_cast<int>(nt1 - nt0);
  const bool do_db = a.do_db && j0 + RC > a.f;  // this chunk holds trainable ranks
  const typename Tr::Act* dy = static_cast<const typename Tr::Act*>(a.dy);

#pragma unroll
  for (int q = 0; q < kMaxNT; ++q)
    if (q < nnt) stage_tile<Elem, kT, kC, RC, kWideThreads>(bs + q * kT * kBPlane, a.b, (nt0 + q) * kC, j0);

  // One accumulator array serves both roles: du warps use its first RC / 8 n8 tiles, dB warps tile (q, it, half) at
  // db_at(q, it, half). Two arrays would both stay live across the loop (the compiler cannot see that a warp only
  // ever touches one) and need twice the registers.
  constexpr int kDuTiles = RC / 8, kDbTiles = kMaxNT * kItemsPerWarp * 2;
  constexpr int kAcc = kDuTiles > kDbTiles ? kDuTiles : kDbTiles;
  auto db_at = [](int q, int it, int half) { return (q * kItemsPerWarp + it) * 2 + half; };
  float acc[kAcc][4];
  zero(acc);

  ActTile<P, kWideThreads> tile;
  const int64_t steps = (mt1 - mt0) * nnt;
  tile.fetch(dy, a.lddy, a.M, a.N, mt0 * kRows, nt0 * kC, a.vec_ok);
  const DropoutStream no_dropout;
  tile.commit(dys, a.M, a.N, mt0 * kRows, nt0 * kC, false, no_dropout, nullptr);
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t mt = mt0 + s / nnt;
    const int q = static_cast<int>(s % nnt);
    const int buf = static_cast<int>(s & 1);
    if (q == 0 && do_db) {  // u rows of this row tile; the previous row tile's readers finished at the last barrier
      stage_tile<Elem, kT, kRows, RC, kWideThreads>(us, a.u, mt * kRows, j0);
    }
    __syncthreads();
    const bool more = s + 1 < steps;
    const int64_t next_m0 = (mt0 + (s + 1) / nnt) * kRows, next_n0 = (nt0 + (s + 1) % nnt) * kC;
    if (more) tile.fetch(dy, a.lddy, a.M, a.N, next_m0, next_n0, a.vec_ok);
    const uint4* yt = dys + buf * kT * kYPlane;
    if (du_warp) {
      if (a.do_du) {
        const uint4* bt = bs + q * kT * kBPlane;
#pragma unroll
        for (int ks = 0; ks < kC / 16; ++ks) {
          uint32_t fa[kT][4];
          load_a<kYC, kT, kYPlane>(fa, yt, 16 * warp, 16 * ks);
#pragma unroll
          for (int p = 0; p < RC / 16; ++p) {
            uint32_t fb[kT][4];
            load_b_trans<kRC, kT, kBPlane>(fb, bt, 16 * p, 16 * ks);
            mma_pair<Elem, kT>(acc[2 * p], acc[2 * p + 1], fa, fb);
          }
        }
      }
    } else if (do_db && dw < kItems) {
      const int nm = dw % kNM;  // the same for all of this warp's items (4 is a multiple of kNM)
#pragma unroll
      for (int ks = 0; ks < kRows / 16; ++ks) {
        uint32_t fa[kT][4];
        load_a_trans<kYC, kT, kYPlane>(fa, yt, 16 * nm, 16 * ks);
#pragma unroll
        for (int it = 0; it < kItemsPerWarp; ++it) {
          const int item = dw + 4 * it;
          if (item >= kItems) continue;
          uint32_t fb[kT][4];
          load_b_trans<kRC, kT, kUPlane>(fb, us, 16 * (item / kNM), 16 * ks);
#pragma unroll
          for (int qq = 0; qq < kMaxNT; ++qq)  // a register array needs compile-time indices
            if (qq == q) mma_pair<Elem, kT>(acc[db_at(qq, it, 0)], acc[db_at(qq, it, 1)], fa, fb);
        }
      }
    }
    if (more) tile.commit(dys + (buf ^ 1) * kT * kYPlane, a.M, a.N, next_m0, next_n0, false, no_dropout, nullptr);

    if (a.do_du && q == nnt - 1) {  // du of row tile mt is complete over this panel's columns
      const bool direct = a.num_n_panels == 1;
      if (du_warp) {
#pragma unroll
        for (int n = 0; n < RC / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t m = mt * kRows + 16 * warp + g + 8 * (e >> 1), j = j0 + 8 * n + 2 * t + (e & 1);
            if (m < a.M && j < a.r) {
              if (direct) {
                a.du[m * a.r + j] = a.du_scale * acc[n][e];
              } else {
                a.du_part[(np * a.M + m) * a.r + j] = acc[n][e];
              }
            }
          }
        }
        zero(acc);
      }
      if (!direct && arrive_last(a.du_counters + mt * a.num_chunks + chunk, static_cast<unsigned>(a.num_n_panels))) {
        for (int idx = static_cast<int>(threadIdx.x); idx < kRows * RC; idx += kWideThreads) {
          const int64_t m = mt * kRows + idx / RC, j = j0 + idx % RC;
          if (m >= a.M || j >= a.r) continue;
          float sum = 0.f;
          for (int64_t p = 0; p < a.num_n_panels; ++p) sum += __ldcg(a.du_part + (p * a.M + m) * a.r + j);
          a.du[m * a.r + j] = a.du_scale * sum;
        }
      }
    }
    __syncthreads();
  }

  if (!du_warp && do_db && dw < kItems) {
    const int nm = dw % kNM;
#pragma unroll
    for (int q = 0; q < kMaxNT; ++q) {
      if (q >= nnt) continue;
#pragma unroll
      for (int it = 0; it < kItemsPerWarp; ++it) {
        const int item = dw + 4 * it;
        if (item >= kItems) continue;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int64_t n = (nt0 + q) * kC + 16 * nm + g + 8 * (e >> 1);
            const int64_t j = j0 + 16 * (item / kNM) + 8 * half + 2 * t + (e & 1);
            if (n >= a.N || j < a.f || j >= a.r) continue;
            const float v = acc[db_at(q, it, half)][e];
            if (a.num_m_panels == 1) {
              store_from_float(a.db, a.db_dtype, n * r_t + j - a.f, v);
            } else {
              a.db_part[(mp * a.N + n) * r_t + j - a.f] = v;
            }
          }
        }
      }
    }
  }
}

// --- backward over x: dxT = keep (du A) / (1 - p) and dA = du^T drop(x) / (1 - p) ----------------------------------

struct BwdXArgs {
  const void* x;
  int64_t ldx, M, K, r, f;
  bool x_vec_ok;            // x and its rows 16-byte aligned
  Strided a;                // A as (rank j, column k)
  SlabSum du;               // du (M, r) fp32 (one slab)
  LoraDropout dropout;
  float inv_keep;           // 1 / (1 - p)
  void* dxt;                // (M, K) in the activation dtype, row stride lddx, when do_dx
  int64_t lddx;
  bool dx_vec_ok, do_dx, do_da;
  float* da_part;           // [m panel][r - f][K] partials when num_m_panels > 1
  unsigned* da_counters;    // [k tile][grid.y], zero before the launch
  void* da;                 // (r - f, K)
  DType da_dtype;
  const float* db_part;     // dB partials to finish: db = sum of db_count slabs of db_elems floats (null: none)
  int64_t db_count, db_elems;
  void* db;
  DType db_dtype;
  int64_t m_tiles, k_tiles, m_tiles_per_panel, num_m_panels, num_chunks, first_da_chunk;
};

template <Prec P, int RC>
__global__ void __launch_bounds__(kWideThreads, kWideBlocksPerSm) lora_bwd_x_kernel(BwdXArgs a) {
  using Tr = Precision<P>;
  using Elem = typename Tr::Elem;
  using Act = typename Tr::Act;
  constexpr int kT = Tr::kTerms, kC = Tr::kTileC, kXC = kC / 8, kRC = RC / 8;
  constexpr int kXPlane = kRows * kXC, kAPlane = RC * kXC, kDPlane = kRows * kRC;
  // dxT: warp w computes rows 16 (w % 4) .. + 16 and column half w / 4 (kDxTiles n8 tiles). dA: (rank m16 tile,
  // column pair) items, kRM x kNP of them; warp w takes w, w + 8, ...
  constexpr int kDxTiles = kC / 16, kRM = RC / 16, kNP = kC / 16, kItems = kRM * kNP;
  constexpr int kItemsPerWarp = (kItems + 7) / 8;
  __shared__ __align__(128) uint4 xs[2 * kT * kXPlane];
  __shared__ __align__(128) uint4 as[kT * kAPlane];
  __shared__ __align__(128) uint4 dus[kT * kDPlane];
  __shared__ __align__(16) uint8_t keep_bits[2 * kRows * kXC];

  // Finish dB: this block's share of the (N, r - f) sums over the bwd_dy partial slabs.
  if (a.db_part != nullptr) {
    const int64_t blocks = int64_t(gridDim.x) * gridDim.y, me = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
    const int64_t per = (a.db_elems + blocks - 1) / blocks;
    const int64_t end = min(a.db_elems, (me + 1) * per);
    for (int64_t e = me * per + threadIdx.x; e < end; e += kWideThreads) {
      float sum = 0.f;
      for (int64_t q = 0; q < a.db_count; ++q) sum += a.db_part[q * a.db_elems + e];
      store_from_float(a.db, a.db_dtype, e, sum);
    }
  }
  if (!a.do_dx && !a.do_da) return;

  const int warp = static_cast<int>(threadIdx.x) >> 5, lane = tc::lane_id(), g = lane >> 2, t = lane & 3;
  const int64_t mp = blockIdx.x / a.k_tiles, kt = blockIdx.x % a.k_tiles, k0 = kt * kC;
  const int64_t mt0 = mp * a.m_tiles_per_panel, mt1 = min(a.m_tiles, mt0 + a.m_tiles_per_panel);
  const bool dx_here = a.do_dx && blockIdx.y == 0;
  const int64_t da_chunk = a.first_da_chunk + blockIdx.y, r_t = a.r - a.f;
  const int64_t c_begin = dx_here ? 0 : da_chunk, c_end = dx_here ? a.num_chunks : da_chunk + 1;
  const bool dropout = a.dropout.seed_offset != nullptr && a.dropout.keep_threshold < kKeepAll;
  const DropoutStream stream =
      dropout ? DropoutStream(a.dropout.seed_offset, a.dropout.keep_threshold) : DropoutStream();
  const Act* x = static_cast<const Act*>(a.x);

  if (dx_here && a.num_chunks == 1) stage_tile<Elem, kT, RC, kC, kWideThreads>(as, a.a, 0, k0);  // resident
  float da_acc[kItemsPerWarp][2][4];
#pragma unroll
  for (int it = 0; it < kItemsPerWarp; ++it) zero(da_acc[it]);

  ActTile<P, kWideThreads> tile;
  tile.fetch(x, a.ldx, a.M, a.K, mt0 * kRows, k0, a.x_vec_ok);
  for (int64_t mt = mt0; mt < mt1; ++mt) {
    const int buf = static_cast<int>((mt - mt0) & 1);
    uint4* xt = xs + buf * kT * kXPlane;
    uint8_t* kb = keep_bits + buf * kRows * kXC;
    tile.commit(xt, a.M, a.K, mt * kRows, k0, dropout, stream, kb);
    if (mt + 1 < mt1) tile.fetch(x, a.ldx, a.M, a.K, (mt + 1) * kRows, k0, a.x_vec_ok);  // in flight meanwhile
    float dx_acc[kDxTiles][4];
    zero(dx_acc);
    for (int64_t c = c_begin; c < c_end; ++c) {
      stage_tile<Elem, kT, kRows, RC, kWideThreads>(dus, a.du, mt * kRows, c * RC);
      if (dx_here && a.num_chunks > 1) stage_tile<Elem, kT, RC, kC, kWideThreads>(as, a.a, c * RC, k0);
      __syncthreads();
      if (dx_here) {
#pragma unroll
        for (int ks = 0; ks < RC / 16; ++ks) {
          uint32_t fa[kT][4];
          load_a<kRC, kT, kDPlane>(fa, dus, 16 * (warp & 3), 16 * ks);
#pragma unroll
          for (int p = 0; p < kDxTiles / 2; ++p) {
            uint32_t fb[kT][4];
            load_b_trans<kXC, kT, kAPlane>(fb, as, (warp >> 2) * (kC / 2) + 16 * p, 16 * ks);
            mma_pair<Elem, kT>(dx_acc[2 * p], dx_acc[2 * p + 1], fa, fb);
          }
        }
      }
      if (a.do_da && c == da_chunk && warp < kItems) {
        const int rm = warp % kRM;  // the same for all of this warp's items (8 is a multiple of kRM)
#pragma unroll
        for (int ks = 0; ks < kRows / 16; ++ks) {
          uint32_t fa[kT][4];
          load_a_trans<kRC, kT, kDPlane>(fa, dus, 16 * rm, 16 * ks);
#pragma unroll
          for (int it = 0; it < kItemsPerWarp; ++it) {
            const int item = warp + 8 * it;
            if (item >= kItems) continue;
            uint32_t fb[kT][4];
            load_b_trans<kXC, kT, kXPlane>(fb, xt, 16 * (item / kRM), 16 * ks);
            mma_pair<Elem, kT>(da_acc[it][0], da_acc[it][1], fa, fb);
          }
        }
      }
      __syncthreads();  // before the next chunk's du / A tiles replace these
    }
    if (dx_here) {
#pragma unroll
      for (int n = 0; n < kDxTiles; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * (warp & 3) + g + 8 * (e >> 1), col = (warp >> 2) * (kC / 2) + 8 * n + 2 * t + (e & 1);
          const bool kept = !dropout || ((kb[row * kXC + col / 8] >> (col % 8)) & 1u);
          dx_acc[n][e] = kept ? a.inv_keep * dx_acc[n][e] : 0.f;
        }
      }
      store_block<Act, kDxTiles>(static_cast<Act*>(a.dxt), a.lddx, a.M, a.K, mt * kRows + 16 * (warp & 3),
                                 k0 + (warp >> 2) * (kC / 2), dx_acc, a.dx_vec_ok);
    }
  }
  if (!a.do_da) return;

  const bool direct = a.num_m_panels == 1;
  if (warp < kItems) {
    const int rm = warp % kRM;
#pragma unroll
    for (int it = 0; it < kItemsPerWarp; ++it) {
      const int item = warp + 8 * it;
      if (item >= kItems) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t j = da_chunk * RC + 16 * rm + g + 8 * (e >> 1);
          const int64_t k = k0 + 16 * (item / kRM) + 8 * half + 2 * t + (e & 1);
          if (j < a.f || j >= a.r || k >= a.K) continue;
          const float v = da_acc[it][half][e];
          if (direct) {
            store_from_float(a.da, a.da_dtype, (j - a.f) * a.K + k, a.inv_keep * v);
          } else {
            a.da_part[(mp * r_t + j - a.f) * a.K + k] = v;
          }
        }
      }
    }
  }
  if (!direct && arrive_last(a.da_counters + kt * gridDim.y + blockIdx.y, static_cast<unsigned>(a.num_m_panels))) {
    for (int idx = static_cast<int>(threadIdx.x); idx < RC * kC; idx += kWideThreads) {
      const int64_t j = da_chunk * RC + idx / kC, k = k0 + idx % kC;
      if (j < a.f || j >= a.r || k >= a.K) continue;
      float sum = 0.f;
      for (int64_t p = 0; p < a.num_m_panels; ++p) sum += __ldcg(a.da_part + (p * r_t + j - a.f) * a.K + k);
      store_from_float(a.da, a.da_dtype, (j - a.f) * a.K + k, a.inv_keep * sum);
    }
  }
}

// --- dropout mask -------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(256)
    dropout_mask_kernel(LoraDropout d, int64_t total, uint8_t* __restrict__ keep) {
  for (int64_t g = int64_t(blockIdx.x) * 256 + threadIdx.x; g * 4 < total; g += int64_t(gridDim.x) * 256) {
    const Philox4 w = philox4x32_10(static_cast<uint64_t>(g), static_cast<uint64_t>(d.seed_offset[1]),
                                    static_cast<uint64_t>(d.seed_offset[0]));
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (g * 4 + i < total) keep[g * 4 + i] = (w.w[i] >> 8) < d.keep_threshold ? 1 : 0;
  }
}

// --- host side: planning and launching ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round4(int64_t floats) { return ceil_div(floats, 4) * 4; }  // keeps every workspace region 16-byte aligned
int64_t clamp64(int64_t v, int64_t lo, int64_t hi) { return std::max(lo, std::min(v, hi)); }

Prec precision_of(DType dt, const char* entry) {
  switch (dt) {
    case DType::kBFloat16:
      return Prec::kBF16;
    case DType::kFloat16:
      return Prec::kF16;
    case DType::kFloat32:
      return Prec::kF32;
  }
  throw bad_argument(entry, "unsupported dtype code for the activations");
}

int tile_cols(Prec p) { return p == Prec::kF32 ? Precision<Prec::kF32>::kTileC : Precision<Prec::kBF16>::kTileC; }

// The rank chunk a launch works on: the smallest of 16, 32, 64 that holds r (r > 64 loops over chunks of 64, or of 32
// for fp32 activations).
int rank_chunk(Prec p, int64_t r) {
  if (r <= 16) return 16;
  if (r <= 32 || max_rank_chunk(p) == 32) return 32;
  return 64;
}

int dy_max_tiles(Prec p, int rc) {
  switch (p) {
    case Prec::kF32:
      return rc == 16 ? dy_max_tiles<Prec::kF32, 16>() : dy_max_tiles<Prec::kF32, 32>();
    default:
      return rc == 16 ? dy_max_tiles<Prec::kBF16, 16>()
                      : (rc == 32 ? dy_max_tiles<Prec::kBF16, 32>() : dy_max_tiles<Prec::kBF16, 64>());
  }
}

// Calls f(std::integral_constant<Prec, P>, std::integral_constant<int, RC>) for the instantiation serving (p, rc).
template <Prec P, class F>
void with_rank_chunk(int rc, F&& f) {
  using PC = std::integral_constant<Prec, P>;
  if (rc == 16) {
    f(PC{}, std::integral_constant<int, 16>{});
    return;
  }
  if constexpr (max_rank_chunk(P) >= 64) {
    if (rc == 64) {
      f(PC{}, std::integral_constant<int, 64>{});
      return;
    }
  }
  f(PC{}, std::integral_constant<int, 32>{});
}

template <class F>
void with_kernel_config(Prec p, int rc, F&& f) {
  switch (p) {
    case Prec::kBF16:
      with_rank_chunk<Prec::kBF16>(rc, f);
      return;
    case Prec::kF16:
      with_rank_chunk<Prec::kF16>(rc, f);
      return;
    case Prec::kF32:
      with_rank_chunk<Prec::kF32>(rc, f);
      return;
  }
}

struct Panels {
  int64_t tiles_a, tiles_b;         // tiles along the two panel dimensions
  int64_t per_panel_a, per_panel_b;
  int64_t panels_a, panels_b;
};

// Every block of a launch gets the same work (the whole tiles of its panel), so a grid a little larger than what the
// GPU holds at once (`target` blocks) takes a whole second round for its last few blocks. choose_panels picks how many
// panels to cut `tiles` into for a grid of blocks_per_panel blocks per panel: the count whose time, rounds of target
// blocks times the tiles of one panel, is least (up to 4 rounds; another count must be 1/32 better to win, so that
// ties go to fewer panels and less partial-sum traffic). At 132 SMs: 128 row tiles x 4 K panels = 512 blocks for
// 528 places rather than 5 panels and 640 blocks (two rounds).
int64_t choose_panels(int64_t tiles, int64_t blocks_per_panel, int64_t target) {
  if (tiles <= 1 || target <= 0) return 1;
  int64_t best = 1, best_cost = ceil_div(blocks_per_panel, target) * tiles;
  for (int64_t p = 2; p <= tiles && blocks_per_panel * p <= 4 * target; ++p) {
    const int64_t per = ceil_div(tiles, p), panels = ceil_div(tiles, per);
    const int64_t cost = ceil_div(blocks_per_panel * panels, target) * per;
    if (cost * 32 < best_cost * 31) {
      best = panels;
      best_cost = cost;
    }
  }
  return best;
}

// tiles_b in panels of at most max_b tiles, tiles_a into the panels choose_panels picks, then tiles_b further when
// every a tile already has its own panel; `others` blocks per (a, b) panel pair.
Panels plan_panels(int64_t tiles_a, int64_t tiles_b, int64_t max_b, int64_t others, int64_t target) {
  Panels p{tiles_a, tiles_b, 1, 1, 1, 1};
  if (tiles_a == 0 || tiles_b == 0) return p;
  int64_t pb = ceil_div(tiles_b, max_b);
  const int64_t pa = choose_panels(tiles_a, pb * others, target);
  if (pa == tiles_a) pb = std::max(pb, choose_panels(tiles_b, pa * others, target));
  p.per_panel_a = ceil_div(tiles_a, pa);
  p.panels_a = ceil_div(tiles_a, p.per_panel_a);
  p.per_panel_b = ceil_div(tiles_b, pb);
  p.panels_b = ceil_div(tiles_b, p.per_panel_b);
  return p;
}

int64_t target_blocks(int64_t num_sms, int per_sm) { return std::max<int64_t>(1, num_sms) * per_sm; }

// shrink: one block per (m tile, K panel, rank chunk); expand: one per (m tile, column panel). The columns are split
// into panels only when the m tiles alone leave SMs idle (tiles_a = m tiles, each its own panel).
struct ForwardPlan {
  Prec prec;
  int rc;
  int64_t chunks;
  Panels shrink, expand;
  int64_t workspace;  // floats
};

Panels split_columns(int64_t m_tiles, int64_t tiles, int64_t others, int64_t target) {
  Panels p{m_tiles, tiles, 1, 1, m_tiles, 1};
  if (m_tiles == 0 || tiles == 0) return p;
  p.per_panel_b = ceil_div(tiles, choose_panels(tiles, m_tiles * others, target));
  p.panels_b = ceil_div(tiles, p.per_panel_b);
  return p;
}

ForwardPlan plan_forward(int64_t M, int64_t K, int64_t N, int64_t r, DType x_dtype, int64_t num_sms,
                         const char* entry) {
  ForwardPlan p{};
  p.prec = precision_of(x_dtype, entry);
  p.rc = rank_chunk(p.prec, r);
  p.chunks = ceil_div(r, p.rc);
  const int64_t m_tiles = ceil_div(M, kRows);
  const int64_t target = target_blocks(num_sms, p.rc == 64 ? stream_min_blocks<64>() : stream_min_blocks<16>());
  // With N == 0 no expand runs to sum split-K partials, so the shrink writes u itself.
  p.shrink = split_columns(m_tiles, ceil_div(K, tile_cols(p.prec)), p.chunks, N > 0 ? target : 0);
  p.expand = split_columns(m_tiles, ceil_div(N, tile_cols(p.prec)), 1, target);
  p.workspace = p.shrink.panels_b > 1 ? round4(p.shrink.panels_b * M * r) : 0;
  return p;
}

struct BackwardPlan {
  Prec prec;
  int rc;
  int64_t chunks, r_t, first_da_chunk, da_groups;
  bool need_du, need_db, need_da, need_dx;
  Panels dy;  // (m tiles, n tiles)
  Panels x;   // (m tiles, k tiles), one k tile per panel
  // workspace regions, in floats from the start
  int64_t du, du_part, db_part, da_part, counters, du_counters, da_counters, total;
  int64_t counter_count;  // uint32 counters at `counters`
};

BackwardPlan plan_backward(int64_t M, int64_t N, int64_t K, int64_t r, int64_t f, DType dtype, bool need_dx,
                           bool need_da, bool need_db, int64_t num_sms, const char* entry) {
  BackwardPlan p{};
  p.prec = precision_of(dtype, entry);
  p.rc = rank_chunk(p.prec, r);
  p.chunks = ceil_div(r, p.rc);
  p.r_t = r - f;
  p.need_dx = need_dx;
  p.need_da = need_da && p.r_t > 0;
  p.need_db = need_db && p.r_t > 0;
  p.need_du = need_dx || p.need_da;
  p.first_da_chunk = f / p.rc;
  p.da_groups = p.need_da ? p.chunks - p.first_da_chunk : 1;
  const int64_t m_tiles = ceil_div(M, kRows), tc = tile_cols(p.prec);
  p.dy = plan_panels(m_tiles, ceil_div(N, tc), dy_max_tiles(p.prec, p.rc), p.chunks,
                     target_blocks(num_sms, kWideBlocksPerSm));
  p.x = plan_panels(m_tiles, ceil_div(K, tc), 1, p.da_groups, target_blocks(num_sms, kWideBlocksPerSm));
  int64_t at = 0;
  auto take = [&at](int64_t floats) {
    const int64_t start = at;
    at += round4(floats);
    return start;
  };
  p.du = take(p.need_du ? M * r : 0);
  p.du_part = take(p.need_du && p.dy.panels_b > 1 ? p.dy.panels_b * M * r : 0);
  p.db_part = take(p.need_db && p.dy.panels_a > 1 ? p.dy.panels_a * N * p.r_t : 0);
  p.da_part = take(p.need_da && p.x.panels_a > 1 ? p.x.panels_a * p.r_t * K : 0);
  const int64_t du_counters = p.need_du && p.dy.panels_b > 1 ? m_tiles * p.chunks : 0;
  const int64_t da_counters = p.need_da && p.x.panels_a > 1 ? p.x.tiles_b * p.da_groups : 0;
  p.counter_count = du_counters + da_counters;
  p.counters = take(p.counter_count);
  p.du_counters = p.counters;
  p.da_counters = p.counters + du_counters;
  p.total = at;
  return p;
}

bool row_aligned(const void* base, int64_t ld, DType dt) {
  return aligned16(base) && (ld * dtype_size(dt)) % 16 == 0;
}

void check_dims(int64_t M, int64_t C, int64_t ld, const char* entry, const char* what) {
  if (M < 0 || C < 0) throw bad_argument(entry, std::string(what) + ": matrix sizes must be >= 0");
  if (M > 1 && ld < C) throw bad_argument(entry, std::string(what) + ": row stride must be >= the row length");
}

LoraDropout normalized(LoraDropout d) {
  if (d.seed_offset == nullptr) d.keep_threshold = kKeepAll;
  if (d.keep_threshold == 0 || d.keep_threshold > kKeepAll)
    throw std::invalid_argument("treelora._C: keep_threshold must be in [1, 2^24]");
  return d;
}

Strided strided(const LoraMatrix& m, int64_t rows, int64_t cols) {
  return Strided{m.data, m.dtype, m.stride0, m.stride1, rows, cols};
}

void check_grid(int64_t x, int64_t y, const char* entry) {
  if (x > 0x7fffffff || y > 65535) throw bad_argument(entry, "problem too large for one launch grid");
}

}  // namespace

int64_t lora_forward_workspace_size(int64_t M, int64_t K, int64_t N, int64_t r, DType x_dtype, int64_t num_sms) {
  if (M <= 0 || K <= 0 || r <= 0) return 0;
  return plan_forward(M, K, N, r, x_dtype, num_sms, "lora_forward_workspace_size").workspace;
}

void lora_forward(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, int64_t N, int64_t r, LoraMatrix a,
                  LoraMatrix b, const void* bias, DType bias_dtype, float scale, LoraDropout dropout, float* u,
                  void* t, int64_t ldt, float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry) {
  check_dims(M, K, ldx, entry, "x");
  check_dims(M, N, ldt, entry, "out");
  if (r < 1) throw bad_argument(entry, "rank must be >= 1");
  if (M == 0) return;
  const ForwardPlan plan = plan_forward(M, K, N, r, x_dtype, num_sms, entry);
  const int64_t shrink_blocks = plan.shrink.panels_a * plan.shrink.panels_b;
  check_grid(shrink_blocks, plan.chunks, entry);
  if (K == 0) {  // an empty sum
    check_cuda(cudaMemsetAsync(u, 0, M * r * sizeof(float), stream), entry, "cudaMemsetAsync");
  } else {
    ShrinkArgs args{};
    args.x = x;
    args.ldx = ldx;
    args.M = M;
    args.K = K;
    args.vec_ok = row_aligned(x, ldx, x_dtype);
    args.a = strided(a, r, K);
    args.dropout = normalized(dropout);
    args.scale = scale;
    args.out = plan.shrink.panels_b > 1 ? workspace : u;
    args.r = r;
    args.k_tiles = plan.shrink.tiles_b;
    args.k_tiles_per_panel = plan.shrink.per_panel_b;
    args.num_k_panels = plan.shrink.panels_b;
    const dim3 grid(static_cast<unsigned>(shrink_blocks), static_cast<unsigned>(plan.chunks));
    with_kernel_config(plan.prec, plan.rc, [&](auto p, auto rc) {
      constexpr Prec kP = decltype(p)::value;
      constexpr int kRC = decltype(rc)::value;
      lora_shrink_kernel<kP, kRC><<<grid, kStreamThreads, 0, stream>>>(args);
    });
    check_launch(entry);
  }
  if (N == 0) return;
  ExpandArgs args{};
  const bool split = K > 0 && plan.shrink.panels_b > 1;
  args.u = split ? SlabSum{workspace, plan.shrink.panels_b, M * r, r, M, r, scale} : SlabSum{u, 1, 0, r, M, r, 1.f};
  args.u_out = split ? u : nullptr;
  args.b = strided(b, N, r);
  args.bias = bias;
  args.bias_dtype = bias_dtype;
  args.out = t;
  args.ldo = ldt;
  args.M = M;
  args.N = N;
  args.r = r;
  args.num_chunks = plan.chunks;
  args.c_tiles = plan.expand.tiles_b;
  args.c_tiles_per_panel = plan.expand.per_panel_b;
  args.num_c_panels = plan.expand.panels_b;
  args.vec_ok = row_aligned(t, ldt, x_dtype);
  const int64_t blocks = plan.expand.panels_a * plan.expand.panels_b;
  check_grid(blocks, 1, entry);
  with_kernel_config(plan.prec, plan.rc, [&](auto p, auto rc) {
    constexpr Prec kP = decltype(p)::value;
    constexpr int kRC = decltype(rc)::value;
    lora_expand_kernel<kP, kRC><<<static_cast<unsigned>(blocks), kStreamThreads, 0, stream>>>(args);
  });
  check_launch(entry);
}

int64_t lora_backward_workspace_size(int64_t M, int64_t N, int64_t K, int64_t r, int64_t f, DType dtype, bool need_dx,
                                     bool need_da, bool need_db, int64_t num_sms) {
  if (M <= 0 || r <= 0 || f < 0 || f > r) return 0;
  return plan_backward(M, N, K, r, f, dtype, need_dx, need_da, need_db, num_sms, "lora_backward_workspace_size").total;
}

void lora_backward(const void* dy, int64_t lddy, const void* x, int64_t ldx, DType dtype, int64_t M, int64_t N,
                   int64_t K, int64_t r, int64_t f, LoraMatrix a, LoraMatrix b, const float* u, float scale,
                   LoraDropout dropout, float inv_keep, void* dxt, int64_t lddx, void* da, DType da_dtype, void* db,
                   DType db_dtype, float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry) {
  check_dims(M, N, lddy, entry, "dy");
  check_dims(M, K, ldx, entry, "x");
  check_dims(M, K, lddx, entry, "dx");
  if (r < 1 || f < 0 || f > r) throw bad_argument(entry, "need r >= 1 and 0 <= frozen_rank <= r");
  const int64_t r_t = r - f;
  if (M == 0) {  // empty sums over the batch
    if (da != nullptr && r_t * K > 0)
      check_cuda(cudaMemsetAsync(da, 0, r_t * K * dtype_size(da_dtype), stream), entry, "cudaMemsetAsync");
    if (db != nullptr && N * r_t > 0)
      check_cuda(cudaMemsetAsync(db, 0, N * r_t * dtype_size(db_dtype), stream), entry, "cudaMemsetAsync");
    return;
  }
  const BackwardPlan plan =
      plan_backward(M, N, K, r, f, dtype, dxt != nullptr, da != nullptr, db != nullptr, num_sms, entry);
  float* du = workspace + plan.du;
  unsigned* counters = reinterpret_cast<unsigned*>(workspace + plan.counters);
  const int64_t counter_bytes = plan.counter_count * 4;
  if (counter_bytes > 0)
    check_cuda(cudaMemsetAsync(counters, 0, counter_bytes, stream), entry, "cudaMemsetAsync");
  const LoraDropout drop = normalized(dropout);

  if ((plan.need_du || plan.need_db) && N > 0) {
    BwdDyArgs args{};
    args.dy = dy;
    args.lddy = lddy;
    args.M = M;
    args.N = N;
    args.r = r;
    args.f = f;
    args.vec_ok = row_aligned(dy, lddy, dtype);
    args.b = strided(b, N, r);
    args.u = SlabSum{u, 1, 0, r, M, r, 1.f};
    args.du = du;
    args.du_part = workspace + plan.du_part;
    args.du_counters = reinterpret_cast<unsigned*>(workspace + plan.du_counters);
    args.du_scale = scale;
    args.db_part = workspace + plan.db_part;
    args.db = db;
    args.db_dtype = db_dtype;
    args.do_du = plan.need_du;
    args.do_db = plan.need_db;
    args.m_tiles = plan.dy.tiles_a;
    args.n_tiles = plan.dy.tiles_b;
    args.m_tiles_per_panel = plan.dy.per_panel_a;
    args.n_tiles_per_panel = plan.dy.per_panel_b;
    args.num_m_panels = plan.dy.panels_a;
    args.num_n_panels = plan.dy.panels_b;
    args.num_chunks = plan.chunks;
    const int64_t blocks = plan.dy.panels_a * plan.dy.panels_b;
    check_grid(blocks, plan.chunks, entry);
    const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(plan.chunks));
    with_kernel_config(plan.prec, plan.rc, [&](auto p, auto rc) {
      constexpr Prec kP = decltype(p)::value;
      constexpr int kRC = decltype(rc)::value;
      lora_bwd_dy_kernel<kP, kRC><<<grid, kWideThreads, 0, stream>>>(args);
    });
    check_launch(entry);
  } else if (plan.need_du) {  // N == 0: du is an empty sum
    check_cuda(cudaMemsetAsync(du, 0, M * r * sizeof(float), stream), entry, "cudaMemsetAsync");
  }

  const bool work = (plan.need_dx || plan.need_da) && K > 0;
  const bool finish_db = plan.need_db && N > 0 && plan.dy.panels_a > 1;
  if (!work && !finish_db) return;
  BwdXArgs args{};
  args.x = x;
  args.ldx = ldx;
  args.M = M;
  args.K = K;
  args.r = r;
  args.f = f;
  args.x_vec_ok = row_aligned(x, ldx, dtype);
  args.a = strided(a, r, K);
  args.du = SlabSum{du, 1, 0, r, M, r, 1.f};
  args.dropout = drop;
  args.inv_keep = inv_keep;
  args.dxt = dxt;
  args.lddx = lddx;
  args.dx_vec_ok = row_aligned(dxt, lddx, dtype);
  args.do_dx = work && plan.need_dx;
  args.do_da = work && plan.need_da;
  args.da_part = workspace + plan.da_part;
  args.da_counters = reinterpret_cast<unsigned*>(workspace + plan.da_counters);
  args.da = da;
  args.da_dtype = da_dtype;
  args.db_part = finish_db ? workspace + plan.db_part : nullptr;
  args.db_count = plan.dy.panels_a;
  args.db_elems = N * r_t;
  args.db = db;
  args.db_dtype = db_dtype;
  args.m_tiles = plan.x.tiles_a;
  args.k_tiles = plan.x.tiles_b;
  args.m_tiles_per_panel = plan.x.per_panel_a;
  args.num_m_panels = plan.x.panels_a;
  args.num_chunks = plan.chunks;
  args.first_da_chunk = plan.first_da_chunk;
  int64_t blocks = 0, groups = 1;
  if (work) {
    blocks = plan.x.panels_a * plan.x.tiles_b;
    groups = args.do_da ? plan.da_groups : 1;
  } else {  // only dB's sums: a grid sized to the elements
    blocks = clamp64(ceil_div(N * r_t, 4 * kWideThreads), 1, target_blocks(num_sms, kWideBlocksPerSm));
  }
  check_grid(blocks, groups, entry);
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(groups));
  with_kernel_config(plan.prec, plan.rc, [&](auto p, auto rc) {
    constexpr Prec kP = decltype(p)::value;
    constexpr int kRC = decltype(rc)::value;
    lora_bwd_x_kernel<kP, kRC><<<grid, kWideThreads, 0, stream>>>(args);
  });
  check_launch(entry);
}

LoraPlanInfo lora_plan(int64_t M, int64_t K, int64_t N, int64_t r, int64_t f, DType dtype, int64_t num_sms,
                       bool need_dx, bool need_da, bool need_db) {
  const char* entry = "lora_plan";
  if (M < 0 || K < 0 || N < 0 || r < 1 || f < 0 || f > r) throw bad_argument(entry, "invalid problem size");
  const ForwardPlan fwd = plan_forward(M, K, N, r, dtype, num_sms, entry);
  const BackwardPlan bwd = plan_backward(M, N, K, r, f, dtype, need_dx, need_da, need_db, num_sms, entry);
  LoraPlanInfo info{};
  info.rank_chunk = fwd.rc;
  info.chunks = fwd.chunks;
  info.shrink_k_panels = fwd.shrink.panels_b;
  info.expand_c_panels = fwd.expand.panels_b;
  info.dy_m_panels = bwd.dy.panels_a;
  info.dy_n_panels = bwd.dy.panels_b;
  info.x_m_panels = bwd.x.panels_a;
  info.forward_workspace = lora_forward_workspace_size(M, K, N, r, dtype, num_sms);
  info.backward_workspace = lora_backward_workspace_size(M, N, K, r, f, dtype, need_dx, need_da, need_db, num_sms);
  info.counters = bwd.counter_count;
  return info;
}

void lora_dropout_mask(LoraDropout dropout, int64_t M, int64_t C, uint8_t* keep, cudaStream_t stream,
                       const char* entry) {
  if (M < 0 || C < 0) throw bad_argument(entry, "matrix sizes must be >= 0");
  if (dropout.seed_offset == nullptr) throw bad_argument(entry, "seed_offset must be set");
  if (M * C == 0) return;
  const int64_t groups = ceil_div(M * C, 4);
  const int64_t grid = std::min<int64_t>(ceil_div(groups, 256), int64_t(sm_count(entry)) * 8);
  dropout_mask_kernel<<<static_cast<unsigned>(grid), 256, 0, stream>>>(normalized(dropout), M * C, keep);
  check_launch(entry);
}

}  // namespace treelora
