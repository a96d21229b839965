// treelora._C: torch-free CUDA kernels for treelora. Each op family binds its entry points in bind_<family>.cpp;
// this file adds the build/device introspection used by `python -m treelora info`.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sstream>
#include <string>
#include <vector>

#include "common.h"

namespace py = pybind11;

namespace treelora {
void bind_similarity(py::module_& m);
void bind_masked_update(py::module_& m);
void bind_lora(py::module_& m);
}  // namespace treelora

namespace {

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::stringstream ss(TREELORA_CUDA_ARCHS);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back("sm_" + item);
  return out;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "treelora CUDA kernels (raw device pointers and stream handles; no torch dependency)";
  m.def("compiled_archs", &compiled_archs, "CUDA architectures this module was compiled for, e.g. ['sm_80', 'sm_90a'].");
  m.def("cuda_runtime_version", []() { return std::string(TREELORA_CUDA_VERSION); },
        "Version of the CUDA toolkit the module was compiled (and statically linked) with.");
  m.def("device_error", &treelora::device_error_message,
        "Empty when a CUDA device is usable, else why not (no driver, no device, ...).");
  m.def("device_count", []() {
    int count = 0;
    if (cudaGetDeviceCount(&count) != cudaSuccess) {
      cudaGetLastError();
      return 0;
    }
    return count;
  });
  treelora::bind_similarity(m);
  treelora::bind_masked_update(m);
  treelora::bind_lora(m);
}
