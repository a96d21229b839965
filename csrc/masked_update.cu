// Sparse masked multi-tensor AdamW / SGD: see masked_update.h for the contract.
//
// Pipeline of one call (every step is one launch for all tensors, none synchronises the host):
//   1. index lists only: clear the scratch area, scatter each list into a dense byte mask (duplicates collapse);
//   2. density only: three radix-select passes over the bits of |grad| (11 + 11 + 9 bits of the 31 that a
//      non-negative float has), each a histogram launch plus a per-tensor select launch, leaving the exact bits of the
//      k-th largest |grad| of every tensor;
//   3. the update: each thread takes 4 consecutive entries, decides which are selected, and runs the 16-byte vector
//      path when all four are, scalar read-modify-writes of the selected ones otherwise, nothing when none is.
#include <algorithm>
#include <cmath>

#include "device_utils.cuh"
#include "masked_update.h"

namespace treelora {
namespace {

constexpr int kThreads = 256;
constexpr int kGroup = 4;             // entries per thread step: a 16-byte fp32 vector, 8 bytes of fp16/bf16
constexpr int kBlocksPerSm = 8;       // 8 x 256 threads fill an SM for the grid-stride loops
constexpr int kMaxBins = 2048;        // widest radix digit (11 bits): 8 KB of shared histogram
constexpr int kPasses = 3;

// Digits of the radix select, most significant first: bits 30..20, 19..9, 8..0 of the key.
__host__ __device__ constexpr int digit_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 9 : 0); }
__host__ __device__ constexpr int digit_bits(int pass) { return pass == 2 ? 9 : 11; }

// Workspace layout: [select state: 2 int64 per tensor (prefix key, remaining k)] [histograms: kMaxBins uint32 per
// tensor] [index-list scratch], each part 256-byte aligned.
constexpr int64_t align256(int64_t n) { return (n + 255) / 256 * 256; }
int64_t state_bytes(int64_t n) { return align256(n * 2 * int64_t(sizeof(int64_t))); }
int64_t hist_bytes(int64_t n) { return align256(n * kMaxBins * int64_t(sizeof(uint32_t))); }

struct Workspace {
  int64_t* state;
  uint32_t* hist;
  uint8_t* scratch;
};

Workspace split_workspace(const MaskedLaunch& l) {
  uint8_t* base = static_cast<uint8_t*>(l.workspace);
  return Workspace{reinterpret_cast<int64_t*>(base), reinterpret_cast<uint32_t*>(base + state_bytes(l.num_tensors)),
                   base + state_bytes(l.num_tensors) + hist_bytes(l.num_tensors)};
}

// The tensor that owns `chunk`: the last entry whose chunk_begin <= chunk (empty tensors own no chunk).
__device__ __forceinline__ int64_t owner(const MaskedTensorEntry* table, int64_t n, int64_t chunk) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (table[mid].chunk_begin <= chunk)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

// Ordering key of |g|: for non-negative floats the IEEE bit pattern orders like the value (NaN above +inf).
__device__ __forceinline__ uint32_t magnitude_key(float g) { return __float_as_uint(g) & 0x7fffffffu; }

// --- 1. index lists -> dense byte masks --------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
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

// --- 2. radix select of the k-th largest |grad| ------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    density_histogram_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors, int64_t total_chunks,
                             int64_t chunk_elems, const int64_t* __restrict__ state, uint32_t* __restrict__ hist,
                             int pass) {
  __shared__ uint32_t bins[kMaxBins];
  const int shift = digit_shift(pass), bits = digit_bits(pass);
  const int above = shift + bits;  // bits >= above were fixed by earlier passes
  const uint32_t digit_mask = (1u << bits) - 1u;
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) bins[b] = 0;
  int64_t current = -1;  // tensor whose counts the shared bins hold
  auto flush = [&]() {
    __syncthreads();
    if (current >= 0) {
      uint32_t* dst = hist + current * kMaxBins;
      for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
        const uint32_t v = bins[b];
        if (v != 0) {
          atomicAdd(dst + b, v);  // integer atomics: the totals do not depend on the order
          bins[b] = 0;
        }
      }
    }
    __syncthreads();
  };
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int64_t t = owner(table, num_tensors, chunk);
    const MaskedTensorEntry& e = table[t];
    if (e.select_kind != int64_t(SelectKind::kDensity)) continue;
    if (t != current) {
      flush();
      current = t;
    }
    const uint32_t prefix = pass == 0 ? 0u : static_cast<uint32_t>(state[2 * t]);
    const DType gdt = static_cast<DType>(e.grad_dtype);
    const void* grad = reinterpret_cast<const void*>(e.grad);
    const int64_t lo = (chunk - e.chunk_begin) * chunk_elems, hi = min(e.numel, lo + chunk_elems);
    for (int64_t i = lo + threadIdx.x; i < hi; i += kThreads) {
      const uint32_t key = magnitude_key(load_as_float(grad, gdt, i));
      if (above >= 31 || (key >> above) == (prefix >> above)) atomicAdd(&bins[(key >> shift) & digit_mask], 1u);
    }
  }
  flush();
}

