// Host entry points of selftest.cu: small kernels with hand-computable results and deliberately broken ones, which
// tests/test_cuda_emulated.py uses to check the emulator itself before trusting it with csrc/.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace emu_selftest {

// Every lane's value after a 5-step xor butterfly over its warp (its warp's total), inputs 0, 1, 2, ...
std::vector<float> butterfly(unsigned threads, unsigned blocks);
// out[t] = in[(t + 1) % threads] through shared memory, with or without the __syncthreads() between write and read.
std::vector<int32_t> rotate(unsigned threads, unsigned blocks, bool sync);
// Kernels the emulator must reject (they hang or misbehave on a GPU); each raises RuntimeError.
void barrier_after_early_exit();
void shuffle_with_ended_lanes();
void barrier_and_shuffle_deadlock();
// Faults a GPU would raise; built with the sanitizer, the emulator reports them as RuntimeError.
void misaligned_vector_load();
void shared_index_out_of_range();
// The four registers each lane of a warp gets from ldmatrix.x4[.trans] over a 32 x 8 matrix of 16-bit values
// (element (i, j) = 8 i + j, rows row_stride elements apart), lane-major (lane * 4 + register).
std::vector<uint32_t> ldmatrix(bool trans, int row_stride);
// The accumulators each lane holds after mma.sync.m16n8k16 on A (16 x 16) and B (16 x 8) (bf16 or fp16 bits,
// row-major) with C (16 x 8, fp32), the fragments packed with the PTX ISA's layouts; lane-major.
std::vector<float> mma(bool bf16, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b,
                       const std::vector<float>& c);
// Launches the butterfly with `threads` threads per block and returns cudaGetErrorName(cudaGetLastError()).
std::string launch_error(unsigned threads);
// The stand-in conversions of cuda_fp16.h / cuda_bf16.h, element by element.
std::vector<uint16_t> float_to_half_bits(const std::vector<float>& values);
std::vector<float> half_bits_to_float(const std::vector<uint16_t>& bits);
std::vector<uint16_t> float_to_bfloat16_bits(const std::vector<float>& values);
std::vector<float> bfloat16_bits_to_float(const std::vector<uint16_t>& bits);

}  // namespace emu_selftest
