// The CPU emulator's scheduler and host API (see cuda_runtime.h and tests/cuda_emulator/__init__.py).
//
// One launch runs its blocks one after another on the calling thread. The threads of a block are fibers with their
// own stacks, switched by emu_switch_stack below (a few instructions: ucontext's swapcontext also saves the signal
// mask with a system call, which made every barrier, shuffle and tensor-core instruction cost microseconds). The
// scheduler always resumes the lowest-index thread that can run (the highest in reverse order), which runs until it
// waits at __syncthreads() or a warp-collective instruction, or ends; a thread that releases a barrier also yields.
// So the low (or high) end of the block runs as far ahead of the rest as the barriers allow, the largest skew a GPU
// could produce: a missing __syncthreads() before a read of what other threads write, or before other threads
// overwrite what a thread still has to read, shows up as a wrong result (the second kind in one of the two orders).
// The scheduler also checks what the CUDA programming model forbids and a GPU answers with a hang or garbage: a
// barrier reached after some threads of the block exited, a shuffle whose mask names an exited lane, lanes that
// disagree on the mask, and a deadlock (no thread can proceed). Built with the sanitizer, it also turns UBSan's
// reports (a misaligned access, an index past a fixed-size array) into errors of the thread that caused them: the
// report is recorded by UBSan's hook, and the thread stops at its next wait point, or at once if the access it was
// reported for then faults (x86 16-byte SSE loads do, which is where the sanitizer matters most).
#include "runtime.h"

#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

thread_local uint3 threadIdx, blockIdx;
thread_local dim3 blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // kernels keep a few KB of locals; UBSan reports need ~16 KB more
constexpr size_t kGuardBytes = 4096;        // an overflow faults on this page instead of corrupting a neighbour
constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;
constexpr size_t kSlotBytes = 32;  // the largest per-lane operand a warp-collective moves: an MMA's A and B fragments

Config g_config;
Counters g_counters;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_sanitizer_report;  // first UBSan report since the launch began

