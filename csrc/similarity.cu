#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "similarity.h"

namespace treelora {
namespace {

constexpr int kThreads = 256;  // 8 warps: enough loads in flight per SM for a streaming reduction

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <Metric M>
__device__ __forceinline__ float term(float q, float g) {
  if constexpr (M == Metric::kDot) return q * g;
  if constexpr (M == Metric::kL1) return fabsf(q - g);
  float d = q - g;
  return d * d;
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grid (num_chunks, num_layers): block (c, l) reduces chunk c of layer l against bank row index[l].
template <Metric M, typename TQ, typename TB>
__global__ void gathered_partial_kernel(const TQ* __restrict__ query, const TB* __restrict__ bank,
                                        const int64_t* __restrict__ index, const int64_t* __restrict__ offsets,
                                        float* __restrict__ workspace, int64_t row_stride) {
  const int64_t layer = blockIdx.y;
  const int64_t begin = offsets[layer], end = offsets[layer + 1];
  const int64_t width = end - begin;
  const int64_t chunk = (width + gridDim.x - 1) / gridDim.x;
  const int64_t lo = begin + blockIdx.x * chunk;
  const int64_t hi = min(end, lo + chunk);
  const TB* row = bank + index[layer] * row_stride;
  float acc = 0.f;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) acc += term<M>(to_float(query[i]), to_float(row[i]));
  acc = block_sum(acc);
  if (threadIdx.x == 0) workspace[layer * gridDim.x + blockIdx.x] = acc;
}

// One warp per layer sums its partials in a fixed order (deterministic across runs).
__global__ void reduce_partials_kernel(const float* __restrict__ workspace, float* __restrict__ out,
                                       int64_t num_layers, int64_t num_chunks) {
  const int64_t layer = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (layer >= num_layers) return;
  float acc = 0.f;
  for (int64_t c = lane; c < num_chunks; c += 32) acc += workspace[layer * num_chunks + c];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) out[layer] = acc;
}

template <Metric M, typename TQ, typename TB>
void launch_partials(const void* query, const void* bank, const int64_t* index, const int64_t* offsets,
                     float* workspace, int64_t num_layers, int64_t row_stride, int64_t num_chunks,
                     cudaStream_t stream) {
  dim3 grid(static_cast<unsigned>(num_chunks), static_cast<unsigned>(num_layers));
  gathered_partial_kernel<M, TQ, TB><<<grid, kThreads, 0, stream>>>(
      static_cast<const TQ*>(query), static_cast<const TB*>(bank), index, offsets, workspace, row_stride);
}

template <Metric M, typename TQ>
void dispatch_bank(DType bank_dtype, const void* query, const void* bank, const int64_t* index,
                   const int64_t* offsets, float* workspace, int64_t num_layers, int64_t row_stride,
                   int64_t num_chunks, cudaStream_t stream) {
  switch (bank_dtype) {
    case DType::kFloat32:
      return launch_partials<M, TQ, float>(query, bank, index, offsets, workspace, num_layers, row_stride,
                                           num_chunks, stream);
    case DType::kFloat16:
      return launch_partials<M, TQ, __half>(query, bank, index, offsets, workspace, num_layers, row_stride,
                                            num_chunks, stream);
    case DType::kBFloat16:
      return launch_partials<M, TQ, __nv_bfloat16>(query, bank, index, offsets, workspace, num_layers,
                                                   row_stride, num_chunks, stream);
  }
  throw std::invalid_argument("treelora._C: unsupported bank dtype code");
}

template <Metric M>
void dispatch_query(DType query_dtype, DType bank_dtype, const void* query, const void* bank, const int64_t* index,
                    const int64_t* offsets, float* workspace, int64_t num_layers, int64_t row_stride,
                    int64_t num_chunks, cudaStream_t stream) {
  switch (query_dtype) {
    case DType::kFloat32:
      return dispatch_bank<M, float>(bank_dtype, query, bank, index, offsets, workspace, num_layers, row_stride,
                                     num_chunks, stream);
    case DType::kFloat16:
      return dispatch_bank<M, __half>(bank_dtype, query, bank, index, offsets, workspace, num_layers, row_stride,
                                      num_chunks, stream);
    case DType::kBFloat16:
      return dispatch_bank<M, __nv_bfloat16>(bank_dtype, query, bank, index, offsets, workspace, num_layers,
                                             row_stride, num_chunks, stream);
  }
  throw std::invalid_argument("treelora._C: unsupported query dtype code");
}

}  // namespace

void similarity_gathered(const void* query, DType query_dtype, const void* bank, DType bank_dtype,
                         const int64_t* index, const int64_t* offsets, float* workspace, float* out,
                         int64_t num_layers, int64_t row_stride, int64_t num_chunks, Metric metric,
                         cudaStream_t stream, const char* entry) {
  if (num_layers <= 0) return;
  if (num_chunks <= 0 || num_chunks > 65535 || num_layers > 65535)
    throw std::invalid_argument(std::string("treelora._C.") + entry + ": num_chunks and num_layers must be in [1, 65535]");
  switch (metric) {
    case Metric::kDot:
      dispatch_query<Metric::kDot>(query_dtype, bank_dtype, query, bank, index, offsets, workspace, num_layers,
                                   row_stride, num_chunks, stream);
      break;
    case Metric::kL1:
      dispatch_query<Metric::kL1>(query_dtype, bank_dtype, query, bank, index, offsets, workspace, num_layers,
                                  row_stride, num_chunks, stream);
      break;
    case Metric::kSqEuclidean:
      dispatch_query<Metric::kSqEuclidean>(query_dtype, bank_dtype, query, bank, index, offsets, workspace,
                                           num_layers, row_stride, num_chunks, stream);
      break;
    default:
      throw std::invalid_argument(std::string("treelora._C.") + entry +
                                  ": this kernel supports the metrics dot, l1 and sqeuclidean");
  }
  check_launch(entry);
  constexpr int kWarpsPerBlock = 4;
  const unsigned blocks = static_cast<unsigned>((num_layers + kWarpsPerBlock - 1) / kWarpsPerBlock);
  reduce_partials_kernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(workspace, out, num_layers, num_chunks);
  check_launch(entry);
}

}  // namespace treelora
