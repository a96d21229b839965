// Batched gradient-similarity kernels (SPEC 3.2), torch-free.
//
// Layout: a query of S = layer_offsets[L] values (layer l occupies [layer_offsets[l], layer_offsets[l + 1])) and a bank
// of T rows of S values each (row t starts at bank + t * row_stride elements). The dense (L, D) layout is the uniform
// case. Each layer is cut into chunks of `chunk_elems` elements; chunk_offsets[l] is the number of chunks of the layers
// before l (chunk_offsets has L + 1 entries, chunk_offsets[L] = total chunks). One block reduces one (row, chunk) work
// item into fixed partial-sum slots, and a small second kernel sums each (row, layer)'s slots in a fixed order, so
// results are bitwise reproducible (no float atomics) and no host synchronisation happens anywhere.
#pragma once

#include <cstdint>

#include "common.h"

namespace treelora {

// Elements of fp32 workspace `similarity` / `similarity_accumulate` need (partial sums, then per-pair norms).
int64_t similarity_workspace_size(int64_t num_rows, int64_t num_layers, int64_t total_chunks, bool gathered);

// Full form (index == nullptr): out (num_rows, L) row-major, out[t, l] = metric(query[l], bank[t, l]).
// Gathered form: out (L,), out[l] = metric(query[l], bank[index[l], l]); num_rows is then T (only for bounds).
// query/bank: fp32, fp16 or bf16; accumulation and out in fp32. l1_normalized makes two passes (its normalisation
// needs the full-row L1 norms before any distance term); every other metric one.
void similarity(const void* query, DType query_dtype, const void* bank, DType bank_dtype, const int64_t* index,
                const int64_t* layer_offsets, const int64_t* chunk_offsets, int64_t num_layers, int64_t num_rows,
                int64_t row_stride, int64_t chunk_elems, int64_t total_chunks, Metric metric, float* workspace,
                float* out, cudaStream_t stream, const char* entry);

// Fused accumulate-then-compare: mean <- mean + (sample - mean) / count in place (mean fp32, sample any of the three
// dtypes; count read from count_ptr when it is not null, else `count`), then out[l] = metric(mean[l],
// bank[index[l], l]) against the updated mean, in the same pass over the data.
void similarity_accumulate(float* mean, const void* sample, DType sample_dtype, const float* count_ptr, float count,
                           const void* bank, DType bank_dtype, const int64_t* index, const int64_t* layer_offsets,
                           const int64_t* chunk_offsets, int64_t num_layers, int64_t num_rows, int64_t row_stride,
                           int64_t chunk_elems, int64_t total_chunks, Metric metric, float* workspace, float* out,
                           cudaStream_t stream, const char* entry);

}  // namespace treelora
