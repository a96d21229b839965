// Sparse masked multi-tensor AdamW / SGD: see masked_update.h for the contract.
//
// Pipeline of one call (every step is one launch for all tensors, none synchronises the host):
//   1. index lists only: clear the scratch area, scatter each list into a dense byte mask (duplicates collapse);
//   2. density only, the exact k-th largest |grad| of every tensor by a radix select on the 31-bit key of |grad|
//      (non-negative floats, then +inf, then NaN, order like these keys), compacted after the first digit:
//      a. every entry: a 512-bin shared-memory histogram of the key's top 9 bits (exponent and one mantissa bit, so
//         a bin spans a factor of sqrt(2) or less); one block per tensor then picks the bin b holding the k-th
//         largest key and the rank still to find in it;
//      b. the update launch, every entry: entries above bin b are selected for certain and updated; entries in bin
//         b (2-9% of a normal-like tensor at density 1%) are appended, key and index, to the tensor's candidate
//         list (a block-wide prefix count and one atomic per chunk); entries below are never touched;
//      c. three 256/128/128-bin histograms over the candidates only narrow the key to the exact threshold (one
//         histogram launch and one per-tensor pick launch each);
//      d. the candidates at or above it are updated (ties included).
//      A list holds up to numel / 8 entries; a tensor whose bin b holds more re-reads its gradient in c and d.
//   3. otherwise the update: each thread takes 4 consecutive entries, decides which are selected, and runs the
//      16-byte vector path when all four are, scalar read-modify-writes of the selected ones otherwise.
//
// The gradient reads of 2a-2b, the bulk of the select's traffic, are templated on the gradient's dtype (one switch
// per chunk, uniform across the block) and move 16 bytes per load: 4 fp32 or 8 fp16/bf16 entries.
//
// Byte and launch model (fp32 p, g, m, v; per parameter; 7B-model LoRA adapters at r = 16: 40M parameters):
//   dense fused AdamW, and this file at density 1: read p, g, m, v, write p, m, v: 28 B, 1 launch.
//   density 0.01: 2a reads g (4 B); 2b reads g again (4 B), writes candidates (8 B x 2-9% = 0.2-0.7 B) and updates
//   the entries above bin b; 2c reads the candidate lists three times (0.5-2.2 B); 2d reads them once more and,
//   with 2b, touches one 32-byte sector of g, p, m, v read and p, m, v written per selected entry (7 x 32 B x 1% =
//   2.2 B): 11-13 B, 10 launches and one memset (~35 us of launch latency, against ~370 us for the dense step on an
//   H100). The previous design made three 2048-bin passes over every entry with scalar run-time-dtype loads
//   (12 B + the update's 6.2 B, 7 launches) and was bound by shared-memory atomics on 2048 bins.
#include <algorithm>
#include <cmath>

#include "device_utils.cuh"
#include "masked_update.h"

namespace treelora {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 4;        // entries per thread step of the update: a 16-byte fp32 vector, 8 bytes of fp16/bf16
constexpr int kBlocksPerSm = 8;  // 8 x 256 threads fill an SM for the grid-stride loops
// Register budgets (__launch_bounds__ minimum blocks per SM). Without one, ptxas aims at 8 blocks of 256 threads
// (32 registers) and spills; the select's streaming kernels fit 4 blocks (64 registers, 39-48 used, no spill) and the
// update kernels 2 (128 registers: 60-128 used on sm_80, 60-86 on sm_90a, no spill), measured with ptxas -v.
constexpr int kStreamMinBlocks = 4;
constexpr int kUpdateMinBlocks = 2;
constexpr int kMaxBins = 512;    // widest digit (9 bits): 2 KB of shared histogram
constexpr int kCandidatePasses = 3;
constexpr int kStateWords = 4;  // per tensor: key prefix (bits fixed so far, in place), rank left, candidates found

// Digits of the radix select, most significant first: the first over every entry, then over the candidates.
constexpr int kFirstShift = 22, kFirstBits = 9;
__host__ __device__ constexpr int candidate_shift(int pass) { return pass == 0 ? 14 : (pass == 1 ? 7 : 0); }
__host__ __device__ constexpr int candidate_bits(int pass) { return pass == 0 ? 8 : 7; }

// Workspace layout: [select state: kStateWords uint32 per tensor] [histograms: kMaxBins uint32 per tensor]
// [scratch: candidate lists (uint2 {key, index} entries) and index-list masks, at the table's scratch_offset].
constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }
int64_t state_bytes(int64_t n) { return align256(n * kStateWords * int64_t(sizeof(uint32_t))); }
int64_t hist_bytes(int64_t n) { return align256(n * kMaxBins * int64_t(sizeof(uint32_t))); }

