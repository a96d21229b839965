// LoRA-branch kernels: see lora.h for the contract.
//
// The panel kernel serves shrink, backward_dy and grad_a. It streams an (M, C) activation matrix X (x or dy) through
// shared memory in tiles of kTileM x kTileC elements, converted to fp32 once (dropout applied on the way in), and
// computes on each tile
//   row-dot:    R[m, j] += sum_c X[m, c] P(c, j)     (u = x A^T, du = dy B)       accumulated over the panel's tiles
//   column-sum: Q[j, c] += sum_m U[m, j] X[m, c]     (dB = dy^T u, dA = du^T x)   accumulated over the panel's rows
// with fp32 FMAs on register tiles (CUDA cores: the rank r <= 32 per rank chunk is too small to fill a tensor-core
// tile without padding, and fp32 inputs must not be rounded to tf32). Each block owns one panel of the grid and
// writes its sums into its own partial slab; a second kernel adds the slabs in a fixed order and applies the scale,
// so results are bitwise reproducible without float atomics.
#include <algorithm>

#include "device_utils.cuh"
#include "lora.h"

namespace treelora {
namespace {

constexpr int kThreads = 256;
constexpr int kTileM = 16;            // rows per tile
constexpr int kTileC = 128;           // columns per tile: 16 threads x 8 elements (one 16-byte load of bf16/fp16)
constexpr int kPadC = kTileC + 4;     // shared row stride: keeps rows 16-byte aligned, 2-way bank conflicts at most
constexpr int kRowWarps = kThreads / kWarpSize;  // the row-dot splits a tile's columns over the 8 warps
constexpr int kRowCols = kTileC / kRowWarps;     // 16 columns per warp
constexpr int kBufFloats = 4096;      // union: X tile (16 x 132), row-dot reduction (8 x 16 x 32), column reduction
constexpr int kBlocksPerSmTarget = 4; // panels per SM the planner aims for
constexpr uint32_t kKeepAll = 1u << 24;

static_assert(kTileM * kPadC <= kBufFloats, "X tile must fit the shared buffer");
static_assert(kRowWarps * kTileM * 32 <= kBufFloats, "row-dot reduction must fit the shared buffer");
static_assert(kTileM * 2 * 8 == kThreads, "row-dot mapping: 16 rows x 2 rank halves x 8 warps");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rank chunk width: the smallest of 8, 16, 32 that holds r (larger ranks loop over chunks of 32 in grid.y).
int pick_rank_chunk(int64_t r) { return r <= 8 ? 8 : (r <= 16 ? 16 : 32); }

struct PanelPlan {
  int rc;                                 // rank chunk width
  int64_t rank_chunks, rank_pad;          // chunks, chunks * rc
  int64_t m_tiles, c_tiles;
  int64_t panel_m_tiles, panel_c_tiles;   // tiles per panel
  int64_t num_m_panels, num_c_panels;
  int64_t row_floats, col_floats;         // partial slabs: num_c_panels x (M x rank_pad), num_m_panels x (rank_pad x C)
};

// A column-sum needs its accumulators to stay in registers across the panel's rows, so its panels are one tile wide
// and tall; a pure row-dot panel is one tile tall and as wide as it takes to give every SM ~4 panels.
PanelPlan plan_panels(int64_t M, int64_t C, int64_t r_row, int64_t r_col, int64_t num_sms) {
  PanelPlan p{};
  const int64_t r = std::max(r_row, r_col);
  p.rc = pick_rank_chunk(r);
  p.rank_chunks = ceil_div(r, p.rc);
  p.rank_pad = p.rank_chunks * p.rc;
  p.m_tiles = ceil_div(M, kTileM);
  p.c_tiles = ceil_div(C, kTileC);
  const int64_t target = std::max<int64_t>(1, ceil_div(std::max<int64_t>(1, num_sms) * kBlocksPerSmTarget,
                                                       p.rank_chunks));
  if (r_col > 0) {
    p.panel_c_tiles = 1;
    p.num_c_panels = p.c_tiles;
    const int64_t want = std::min(p.m_tiles, std::max<int64_t>(1, ceil_div(target, p.c_tiles)));
    p.panel_m_tiles = ceil_div(p.m_tiles, want);
    p.num_m_panels = ceil_div(p.m_tiles, p.panel_m_tiles);
  } else {
    p.panel_m_tiles = 1;
    p.num_m_panels = p.m_tiles;
    const int64_t want = std::min(p.c_tiles, std::max<int64_t>(1, ceil_div(target, p.m_tiles)));
    p.panel_c_tiles = ceil_div(p.c_tiles, want);
    p.num_c_panels = ceil_div(p.c_tiles, p.panel_c_tiles);
  }
  p.row_floats = r_row > 0 ? p.num_c_panels * M * p.rank_pad : 0;
  p.col_floats = r_col > 0 ? p.num_m_panels * p.rank_pad * C : 0;
  return p;
}

struct PanelArgs {
  const void* x;
  int64_t ldx, M, C;
  LoraDropout dropout;
  bool vec_ok;           // x and every row start 16-byte aligned
  // row-dot: P(c, j) = p[c * p_sc + j * p_sj], j < r_row; sums into row_part[c_panel][m][rank_pad]
  const void* p;
  DType p_dtype;
  int64_t p_sc, p_sj, r_row;
  float* row_part;
  // column-sum: U(m, j) = u[m * ldu + j], j < r_col; sums into col_part[m_panel][j][C] (j < rank_pad)
  const float* u;
  int64_t ldu, r_col;
  float* col_part;
  int64_t rank_pad, m_tiles, c_tiles, panel_m_tiles, panel_c_tiles, num_c_panels;
};

// Stages X[m0 : m0 + 16, c0 : c0 + 128] into xs as fp32 (zero outside the matrix, dropped entries zeroed).
template <typename TX>
__device__ __forceinline__ void stage_x(const PanelArgs& a, float (*xs)[kPadC], int64_t m0, int64_t c0,
                                        bool dropout) {
  const int row = threadIdx.x / (kTileC / 8), col = (threadIdx.x % (kTileC / 8)) * 8;
  const int64_t m = m0 + row, c = c0 + col;
  const TX* src = static_cast<const TX*>(a.x) + m * a.ldx + c;
  float v[8];
  if (m < a.M && a.vec_ok && c + 8 <= a.C) {
    load_vec<TX, 8>(src, v);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (m < a.M && c + e < a.C) ? to_float(src[e]) : 0.f;
  }
  if (dropout && m < a.M) {
    DropoutStream keep({a.dropout.seed_offset, a.dropout.keep_threshold, a.C});
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (c + e < a.C && !keep.keep(m * a.C + c + e)) v[e] = 0.f;
  }
  float4* dst = reinterpret_cast<float4*>(&xs[row][col]);
  dst[0] = make_float4(v[0], v[1], v[2], v[3]);
  dst[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <int RC, typename TX>
__global__ void __launch_bounds__(kThreads) lora_panel_kernel(PanelArgs a) {
  constexpr int kTJ = RC / 2;         // row-dot: each thread owns one row and half of the rank chunk
  constexpr int kColJG = RC / 4;      // column-sum: rank groups of 4
  constexpr int kColMQ = 32 / RC;     // column-sum: the block's 8 warps split a tile's rows kColMQ ways
  static_assert(kColMQ * kColJG * 32 == kThreads, "column-sum mapping must use every thread");
  static_assert(kColMQ * RC * kTileC <= kBufFloats, "column reduction must fit the shared buffer");

  __shared__ __align__(16) float buf[kBufFloats];
  __shared__ __align__(16) float ps[kTileC][RC];
  __shared__ __align__(16) float us[kTileM][RC];
  float (*xs)[kPadC] = reinterpret_cast<float (*)[kPadC]>(buf);

  const int64_t j0 = int64_t(blockIdx.y) * RC;
  const bool do_row = a.row_part != nullptr && j0 < a.r_row;
  const bool do_col = a.col_part != nullptr && j0 < a.r_col;
  if (!do_row && !do_col) return;  // uniform over the block
  const bool dropout = a.dropout.seed_offset != nullptr && a.dropout.keep_threshold < kKeepAll;
  const int64_t mp = blockIdx.x / a.num_c_panels, cp = blockIdx.x % a.num_c_panels;
  const int64_t mt_begin = mp * a.panel_m_tiles, mt_end = min(a.m_tiles, mt_begin + a.panel_m_tiles);
  const int64_t ct_begin = cp * a.panel_c_tiles, ct_end = min(a.c_tiles, ct_begin + a.panel_c_tiles);

  const int tid = threadIdx.x;
  // row-dot mapping: warp w sums columns [16 w, 16 w + 16) of the tile for row rm, ranks [jg kTJ, jg kTJ + kTJ)
  const int r_jg = tid & 1, r_m = (tid >> 1) & (kTileM - 1), r_warp = tid >> 5;
  // column-sum mapping: columns [4 cg, 4 cg + 4), ranks [4 jg, 4 jg + 4), rows mq, mq + kColMQ, ...
  const int c_cg = tid & 31, c_jg = (tid >> 5) % kColJG, c_mq = (tid >> 5) / kColJG;

  float col_acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int k = 0; k < 4; ++k) col_acc[i][k] = 0.f;
  int64_t staged_p_tile = -1;

  for (int64_t mt = mt_begin; mt < mt_end; ++mt) {
    const int64_t m0 = mt * kTileM;
    float row_acc[kTJ];
#pragma unroll
    for (int k = 0; k < kTJ; ++k) row_acc[k] = 0.f;
    for (int64_t ct = ct_begin; ct < ct_end; ++ct) {
      const int64_t c0 = ct * kTileC;
      __syncthreads();  // the previous tile (or reduction) is done with buf, ps and us
      stage_x<TX>(a, xs, m0, c0, dropout);
      if (do_row && ct != staged_p_tile) {
        for (int idx = tid; idx < kTileC * RC; idx += kThreads) {
          int c, j;
          if (a.p_sc == 1) {  // A (r, K): consecutive threads read consecutive columns
            c = idx % kTileC;
            j = idx / kTileC;
          } else {  // B (N, r): consecutive threads read along a row of B
            j = idx % RC;
            c = idx / RC;
          }
          const int64_t cc = c0 + c, jj = j0 + j;
          ps[c][j] = (cc < a.C && jj < a.r_row) ? load_as_float(a.p, a.p_dtype, cc * a.p_sc + jj * a.p_sj) : 0.f;
        }
        staged_p_tile = ct;
      }
      if (do_col && ct == ct_begin) {
        for (int idx = tid; idx < kTileM * RC; idx += kThreads) {
          const int mm = idx / RC, j = idx % RC;
          const int64_t m = m0 + mm, jj = j0 + j;
          us[mm][j] = (m < a.M && jj < a.r_col) ? a.u[m * a.ldu + jj] : 0.f;
        }
      }
      __syncthreads();
      if (do_row) {
#pragma unroll 4
        for (int cc = 0; cc < kRowCols; ++cc) {
          const int c = r_warp * kRowCols + cc;
          const float xv = xs[r_m][c];
          const float4* pv = reinterpret_cast<const float4*>(&ps[c][r_jg * kTJ]);
#pragma unroll
          for (int q = 0; q < kTJ / 4; ++q) {
            const float4 w = pv[q];
            row_acc[4 * q + 0] += xv * w.x;
            row_acc[4 * q + 1] += xv * w.y;
            row_acc[4 * q + 2] += xv * w.z;
            row_acc[4 * q + 3] += xv * w.w;
          }
        }
      }
      if (do_col) {
        for (int mm = c_mq; mm < kTileM; mm += kColMQ) {
          const float4 xv = *reinterpret_cast<const float4*>(&xs[mm][4 * c_cg]);
          const float4 uv = *reinterpret_cast<const float4*>(&us[mm][4 * c_jg]);
          const float xa[4] = {xv.x, xv.y, xv.z, xv.w}, ua[4] = {uv.x, uv.y, uv.z, uv.w};
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int k = 0; k < 4; ++k) col_acc[i][k] += ua[i] * xa[k];
        }
      }
    }
    if (do_row) {
      // Sum the 8 warps' column slices of this row tile in a fixed order and write the panel's partial.
      float* red = buf;  // [kRowWarps][kTileM][RC]
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kTJ; ++k) red[(r_warp * kTileM + r_m) * RC + r_jg * kTJ + k] = row_acc[k];
      __syncthreads();
      for (int idx = tid; idx < kTileM * RC; idx += kThreads) {
        const int mm = idx / RC, j = idx % RC;
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kRowWarps; ++w) s += red[(w * kTileM + mm) * RC + j];
        const int64_t m = m0 + mm;
        if (m < a.M && j0 + j < a.r_row) a.row_part[(cp * a.M + m) * a.rank_pad + j0 + j] = s;
      }
    }
  }
  if (do_col) {
    float* red = buf;  // [kColMQ][RC][kTileC]
    __syncthreads();
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int k = 0; k < 4; ++k) red[(c_mq * RC + 4 * c_jg + i) * kTileC + 4 * c_cg + k] = col_acc[i][k];
    __syncthreads();
    const int64_t c0 = ct_begin * kTileC;
    for (int idx = tid; idx < RC * kTileC; idx += kThreads) {
      const int j = idx / kTileC, c = idx % kTileC;
      float s = 0.f;
#pragma unroll
      for (int q = 0; q < kColMQ; ++q) s += red[(q * RC + j) * kTileC + c];
      if (c0 + c < a.C && j0 + j < a.r_col) a.col_part[(mp * a.rank_pad + j0 + j) * a.C + c0 + c] = s;
    }
  }
}

