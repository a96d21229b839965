// Python bindings of the masked multi-tensor optimizer: the tensor table, workspace and stream arrive as integers from
// treelora/kernels/cuda/masked_update.py, which validated every tensor and built the table.
#include <pybind11/pybind11.h>

#include "masked_update.h"

namespace py = pybind11;

namespace treelora {
namespace {

MaskedLaunch make_launch(std::uintptr_t table, int64_t num_tensors, int64_t total_chunks, int64_t chunk_elems,
                         bool has_index_lists, bool has_density, std::uintptr_t workspace, int64_t scratch_bytes) {
  MaskedLaunch l{};
  l.table = as_ptr<const MaskedTensorEntry>(table);
  l.num_tensors = num_tensors;
  l.total_chunks = total_chunks;
  l.chunk_elems = chunk_elems;
  l.has_index_lists = has_index_lists;
  l.has_density = has_density;
  l.workspace = as_ptr<void>(workspace);
  l.scratch_bytes = scratch_bytes;
  return l;
}

}  // namespace

void bind_masked_update(py::module_& m) {
  m.def(
      "masked_adamw",
      [](std::uintptr_t table, int64_t num_tensors, int64_t total_chunks, int64_t chunk_elems, bool has_index_lists,
         bool has_density, std::uintptr_t workspace, int64_t scratch_bytes, double lr, double beta1, double beta2,
         double eps, double weight_decay, double step, std::uintptr_t step_ptr, std::uintptr_t stream) {
        require_device("masked_adamw");
        py::gil_scoped_release release;
        const MaskedLaunch l = make_launch(table, num_tensors, total_chunks, chunk_elems, has_index_lists,
                                           has_density, workspace, scratch_bytes);
        masked_adamw(l, AdamWScalars{lr, beta1, beta2, eps, weight_decay, step, as_ptr<const double>(step_ptr)},
                     as_stream(stream), "masked_adamw");
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("total_chunks"), py::arg("chunk_elems"),
      py::arg("has_index_lists"), py::arg("has_density"), py::arg("workspace"), py::arg("scratch_bytes"),
      py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("step"),
      py::arg("step_ptr"), py::arg("stream"),
      "AdamW on the selected entries of every tensor of the table, in one launch per pipeline stage.");
  m.def(
      "masked_sgd",
      [](std::uintptr_t table, int64_t num_tensors, int64_t total_chunks, int64_t chunk_elems, bool has_index_lists,
         bool has_density, std::uintptr_t workspace, int64_t scratch_bytes, double lr, double momentum,
         double weight_decay, std::uintptr_t stream) {
        require_device("masked_sgd");
        py::gil_scoped_release release;
        const MaskedLaunch l = make_launch(table, num_tensors, total_chunks, chunk_elems, has_index_lists,
                                           has_density, workspace, scratch_bytes);
        masked_sgd(l, SgdScalars{lr, momentum, weight_decay}, as_stream(stream), "masked_sgd");
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("total_chunks"), py::arg("chunk_elems"),
      py::arg("has_index_lists"), py::arg("has_density"), py::arg("workspace"), py::arg("scratch_bytes"),
      py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("stream"),
      "SGD (momentum, coupled weight decay) on the selected entries of every tensor of the table.");
  m.def(
      "masked_density_thresholds",
      [](std::uintptr_t table, int64_t num_tensors, int64_t total_chunks, int64_t chunk_elems,
         std::uintptr_t workspace, std::uintptr_t thresholds, std::uintptr_t stream) {
        require_device("masked_density_thresholds");
        py::gil_scoped_release release;
        const MaskedLaunch l =
            make_launch(table, num_tensors, total_chunks, chunk_elems, false, true, workspace, 0);
        masked_density_thresholds(l, as_ptr<float>(thresholds), as_stream(stream), "masked_density_thresholds");
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("total_chunks"), py::arg("chunk_elems"), py::arg("workspace"),
      py::arg("thresholds"), py::arg("stream"),
      "The radix select alone: thresholds[i] = k-th largest |grad| of density tensor i (+inf for the others).");
  m.def("masked_update_workspace_size", &masked_update_workspace_size, py::arg("num_tensors"),
        py::arg("scratch_bytes"), "Bytes of device workspace a masked-update launch needs.");
}

}  // namespace treelora