struct Workspace {
  uint32_t* state;
  uint32_t* hist;
  uint8_t* scratch;
};

Workspace split_workspace(const MaskedLaunch& l) {
  uint8_t* base = static_cast<uint8_t*>(l.workspace);
  return Workspace{reinterpret_cast<uint32_t*>(base), reinterpret_cast<uint32_t*>(base + state_bytes(l.num_tensors)),
                   base + state_bytes(l.num_tensors) + hist_bytes(l.num_tensors)};
}

__device__ __forceinline__ DType dtype_of(int64_t dtypes, int slot) {
  return static_cast<DType>((dtypes >> (8 * slot)) & 0xff);
}

// The last entry whose `begin` field is <= chunk: the tensor that owns the chunk (tensors with no chunk own none).
template <typename Begin>
__device__ __forceinline__ int64_t owner(const MaskedTensorEntry* table, int64_t n, int64_t chunk, Begin begin) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (begin(table[mid]) <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}
__device__ __forceinline__ int64_t chunk_owner(const MaskedTensorEntry* table, int64_t n, int64_t chunk) {
  return owner(table, n, chunk, [](const MaskedTensorEntry& e) { return e.chunk_begin; });
}
__device__ __forceinline__ int64_t candidate_owner(const MaskedTensorEntry* table, int64_t n, int64_t chunk) {
  return owner(table, n, chunk, [](const MaskedTensorEntry& e) { return e.candidate_chunk_begin; });
}
__device__ __forceinline__ int64_t total_candidate_chunks(const MaskedTensorEntry* table, int64_t n, int64_t chunk) {
  return table[n - 1].candidate_chunk_begin + table[n - 1].candidate_capacity / chunk;
}

// Ordering key of |g|: for non-negative floats the IEEE bit pattern orders like the value (NaN above +inf).
__device__ __forceinline__ uint32_t magnitude_key(float g) { return __float_as_uint(g) & 0x7fffffffu; }

// Calls f(key, index) for every entry of grad[lo, hi) this thread owns: 16-byte loads of the templated dtype over the
// aligned body when `vec_ok`, scalar loads for the rest. Threads stride through the range together (coalesced).
template <typename T, typename F>
__device__ __forceinline__ void for_each_key(const T* grad, int64_t lo, int64_t hi, bool vec_ok, F&& f) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  const int64_t body_end = vec_ok ? lo + (hi - lo) / kVec * kVec : lo;
  for (int64_t i = lo + int64_t(threadIdx.x) * kVec; i < body_end; i += int64_t(kThreads) * kVec) {
    float g[kVec];
    load_vec<T, kVec>(grad + i, g);
#pragma unroll
    for (int j = 0; j < kVec; ++j) f(magnitude_key(g[j]), i + j);
  }
  for (int64_t i = body_end + threadIdx.x; i < hi; i += kThreads) f(magnitude_key(to_float(grad[i])), i);
}

// for_each_key with the gradient's dtype resolved once (the branch is uniform across the block).
template <typename F>
__device__ __forceinline__ void for_each_grad_key(const void* grad, DType dt, int64_t lo, int64_t hi, bool vec_ok,
                                                  F&& f) {
  switch (dt) {
    case DType::kFloat16:
      for_each_key(static_cast<const __half*>(grad), lo, hi, vec_ok, f);
      break;
    case DType::kBFloat16:
      for_each_key(static_cast<const __nv_bfloat16*>(grad), lo, hi, vec_ok, f);
      break;
    default:
      for_each_key(static_cast<const float*>(grad), lo, hi, vec_ok, f);
  }
}