// An mmap'ed fiber stack with a guard page below it; pages are committed only when touched.
class Stack {
 public:
  Stack() {
    base_ = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map a fiber stack");
    mprotect(base_, kGuardBytes, PROT_NONE);
  }
  ~Stack() { munmap(base_, kStackBytes + kGuardBytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* top() const { return static_cast<char*>(base_) + kGuardBytes; }

 private:
  void* base_;
};

enum class State : uint8_t { kReady, kAtBarrier, kAtShuffle, kDone };

struct Fiber {
  void* sp;  // saved stack pointer while the fiber is switched out
  State state;
};

struct WarpSync {
  unsigned mask = 0;     // lanes the shuffle in progress waits for
  unsigned arrived = 0;  // lanes that reached it
  unsigned exited = 0;   // lanes whose thread ended
  uint64_t generation = 0;
  alignas(16) unsigned char slots[2][kWarp][kSlotBytes];  // double-buffered by generation: see warp_deposit
};

// Everything about the block being run. Lives on the launching thread's stack for the duration of one block.
struct Block {
  uint64_t ready[kMaxThreads / 64];  // bit t: thread t can run
  Thunk thunk;
  const void* packed;
  unsigned num_threads;
  Fiber* fibers;
  WarpSync* warps;
  void* scheduler_sp;  // the scheduler's stack pointer while a fiber runs
#ifdef TREELORA_EMULATOR_UBSAN
  sigjmp_buf fault_return;  // where a fault after a sanitizer report abandons the faulting fiber
#endif
  unsigned current = 0;
  unsigned live = 0;
  unsigned exited = 0;
  unsigned at_barrier = 0;
  std::vector<const void*> poisoned;  // shared-memory objects this block has already reached
  std::string error;
};

thread_local Block* t_block = nullptr;
thread_local std::vector<std::unique_ptr<Stack>> t_stacks;

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch (emu_switch_stack) is written for x86-64"
#endif

// emu_switch_stack(save, load): pushes the callee-saved registers and the SSE / x87 control words of the System V
// ABI on the current stack, stores the stack pointer in *save, switches to the stack `load` (saved the same way) and
// pops what was pushed there, returning into the context that saved it.
extern "C" void emu_switch_stack(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_stack, .-emu_switch_stack
)");

[[noreturn]] void fiber_main();

// A fresh fiber's stack, laid out as emu_switch_stack leaves a switched-out one: control words, six zeroed registers
// and the address of fiber_main as the return address (16-byte aligned, as a call would leave it).
void* initial_stack(void* top) {
  uintptr_t* sp = static_cast<uintptr_t*>(top);
  *--sp = 0;  // fiber_main never returns: a zero return address above its frame
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = 0;  // rbp, rbx, r12 .. r15
  uint32_t control[2];
  asm volatile("stmxcsr %0" : "=m"(control[0]));
  asm volatile("fnstcw %0" : "=m"(control[1]));
  --sp;
  std::memcpy(sp, control, sizeof control);
  return sp;
}

void mark_ready(Block& b, unsigned t) {
  b.fibers[t].state = State::kReady;
  b.ready[t / 64] |= uint64_t(1) << (t % 64);
}

// The thread to resume: the lowest ready index, or the highest in reverse order; num_threads when none is ready.
unsigned next_ready(const Block& b) {
  const unsigned words = (b.num_threads + 63) / 64;
  if (g_config.reverse_order) {
    for (unsigned w = words; w-- > 0;)
      if (b.ready[w]) return w * 64 + 63 - unsigned(__builtin_clzll(b.ready[w]));
  } else {
    for (unsigned w = 0; w < words; ++w)
      if (b.ready[w]) return w * 64 + unsigned(__builtin_ctzll(b.ready[w]));
  }
  return b.num_threads;
}

std::string take_sanitizer_report() {
  std::string report;
  report.swap(t_sanitizer_report);
  return report;
}

std::string describe(unsigned tid) {
  const dim3 b = blockDim;
  char text[128];
  std::snprintf(text, sizeof text, "block (%u, %u, %u), thread (%u, %u, %u)", blockIdx.x, blockIdx.y, blockIdx.z,
                tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y));
  return text;
}

// Records the first error of the block and returns to the scheduler for good (the fiber is abandoned).
[[noreturn]] void fail(const std::string& what) {
  Block& b = *t_block;
  if (b.error.empty()) b.error = what + " [" + describe(b.current) + "]";
  emu_switch_stack(&b.fibers[b.current].sp, b.scheduler_sp);
  std::abort();  // never resumed
}

void yield() {
  Block& b = *t_block;
  emu_switch_stack(&b.fibers[b.current].sp, b.scheduler_sp);
}

[[noreturn]] void fiber_main() {
  Block& b = *t_block;
  b.thunk(b.packed);
  const unsigned tid = b.current, lane = tid % kWarp;
  WarpSync& w = b.warps[tid / kWarp];
  b.fibers[tid].state = State::kDone;
  --b.live;
  ++b.exited;
  w.exited |= 1u << lane;
  if (b.at_barrier > 0)
    fail("a thread ended while " + std::to_string(b.at_barrier) +
         " threads of its block wait at __syncthreads() (a barrier in divergent code)");
  if (w.arrived != 0 && (w.mask >> lane & 1u))
    fail("a thread ended while the other lanes of its warp wait for it in a shuffle");
  emu_switch_stack(&b.fibers[tid].sp, b.scheduler_sp);
  std::abort();  // never resumed
}

void set_thread(unsigned tid) {
  const dim3 d = blockDim;
  threadIdx = uint3{tid % d.x, (tid / d.x) % d.y, tid / (d.x * d.y)};
}

std::string deadlock_report(const Block& b) {
  std::string out = "deadlock: no thread of the block can proceed (" + std::to_string(b.at_barrier) +
                    " wait at __syncthreads(), " + std::to_string(b.exited) + " ended";
  const unsigned warps = (b.num_threads + kWarp - 1) / kWarp;
  for (unsigned i = 0; i < warps; ++i) {
    const WarpSync& w = b.warps[i];
    if (w.arrived == 0) continue;
    char text[96];
    std::snprintf(text, sizeof text, "; warp %u: lanes 0x%08x of shuffle mask 0x%08x arrived", i, w.arrived, w.mask);
    out += text;
  }
  return out + ")";
}

#ifdef TREELORA_EMULATOR_UBSAN
// Installed while a launch runs: a fault right after a UBSan report in a kernel thread is that report's access, so
// the thread is abandoned and the scheduler raises the report. Any other fault goes to the previous handler (Python's
// faulthandler under pytest) by re-executing the faulting instruction with it restored.
struct FaultHandlers {
  struct sigaction segv, bus;
};
thread_local FaultHandlers t_previous;

void on_fault(int signal, siginfo_t*, void*) {
  Block* b = t_block;
  if (b != nullptr && !t_sanitizer_report.empty()) siglongjmp(b->fault_return, 1);  // restores the signal mask too
  sigaction(signal, signal == SIGSEGV ? &t_previous.segv : &t_previous.bus, nullptr);
}

class FaultGuard {
 public:
  FaultGuard() {
    struct sigaction action {};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &t_previous.segv);
    sigaction(SIGBUS, &action, &t_previous.bus);
  }
  ~FaultGuard() {
    sigaction(SIGSEGV, &t_previous.segv, nullptr);
    sigaction(SIGBUS, &t_previous.bus, nullptr);
  }
  FaultGuard(const FaultGuard&) = delete;
  FaultGuard& operator=(const FaultGuard&) = delete;
};
#else
struct FaultGuard {};
#endif