// One block per tensor: find the digit whose bin holds the remaining k-th largest key, fix it in the prefix, and clear
// the tensor's bins for the next pass.
__global__ void __launch_bounds__(kThreads)
    density_select_kernel(const MaskedTensorEntry* __restrict__ table, int64_t* __restrict__ state,
                          uint32_t* __restrict__ hist, int pass) {
  const int64_t t = blockIdx.x;
  const MaskedTensorEntry& e = table[t];
  if (e.select_kind != int64_t(SelectKind::kDensity) || e.numel == 0) return;
  const int shift = digit_shift(pass), nbins = 1 << digit_bits(pass);
  const int per_thread = nbins / kThreads;  // 8 or 2 bins, contiguous, owned by one thread
  const int first = threadIdx.x * per_thread;
  __shared__ int64_t thread_total[kThreads];
  __shared__ int64_t above_thread[kThreads];
  uint32_t* bins = hist + t * kMaxBins;
  const int64_t k = pass == 0 ? e.topk : state[2 * t + 1];
  const int64_t prefix = pass == 0 ? 0 : state[2 * t];
  int64_t own = 0;
  for (int b = 0; b < per_thread; ++b) own += bins[first + b];
  thread_total[threadIdx.x] = own;
  __syncthreads();
  if (threadIdx.x == 0) {  // 256 additions in a fixed order: negligible next to the histogram pass
    int64_t run = 0;
    for (int i = kThreads - 1; i >= 0; --i) {
      above_thread[i] = run;
      run += thread_total[i];
    }
  }
  __syncthreads();
  int64_t run = above_thread[threadIdx.x];  // keys counted in higher bins than this thread's
  for (int b = per_thread - 1; b >= 0; --b) {
    const int64_t count = bins[first + b];
    if (run < k && run + count >= k) {
      state[2 * t] = prefix | (int64_t(first + b) << shift);
      state[2 * t + 1] = k - run;
    }
    run += count;
  }
  for (int b = 0; b < per_thread; ++b) bins[first + b] = 0;
}

void run_radix_select(const MaskedLaunch& l, const Workspace& ws, int grid, cudaStream_t stream, const char* entry) {
  check_cuda(cudaMemsetAsync(ws.hist, 0, hist_bytes(l.num_tensors), stream), entry, "cudaMemsetAsync");
  for (int pass = 0; pass < kPasses; ++pass) {
    density_histogram_kernel<<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.total_chunks, l.chunk_elems,
                                                            ws.state, ws.hist, pass);
    check_launch(entry);
    density_select_kernel<<<static_cast<unsigned>(l.num_tensors), kThreads, 0, stream>>>(l.table, ws.state, ws.hist,
                                                                                         pass);
    check_launch(entry);
  }
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

struct AdamWRule {
  AdamWDevice s;
  __device__ __forceinline__ void prepare() {
    if (s.step_ptr != nullptr) {
      const double step = *s.step_ptr;
      s.bc1 = static_cast<float>(1.0 - pow(s.beta1_d, step));
      s.bc2 = static_cast<float>(1.0 - pow(s.beta2_d, step));
    }
  }
  // The arithmetic of masked_adamw_ref_ (treelora/kernels/torch/masked_update.py), in fp32.
  __device__ __forceinline__ void apply(float& p, float g, float& m, float& v, bool) const {
    m = s.beta1 * m + s.one_minus_beta1 * g;
    v = s.beta2 * v + s.one_minus_beta2 * g * g;
    const float denom = sqrtf(v / s.bc2) + s.eps;
    p = p * s.decay - s.lr * (m / s.bc1) / denom;
  }
  static constexpr bool kTwoStates = true;
};