// --- 1. index lists -> dense byte masks --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    scatter_index_lists_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors,
                               uint8_t* __restrict__ scratch) {
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int64_t t = 0; t < num_tensors; ++t) {
    if (table[t].select_kind != int64_t(SelectKind::kIndexList)) continue;
    const int64_t* idx = reinterpret_cast<const int64_t*>(table[t].select);
    const int64_t len = table[t].select_len, numel = table[t].numel;
    uint8_t* mask = scratch + table[t].scratch_offset;
    for (int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x; j < len; j += stride) {
      const int64_t i = idx[j];
      if (i >= 0 && i < numel) mask[i] = 1;  // duplicates write the same byte: no race on the outcome
    }
  }
}

// --- 2. the radix select -----------------------------------------------------------------------------------------

// Shared bins of the tensor a block is counting, flushed to its global histogram with integer atomics whenever the
// block moves on to another tensor (the totals do not depend on the order).
struct SharedHistogram {
  uint32_t* bins;
  uint32_t* global;
  int nbins;
  int64_t current = -1;

  __device__ __forceinline__ void clear() {
    for (int b = threadIdx.x; b < kMaxBins; b += kThreads) bins[b] = 0;
  }
  __device__ __forceinline__ void switch_to(int64_t t) {
    if (t == current) return;
    flush();
    current = t;
  }
  __device__ __forceinline__ void flush() {
    __syncthreads();
    if (current >= 0) {
      uint32_t* dst = global + current * kMaxBins;
      for (int b = threadIdx.x; b < nbins; b += kThreads) {
        const uint32_t v = bins[b];
        if (v != 0) {
          atomicAdd(dst + b, v);
          bins[b] = 0;
        }
      }
    }
    __syncthreads();
  }
};

// 2a: the first digit of every entry of every density tensor.
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    first_digit_histogram_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors,
                                 int64_t total_chunks, int64_t chunk_elems, uint32_t* __restrict__ hist) {
  __shared__ uint32_t bins[kMaxBins];
  SharedHistogram h{bins, hist, 1 << kFirstBits};
  h.clear();
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int64_t t = chunk_owner(table, num_tensors, chunk);
    const MaskedTensorEntry& e = table[t];
    if (e.select_kind != int64_t(SelectKind::kDensity)) continue;
    h.switch_to(t);
    const int64_t lo = (chunk - e.chunk_begin) * chunk_elems, hi = min(e.numel, lo + chunk_elems);
    for_each_grad_key(reinterpret_cast<const void*>(e.grad), dtype_of(e.dtypes, 1), lo, hi, e.vec_ok != 0,
                      [&](uint32_t key, int64_t) { atomicAdd(&bins[key >> kFirstShift], 1u); });
  }
  h.flush();
}

// One block per density tensor: the bin holding the k-th largest key (rank `state[1]` within the keys matching the
// prefix so far) is fixed into the prefix, the rank is made relative to it and the tensor's bins are cleared. After
// the first digit the candidate count is reset for step 2b.
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    pick_bin_kernel(const MaskedTensorEntry* __restrict__ table, uint32_t* __restrict__ state,
                    uint32_t* __restrict__ hist, int shift, int bits, bool first) {
  const int64_t t = blockIdx.x;
  const MaskedTensorEntry& e = table[t];
  if (e.select_kind != int64_t(SelectKind::kDensity) || e.numel == 0) return;
  const int nbins = 1 << bits;
  const int per_thread = nbins >= kThreads ? nbins / kThreads : 1;  // contiguous bins owned by one thread
  const int first_bin = threadIdx.x * per_thread;
  __shared__ uint32_t thread_total[kThreads];
  __shared__ uint32_t above_thread[kThreads];
  uint32_t* bins = hist + t * kMaxBins;
  uint32_t* s = state + t * kStateWords;
  const uint32_t rank = first ? static_cast<uint32_t>(e.topk) : s[1];
  const uint32_t prefix = first ? 0u : s[0];
  uint32_t own = 0;
  for (int b = 0; b < per_thread; ++b)
    if (first_bin + b < nbins) own += bins[first_bin + b];
  thread_total[threadIdx.x] = own;
  __syncthreads();
  if (threadIdx.x == 0) {  // 256 additions in a fixed order: negligible next to the histogram pass
    uint32_t run = 0;
    for (int i = kThreads - 1; i >= 0; --i) {
      above_thread[i] = run;
      run += thread_total[i];
    }
  }
  __syncthreads();
  uint32_t run = above_thread[threadIdx.x];  // keys counted in higher bins than this thread's
  for (int b = per_thread - 1; b >= 0; --b) {
    if (first_bin + b >= nbins) continue;
    const uint32_t count = bins[first_bin + b];
    if (run < rank && run + count >= rank) {
      s[0] = prefix | (static_cast<uint32_t>(first_bin + b) << shift);
      s[1] = rank - run;
      if (first) s[2] = 0;
    }
    run += count;
  }
  for (int b = 0; b < per_thread; ++b)
    if (first_bin + b < nbins) bins[first_bin + b] = 0;
}

