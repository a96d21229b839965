// Self-test kernels of the CPU emulator (see selftest.h). Written in CUDA syntax and converted by build.py like
// csrc/*.cu; compiled only into the emulated module.
#include "selftest.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <numeric>
#include <stdexcept>

namespace emu_selftest {
namespace {

__global__ void butterfly_kernel(const float* in, float* out) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = in[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  out[i] = v;
}

__global__ void rotate_kernel(const int32_t* in, int32_t* out, bool sync) {
  __shared__ int32_t ring[1024];
  const unsigned base = blockIdx.x * blockDim.x;
  ring[threadIdx.x] = in[base + threadIdx.x];
  if (sync) __syncthreads();
  out[base + threadIdx.x] = ring[(threadIdx.x + 1) % blockDim.x];
}

__global__ void barrier_after_early_exit_kernel(int32_t* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_with_ended_lanes_kernel(float* out) {
  if (threadIdx.x % 2) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 2);
}

__global__ void barrier_and_shuffle_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

// A whole 16-byte word 4 bytes past a 16-byte boundary: g++ loads it with an aligned SSE instruction, which faults on
// the CPU too, so this also covers the emulator's recovery from a fault after a report.
__global__ void misaligned_vector_load_kernel(const float* in, uint4* out) {
  out[threadIdx.x] = *reinterpret_cast<const uint4*>(in + 1);
}

__global__ void shared_index_out_of_range_kernel(float* out) {
  __shared__ float slots[32];
  slots[threadIdx.x + 1] = 1.f;  // thread 31 writes slots[32]
  __syncthreads();
  out[threadIdx.x] = slots[threadIdx.x];
}

// One warp: a 32 x 8 matrix of 16-bit values (element (i, j) = 8 i + j) in shared memory, rows row_stride elements
// apart; lane l gives the address of row l to ldmatrix.x4 and writes the four registers it gets.
__global__ void ldmatrix_kernel(bool trans, int row_stride, uint32_t* out) {
  __shared__ __align__(128) uint16_t tile[32 * 64];
  for (int i = 0; i < 32; ++i)
    for (int j = 0; j < 8; ++j) tile[i * row_stride + j] = static_cast<uint16_t>(8 * i + j);
  __syncthreads();
  uint32_t r[4];
  ::emu::ptx_ldmatrix_x4(r, trans, tile + threadIdx.x * row_stride);
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = r[i];
}

// One warp: D = A B + C for A (16 x 16), B (16 x 8) given as bf16 / fp16 bits, row-major, and C (16 x 8) fp32. Each
// lane packs its A and B registers from the matrices with the PTX ISA's fragment layout, written out here
// independently of the emulator's own lookup, and writes its four accumulators in lane order.
__global__ void mma_kernel(bool bf16, const uint16_t* a, const uint16_t* b, const float* c, float* out) {
  const unsigned lane = threadIdx.x, g = lane / 4, t = lane % 4;
  auto pair = [](uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); };
  const uint32_t ra[4] = {pair(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          pair(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          pair(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          pair(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t rb[2] = {pair(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          pair(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  float d[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]};
  ::emu::ptx_mma_m16n8k16(bf16, d, ra, rb);
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = d[i];
}

void check_launch() {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(cudaGetErrorName(err));
}

}  // namespace

std::vector<float> butterfly(unsigned threads, unsigned blocks) {
  std::vector<float> in(threads * blocks), out(threads * blocks);
  std::iota(in.begin(), in.end(), 0.f);
  butterfly_kernel<<<blocks, threads, 0, nullptr>>>(in.data(), out.data());
  check_launch();
  return out;
}

std::vector<int32_t> rotate(unsigned threads, unsigned blocks, bool sync) {
  std::vector<int32_t> in(threads * blocks), out(threads * blocks);
  std::iota(in.begin(), in.end(), 0);
  rotate_kernel<<<blocks, threads, 0, nullptr>>>(in.data(), out.data(), sync);
  check_launch();
  return out;
}

void barrier_after_early_exit() {
  std::vector<int32_t> out(64);
  barrier_after_early_exit_kernel<<<1, 64, 0, nullptr>>>(out.data());
}

void shuffle_with_ended_lanes() {
  std::vector<float> out(32);
  shuffle_with_ended_lanes_kernel<<<1, 32, 0, nullptr>>>(out.data());
}

void barrier_and_shuffle_deadlock() {
  std::vector<float> out(32);
  barrier_and_shuffle_kernel<<<1, 32, 0, nullptr>>>(out.data());
}

void misaligned_vector_load() {
  alignas(16) float in[8] = {};
  std::vector<uint4> out(32);
  misaligned_vector_load_kernel<<<1, 32, 0, nullptr>>>(in, out.data());
}

void shared_index_out_of_range() {
  std::vector<float> out(32);
  shared_index_out_of_range_kernel<<<1, 32, 0, nullptr>>>(out.data());
}

std::vector<uint32_t> ldmatrix(bool trans, int row_stride) {
  if (row_stride < 8 || row_stride > 64 || row_stride % 8 != 0)
    throw std::invalid_argument("row_stride must be a multiple of 8 in [8, 64]");
  std::vector<uint32_t> out(32 * 4);
  ldmatrix_kernel<<<1, 32, 0, nullptr>>>(trans, row_stride, out.data());
  check_launch();
  return out;
}

std::vector<float> mma(bool bf16, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                       const std::vector<float>& c) {
  if (a.size() != 256 || b.size() != 128 || c.size() != 128)
    throw std::invalid_argument("mma takes A (16 x 16), B (16 x 8) and C (16 x 8)");
  std::vector<float> out(32 * 4);
  mma_kernel<<<1, 32, 0, nullptr>>>(bf16, a.data(), b.data(), c.data(), out.data());
  check_launch();
  return out;
}

std::string launch_error(unsigned threads) {
  std::vector<float> in(threads), out(threads);
  butterfly_kernel<<<1, threads, 0, nullptr>>>(in.data(), out.data());
  return cudaGetErrorName(cudaGetLastError());
}

std::vector<uint16_t> float_to_half_bits(const std::vector<float>& values) {
  std::vector<uint16_t> out;
  for (float v : values) out.push_back(__float2half_rn(v).bits);
  return out;
}

std::vector<float> half_bits_to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> out;
  for (uint16_t b : bits) out.push_back(__half2float(__half{b}));
  return out;
}

std::vector<uint16_t> float_to_bfloat16_bits(const std::vector<float>& values) {
  std::vector<uint16_t> out;
  for (float v : values) out.push_back(__float2bfloat16_rn(v).bits);
  return out;
}

std::vector<float> bfloat16_bits_to_float(const std::vector<uint16_t>& bits) {
  std::vector<float> out;
  for (uint16_t b : bits) out.push_back(__bfloat162float(__nv_bfloat16{b}));
  return out;
}

}  // namespace emu_selftest
