// Python bindings of the similarity kernels: pointers and the stream arrive as integers from
// treelora/kernels/cuda_similarity.py, which validated shapes, dtypes and devices.
#include <pybind11/pybind11.h>

#include "similarity.h"

namespace py = pybind11;

namespace treelora {

void bind_similarity(py::module_& m) {
  m.def(
      "similarity_gathered",
      [](std::uintptr_t query, int query_dtype, std::uintptr_t bank, int bank_dtype, std::uintptr_t index,
         std::uintptr_t offsets, std::uintptr_t workspace, std::uintptr_t out, int64_t num_layers, int64_t row_stride,
         int64_t num_chunks, int metric, std::uintptr_t stream) {
        require_device("similarity_gathered");
        py::gil_scoped_release release;
        similarity_gathered(as_ptr<const void>(query), static_cast<DType>(query_dtype), as_ptr<const void>(bank),
                            static_cast<DType>(bank_dtype), as_ptr<const int64_t>(index),
                            as_ptr<const int64_t>(offsets), as_ptr<float>(workspace), as_ptr<float>(out), num_layers,
                            row_stride, num_chunks, static_cast<Metric>(metric), as_stream(stream),
                            "similarity_gathered");
      },
      py::arg("query"), py::arg("query_dtype"), py::arg("bank"), py::arg("bank_dtype"), py::arg("index"),
      py::arg("offsets"), py::arg("workspace"), py::arg("out"), py::arg("num_layers"), py::arg("row_stride"),
      py::arg("num_chunks"), py::arg("metric"), py::arg("stream"),
      "out[l] = metric(query[layer l], bank[index[l], layer l]) (dot, l1, sqeuclidean); all pointers on the device.");
  m.def("similarity_gathered_workspace", &similarity_gathered_workspace, py::arg("num_layers"), py::arg("num_chunks"),
        "Number of fp32 elements similarity_gathered needs in its workspace.");
}

}  // namespace treelora