// The candidate range a block handles for tensor t's candidate chunk j: list entries [j, j + 1) x chunk of the list,
// or, when the list overflowed, tensor chunks j, j + P, j + 2P, ... (P = the list's chunks), keys outside bin b
// skipped by the caller.
struct CandidateChunk {
  bool overflowed;
  int64_t j, programs;
  uint32_t found;
};

__device__ __forceinline__ CandidateChunk candidate_chunk(const MaskedTensorEntry& e, const uint32_t* s,
                                                          int64_t chunk, int64_t chunk_elems) {
  const uint32_t found = s[2];
  return CandidateChunk{int64_t(found) > e.candidate_capacity, chunk - e.candidate_chunk_begin,
                        e.candidate_capacity / chunk_elems, found};
}

// Calls f(key, index) for every candidate of tensor e in candidate chunk `c` this thread owns: from the list, or from
// the gradient (keys whose top bits match `prefix` above `level`) when the list overflowed.
template <typename F>
__device__ __forceinline__ void for_each_candidate(const MaskedTensorEntry& e, const CandidateChunk& c,
                                                   const uint2* list, uint32_t prefix, int level, int64_t chunk_elems,
                                                   F&& f) {
  if (!c.overflowed) {
    const int64_t lo = c.j * chunk_elems, hi = min(int64_t(c.found), lo + chunk_elems);
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const uint2 entry = list[i];
      f(entry.x, int64_t(entry.y));
    }
    return;
  }
  for (int64_t lo = c.j * chunk_elems; lo < e.numel; lo += c.programs * chunk_elems) {
    for_each_grad_key(reinterpret_cast<const void*>(e.grad), dtype_of(e.dtypes, 1), lo, min(e.numel, lo + chunk_elems),
                      e.vec_ok != 0, [&](uint32_t key, int64_t i) {
                        if ((key >> level) == (prefix >> level)) f(key, i);
                      });
  }
}

// 2c: one digit over the candidates.
__global__ void __launch_bounds__(kThreads, kStreamMinBlocks)
    candidate_histogram_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors, int64_t chunk_elems,
                               const uint32_t* __restrict__ state, uint32_t* __restrict__ hist,
                               const uint8_t* __restrict__ scratch, int shift, int bits) {
  __shared__ uint32_t bins[kMaxBins];
  SharedHistogram h{bins, hist, 1 << bits};
  h.clear();
  const int64_t total = total_candidate_chunks(table, num_tensors, chunk_elems);
  const uint32_t digit_mask = (1u << bits) - 1u;
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int64_t t = candidate_owner(table, num_tensors, chunk);
    const MaskedTensorEntry& e = table[t];
    if (e.select_kind != int64_t(SelectKind::kDensity)) continue;
    h.switch_to(t);
    const uint32_t* s = state + t * kStateWords;
    const CandidateChunk c = candidate_chunk(e, s, chunk, chunk_elems);
    const uint32_t prefix = s[0];
    const int above = shift + bits;  // bits fixed by the earlier digits
    const uint2* list = reinterpret_cast<const uint2*>(scratch + e.scratch_offset);
    for_each_candidate(e, c, list, prefix, kFirstShift, chunk_elems, [&](uint32_t key, int64_t) {
      if ((key >> above) == (prefix >> above)) atomicAdd(&bins[(key >> shift) & digit_mask], 1u);
    });
  }
  h.flush();
}