void run_block(Block& b) {
  const unsigned n = b.num_threads;
  while (t_stacks.size() < n) t_stacks.push_back(std::make_unique<Stack>());
  for (unsigned t = 0; t < n; ++t) {
    mark_ready(b, t);
    b.fibers[t].sp = initial_stack(static_cast<char*>(t_stacks[t]->top()) + kStackBytes);
  }
  b.live = n;
#ifdef TREELORA_EMULATOR_UBSAN
  if (sigsetjmp(b.fault_return, 1) != 0) {  // a fiber faulted right after a sanitizer report: it is abandoned
    b.error = take_sanitizer_report() + " [" + describe(b.current) + "]";
    return;
  }
#endif
  while (b.live > 0) {
    const unsigned t = next_ready(b);
    if (t == n) {
      b.error = deadlock_report(b);
      return;
    }
    b.ready[t / 64] &= ~(uint64_t(1) << (t % 64));
    b.current = t;
    set_thread(t);
    emu_switch_stack(&b.scheduler_sp, b.fibers[t].sp);
    if (b.error.empty() && !t_sanitizer_report.empty()) b.error = take_sanitizer_report() + " [" + describe(t) + "]";
    if (!b.error.empty()) return;
  }
}

bool valid_configuration(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return threads >= 1 && threads <= kMaxThreads && block.x <= 1024 && block.y <= 1024 && block.z <= 64 &&
         grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 && grid.z <= 65535;
}

}  // namespace

Config& config() { return g_config; }
Counters& counters() { return g_counters; }

void run_grid(const char* kernel, const char* where, dim3 grid, dim3 block, size_t dynamic_smem, Thunk thunk,
              const void* packed) {
  if (dynamic_smem != 0)
    throw std::runtime_error(std::string("CUDA emulator: ") + kernel + " at " + where +
                             " asks for dynamic shared memory, which the emulator does not provide");
  if (!valid_configuration(grid, block)) {
    t_last_error = cudaErrorInvalidConfiguration;  // reported by the launcher's cudaGetLastError(), as on a GPU
    return;
  }
  if (t_block != nullptr) throw std::runtime_error("CUDA emulator: a kernel launched another kernel");
  if (!t_sanitizer_report.empty())
    throw std::runtime_error("CUDA emulator: " + take_sanitizer_report() + " in host code before launching " + kernel +
                             " at " + where);
  const unsigned n = block.x * block.y * block.z, warps = (n + kWarp - 1) / kWarp;
  std::vector<Fiber> fibers(n);
  std::vector<WarpSync> warp_sync(warps);
  ++g_counters.launches;
  const FaultGuard guard;
  gridDim = grid;
  blockDim = block;
  const uint64_t num_blocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; k < num_blocks; ++k) {
    const uint64_t linear = g_config.reverse_order ? num_blocks - 1 - k : k;
    blockIdx = uint3{unsigned(linear % grid.x), unsigned(linear / grid.x % grid.y),
                     unsigned(linear / (uint64_t(grid.x) * grid.y))};
    for (unsigned i = 0; i < warps; ++i) {
      warp_sync[i] = WarpSync{};
      // lanes past the end of a partial last warp do not exist: count them as ended
      if (i == warps - 1 && n % kWarp != 0) warp_sync[i].exited = ~0u << (n % kWarp);
    }
    Block b{{}, thunk, packed, n, fibers.data(), warp_sync.data(), {}};
    t_block = &b;
    run_block(b);
    t_block = nullptr;
    ++g_counters.blocks;
    g_counters.threads += n;
    if (!b.error.empty())
      throw std::runtime_error(std::string("CUDA emulator: ") + b.error + " in " + kernel + " launched at " + where);
  }
}

void sync_block() {
  Block& b = *t_block;
  if (b.exited > 0)
    fail("__syncthreads() reached after " + std::to_string(b.exited) +
         " threads of the block ended (a barrier in divergent code)");
  b.fibers[b.current].state = State::kAtBarrier;
  if (++b.at_barrier == b.live) {
    for (unsigned t = 0; t < b.num_threads; ++t)
      if (b.fibers[t].state == State::kAtBarrier) mark_ready(b, t);
    b.at_barrier = 0;
  }
  yield();
}

