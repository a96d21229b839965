// Device-side helpers shared by treelora's kernels: dtype conversions (compile-time and run-time dispatched),
// vectorised loads and stores, deterministic warp/block reductions and the Philox4x32-10 counter-based generator used
// for dropout. Included only by .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace treelora {

constexpr int kWarpSize = 32;

// --- scalar conversions ------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Run-time dtype dispatch for kernels that serve tensors of several dtypes in one launch (the multi-tensor optimizer):
// the branch is uniform across a block, so it costs a few instructions per access, not divergence.
__device__ __forceinline__ float load_as_float(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kFloat16:
      return __half2float(static_cast<const __half*>(base)[i]);
    case DType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dt, int64_t i, float v) {
  switch (dt) {
    case DType::kFloat16:
      static_cast<__half*>(base)[i] = __float2half_rn(v);
      break;
    case DType::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
      break;
    default:
      static_cast<float*>(base)[i] = v;
  }
}

__host__ __device__ __forceinline__ int dtype_size(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

// --- vectorised loads and stores ---------------------------------------------------------------------------------

// The widest word type for a run of `Bytes` bytes (16, 8 or 4).
template <int Bytes>
struct VecWord;
template <>
struct VecWord<16> {
  using type = uint4;
};
template <>
struct VecWord<8> {
  using type = uint2;
};
template <>
struct VecWord<4> {
  using type = unsigned int;
};

// Loads N consecutive elements starting at p (which must be aligned to min(16, N * sizeof(T)) bytes) as floats.
template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kWordBytes = kBytes >= 16 ? 16 : kBytes;
  constexpr int kWords = kBytes / kWordBytes;
  constexpr int kPerWord = kWordBytes / static_cast<int>(sizeof(T));
  using Word = typename VecWord<kWordBytes>::type;
  static_assert(kBytes % kWordBytes == 0, "vector length must fill whole words");
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    Word raw = reinterpret_cast<const Word*>(p)[w];
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerWord; ++i) out[w * kPerWord + i] = to_float(vals[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  constexpr int kWordBytes = kBytes >= 16 ? 16 : kBytes;
  constexpr int kWords = kBytes / kWordBytes;
  constexpr int kPerWord = kWordBytes / static_cast<int>(sizeof(T));
  using Word = typename VecWord<kWordBytes>::type;
  static_assert(kBytes % kWordBytes == 0, "vector length must fill whole words");
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    Word raw;
    T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < kPerWord; ++i) vals[i] = from_float<T>(in[w * kPerWord + i]);
    reinterpret_cast<Word*>(p)[w] = raw;
  }
}

// Four consecutive elements of a run-time dtype (16 bytes for fp32, 8 for fp16/bf16); base + i must be aligned.
__device__ __forceinline__ void load4_as_float(const void* base, DType dt, int64_t i, float (&out)[4]) {
  switch (dt) {
    case DType::kFloat16:
      load_vec<__half, 4>(static_cast<const __half*>(base) + i, out);
      break;
    case DType::kBFloat16:
      load_vec<__nv_bfloat16, 4>(static_cast<const __nv_bfloat16*>(base) + i, out);
      break;
    default:
      load_vec<float, 4>(static_cast<const float*>(base) + i, out);
  }
}

__device__ __forceinline__ void store4_from_float(void* base, DType dt, int64_t i, const float (&in)[4]) {
  switch (dt) {
    case DType::kFloat16:
      store_vec<__half, 4>(static_cast<__half*>(base) + i, in);
      break;
    case DType::kBFloat16:
      store_vec<__nv_bfloat16, 4>(static_cast<__nv_bfloat16*>(base) + i, in);
      break;
    default:
      store_vec<float, 4>(static_cast<float*>(base) + i, in);
  }
}

// --- deterministic reductions ------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = kWarpSize / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sums K values per thread over the block; the totals are valid in thread 0. The tree has a fixed shape, so the
// result is the same bit for bit on every run. Safe to call repeatedly (it synchronises before returning).
template <int kThreads, int K>
__device__ __forceinline__ void block_sum(float (&v)[K]) {
  static_assert(kThreads % kWarpSize == 0 && kThreads <= kWarpSize * kWarpSize, "block must be whole warps");
  constexpr int kWarps = kThreads / kWarpSize;
  __shared__ float partial[K][kWarps];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int s = 0; s < K; ++s) {
    float w = warp_sum(v[s]);
    if (lane == 0) partial[s][warp] = w;
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int s = 0; s < K; ++s) v[s] = warp_sum(lane < kWarps ? partial[s][lane] : 0.f);
  }
  __syncthreads();
}

