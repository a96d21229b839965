// Batched gradient-similarity kernels: see similarity.h for the layout and the contract.
#include <algorithm>

#include "device_utils.cuh"
#include "similarity.h"

namespace treelora {
namespace {

constexpr int kThreads = 256;      // 8 warps: enough 16-byte loads in flight per SM for a streaming reduction
constexpr int kVec = 8;            // elements per vector step: one 16-byte load of fp16/bf16, two of fp32
constexpr int kBlocksPerSm = 8;    // 8 x 256 threads fill an SM (2048 threads) for the grid-stride loop
constexpr int kMaxSums = 3;        // cosine keeps three sums (q.g, q.q, g.g)

// What one pass accumulates per element; each metric maps to one pass (l1_normalized to two: norms, then distance).
enum class Pass { kDot, kL1, kSqEuclidean, kCosine, kL1Norms, kL1NormalizedDistance };

template <Pass P>
struct PassTraits {
  static constexpr int kSums = P == Pass::kCosine ? 3 : (P == Pass::kL1Norms ? 2 : 1);
};

struct PartialArgs {
  const void* query;         // the query (or, when accumulating, the new sample)
  float* mean;               // accumulate only: running mean, updated in place
  const float* count_ptr;    // accumulate only: device count, or nullptr to use `count`
  float count;
  const void* bank;
  const int64_t* index;      // nullptr: full form
  const int64_t* layer_offsets;
  const int64_t* chunk_offsets;
  const float* inv_norms;    // distance pass of l1_normalized: per pair {1/max(|q|_1, eps), 1/max(|g|_1, eps)}
  float* partials;           // (num_items, kSums) row-major
  int64_t num_layers, num_rows, total_chunks, num_items, row_stride, chunk_elems;
  bool vec_ok;               // query, mean, bank and every bank row start are 16-byte aligned
};

template <Pass P>
__device__ __forceinline__ void visit(float (&acc)[kMaxSums], float q, float g, float ia, float ib) {
  if constexpr (P == Pass::kDot) {
    acc[0] += q * g;
  } else if constexpr (P == Pass::kL1) {
    acc[0] += fabsf(q - g);
  } else if constexpr (P == Pass::kSqEuclidean) {
    const float d = q - g;
    acc[0] += d * d;
  } else if constexpr (P == Pass::kCosine) {
    acc[0] += q * g;
    acc[1] += q * q;
    acc[2] += g * g;
  } else if constexpr (P == Pass::kL1Norms) {
    acc[0] += fabsf(q);
    acc[1] += fabsf(g);
  } else {
    acc[0] += fabsf(q * ia - g * ib);
  }
}

// grid-stride over work items (row, chunk); one block per item at a time, one partial per sum per item.
template <Pass P, typename TQ, typename TB, bool kAccumulate>
__global__ void __launch_bounds__(kThreads) similarity_partial_kernel(PartialArgs a) {
  constexpr int kSums = PassTraits<P>::kSums;
  const TQ* query = static_cast<const TQ*>(a.query);
  const TB* bank = static_cast<const TB*>(a.bank);
  float count = 1.f;
  if constexpr (kAccumulate) count = a.count_ptr != nullptr ? *a.count_ptr : a.count;
  for (int64_t item = blockIdx.x; item < a.num_items; item += gridDim.x) {
    const int64_t t = item / a.total_chunks;
    const int64_t c = item - t * a.total_chunks;
    const int64_t l = upper_segment(a.chunk_offsets, a.num_layers, c);
    const int64_t layer_end = a.layer_offsets[l + 1];
    const int64_t lo = a.layer_offsets[l] + (c - a.chunk_offsets[l]) * a.chunk_elems;
    const int64_t hi = min(layer_end, lo + a.chunk_elems);
    const int64_t row = a.index != nullptr ? a.index[l] : t;
    const int64_t pair = a.index != nullptr ? l : t * a.num_layers + l;
    const TB* g = bank + row * a.row_stride;
    float ia = 0.f, ib = 0.f;
    if constexpr (P == Pass::kL1NormalizedDistance) {
      ia = a.inv_norms[2 * pair];
      ib = a.inv_norms[2 * pair + 1];
    }
    float acc[kMaxSums] = {0.f, 0.f, 0.f};
    if (row < 0 || row >= a.num_rows) {
      // An index outside the bank cannot be rejected on the host without a synchronisation: its layer reads nothing
      // and comes out NaN instead of reading foreign memory.
      if (threadIdx.x == 0)
        for (int s = 0; s < kSums; ++s) a.partials[item * kSums + s] = __int_as_float(0x7fc00000);
      continue;
    }

    // One element: the query value (after the running-mean update when accumulating) against the bank value.
    auto scalar = [&](int64_t i) {
      float q = to_float(query[i]);
      if constexpr (kAccumulate) {
        const float m = a.mean[i];
        q = m + (q - m) / count;
        a.mean[i] = q;
      }
      visit<P>(acc, q, to_float(g[i]), ia, ib);
    };

    int64_t body_lo = hi, body_hi = hi;  // [body_lo, body_hi): whole vectors, aligned in every operand
    if (a.vec_ok) {
      body_lo = min(hi, (lo + kVec - 1) / kVec * kVec);
      body_hi = body_lo + (hi - body_lo) / kVec * kVec;
    }
    for (int64_t i = lo + threadIdx.x; i < body_lo; i += kThreads) scalar(i);
    for (int64_t i = body_lo + int64_t(threadIdx.x) * kVec; i < body_hi; i += int64_t(kThreads) * kVec) {
      float qv[kVec], gv[kVec];
      load_vec<TQ, kVec>(query + i, qv);
      load_vec<TB, kVec>(g + i, gv);
      if constexpr (kAccumulate) {
        float mv[kVec];
        load_vec<float, kVec>(a.mean + i, mv);
#pragma unroll
        for (int e = 0; e < kVec; ++e) qv[e] = mv[e] + (qv[e] - mv[e]) / count;
        store_vec<float, kVec>(a.mean + i, qv);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) visit<P>(acc, qv[e], gv[e], ia, ib);
    }
    for (int64_t i = body_hi + threadIdx.x; i < hi; i += kThreads) scalar(i);

    float sums[kSums];
#pragma unroll
    for (int s = 0; s < kSums; ++s) sums[s] = acc[s];
    block_sum<kThreads, kSums>(sums);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int s = 0; s < kSums; ++s) a.partials[item * kSums + s] = sums[s];
    }
  }
}