// out(i, j) = scale * sum_p part[p * slab + i * ld + j], stored at out + i * s0 + j * s1 in out_dtype. Fixed order.
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* __restrict__ part, int64_t count, int64_t slab, int64_t rows, int64_t cols,
                        int64_t ld, float scale, void* out, DType out_dtype, int64_t s0, int64_t s1) {
  const int64_t total = rows * cols;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    const int64_t i = idx / cols, j = idx - i * cols;
    float s = 0.f;
    for (int64_t p = 0; p < count; ++p) s += part[p * slab + i * ld + j];
    store_from_float(out, out_dtype, i * s0 + j * s1, scale * s);
  }
}

// --- expand ------------------------------------------------------------------------------------------------------

constexpr int kExpandM = 32;    // rows per tile: 16 row pairs
constexpr int kExpandC = 128;   // columns per tile: 16 groups of 8 (one 16-byte store of bf16/fp16)
constexpr int kExpandJ = 32;    // ranks staged per step

struct ExpandArgs {
  const float* u;
  int64_t ldu, M, C, r;
  const void* p;
  DType p_dtype;
  int64_t p_sc, p_sj;
  const void* bias;
  DType bias_dtype;
  float scale;
  LoraDropout dropout;
  void* out;
  int64_t ldo;
  bool vec_ok;  // out and every row start 16-byte aligned
};