namespace {

// Lane `lane` deposits its value in the slot buffer of the current generation and waits until every lane of the mask
// has deposited; then it reads the slots it needs (the returned buffer, 32 lanes x kSlotBytes). A lane that runs
// ahead to the next collective writes the other buffer, and cannot get past that one before every lane has arrived
// there, that is, has finished reading this one.
const unsigned char (*warp_deposit(unsigned mask, const void* value, size_t bytes))[kSlotBytes] {
  Block& b = *t_block;
  const unsigned tid = b.current, lane = tid % kWarp;
  WarpSync& w = b.warps[tid / kWarp];
  if (!(mask >> lane & 1u)) fail("a lane called a shuffle whose mask excludes it");
  if (mask & w.exited) fail("a shuffle mask names lanes that have ended or do not exist");
  if (w.arrived == 0) {
    w.mask = mask;
  } else if (w.mask != mask) {
    fail("lanes of a warp called the same shuffle with different masks");
  }
  const uint64_t generation = w.generation;
  std::memcpy(w.slots[generation & 1][lane], value, bytes);
  w.arrived |= 1u << lane;
  b.fibers[tid].state = State::kAtShuffle;
  if (w.arrived == w.mask) {
    w.arrived = 0;
    ++w.generation;
    const unsigned first = tid - lane;
    for (unsigned l = 0; l < kWarp && first + l < b.num_threads; ++l)
      if (b.fibers[first + l].state == State::kAtShuffle) mark_ready(b, first + l);
  }
  yield();
  return w.slots[generation & 1];
}


// --- tensor-core instructions ------------------------------------------------------------------------------------
// ldmatrix, mma.sync and st.shared.v4 of csrc/lora_mma.cuh: warp-collective, so every lane of the warp must execute
// them (the PTX instructions are .aligned); each lane gets its part with the PTX ISA's fragment layouts.

constexpr unsigned kFullMask = 0xffffffffu;

unsigned current_lane() { return t_block->current % kWarp; }

// The extra shared-memory wavefronts of one access phase: the 16-byte groups (bank quadruples) its addresses hit.
// Lanes of a phase that address the same 16-byte chunk are served together (a broadcast).
void count_bank_conflicts(const uintptr_t* addresses, unsigned count) {
  unsigned per_group[8] = {};
  uintptr_t seen[8][32];
  for (unsigned i = 0; i < count; ++i) {
    const uintptr_t chunk = addresses[i] >> 4;
    const unsigned group = static_cast<unsigned>(chunk & 7u);
    bool duplicate = false;
    for (unsigned j = 0; j < per_group[group]; ++j) duplicate |= seen[group][j] == chunk;
    if (!duplicate) seen[group][per_group[group]++] = chunk;
  }
  unsigned worst = 0;
  for (unsigned g = 0; g < 8; ++g) worst = per_group[g] > worst ? per_group[g] : worst;
  if (worst > 1) g_counters.bank_conflicts += worst - 1;
}

// The .aligned PTX instructions need every lane of the warp; a warp with ended lanes would hang or misbehave on a GPU.
void require_full_warp(const char* what) {
  const Block& b = *t_block;
  if (b.warps[b.current / kWarp].exited != 0)
    fail(std::string(what) + " executed by a warp some of whose lanes ended or do not exist (it needs all 32)");
}

void require_aligned16(const void* address, const char* what) {
  if (reinterpret_cast<uintptr_t>(address) % 16 != 0) fail(std::string(what) + " address is not 16-byte aligned");
}

}  // namespace

void warp_exchange(unsigned mask, const void* value, void* out, size_t bytes, unsigned src_lane) {
  if (!(mask >> src_lane & 1u)) fail("a shuffle reads lane " + std::to_string(src_lane) + ", which its mask excludes");
  std::memcpy(out, warp_deposit(mask, value, bytes)[src_lane], bytes);
}

void ptx_ldmatrix_x4(uint32_t (&r)[4], bool trans, const void* row) {
  require_full_warp("ldmatrix");
  require_aligned16(row, "ldmatrix row");
  const auto slots = warp_deposit(kFullMask, &row, sizeof(row));
  const void* rows[kWarp];
  for (unsigned l = 0; l < kWarp; ++l) std::memcpy(&rows[l], slots[l], sizeof(const void*));
  const unsigned lane = current_lane(), g = lane / 4, t = lane % 4;
  if (lane == 0) {  // each 8 x 8 matrix is one access phase of 8 rows x 16 bytes
    for (unsigned m = 0; m < 4; ++m) {
      uintptr_t addresses[8];
      for (unsigned i = 0; i < 8; ++i) addresses[i] = reinterpret_cast<uintptr_t>(rows[8 * m + i]);
      count_bank_conflicts(addresses, 8);
    }
  }
  for (unsigned m = 0; m < 4; ++m) {
    uint16_t lo, hi;
    if (!trans) {  // row g of matrix m, elements 2t and 2t + 1
      const uint16_t* src = static_cast<const uint16_t*>(rows[8 * m + g]);
      lo = src[2 * t];
      hi = src[2 * t + 1];
    } else {  // rows 2t and 2t + 1 of matrix m, element g
      lo = static_cast<const uint16_t*>(rows[8 * m + 2 * t])[g];
      hi = static_cast<const uint16_t*>(rows[8 * m + 2 * t + 1])[g];
    }
    r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
  }
}