__global__ void thresholds_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors,
                                  const uint32_t* __restrict__ state, float* __restrict__ out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tensors) return;
  const bool density = table[t].select_kind == int64_t(SelectKind::kDensity) && table[t].numel > 0;
  out[t] = density ? __uint_as_float(state[t * kStateWords]) : INFINITY;
}

// --- 3. the update -------------------------------------------------------------------------------------------------

struct AdamWDevice {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, bc1, bc2;
  const double* step_ptr;
  double beta1_d, beta2_d;
};

struct SgdDevice {
  float lr, momentum, weight_decay;
};

// A rule turns its launch scalars into per-call coefficients once per thread (the bias corrections may come from a
// device step) and applies them to one entry; the coefficients are plain floats, passed by value.
struct AdamWRule {
  AdamWDevice s;
  struct Coeffs {
    float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, eps, decay, bc1, bc2;
  };
  __device__ __forceinline__ Coeffs coefficients() const {
    Coeffs c{s.lr, s.beta1, s.beta2, s.one_minus_beta1, s.one_minus_beta2, s.eps, s.decay, s.bc1, s.bc2};
    if (s.step_ptr != nullptr) {
      const double step = *s.step_ptr;
      c.bc1 = static_cast<float>(1.0 - pow(s.beta1_d, step));
      c.bc2 = static_cast<float>(1.0 - pow(s.beta2_d, step));
    }
    return c;
  }
  // The arithmetic of masked_adamw_ref_ (treelora/kernels/torch/masked_update.py), in fp32.
  static __device__ __forceinline__ void apply(const Coeffs& c, float& p, float g, float& m, float& v, bool) {
    m = c.beta1 * m + c.one_minus_beta1 * g;
    v = c.beta2 * v + c.one_minus_beta2 * g * g;
    const float denom = sqrtf(v / c.bc2) + c.eps;
    p = p * c.decay - c.lr * (m / c.bc1) / denom;
  }
  static constexpr bool kTwoStates = true;
};

struct SgdRule {
  SgdDevice s;
  using Coeffs = SgdDevice;
  __device__ __forceinline__ Coeffs coefficients() const { return s; }
  // The arithmetic of masked_sgd_ref_: coupled weight decay, momentum without dampening.
  static __device__ __forceinline__ void apply(const Coeffs& c, float& p, float g, float& buf, float&,
                                               bool has_momentum) {
    float d = g + c.weight_decay * p;
    if (has_momentum) {
      buf = c.momentum * buf + d;
      d = buf;
    }
    p = p - c.lr * d;
  }
  static constexpr bool kTwoStates = false;
};

// Read-modify-write of entry i of the tensor at `e` (its table row, in global memory; nothing else is ever written).
// Not inlined: the sparse paths call it from every unrolled lane of every dtype's gradient loop, and its four
// run-time dtype switches inlined there multiply the code (and the compile time, 15 minutes against 11 s) for no
// gain at a 1% density. Arguments by value and a global pointer keep the call free of local memory.
template <typename Rule>
__device__ __attribute__((noinline)) void update_one(typename Rule::Coeffs c, const MaskedTensorEntry* __restrict__ e,
                                                     int64_t i) {
  void* param = reinterpret_cast<void*>(e->param);
  void* s0 = reinterpret_cast<void*>(e->state0);
  void* s1 = reinterpret_cast<void*>(e->state1);
  const int64_t dtypes = e->dtypes;
  const bool has_s0 = s0 != nullptr;
  float p = load_as_float(param, dtype_of(dtypes, 0), i);
  const float g = load_as_float(reinterpret_cast<const void*>(e->grad), dtype_of(dtypes, 1), i);
  float a = has_s0 ? load_as_float(s0, dtype_of(dtypes, 2), i) : 0.f;
  float b = Rule::kTwoStates ? load_as_float(s1, dtype_of(dtypes, 3), i) : 0.f;
  Rule::apply(c, p, g, a, b, has_s0);
  store_from_float(param, dtype_of(dtypes, 0), i, p);
  if (has_s0) store_from_float(s0, dtype_of(dtypes, 2), i, a);
  if (Rule::kTwoStates) store_from_float(s1, dtype_of(dtypes, 3), i, b);
}