template <typename TO>
__global__ void __launch_bounds__(kThreads) lora_expand_kernel(ExpandArgs a) {
  __shared__ __align__(16) float us[kExpandJ][kExpandM];
  __shared__ __align__(16) float ps[kExpandJ][kExpandC];
  const int tid = threadIdx.x;
  const int ng = tid % 16, mg = tid / 16;  // columns [8 ng, 8 ng + 8), rows 2 mg and 2 mg + 1
  const bool dropout = a.dropout.seed_offset != nullptr && a.dropout.keep_threshold < kKeepAll;
  const int64_t m_tiles = (a.M + kExpandM - 1) / kExpandM, c_tiles = (a.C + kExpandC - 1) / kExpandC;
  for (int64_t tile = blockIdx.x; tile < m_tiles * c_tiles; tile += gridDim.x) {
    const int64_t m0 = (tile / c_tiles) * kExpandM, c0 = (tile % c_tiles) * kExpandC;
    float acc[2][8];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] = 0.f;
    for (int64_t jc = 0; jc < a.r; jc += kExpandJ) {
      __syncthreads();  // the previous step is done with us and ps
      for (int idx = tid; idx < kExpandJ * kExpandM; idx += kThreads) {
        const int mm = idx / kExpandJ, j = idx % kExpandJ;  // consecutive threads read along a row of u
        const int64_t m = m0 + mm, jj = jc + j;
        us[j][mm] = (m < a.M && jj < a.r) ? a.u[m * a.ldu + jj] : 0.f;
      }
      for (int idx = tid; idx < kExpandJ * kExpandC; idx += kThreads) {
        int c, j;
        if (a.p_sc == 1) {  // A (r, K) as the operand of dx: consecutive threads read consecutive columns
          c = idx % kExpandC;
          j = idx / kExpandC;
        } else {  // B (N, r): consecutive threads read along a row of B
          j = idx % kExpandJ;
          c = idx / kExpandJ;
        }
        const int64_t cc = c0 + c, jj = jc + j;
        ps[j][c] = (cc < a.C && jj < a.r) ? load_as_float(a.p, a.p_dtype, cc * a.p_sc + jj * a.p_sj) : 0.f;
      }
      __syncthreads();
      const int jn = static_cast<int>(min(int64_t(kExpandJ), a.r - jc));
      for (int j = 0; j < jn; ++j) {
        const float2 uv = *reinterpret_cast<const float2*>(&us[j][2 * mg]);
        const float4 p0 = *reinterpret_cast<const float4*>(&ps[j][8 * ng]);
        const float4 p1 = *reinterpret_cast<const float4*>(&ps[j][8 * ng + 4]);
        const float pv[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          acc[0][e] += uv.x * pv[e];
          acc[1][e] += uv.y * pv[e];
        }
      }
    }
    const int64_t c = c0 + 8 * ng;
    float bias[8];
#pragma unroll
    for (int e = 0; e < 8; ++e)
      bias[e] = (a.bias != nullptr && c + e < a.C) ? load_as_float(a.bias, a.bias_dtype, c + e) : 0.f;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t m = m0 + 2 * mg + i;
      if (m >= a.M) continue;
      float v[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] = a.scale * acc[i][e];
      if (dropout) {
        DropoutStream keep({a.dropout.seed_offset, a.dropout.keep_threshold, a.C});
#pragma unroll
        for (int e = 0; e < 8; ++e)
          if (c + e < a.C && !keep.keep(m * a.C + c + e)) v[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < 8; ++e) v[e] += bias[e];
      TO* dst = static_cast<TO*>(a.out) + m * a.ldo + c;
      if (a.vec_ok && c + 8 <= a.C) {
        store_vec<TO, 8>(dst, v);
      } else {
        for (int e = 0; e < 8 && c + e < a.C; ++e) dst[e] = from_float<TO>(v[e]);
      }
    }
  }
}