// One warp per (row, layer) pair sums that pair's chunk partials in a fixed order, then finishes the metric.
// Writes out[pair] (the metric), or, for the norm pass of l1_normalized, inv_norms[2 * pair + {0, 1}].
template <Pass P>
__global__ void similarity_reduce_kernel(const float* __restrict__ partials, const int64_t* __restrict__ chunk_offsets,
                                         int64_t num_layers, int64_t total_chunks, int64_t num_pairs,
                                         float* __restrict__ out) {
  constexpr int kSums = PassTraits<P>::kSums;
  const int64_t pair = int64_t(blockIdx.x) * (blockDim.x / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (pair >= num_pairs) return;  // whole warps exit together: the shuffles below stay convergent
  const int64_t t = pair / num_layers, l = pair - t * num_layers;
  const int64_t first = t * total_chunks + chunk_offsets[l], last = t * total_chunks + chunk_offsets[l + 1];
  float s[kSums];
#pragma unroll
  for (int k = 0; k < kSums; ++k) s[k] = 0.f;
  for (int64_t item = first + lane; item < last; item += kWarpSize) {
#pragma unroll
    for (int k = 0; k < kSums; ++k) s[k] += partials[item * kSums + k];
  }
#pragma unroll
  for (int k = 0; k < kSums; ++k) s[k] = warp_sum(s[k]);
  if (lane != 0) return;
  if constexpr (P == Pass::kCosine) {
    out[pair] = s[0] / fmaxf(sqrtf(s[1]) * sqrtf(s[2]), kSimilarityEps);
  } else if constexpr (P == Pass::kL1Norms) {
    out[2 * pair] = 1.f / fmaxf(s[0], kSimilarityEps);
    out[2 * pair + 1] = 1.f / fmaxf(s[1], kSimilarityEps);
  } else {
    out[pair] = s[0];
  }
}

struct Geometry {
  const int64_t* chunk_offsets;
  int64_t num_layers, total_chunks, num_pairs;
};

template <Pass P, bool kAccumulate>
void run_pass(PartialArgs args, DType query_dtype, DType bank_dtype, const Geometry& geo, float* reduce_out,
              cudaStream_t stream, const char* entry) {
  const int64_t grid = std::min<int64_t>(args.num_items, int64_t(sm_count(entry)) * kBlocksPerSm);
  with_dtype(query_dtype, entry, kAccumulate ? "sample" : "query", [&](auto q_tag) {
    using TQ = decltype(q_tag);
    with_dtype(bank_dtype, entry, "bank", [&](auto b_tag) {
      using TB = decltype(b_tag);
      similarity_partial_kernel<P, TQ, TB, kAccumulate>
          <<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(args);
    });
  });
  check_launch(entry);
  constexpr int kWarpsPerBlock = 8;
  const int64_t blocks = (geo.num_pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  similarity_reduce_kernel<P><<<static_cast<unsigned>(blocks), kWarpsPerBlock * kWarpSize, 0, stream>>>(
      args.partials, geo.chunk_offsets, geo.num_layers, geo.total_chunks, geo.num_pairs, reduce_out);
  check_launch(entry);
}

// Runs `metric` as one pass, or two for l1_normalized (norms into the workspace tail, then the distance).
template <bool kAccumulate>
void run_metric(PartialArgs args, DType query_dtype, DType bank_dtype, const Geometry& geo, Metric metric,
                float* workspace, float* out, cudaStream_t stream, const char* entry) {
  switch (metric) {
    case Metric::kDot:
      return run_pass<Pass::kDot, kAccumulate>(args, query_dtype, bank_dtype, geo, out, stream, entry);
    case Metric::kL1:
      return run_pass<Pass::kL1, kAccumulate>(args, query_dtype, bank_dtype, geo, out, stream, entry);
    case Metric::kSqEuclidean:
      return run_pass<Pass::kSqEuclidean, kAccumulate>(args, query_dtype, bank_dtype, geo, out, stream, entry);
    case Metric::kCosine:
      return run_pass<Pass::kCosine, kAccumulate>(args, query_dtype, bank_dtype, geo, out, stream, entry);
    case Metric::kL1Normalized: {
      float* inv_norms = workspace + args.num_items * kMaxSums;
      run_pass<Pass::kL1Norms, kAccumulate>(args, query_dtype, bank_dtype, geo, inv_norms, stream, entry);
      // The distance pass reads the (now updated) mean as an fp32 query and never updates it again.
      PartialArgs dist = args;
      dist.inv_norms = inv_norms;
      if (kAccumulate) {
        dist.query = args.mean;
        query_dtype = DType::kFloat32;
      }
      return run_pass<Pass::kL1NormalizedDistance, false>(dist, query_dtype, bank_dtype, geo, out, stream, entry);
    }
  }
  throw bad_argument(entry, "unknown metric code");
}

void check_geometry(int64_t num_layers, int64_t num_rows, int64_t chunk_elems, int64_t total_chunks,
                    const char* entry) {
  if (num_layers < 1) throw bad_argument(entry, "num_layers must be >= 1");
  if (num_rows < 1) throw bad_argument(entry, "num_rows must be >= 1");
  if (chunk_elems < kVec || chunk_elems % kVec != 0)
    throw bad_argument(entry, "chunk_elems must be a positive multiple of " + std::to_string(kVec));
  if (total_chunks < num_layers) throw bad_argument(entry, "total_chunks must be >= num_layers (no empty layer)");
}

}  // namespace

int64_t similarity_workspace_size(int64_t num_rows, int64_t num_layers, int64_t total_chunks, bool gathered) {
  const int64_t rows = gathered ? 1 : num_rows;
  return rows * total_chunks * kMaxSums + 2 * rows * num_layers;
}

void similarity(const void* query, DType query_dtype, const void* bank, DType bank_dtype, const int64_t* index,
                const int64_t* layer_offsets, const int64_t* chunk_offsets, int64_t num_layers, int64_t num_rows,
                int64_t row_stride, int64_t chunk_elems, int64_t total_chunks, Metric metric, float* workspace,
                float* out, cudaStream_t stream, const char* entry) {
  check_geometry(num_layers, num_rows, chunk_elems, total_chunks, entry);
  const int64_t rows = index != nullptr ? 1 : num_rows;
  PartialArgs args{};
  args.query = query;
  args.bank = bank;
  args.index = index;
  args.layer_offsets = layer_offsets;
  args.chunk_offsets = chunk_offsets;
  args.partials = workspace;
  args.num_layers = num_layers;
  args.num_rows = num_rows;
  args.total_chunks = total_chunks;
  args.num_items = rows * total_chunks;
  args.row_stride = row_stride;
  args.chunk_elems = chunk_elems;
  args.vec_ok = aligned16(query) && aligned16(bank) && (row_stride * dtype_size(bank_dtype)) % 16 == 0;
  const Geometry geo{chunk_offsets, num_layers, total_chunks, rows * num_layers};
  run_metric<false>(args, query_dtype, bank_dtype, geo, metric, workspace, out, stream, entry);
}

void similarity_accumulate(float* mean, const void* sample, DType sample_dtype, const float* count_ptr, float count,
                           const void* bank, DType bank_dtype, const int64_t* index, const int64_t* layer_offsets,
                           const int64_t* chunk_offsets, int64_t num_layers, int64_t num_rows, int64_t row_stride,
                           int64_t chunk_elems, int64_t total_chunks, Metric metric, float* workspace, float* out,
                           cudaStream_t stream, const char* entry) {
  check_geometry(num_layers, num_rows, chunk_elems, total_chunks, entry);
  if (index == nullptr) throw bad_argument(entry, "index is required (the accumulate form is gathered only)");
  PartialArgs args{};
  args.query = sample;
  args.mean = mean;
  args.count_ptr = count_ptr;
  args.count = count;
  args.bank = bank;
  args.index = index;
  args.layer_offsets = layer_offsets;
  args.chunk_offsets = chunk_offsets;
  args.partials = workspace;
  args.num_layers = num_layers;
  args.num_rows = num_rows;
  args.total_chunks = total_chunks;
  args.num_items = total_chunks;
  args.row_stride = row_stride;
  args.chunk_elems = chunk_elems;
  args.vec_ok = aligned16(mean) && aligned16(sample) && aligned16(bank) &&
                (row_stride * dtype_size(bank_dtype)) % 16 == 0;
  const Geometry geo{chunk_offsets, num_layers, total_chunks, num_layers};
  run_metric<true>(args, sample_dtype, bank_dtype, geo, metric, workspace, out, stream, entry);
}

}  // namespace treelora