void ptx_mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  struct Operands {
    uint32_t a[4], b[2];
  };
  require_full_warp("mma.sync");
  const Operands mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const auto slots = warp_deposit(kFullMask, &mine, sizeof(mine));
  Operands all[kWarp];
  for (unsigned l = 0; l < kWarp; ++l) std::memcpy(&all[l], slots[l], sizeof(Operands));
  auto value = [bf16](uint32_t reg, unsigned half) {
    const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
    return bf16 ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
  };
  // A[row][k] lives in lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2;
  // B[k][n] in lane 4 n + (k % 8) / 2, register k / 8, half k % 2.
  auto A = [&](unsigned row, unsigned k) {
    return value(all[4 * (row % 8) + (k % 8) / 2].a[row / 8 + 2 * (k / 8)], k % 2);
  };
  auto B = [&](unsigned k, unsigned n) { return value(all[4 * n + (k % 8) / 2].b[k / 8], k % 2); };
  const unsigned lane = current_lane(), g = lane / 4, t = lane % 4;
  for (unsigned i = 0; i < 4; ++i) {  // c0..c3: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
    const unsigned row = g + 8 * (i / 2), col = 2 * t + i % 2;
    double sum = d[i];
    for (unsigned k = 0; k < 16; ++k) sum += double(A(row, k)) * double(B(k, col));
    d[i] = static_cast<float>(sum);
  }
}

void ptx_st_shared_16B(void* dst, const void* value) {
  require_full_warp("st.shared.v4");
  require_aligned16(dst, "16-byte shared store");
  const auto slots = warp_deposit(kFullMask, &dst, sizeof(dst));
  if (current_lane() == 0) {  // 16-byte accesses are served 8 lanes per phase
    for (unsigned phase = 0; phase < 4; ++phase) {
      uintptr_t addresses[8];
      for (unsigned i = 0; i < 8; ++i) std::memcpy(&addresses[i], slots[8 * phase + i], sizeof(uintptr_t));
      count_bank_conflicts(addresses, 8);
    }
  }
  std::memcpy(dst, value, 16);
}

void poison_shared(void* address, size_t bytes) {
  Block& b = *t_block;
  for (const void* p : b.poisoned)
    if (p == address) return;
  b.poisoned.push_back(address);
  std::memset(address, 0xff, bytes);
}

}  // namespace emu

#ifdef TREELORA_EMULATOR_UBSAN
// UBSan calls this hook after printing each report (its runtime's own definition is weak; this module comes first in
// the lookup scope it was loaded with). Recoverable checks let the thread go on to its next wait point, where the
// scheduler stops the launch with the report as its error.
extern "C" void __ubsan_get_current_report_data(const char** kind, const char** message, const char** file,
                                                unsigned* line, unsigned* column, char** address);

extern "C" __attribute__((visibility("default"))) void __ubsan_on_report() {
  if (!emu::t_sanitizer_report.empty()) return;
  const char *kind = "", *message = "", *file = "";
  unsigned line = 0, column = 0;
  char* address = nullptr;
  __ubsan_get_current_report_data(&kind, &message, &file, &line, &column, &address);
  emu::t_sanitizer_report = std::string("UBSan ") + kind + " at " + file + ":" + std::to_string(line) + ":" +
                            std::to_string(column) + ": " + message;
}
#endif

// --- host API ----------------------------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t err = emu::t_last_error;
  emu::t_last_error = cudaSuccess;
  return err;
}

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
  }
  return "cudaErrorUnknown";
}

const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return "no error";
    case cudaErrorInvalidValue:
      return "invalid argument";
    case cudaErrorInvalidConfiguration:
      return "invalid configuration argument";
  }
  return "unknown error";
}

cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount || device != 0) return cudaErrorInvalidValue;
  *value = emu::g_config.sm_count;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  if (bytes == 0) return cudaSuccess;
  if (ptr == nullptr) return cudaErrorInvalidValue;
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
