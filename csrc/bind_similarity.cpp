// Python bindings of the similarity kernels: pointers and the stream arrive as integers from
// treelora/kernels/cuda/similarity.py, which validated shapes, dtypes, devices and the chunk geometry.
#include <pybind11/pybind11.h>

#include "similarity.h"

namespace py = pybind11;

namespace treelora {

void bind_similarity(py::module_& m) {
  m.def(
      "similarity",
      [](std::uintptr_t query, int query_dtype, std::uintptr_t bank, int bank_dtype, std::uintptr_t index,
         std::uintptr_t layer_offsets, std::uintptr_t chunk_offsets, int64_t num_layers, int64_t num_rows,
         int64_t row_stride, int64_t chunk_elems, int64_t total_chunks, int metric, std::uintptr_t workspace,
         std::uintptr_t out, std::uintptr_t stream) {
        require_device("similarity");
        py::gil_scoped_release release;
        similarity(as_ptr<const void>(query), static_cast<DType>(query_dtype), as_ptr<const void>(bank),
                   static_cast<DType>(bank_dtype), as_ptr<const int64_t>(index), as_ptr<const int64_t>(layer_offsets),
                   as_ptr<const int64_t>(chunk_offsets), num_layers, num_rows, row_stride, chunk_elems, total_chunks,
                   static_cast<Metric>(metric), as_ptr<float>(workspace), as_ptr<float>(out), as_stream(stream),
                   "similarity");
      },
      py::arg("query"), py::arg("query_dtype"), py::arg("bank"), py::arg("bank_dtype"), py::arg("index"),
      py::arg("layer_offsets"), py::arg("chunk_offsets"), py::arg("num_layers"), py::arg("num_rows"),
      py::arg("row_stride"), py::arg("chunk_elems"), py::arg("total_chunks"), py::arg("metric"), py::arg("workspace"),
      py::arg("out"), py::arg("stream"),
      "Full (index = 0: out (num_rows, L)) or gathered (out (L,)) per-layer similarity of a query to bank rows; "
      "every pointer on the device.");
  m.def(
      "similarity_accumulate",
      [](std::uintptr_t mean, std::uintptr_t sample, int sample_dtype, std::uintptr_t count_ptr, double count,
         std::uintptr_t bank, int bank_dtype, std::uintptr_t index, std::uintptr_t layer_offsets,
         std::uintptr_t chunk_offsets, int64_t num_layers, int64_t num_rows, int64_t row_stride, int64_t chunk_elems,
         int64_t total_chunks, int metric, std::uintptr_t workspace, std::uintptr_t out, std::uintptr_t stream) {
        require_device("similarity_accumulate");
        py::gil_scoped_release release;
        similarity_accumulate(as_ptr<float>(mean), as_ptr<const void>(sample), static_cast<DType>(sample_dtype),
                              as_ptr<const float>(count_ptr), static_cast<float>(count), as_ptr<const void>(bank),
                              static_cast<DType>(bank_dtype), as_ptr<const int64_t>(index),
                              as_ptr<const int64_t>(layer_offsets), as_ptr<const int64_t>(chunk_offsets), num_layers,
                              num_rows, row_stride, chunk_elems, total_chunks, static_cast<Metric>(metric),
                              as_ptr<float>(workspace), as_ptr<float>(out), as_stream(stream),
                              "similarity_accumulate");
      },
      py::arg("mean"), py::arg("sample"), py::arg("sample_dtype"), py::arg("count_ptr"), py::arg("count"),
      py::arg("bank"), py::arg("bank_dtype"), py::arg("index"), py::arg("layer_offsets"), py::arg("chunk_offsets"),
      py::arg("num_layers"), py::arg("num_rows"), py::arg("row_stride"), py::arg("chunk_elems"),
      py::arg("total_chunks"), py::arg("metric"), py::arg("workspace"), py::arg("out"), py::arg("stream"),
      "mean += (sample - mean) / count in place, then the gathered similarity of the updated mean (one pass).");
  m.def("similarity_workspace_size", &similarity_workspace_size, py::arg("num_rows"), py::arg("num_layers"),
        py::arg("total_chunks"), py::arg("gathered"),
        "Number of fp32 elements the similarity entry points need in their workspace.");
}

}  // namespace treelora