// --- dropout mask ------------------------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    dropout_mask_kernel(LoraDropout d, int64_t total, uint8_t* __restrict__ keep) {
  for (int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x; g * 4 < total; g += int64_t(gridDim.x) * kThreads) {
    const Philox4 w = philox4x32_10(static_cast<uint64_t>(g), static_cast<uint64_t>(d.seed_offset[1]),
                                    static_cast<uint64_t>(d.seed_offset[0]));
#pragma unroll
    for (int i = 0; i < 4; ++i)
      if (g * 4 + i < total) keep[g * 4 + i] = (w.w[i] >> 8) < d.keep_threshold ? 1 : 0;
  }
}

// --- host side ---------------------------------------------------------------------------------------------------

bool row_aligned(const void* base, int64_t ld, DType dt) {
  return aligned16(base) && (ld * dtype_size(dt)) % 16 == 0;
}

void check_dims(int64_t M, int64_t C, int64_t ld, const char* entry) {
  if (M < 0 || C < 0) throw bad_argument(entry, "matrix sizes must be >= 0");
  if (M > 0 && ld < C) throw bad_argument(entry, "row stride must be >= the row length");
}

LoraDropout normalized(LoraDropout d) {
  if (d.seed_offset == nullptr) d.keep_threshold = kKeepAll;
  if (d.keep_threshold == 0 || d.keep_threshold > kKeepAll)
    throw std::invalid_argument("treelora._C: keep_threshold must be in [1, 2^24]");
  return d;
}

