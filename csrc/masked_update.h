// Sparse masked multi-tensor optimizer steps (SPEC 3.3), torch-free.
//
// One launch updates many tensors: the launcher passes a device table with one MaskedTensorEntry per tensor and a
// chunk numbering (tensor i owns chunks [chunk_begin, chunk_begin + ceil(numel / chunk_elems))). Only selected entries
// are read-modified-written; an unselected entry is never written, so its value and moments keep their exact bits.
#pragma once

#include <cstdint>

#include "common.h"

namespace treelora {

// How a tensor's entries are selected.
enum class SelectKind : int64_t {
  kAll = 0,        // every entry
  kByteMask = 1,   // bool / uint8 tensor of the parameter's shape, nonzero = selected
  kIndexList = 2,  // int64 flat indices (duplicates count once; out-of-range indices are ignored)
  kDensity = 3,    // |grad| >= the k-th largest |grad| of the tensor (k = topk), found by radix select
};

// One tensor of a launch: 16 int64 words, packed by treelora/kernels/cuda/masked_update.py (keep the order in sync).
struct MaskedTensorEntry {
  int64_t param, grad, state0, state1;  // addresses; state0 = exp_avg or momentum buffer (0: none), state1 = exp_avg_sq
  int64_t select;                       // byte mask or index list address (by select_kind)
  int64_t numel;                        // at most 2^31 - 1 (the select counts in 32 bits)
  int64_t select_len;                   // kIndexList: number of indices
  int64_t chunk_begin;                  // first chunk of this tensor
  int64_t topk;                         // kDensity: k >= 1
  int64_t scratch_offset;  // bytes into the scratch area: kIndexList its dense mask, kDensity its candidate list
  int64_t dtypes;          // DType codes: param | grad << 8 | state0 << 16 | state1 << 24
  int64_t candidate_capacity;     // kDensity: entries its candidate list holds, a multiple of chunk_elems (else 0)
  int64_t candidate_chunk_begin;  // first candidate chunk of this tensor (non-decreasing over the table)
  int64_t reserved;
  int64_t select_kind;  // SelectKind
  int64_t vec_ok;       // param, grad, states 16-byte aligned and the byte mask 4-byte aligned: the vector paths
};
static_assert(sizeof(MaskedTensorEntry) == 16 * sizeof(int64_t), "table rows are 16 int64 words");

struct MaskedLaunch {
  const MaskedTensorEntry* table;  // device, num_tensors rows
  int64_t num_tensors, total_chunks, chunk_elems;
  bool has_index_lists, has_density;
  void* workspace;                  // device, masked_update_workspace_size(num_tensors, scratch_bytes) bytes
  int64_t scratch_bytes;            // index-list masks and candidate lists (8 bytes per candidate entry)
};

// Bias correction: from `step` on the device (float64 1-element tensor) when step_ptr is not null, else from `step`.
struct AdamWScalars {
  double lr, beta1, beta2, eps, weight_decay, step;
  const double* step_ptr;
};

struct SgdScalars {
  double lr, momentum, weight_decay;
};

// Bytes of device workspace a launch needs (select state and histograms, then the scratch area).
int64_t masked_update_workspace_size(int64_t num_tensors, int64_t scratch_bytes);

// Per selected entry: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m / (1 - b1^step)) / (sqrt(v / (1 - b2^step)) + eps). fp32 arithmetic whatever the storage dtypes.
void masked_adamw(const MaskedLaunch& launch, const AdamWScalars& s, cudaStream_t stream, const char* entry);

// Per selected entry: d = g + wd p; with momentum: buf = momentum buf + d, d = buf; p -= lr d.
void masked_sgd(const MaskedLaunch& launch, const SgdScalars& s, cudaStream_t stream, const char* entry);

// Writes the k-th largest |grad| of every density tensor (as float) into thresholds[i] (+inf for other tensors):
// the radix select on its own, for tests and for callers that need the threshold.
void masked_density_thresholds(const MaskedLaunch& launch, float* thresholds, cudaStream_t stream, const char* entry);

}  // namespace treelora