struct SgdRule {
  SgdDevice s;
  __device__ __forceinline__ void prepare() {}
  // The arithmetic of masked_sgd_ref_: coupled weight decay, momentum without dampening.
  __device__ __forceinline__ void apply(float& p, float g, float& buf, float&, bool has_momentum) const {
    float d = g + s.weight_decay * p;
    if (has_momentum) {
      buf = s.momentum * buf + d;
      d = buf;
    }
    p = p - s.lr * d;
  }
  static constexpr bool kTwoStates = false;
};

template <typename Rule>
__global__ void __launch_bounds__(kThreads)
    masked_update_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors, int64_t total_chunks,
                         int64_t chunk_elems, const int64_t* __restrict__ state, const uint8_t* __restrict__ scratch,
                         Rule rule) {
  rule.prepare();
  for (int64_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int64_t t = owner(table, num_tensors, chunk);
    const MaskedTensorEntry e = table[t];
    const SelectKind kind = static_cast<SelectKind>(e.select_kind);
    void* param = reinterpret_cast<void*>(e.param);
    const void* grad = reinterpret_cast<const void*>(e.grad);
    void* s0 = reinterpret_cast<void*>(e.state0);
    void* s1 = reinterpret_cast<void*>(e.state1);
    const DType pdt = static_cast<DType>(e.param_dtype), gdt = static_cast<DType>(e.grad_dtype);
    const DType s0dt = static_cast<DType>(e.state0_dtype), s1dt = static_cast<DType>(e.state1_dtype);
    const bool has_s0 = s0 != nullptr;
    const uint8_t* mask = kind == SelectKind::kByteMask    ? reinterpret_cast<const uint8_t*>(e.select)
                          : kind == SelectKind::kIndexList ? scratch + e.scratch_offset
                                                           : nullptr;
    const uint32_t threshold = kind == SelectKind::kDensity ? static_cast<uint32_t>(state[2 * t]) : 0u;
    const int64_t lo = (chunk - e.chunk_begin) * chunk_elems, hi = min(e.numel, lo + chunk_elems);

    // Read-modify-write of one selected entry; nothing else is ever written.
    auto update_one = [&](int64_t i) {
      float p = load_as_float(param, pdt, i), g = load_as_float(grad, gdt, i);
      float a = has_s0 ? load_as_float(s0, s0dt, i) : 0.f;
      float b = Rule::kTwoStates ? load_as_float(s1, s1dt, i) : 0.f;
      rule.apply(p, g, a, b, has_s0);
      store_from_float(param, pdt, i, p);
      if (has_s0) store_from_float(s0, s0dt, i, a);
      if (Rule::kTwoStates) store_from_float(s1, s1dt, i, b);
    };
    auto selected_one = [&](int64_t i) -> bool {
      switch (kind) {
        case SelectKind::kAll:
          return true;
        case SelectKind::kDensity:
          return magnitude_key(load_as_float(grad, gdt, i)) >= threshold;
        default:
          return mask[i] != 0;
      }
    };

    for (int64_t i = lo + int64_t(threadIdx.x) * kGroup; i < hi; i += int64_t(kThreads) * kGroup) {
      if (!e.vec_ok || i + kGroup > hi) {
        for (int64_t j = i; j < min(hi, i + kGroup); ++j)
          if (selected_one(j)) update_one(j);
        continue;
      }
      float g[kGroup];
      unsigned sel = 0;
      bool have_g = false;
      if (kind == SelectKind::kAll) {
        sel = 0xfu;
      } else if (kind == SelectKind::kDensity) {
        load4_as_float(grad, gdt, i, g);
        have_g = true;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) sel |= (magnitude_key(g[j]) >= threshold ? 1u : 0u) << j;
      } else {
        const uint32_t word = *reinterpret_cast<const uint32_t*>(mask + i);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) sel |= (((word >> (8 * j)) & 0xffu) != 0 ? 1u : 0u) << j;
      }
      if (sel == 0) continue;
      if (sel != 0xfu) {
#pragma unroll
        for (int j = 0; j < kGroup; ++j)
          if (sel & (1u << j)) update_one(i + j);
        continue;
      }
      float p[kGroup], a[kGroup] = {0.f, 0.f, 0.f, 0.f}, b[kGroup] = {0.f, 0.f, 0.f, 0.f};
      if (!have_g) load4_as_float(grad, gdt, i, g);
      load4_as_float(param, pdt, i, p);
      if (has_s0) load4_as_float(s0, s0dt, i, a);
      if (Rule::kTwoStates) load4_as_float(s1, s1dt, i, b);
#pragma unroll
      for (int j = 0; j < kGroup; ++j) rule.apply(p[j], g[j], a[j], b[j], has_s0);
      store4_from_float(param, pdt, i, p);
      if (has_s0) store4_from_float(s0, s0dt, i, a);
      if (Rule::kTwoStates) store4_from_float(s1, s1dt, i, b);
    }
  }
}