void launch_panel(const PanelArgs& args, const PanelPlan& plan, DType x_dtype, cudaStream_t stream,
                  const char* entry) {
  if (plan.rank_chunks > 65535) throw bad_argument(entry, "rank too large");
  const dim3 grid(static_cast<unsigned>(plan.num_m_panels * plan.num_c_panels), static_cast<unsigned>(plan.rank_chunks));
  with_dtype(x_dtype, entry, "x", [&](auto tag) {
    using TX = decltype(tag);
    switch (plan.rc) {
      case 8:
        lora_panel_kernel<8, TX><<<grid, kThreads, 0, stream>>>(args);
        break;
      case 16:
        lora_panel_kernel<16, TX><<<grid, kThreads, 0, stream>>>(args);
        break;
      default:
        lora_panel_kernel<32, TX><<<grid, kThreads, 0, stream>>>(args);
    }
  });
  check_launch(entry);
}

void launch_sum(const float* part, int64_t count, int64_t slab, int64_t rows, int64_t cols, int64_t ld, float scale,
                void* out, DType out_dtype, int64_t s0, int64_t s1, int64_t num_sms, cudaStream_t stream,
                const char* entry) {
  const int64_t blocks = std::max<int64_t>(1, std::min(ceil_div(rows * cols, kThreads), num_sms * 8));
  sum_partials_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(part, count, slab, rows, cols, ld,
                                                                              scale, out, out_dtype, s0, s1);
  check_launch(entry);
}