// 2b for one chunk of a density tensor: entries above the first digit's bin are updated (when kUpdate), entries in it
// appended to the tensor's candidate list: a count pass, a block-wide prefix (thread order), one atomic per chunk,
// then a write pass over the same 16 KB of gradient (now in L1).
template <bool kUpdate, typename Rule>
__device__ __forceinline__ void digit_chunk(typename Rule::Coeffs c, const MaskedTensorEntry* __restrict__ row,
                                            const MaskedTensorEntry& e, uint32_t* s, uint8_t* scratch, int64_t lo,
                                            int64_t hi) {
  __shared__ uint32_t offsets[kThreads];
  __shared__ uint32_t chunk_base;
  const uint32_t bin = s[0] >> kFirstShift;
  const void* grad = reinterpret_cast<const void*>(e.grad);
  const DType gdt = dtype_of(e.dtypes, 1);
  const bool vec_ok = e.vec_ok != 0;
  uint32_t mine = 0;
  for_each_grad_key(grad, gdt, lo, hi, vec_ok, [&](uint32_t key, int64_t i) {
    const uint32_t digit = key >> kFirstShift;
    if (kUpdate && digit > bin) update_one<Rule>(c, row, i);
    mine += digit == bin ? 1u : 0u;
  });
  offsets[threadIdx.x] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t run = 0;
    for (int i = 0; i < kThreads; ++i) {
      const uint32_t c = offsets[i];
      offsets[i] = run;
      run += c;
    }
    chunk_base = run > 0 ? atomicAdd(s + 2, run) : 0u;
  }
  __syncthreads();
  if (mine > 0) {
    uint2* list = reinterpret_cast<uint2*>(scratch + e.scratch_offset);
    const int64_t capacity = e.candidate_capacity;
    uint32_t slot = chunk_base + offsets[threadIdx.x];
    for_each_grad_key(grad, gdt, lo, hi, vec_ok, [&](uint32_t key, int64_t i) {
      if ((key >> kFirstShift) != bin) return;
      if (int64_t(slot) < capacity) {  // beyond it the count still grows: the list has overflowed
        uint2 entry;
        entry.x = key;
        entry.y = static_cast<uint32_t>(i);
        list[slot] = entry;
      }
      ++slot;
    });
  }
  __syncthreads();  // offsets and chunk_base are reused by the block's next chunk
}

template <bool kUpdate, typename Rule>
__global__ void __launch_bounds__(kThreads, kUpdateMinBlocks)
    masked_update_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors, int64_t total_chunks,
                         int64_t chunk_elems, uint32_t* __restrict__ state, uint8_t* __restrict__ scratch,
                         Rule rule) {
  const typename Rule::Coeffs c = rule.coefficients();
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int64_t t = chunk_owner(table, num_tensors, chunk);
    const MaskedTensorEntry e = table[t];
    const SelectKind kind = static_cast<SelectKind>(e.select_kind);
    const int64_t lo = (chunk - e.chunk_begin) * chunk_elems, hi = min(e.numel, lo + chunk_elems);
    if (kind == SelectKind::kDensity) {
      digit_chunk<kUpdate, Rule>(c, table + t, e, state + t * kStateWords, scratch, lo, hi);
      continue;
    }
    if (!kUpdate) continue;
    void* param = reinterpret_cast<void*>(e.param);
    const void* grad = reinterpret_cast<const void*>(e.grad);
    void* s0 = reinterpret_cast<void*>(e.state0);
    void* s1 = reinterpret_cast<void*>(e.state1);
    const DType pdt = dtype_of(e.dtypes, 0), gdt = dtype_of(e.dtypes, 1);
    const DType s0dt = dtype_of(e.dtypes, 2), s1dt = dtype_of(e.dtypes, 3);
    const bool has_s0 = s0 != nullptr;
    const uint8_t* mask = kind == SelectKind::kByteMask    ? reinterpret_cast<const uint8_t*>(e.select)
                          : kind == SelectKind::kIndexList ? scratch + e.scratch_offset
                                                           : nullptr;
    for (int64_t i = lo + int64_t(threadIdx.x) * kGroup; i < hi; i += int64_t(kThreads) * kGroup) {
      if (!e.vec_ok || i + kGroup > hi) {
        for (int64_t j = i; j < min(hi, i + kGroup); ++j)
          if (kind == SelectKind::kAll || mask[j] != 0) update_one<Rule>(c, table + t, j);
        continue;
      }
      unsigned sel = 0xfu;
      if (kind != SelectKind::kAll) {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(mask + i);
        sel = 0;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) sel |= (((word >> (8 * j)) & 0xffu) != 0 ? 1u : 0u) << j;
      }
      if (sel == 0) continue;
      if (sel != 0xfu) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
          if (sel & (1u << j)) update_one<Rule>(c, table + t, i + j);
        continue;
      }
      float p[kGroup], g[kGroup], a[kGroup] = {0.f, 0.f, 0.f, 0.f}, b[kGroup] = {0.f, 0.f, 0.f, 0.f};
      load4_as_float(grad, gdt, i, g);
      load4_as_float(param, pdt, i, p);
      if (has_s0) load4_as_float(s0, s0dt, i, a);
      if (Rule::kTwoStates) load4_as_float(s1, s1dt, i, b);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) Rule::apply(c, p[j], g[j], a[j], b[j], has_s0);
      store4_from_float(param, pdt, i, p);
      if (has_s0) store4_from_float(s0, s0dt, i, a);
      if (Rule::kTwoStates) store4_from_float(s1, s1dt, i, b);
    }
  }
}