// Writes the threshold value (or +inf) of every tensor after the radix select.
__global__ void thresholds_kernel(const MaskedTensorEntry* __restrict__ table, int64_t num_tensors,
                                  const int64_t* __restrict__ state, float* __restrict__ out) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= num_tensors) return;
  const bool density = table[t].select_kind == int64_t(SelectKind::kDensity) && table[t].numel > 0;
  out[t] = density ? __uint_as_float(static_cast<uint32_t>(state[2 * t])) : INFINITY;
}

void validate(const MaskedLaunch& l, const char* entry) {
  if (l.num_tensors < 1) throw bad_argument(entry, "num_tensors must be >= 1");
  if (l.num_tensors > (int64_t(1) << 31) - 1) throw bad_argument(entry, "too many tensors for one launch");
  if (l.chunk_elems < kGroup || l.chunk_elems % kGroup != 0)
    throw bad_argument(entry, "chunk_elems must be a positive multiple of " + std::to_string(kGroup));
  if (l.total_chunks < 0) throw bad_argument(entry, "total_chunks must be >= 0");
  if (l.scratch_bytes < 0) throw bad_argument(entry, "scratch_bytes must be >= 0");
  if (l.table == nullptr || l.workspace == nullptr) throw bad_argument(entry, "table and workspace must be set");
}

int grid_for(const MaskedLaunch& l, const char* entry) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(l.total_chunks, int64_t(sm_count(entry)) * kBlocksPerSm)));
}

// Steps 1 and 2 of the pipeline, shared by both optimizers and by masked_density_thresholds.
Workspace prepare_selections(const MaskedLaunch& l, int grid, cudaStream_t stream, const char* entry) {
  const Workspace ws = split_workspace(l);
  if (l.has_index_lists && l.scratch_bytes > 0) {
    check_cuda(cudaMemsetAsync(ws.scratch, 0, l.scratch_bytes, stream), entry, "cudaMemsetAsync");
    scatter_index_lists_kernel<<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, ws.scratch);
    check_launch(entry);
  }
  if (l.has_density) run_radix_select(l, ws, grid, stream, entry);
  return ws;
}

template <typename Rule>
void run_update(const MaskedLaunch& l, Rule rule, cudaStream_t stream, const char* entry) {
  validate(l, entry);
  if (l.total_chunks == 0) return;
  const int grid = grid_for(l, entry);
  const Workspace ws = prepare_selections(l, grid, stream, entry);
  masked_update_kernel<Rule><<<grid, kThreads, 0, stream>>>(l.table, l.num_tensors, l.total_chunks, l.chunk_elems,
                                                            ws.state, ws.scratch, rule);
  check_launch(entry);
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
  const Workspace ws = prepare_selections(launch, grid_for(launch, entry), stream, entry);
  constexpr int kPerBlock = 256;
  const unsigned blocks = static_cast<unsigned>((launch.num_tensors + kPerBlock - 1) / kPerBlock);
  thresholds_kernel<<<blocks, kPerBlock, 0, stream>>>(launch.table, launch.num_tensors, ws.state, thresholds);
  check_launch(entry);
}

}  // namespace treelora
