// Python bindings of the LoRA-branch kernels: pointers, strides and the stream arrive as integers from
// treelora/kernels/cuda/lora.py, which validated shapes, dtypes and devices and allocated the workspace.
#include <pybind11/pybind11.h>

#include "lora.h"

namespace py = pybind11;

namespace treelora {

void bind_lora(py::module_& m) {
  m.def(
      "lora_shrink",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t a, int a_dtype,
         int64_t a_stride_k, int64_t a_stride_j, int64_t r, double scale, std::uintptr_t seed_offset,
         uint32_t keep_threshold, std::uintptr_t workspace, std::uintptr_t u, int64_t num_sms, std::uintptr_t stream) {
        require_device("lora_shrink");
        py::gil_scoped_release release;
        lora_shrink(as_ptr<const void>(x), static_cast<DType>(x_dtype), ldx, M, K, as_ptr<const void>(a),
                    static_cast<DType>(a_dtype), a_stride_k, a_stride_j, r, static_cast<float>(scale),
                    LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold}, as_ptr<float>(workspace),
                    as_ptr<float>(u), num_sms, as_stream(stream), "lora_shrink");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("a"), py::arg("a_dtype"),
      py::arg("a_stride_k"), py::arg("a_stride_j"), py::arg("r"), py::arg("scale"), py::arg("seed_offset"),
      py::arg("keep_threshold"), py::arg("workspace"), py::arg("u"), py::arg("num_sms"), py::arg("stream"),
      "u (M, r) fp32 = scale * drop(x) A^T (split-K, deterministic).");
  m.def(
      "lora_backward_dy",
      [](std::uintptr_t dy, int dy_dtype, int64_t lddy, int64_t M, int64_t N, std::uintptr_t b, int b_dtype,
         int64_t b_stride_n, int64_t b_stride_j, int64_t r, double scale, std::uintptr_t du, std::uintptr_t u,
         int64_t ldu, int64_t f, int64_t r_t, std::uintptr_t db, int db_dtype, std::uintptr_t workspace,
         int64_t num_sms, std::uintptr_t stream) {
        require_device("lora_backward_dy");
        py::gil_scoped_release release;
        lora_backward_dy(as_ptr<const void>(dy), static_cast<DType>(dy_dtype), lddy, M, N, as_ptr<const void>(b),
                         static_cast<DType>(b_dtype), b_stride_n, b_stride_j, r, static_cast<float>(scale),
                         as_ptr<float>(du), as_ptr<const float>(u), ldu, f, r_t, as_ptr<void>(db),
                         static_cast<DType>(db_dtype), as_ptr<float>(workspace), num_sms, as_stream(stream),
                         "lora_backward_dy");
      },
      py::arg("dy"), py::arg("dy_dtype"), py::arg("lddy"), py::arg("M"), py::arg("N"), py::arg("b"),
      py::arg("b_dtype"), py::arg("b_stride_n"), py::arg("b_stride_j"), py::arg("r"), py::arg("scale"), py::arg("du"),
      py::arg("u"), py::arg("ldu"), py::arg("f"), py::arg("r_t"), py::arg("db"), py::arg("db_dtype"),
      py::arg("workspace"), py::arg("num_sms"), py::arg("stream"),
      "du = scale * dy B (M, r) fp32 and dB = dy^T u[:, f:f+r_t] (N, r_t), from one read of dy.");
  m.def(
      "lora_grad_a",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, std::uintptr_t du, int64_t ldu, int64_t f,
         int64_t r_t, double scale, std::uintptr_t seed_offset, uint32_t keep_threshold, std::uintptr_t da,
         int da_dtype, std::uintptr_t workspace, int64_t num_sms, std::uintptr_t stream) {
        require_device("lora_grad_a");
        py::gil_scoped_release release;
        lora_grad_a(as_ptr<const void>(x), static_cast<DType>(x_dtype), ldx, M, K, as_ptr<const float>(du), ldu, f,
                    r_t, static_cast<float>(scale), LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold},
                    as_ptr<void>(da), static_cast<DType>(da_dtype), as_ptr<float>(workspace), num_sms,
                    as_stream(stream), "lora_grad_a");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("du"), py::arg("ldu"),
      py::arg("f"), py::arg("r_t"), py::arg("scale"), py::arg("seed_offset"), py::arg("keep_threshold"),
      py::arg("da"), py::arg("da_dtype"), py::arg("workspace"), py::arg("num_sms"), py::arg("stream"),
      "dA (r_t, K) = scale * du[:, f:f+r_t]^T drop(x) (split-M, deterministic; the mask regenerated).");
  m.def(
      "lora_expand",
      [](std::uintptr_t u, int64_t ldu, int64_t M, int64_t C, int64_t r, std::uintptr_t p, int p_dtype,
         int64_t p_stride_c, int64_t p_stride_j, std::uintptr_t bias, int bias_dtype, double scale,
         std::uintptr_t seed_offset, uint32_t keep_threshold, std::uintptr_t out, int out_dtype, int64_t ldo,
         std::uintptr_t stream) {
        require_device("lora_expand");
        py::gil_scoped_release release;
        lora_expand(as_ptr<const float>(u), ldu, M, C, r, as_ptr<const void>(p), static_cast<DType>(p_dtype),
                    p_stride_c, p_stride_j, as_ptr<const void>(bias), static_cast<DType>(bias_dtype),
                    static_cast<float>(scale), LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold},
                    as_ptr<void>(out), static_cast<DType>(out_dtype), ldo, as_stream(stream), "lora_expand");
      },
      py::arg("u"), py::arg("ldu"), py::arg("M"), py::arg("C"), py::arg("r"), py::arg("p"), py::arg("p_dtype"),
      py::arg("p_stride_c"), py::arg("p_stride_j"), py::arg("bias"), py::arg("bias_dtype"), py::arg("scale"),
      py::arg("seed_offset"), py::arg("keep_threshold"), py::arg("out"), py::arg("out_dtype"), py::arg("ldo"),
      py::arg("stream"), "out (M, C) = bias + scale * keep * (u P^T), written once in the activation dtype.");
  m.def(
      "lora_dropout_mask",
      [](std::uintptr_t seed_offset, uint32_t keep_threshold, int64_t M, int64_t C, std::uintptr_t keep,
         std::uintptr_t stream) {
        require_device("lora_dropout_mask");
        py::gil_scoped_release release;
        lora_dropout_mask(LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold}, M, C,
                          as_ptr<uint8_t>(keep), as_stream(stream), "lora_dropout_mask");
      },
      py::arg("seed_offset"), py::arg("keep_threshold"), py::arg("M"), py::arg("C"), py::arg("keep"),
      py::arg("stream"), "The (M, C) uint8 keep mask the other LoRA kernels use for this seed/offset.");
  m.def("lora_panel_workspace_size", &lora_panel_workspace_size, py::arg("M"), py::arg("C"), py::arg("r_row"),
        py::arg("r_col"), py::arg("num_sms"),
        "fp32 elements of workspace lora_shrink / lora_backward_dy / lora_grad_a need.");
}

}  // namespace treelora