// 2d: the candidates at or above the threshold key are updated (the entries above the first digit's bin were, in 2b).
template <typename Rule>
__global__ void __launch_bounds__(kThreads, kUpdateMinBlocks)
    candidate_update_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors, int64_t chunk_elems,
                            const uint32_t* __restrict__ state, const uint8_t* __restrict__ scratch, Rule rule) {
  const typename Rule::Coeffs coeffs = rule.coefficients();
  const int64_t total = total_candidate_chunks(table, num_tensors, chunk_elems);
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    const int64_t t = candidate_owner(table, num_tensors, chunk);
    const MaskedTensorEntry e = table[t];
    if (e.select_kind != int64_t(SelectKind::kDensity)) continue;
    const uint32_t* s = state + t * kStateWords;
    const CandidateChunk c = candidate_chunk(e, s, chunk, chunk_elems);
    const uint32_t threshold = s[0];
    const uint2* list = reinterpret_cast<const uint2*>(scratch + e.scratch_offset);
    for_each_candidate(e, c, list, threshold, kFirstShift, chunk_elems, [&](uint32_t key, int64_t i) {
      if (key >= threshold) update_one<Rule>(coeffs, table + t, i);
    });
  }
}

void validate(const MaskedLaunch& l, const char* entry) {
  if (l.num_tensors < 1) throw bad_argument(entry, "num_tensors must be >= 1");
  if (l.num_tensors > (int64_t(1) << 31) - 1) throw bad_argument(entry, "too many tensors for one launch");
  if (l.chunk_elems < 16 || l.chunk_elems % 16 != 0)
    throw bad_argument(entry, "chunk_elems must be a positive multiple of 16");
  if (l.total_chunks < 0) throw bad_argument(entry, "total_chunks must be >= 0");
  if (l.scratch_bytes < 0) throw bad_argument(entry, "scratch_bytes must be >= 0");
  if (l.table == nullptr || l.workspace == nullptr) throw bad_argument(entry, "table and workspace must be set");
}

int grid_for(const MaskedLaunch& l, const char* entry) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(l.total_chunks, int64_t(sm_count(entry)) * kBlocksPerSm)));
}

// Step 1, and step 2a with the first pick: the select state holds each density tensor's first-digit bin.
Workspace prepare_selections(const MaskedLaunch& l, int grid, cudaStream_t stream, const char* entry) {
  const Workspace ws = split_workspace(l);
  if (l.has_index_lists && l.scratch_bytes > 0) {
    check_cuda(cudaMemsetAsync(ws.scratch, 0, l.scratch_bytes, stream), entry, "cudaMemsetAsync");
    scatter_index_lists_kernel<<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, ws.scratch);
    check_launch(entry);
  }
  if (l.has_density) {
    check_cuda(cudaMemsetAsync(ws.hist, 0, hist_bytes(l.num_tensors), stream), entry, "cudaMemsetAsync");
    first_digit_histogram_kernel<<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.total_chunks,
                                                                l.chunk_elems, ws.hist);
    check_launch(entry);
    pick_bin_kernel<<<static_cast<unsigned>(l.num_tensors), kThreads, 0, stream>>>(l.table, ws.state, ws.hist,
                                                                                  kFirstShift, kFirstBits, true);
    check_launch(entry);
  }
  return ws;
}

