// Shared helpers for treelora's CUDA C++ kernels: dtype/metric codes and the similarity clamp (kernel_constants.h,
// generated from treelora/kernels/constants.py), error checking that turns CUDA failures into C++ exceptions
// (pybind11 maps them to Python RuntimeError), and a device check every entry point runs first so a machine without
// a GPU gets a clear error instead of a crash.
#pragma once

#include <cuda_runtime.h>

#include "kernel_constants.h"

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace treelora {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

inline void check_cuda(cudaError_t err, const char* entry, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the (non-sticky) error so later calls are not blamed for it
    throw CudaError(std::string("treelora._C.") + entry + ": " + what + " failed (" + describe(err) + ")");
  }
}

// Empty string when a CUDA device is usable, else the runtime's explanation (no driver, no device, ...).
inline std::string device_error_message() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return describe(err);
  }
  if (count == 0) return "cudaGetDeviceCount returned 0 devices";
  return "";
}

// Every entry point calls this first. A usable device stays usable for the life of the process, so success is
// cached and the check costs one relaxed atomic load per call after the first.
inline void require_device(const char* entry) {
  static std::atomic<bool> found{false};
  if (found.load(std::memory_order_relaxed)) return;
  std::string msg = device_error_message();
  if (!msg.empty()) throw CudaError(std::string("treelora._C.") + entry + ": no usable CUDA device (" + msg + ")");
  found.store(true, std::memory_order_relaxed);
}

// Number of SMs of the current device (grid sizing of the grid-stride kernels). A host-side attribute query: no
// device synchronisation.
inline int sm_count(const char* entry) {
  int device = 0, count = 0;
  check_cuda(cudaGetDevice(&device), entry, "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device), entry, "cudaDeviceGetAttribute");
  return count > 0 ? count : 1;
}

inline std::invalid_argument bad_argument(const char* entry, const std::string& what) {
  return std::invalid_argument(std::string("treelora._C.") + entry + ": " + what);
}

// Checks the launch that was just queued (configuration errors, missing kernel image for this GPU, ...).
inline void check_launch(const char* entry) { check_cuda(cudaGetLastError(), entry, "kernel launch"); }

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename T>
inline T* as_ptr(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace treelora