// --- Philox4x32-10 -----------------------------------------------------------------------------------------------

// Counter-based generator (Salmon et al., SC'11): the same (key, counter) always gives the same four words, so a
// dropout mask is a pure function of (seed, offset, element index) and backward regenerates it instead of storing it.
struct Philox4 {
  uint32_t w[4];
};

__host__ __device__ __forceinline__ uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

__host__ __device__ __forceinline__ Philox4 philox4x32_10(uint64_t counter_lo, uint64_t counter_hi, uint64_t key) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t c0 = static_cast<uint32_t>(counter_lo), c1 = static_cast<uint32_t>(counter_lo >> 32);
  uint32_t c2 = static_cast<uint32_t>(counter_hi), c3 = static_cast<uint32_t>(counter_hi >> 32);
  uint32_t k0 = static_cast<uint32_t>(key), k1 = static_cast<uint32_t>(key >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kMul0, c0), lo0 = kMul0 * c0;
    const uint32_t hi1 = mulhi32(kMul1, c2), lo1 = kMul1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// Dropout keep-decisions for the elements of one logical (rows, cols) matrix. Element e = row * cols + col uses word
// e % 4 of Philox(counter = e / 4, offset; key = seed); it is kept when the word's top 24 bits are below
// keep_threshold = round((1 - p) * 2^24) (2^24 keeps everything). {seed, offset} live on the device, drawn from
// torch's generator by the launcher (no host synchronisation).
class DropoutStream {
 public:
  // A stream that keeps everything without reading any seed (for kernels whose dropout is off).
  __device__ __forceinline__ DropoutStream() : key_(0), offset_(0), threshold_(1u << 24) {}
  __device__ __forceinline__ DropoutStream(const int64_t* seed_offset, uint32_t keep_threshold)
      : key_(static_cast<uint64_t>(seed_offset[0])),
        offset_(static_cast<uint64_t>(seed_offset[1])),
        threshold_(keep_threshold) {}

  // Keep decisions of the n <= 8 consecutive elements e0 .. e0 + n as bits (bit i: element e0 + i), one Philox draw
  // per group of 4 they touch (2 for an aligned run of 8), from one copy of the generator's code: the tile loaders
  // call it for every run, and a call per element would inline ten Philox rounds eight times over.
  __device__ __forceinline__ uint32_t keep_bits(int64_t e0, int n) const {
    uint32_t bits = 0;
    const int64_t last = (e0 + n - 1) >> 2;
#pragma unroll 1
    for (int64_t group = e0 >> 2; group <= last; ++group) {
      const Philox4 w = philox4x32_10(static_cast<uint64_t>(group), offset_, key_);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t e = group * 4 + i - e0;
        if (e >= 0 && e < n && (w.w[i] >> 8) < threshold_) bits |= 1u << e;
      }
    }
    return bits;
  }

 private:
  uint64_t key_, offset_;
  uint32_t threshold_;
};

// --- host-side dispatch ------------------------------------------------------------------------------------------

// Calls f(T{}) with T the C++ type of a dtype code.
template <typename F>
void with_dtype(DType dt, const char* entry, const char* name, F&& f) {
  switch (dt) {
    case DType::kFloat32:
      f(float{});
      return;
    case DType::kFloat16:
      f(__half{});
      return;
    case DType::kBFloat16:
      f(__nv_bfloat16{});
      return;
  }
  throw bad_argument(entry, std::string("unsupported dtype code for ") + name);
}

// --- index helpers -----------------------------------------------------------------------------------------------

// Largest l in [0, n) with prefix[l] <= value, for a non-decreasing prefix with prefix[0] <= value.
__device__ __forceinline__ int64_t upper_segment(const int64_t* prefix, int64_t n, int64_t value) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (prefix[mid] <= value)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0;
}

}  // namespace treelora