// Step 2c: the exact threshold key of every density tensor, from its candidates (after 2b listed them).
void finish_selections(const MaskedLaunch& l, const Workspace& ws, int grid, cudaStream_t stream, const char* entry) {
  for (int pass = 0; pass < kCandidatePasses; ++pass) {
    const int shift = candidate_shift(pass), bits = candidate_bits(pass);
    candidate_histogram_kernel<<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.chunk_elems, ws.state,
                                                              ws.hist, ws.scratch, shift, bits);
    check_launch(entry);
    pick_bin_kernel<<<static_cast<unsigned>(l.num_tensors), kThreads, 0, stream>>>(l.table, ws.state, ws.hist, shift,
                                                                                  bits, false);
    check_launch(entry);
  }
}

template <typename Rule>
void run_update(const MaskedLaunch& l, Rule rule, cudaStream_t stream, const char* entry) {
  validate(l, entry);
  if (l.total_chunks == 0) return;
  const int grid = grid_for(l, entry);
  const Workspace ws = prepare_selections(l, grid, stream, entry);
  masked_update_kernel<true, Rule><<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.total_chunks,
                                                                  l.chunk_elems, ws.state, ws.scratch, rule);
  check_launch(entry);
  if (l.has_density) {
    finish_selections(l, ws, grid, stream, entry);
    candidate_update_kernel<Rule><<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.chunk_elems, ws.state,
                                                                 ws.scratch, rule);
    check_launch(entry);
  }
}

}  // namespace

int64_t masked_update_workspace_size(int64_t num_tensors, int64_t scratch_bytes) {
  return state_bytes(num_tensors) + hist_bytes(num_tensors) + align256(scratch_bytes);
}

void masked_adamw(const MaskedLaunch& launch, const AdamWScalars& s, cudaStream_t stream, const char* entry) {
  AdamWDevice d{};
  d.lr = static_cast<float>(s.lr);
  d.beta1 = static_cast<float>(s.beta1);
  d.beta2 = static_cast<float>(s.beta2);
  d.one_minus_beta1 = static_cast<float>(1.0 - s.beta1);
  d.one_minus_beta2 = static_cast<float>(1.0 - s.beta2);
  d.eps = static_cast<float>(s.eps);
  d.decay = static_cast<float>(1.0 - s.lr * s.weight_decay);
  d.bc1 = static_cast<float>(1.0 - std::pow(s.beta1, s.step));
  d.bc2 = static_cast<float>(1.0 - std::pow(s.beta2, s.step));
  d.step_ptr = s.step_ptr;
  d.beta1_d = s.beta1;
  d.beta2_d = s.beta2;
  run_update(launch, AdamWRule{d}, stream, entry);
}

void masked_sgd(const MaskedLaunch& launch, const SgdScalars& s, cudaStream_t stream, const char* entry) {
  SgdDevice d{static_cast<float>(s.lr), static_cast<float>(s.momentum), static_cast<float>(s.weight_decay)};
  run_update(launch, SgdRule{d}, stream, entry);
}

void masked_density_thresholds(const MaskedLaunch& launch, float* thresholds, cudaStream_t stream, const char* entry) {
  validate(launch, entry);
  const int grid = grid_for(launch, entry);
  const Workspace ws = prepare_selections(launch, grid, stream, entry);
  masked_update_kernel<false, SgdRule><<<grid, kThreads, 0, stream>>>(
      launch.table, launch.num_tensors, launch.total_chunks, launch.chunk_elems, ws.state, ws.scratch, SgdRule{});
  check_launch(entry);
  finish_selections(launch, ws, grid, stream, entry);
  constexpr int kPerBlock = 256;
  const unsigned blocks = static_cast<unsigned>((launch.num_tensors + kPerBlock - 1) / kPerBlock);
  thresholds_kernel<<<blocks, kPerBlock, 0, stream>>>(launch.table, launch.num_tensors, ws.state, thresholds);
  check_launch(entry);
}

}  // namespace treelora
