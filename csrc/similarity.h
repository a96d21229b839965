// Batched gradient-similarity kernels (SPEC 3.2). Layout: a query of S = offsets[L] values (layer l occupies
// [offsets[l], offsets[l+1])), a bank of T rows of S values each (row stride `row_stride` elements).
#pragma once

#include <cstdint>

#include "common.h"

namespace treelora {

// Number of fp32 partial sums the gathered kernel needs in `workspace` for `num_layers` layers split in `num_chunks`.
inline int64_t similarity_gathered_workspace(int64_t num_layers, int64_t num_chunks) {
  return num_layers * num_chunks;
}

// out[l] = metric(query[layer l], bank[index[l], layer l]) for metric in {dot, l1, sqeuclidean}, fp32 accumulation.
// Deterministic: each (layer, chunk) block writes one partial, a second kernel sums them in a fixed order.
void similarity_gathered(const void* query, DType query_dtype, const void* bank, DType bank_dtype,
                         const int64_t* index, const int64_t* offsets, float* workspace, float* out,
                         int64_t num_layers, int64_t row_stride, int64_t num_chunks, Metric metric,
                         cudaStream_t stream, const char* entry);

}  // namespace treelora