PanelArgs panel_args(const void* x, int64_t ldx, int64_t M, int64_t C, DType x_dtype, LoraDropout dropout,
                     const PanelPlan& plan) {
  PanelArgs a{};
  a.x = x;
  a.ldx = ldx;
  a.M = M;
  a.C = C;
  a.dropout = dropout;
  a.vec_ok = row_aligned(x, ldx, x_dtype);
  a.rank_pad = plan.rank_pad;
  a.m_tiles = plan.m_tiles;
  a.c_tiles = plan.c_tiles;
  a.panel_m_tiles = plan.panel_m_tiles;
  a.panel_c_tiles = plan.panel_c_tiles;
  a.num_c_panels = plan.num_c_panels;
  return a;
}

}  // namespace

int64_t lora_panel_workspace_size(int64_t M, int64_t C, int64_t r_row, int64_t r_col, int64_t num_sms) {
  if (M <= 0 || C <= 0 || (r_row <= 0 && r_col <= 0)) return 0;
  const PanelPlan p = plan_panels(M, C, std::max<int64_t>(0, r_row), std::max<int64_t>(0, r_col), num_sms);
  return p.row_floats + p.col_floats;
}

void lora_shrink(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, const void* a, DType a_dtype,
                 int64_t a_stride_k, int64_t a_stride_j, int64_t r, float scale, LoraDropout dropout, float* workspace,
                 float* u, int64_t num_sms, cudaStream_t stream, const char* entry) {
  check_dims(M, K, ldx, entry);
  if (r < 1) throw bad_argument(entry, "rank must be >= 1");
  if (M == 0) return;
  if (K == 0) {  // an empty sum
    check_cuda(cudaMemsetAsync(u, 0, M * r * sizeof(float), stream), entry, "cudaMemsetAsync");
    return;
  }
  const PanelPlan plan = plan_panels(M, K, r, 0, num_sms);
  PanelArgs args = panel_args(x, ldx, M, K, x_dtype, normalized(dropout), plan);
  args.p = a;
  args.p_dtype = a_dtype;
  args.p_sc = a_stride_k;
  args.p_sj = a_stride_j;
  args.r_row = r;
  args.row_part = workspace;
  launch_panel(args, plan, x_dtype, stream, entry);
  launch_sum(workspace, plan.num_c_panels, M * plan.rank_pad, M, r, plan.rank_pad, scale, u, DType::kFloat32, r, 1,
             num_sms, stream, entry);
}

void lora_backward_dy(const void* dy, DType dy_dtype, int64_t lddy, int64_t M, int64_t N, const void* b, DType b_dtype,
                      int64_t b_stride_n, int64_t b_stride_j, int64_t r, float scale, float* du, const float* u,
                      int64_t ldu, int64_t f, int64_t r_t, void* db, DType db_dtype, float* workspace,
                      int64_t num_sms, cudaStream_t stream, const char* entry) {
  check_dims(M, N, lddy, entry);
  if (r < 1 || f < 0 || r_t < 0 || f + r_t > r) throw bad_argument(entry, "need r >= 1 and 0 <= f <= f + r_t <= r");
  const int64_t r_row = du != nullptr ? r : 0, r_col = db != nullptr ? r_t : 0;
  if (M == 0 || N == 0 || (r_row == 0 && r_col == 0)) {
    // Empty sums: du and dB are zero (dB is zero when M == 0; du when N == 0).
    if (du != nullptr && M > 0)
      check_cuda(cudaMemsetAsync(du, 0, M * r * sizeof(float), stream), entry, "cudaMemsetAsync");
    if (db != nullptr && N * r_t > 0)
      check_cuda(cudaMemsetAsync(db, 0, N * r_t * dtype_size(db_dtype), stream), entry, "cudaMemsetAsync");
    return;
  }
  const PanelPlan plan = plan_panels(M, N, r_row, r_col, num_sms);
  PanelArgs args = panel_args(dy, lddy, M, N, dy_dtype, normalized(LoraDropout{nullptr, kKeepAll}), plan);
  float* row_part = workspace;
  float* col_part = workspace + plan.row_floats;
  if (r_row > 0) {
    args.p = b;
    args.p_dtype = b_dtype;
    args.p_sc = b_stride_n;
    args.p_sj = b_stride_j;
    args.r_row = r_row;
    args.row_part = row_part;
  }
  if (r_col > 0) {
    args.u = u + f;
    args.ldu = ldu;
    args.r_col = r_col;
    args.col_part = col_part;
  }
  launch_panel(args, plan, dy_dtype, stream, entry);
  if (r_row > 0)
    launch_sum(row_part, plan.num_c_panels, M * plan.rank_pad, M, r, plan.rank_pad, scale, du, DType::kFloat32, r, 1,
               num_sms, stream, entry);
  if (r_col > 0)  // dB[n, j] = Q[j, n]: rows j of the slab go to columns of dB
    launch_sum(col_part, plan.num_m_panels, plan.rank_pad * N, r_t, N, N, 1.f, db, db_dtype, 1, r_t, num_sms, stream,
               entry);
}

