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
};

Config& config();
Counters& counters();

}  // namespace emu
