// Settings and counters of the CPU emulator, shared by runtime.cc and the Python bindings in bind_emulator.cpp.
#pragma once

#include <cstdint>

namespace emu {

struct Config {
  int sm_count = 1;            // what cudaDeviceGetAttribute reports: sizes the grid-stride launches
  bool reverse_order = false;  // run blocks and the threads of each block in descending index order
};

struct Counters {
  uint64_t launches = 0, blocks = 0, threads = 0;
  // Extra shared-memory wavefronts of the ldmatrix and st.shared.v4 instructions (csrc/lora_mma.cuh): 0 when every
  // access phase touches each 16-byte bank group at most once.
  uint64_t bank_conflicts = 0;
};

Config& config();
Counters& counters();

}  // namespace emu