void lora_grad_a(const void* x, DType x_dtype, int64_t ldx, int64_t M, int64_t K, const float* du, int64_t ldu,
                 int64_t f, int64_t r_t, float scale, LoraDropout dropout, void* da, DType da_dtype,
                 float* workspace, int64_t num_sms, cudaStream_t stream, const char* entry) {
  check_dims(M, K, ldx, entry);
  if (f < 0 || r_t < 0) throw bad_argument(entry, "need f >= 0 and r_t >= 0");
  if (r_t == 0 || K == 0) return;
  if (M == 0) {
    check_cuda(cudaMemsetAsync(da, 0, r_t * K * dtype_size(da_dtype), stream), entry, "cudaMemsetAsync");
    return;
  }
  const PanelPlan plan = plan_panels(M, K, 0, r_t, num_sms);
  PanelArgs args = panel_args(x, ldx, M, K, x_dtype, normalized(dropout), plan);
  args.u = du + f;
  args.ldu = ldu;
  args.r_col = r_t;
  args.col_part = workspace;
  launch_panel(args, plan, x_dtype, stream, entry);
  launch_sum(workspace, plan.num_m_panels, plan.rank_pad * K, r_t, K, K, scale, da, da_dtype, K, 1, num_sms, stream,
             entry);
}

void lora_expand(const float* u, int64_t ldu, int64_t M, int64_t C, int64_t r, const void* p, DType p_dtype,
                 int64_t p_stride_c, int64_t p_stride_j, const void* bias, DType bias_dtype, float scale,
                 LoraDropout dropout, void* out, DType out_dtype, int64_t ldo, cudaStream_t stream,
                 const char* entry) {
  check_dims(M, C, ldo, entry);
  if (r < 0) throw bad_argument(entry, "rank must be >= 0");
  if (M == 0 || C == 0) return;
  ExpandArgs a{};
  a.u = u;
  a.ldu = ldu;
  a.M = M;
  a.C = C;
  a.r = r;
  a.p = p;
  a.p_dtype = p_dtype;
  a.p_sc = p_stride_c;
  a.p_sj = p_stride_j;
  a.bias = bias;
  a.bias_dtype = bias_dtype;
  a.scale = scale;
  a.dropout = normalized(dropout);
  a.out = out;
  a.ldo = ldo;
  a.vec_ok = row_aligned(out, ldo, out_dtype);
  const int64_t tiles = ceil_div(M, kExpandM) * ceil_div(C, kExpandC);
  const int64_t grid = std::min<int64_t>(tiles, int64_t(sm_count(entry)) * 8);
  with_dtype(out_dtype, entry, "out", [&](auto tag) {
    using TO = decltype(tag);
    lora_expand_kernel<TO><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(a);
  });
  check_launch(entry);
}

void lora_dropout_mask(LoraDropout dropout, int64_t M, int64_t C, uint8_t* keep, cudaStream_t stream,
                       const char* entry) {
  if (M < 0 || C < 0) throw bad_argument(entry, "matrix sizes must be >= 0");
  if (dropout.seed_offset == nullptr) throw bad_argument(entry, "seed_offset must be set");
  if (M * C == 0) return;
  const int64_t groups = ceil_div(M * C, 4);
  const int64_t grid = std::min<int64_t>(ceil_div(groups, kThreads), int64_t(sm_count(entry)) * 8);
  dropout_mask_kernel<<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(normalized(dropout), M * C, keep);
  check_launch(entry);
}

}  // namespace treelora
