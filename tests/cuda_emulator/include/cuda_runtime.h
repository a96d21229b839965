// Stand-in for the CUDA runtime and device builtins that csrc/ uses, for the CPU emulator (tests/cuda_emulator).
//
// A launch `kernel<<<grid, block, smem, stream>>>(args)` is rewritten by build.py into
// `::emu::launch("kernel", "file.cu:line", kernel, grid, block, smem, stream, args)`. Blocks run one after another on
// the calling thread; the threads of a block are fibers (ucontext) scheduled cooperatively, lowest ready index first
// (highest in reverse order), each running until it reaches __syncthreads(), a warp shuffle or its end. Kernel
// arguments are converted to the kernel's parameter types once per launch and copied into every thread, as on the
// device.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
// Shared memory: one static object per declaration serves every block, since blocks run one at a time. build.py adds
// a call to ::emu::poison_shared after each declaration, which fills it with 0xff bytes (NaN as a float) the first
// time each block reaches it: a read before any write gives garbage, as on the device.
#define __shared__ static

// --- host API ----------------------------------------------------------------------------------------------------

enum cudaError_t : int { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef struct CUstream_st* cudaStream_t;
enum cudaDeviceAttr : int { cudaDevAttrMultiProcessorCount = 16 };

cudaError_t cudaGetLastError();
const char* cudaGetErrorName(cudaError_t err);
const char* cudaGetErrorString(cudaError_t err);
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream);

// --- vector types (with the device's alignment, so that UBSan flags misaligned vector accesses) -------------------

struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

// --- emulator core (tests/cuda_emulator/runtime.cc) ----------------------------------------------------------------

namespace emu {

using Thunk = void (*)(const void* packed);

// Runs every block of a launch; sets the error cudaGetLastError() reports for an invalid configuration (as the
// device does), throws std::runtime_error for what the emulator detects inside the kernel (divergent barriers,
// deadlocks, shuffles naming exited lanes).
void run_grid(const char* kernel, const char* where, dim3 grid, dim3 block, size_t dynamic_smem, Thunk thunk,
              const void* packed);
void sync_block();
void warp_exchange(unsigned mask, const void* value, void* out, size_t bytes, unsigned src_lane);
void poison_shared(void* address, size_t bytes);

// The PTX instructions of csrc/lora_mma.cuh (compiled with TREELORA_CUDA_EMULATOR), warp-collective like the real
// ones: ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 with this lane's row address; mma.sync.aligned.m16n8k16
// .row.col.f32.{bf16,f16} (d += A B, products summed in double and rounded to float once); st.shared.v4.b32. Each
// lane gets its part with the PTX ISA's fragment layouts; ldmatrix and the store count their bank conflicts.
void ptx_ldmatrix_x4(uint32_t (&r)[4], bool trans, const void* row);
void ptx_mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
void ptx_st_shared_16B(void* dst, const void* value);

template <class... P, class... A>
void launch(const char* name, const char* where, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem,
            cudaStream_t, A&&... args) {
  struct Packed {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> params;
  };
  const Packed packed{kernel, std::tuple<std::decay_t<P>...>(std::forward<A>(args)...)};
  run_grid(name, where, grid, block, dynamic_smem,
           [](const void* p) {
             const Packed& pk = *static_cast<const Packed*>(p);
             std::apply(pk.kernel, pk.params);  // each thread gets its own copy of the parameters
           },
           &packed);
}

}  // namespace emu

// --- device builtins ---------------------------------------------------------------------------------------------

// Set by the scheduler before it resumes a thread (all threads of a launch run on the launching OS thread).
extern thread_local uint3 threadIdx, blockIdx;
extern thread_local dim3 blockDim, gridDim;

inline void __syncthreads() { emu::sync_block(); }
// Blocks run one after another: every write of an earlier block is visible to a later one without a fence.
inline void __threadfence() {}
// A load that bypasses L1 (ld.global.cg): a plain load here, where there is no cache to bypass.
template <class T>
inline T __ldcg(const T* address) {
  return *address;
}

// Lane l reads `var` of lane l ^ lane_mask; a source outside l's group of `width` lanes reads l's own value.
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move 4- or 8-byte values");
  const unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const unsigned lane = tid % 32;
  unsigned src = lane ^ static_cast<unsigned>(lane_mask);
  if (src >= ((lane + width) & ~static_cast<unsigned>(width - 1))) src = lane;
  T out;
  emu::warp_exchange(mask, &var, &out, sizeof(T), src);
  return out;
}

// Every thread of a block runs on one OS thread and none is preempted mid-instruction: plain read-modify-writes.
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}

// The device's min/max overloads accept mixed integer widths; the common type mirrors their promotion.
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}
