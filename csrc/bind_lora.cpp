// Python bindings of the LoRA-branch kernels: pointers, strides and the stream arrive as integers from
// treelora/kernels/cuda/lora.py, which validated shapes, dtypes and devices and allocated outputs and the workspace.
#include <pybind11/pybind11.h>

#include "lora.h"

namespace py = pybind11;

namespace treelora {

namespace {

LoraMatrix matrix(std::uintptr_t data, int dtype, int64_t stride0, int64_t stride1) {
  return LoraMatrix{as_ptr<const void>(data), static_cast<DType>(dtype), stride0, stride1};
}

}  // namespace

void bind_lora(py::module_& m) {
  m.def("lora_forward_workspace_size", [](int64_t M, int64_t K, int64_t N, int64_t r, int x_dtype, int64_t num_sms) {
    return lora_forward_workspace_size(M, K, N, r, static_cast<DType>(x_dtype), num_sms);
  }, py::arg("M"), py::arg("K"), py::arg("N"), py::arg("r"), py::arg("x_dtype"), py::arg("num_sms"),
        "fp32 elements of workspace lora_forward needs.");
  m.def(
      "lora_forward",
      [](std::uintptr_t x, int x_dtype, int64_t ldx, int64_t M, int64_t K, int64_t N, int64_t r, std::uintptr_t a,
         int a_dtype, int64_t a_stride_j, int64_t a_stride_k, std::uintptr_t b, int b_dtype, int64_t b_stride_n,
         int64_t b_stride_j, std::uintptr_t bias, int bias_dtype, double scale, std::uintptr_t seed_offset,
         uint32_t keep_threshold, std::uintptr_t u, std::uintptr_t t, int64_t ldt, std::uintptr_t workspace,
         int64_t num_sms, std::uintptr_t stream) {
        require_device("lora_forward");
        py::gil_scoped_release release;
        lora_forward(as_ptr<const void>(x), static_cast<DType>(x_dtype), ldx, M, K, N, r,
                     matrix(a, a_dtype, a_stride_j, a_stride_k), matrix(b, b_dtype, b_stride_n, b_stride_j),
                     as_ptr<const void>(bias), static_cast<DType>(bias_dtype), static_cast<float>(scale),
                     LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold}, as_ptr<float>(u),
                     as_ptr<void>(t), ldt, as_ptr<float>(workspace), num_sms, as_stream(stream), "lora_forward");
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("ldx"), py::arg("M"), py::arg("K"), py::arg("N"), py::arg("r"),
      py::arg("a"), py::arg("a_dtype"), py::arg("a_stride_j"), py::arg("a_stride_k"), py::arg("b"), py::arg("b_dtype"),
      py::arg("b_stride_n"), py::arg("b_stride_j"), py::arg("bias"), py::arg("bias_dtype"), py::arg("scale"),
      py::arg("seed_offset"), py::arg("keep_threshold"), py::arg("u"), py::arg("t"), py::arg("ldt"),
      py::arg("workspace"), py::arg("num_sms"), py::arg("stream"),
      "u (M, r) fp32 = scale * drop(x) A^T and T (M, N) = bias + u B^T in x's dtype (tensor cores).");
  m.def("lora_backward_workspace_size",
        [](int64_t M, int64_t N, int64_t K, int64_t r, int64_t f, int dtype, bool need_dx, bool need_da,
           bool need_db, int64_t num_sms) {
          return lora_backward_workspace_size(M, N, K, r, f, static_cast<DType>(dtype), need_dx, need_da, need_db,
                                              num_sms);
        },
        py::arg("M"), py::arg("N"), py::arg("K"), py::arg("r"), py::arg("f"), py::arg("dtype"), py::arg("need_dx"),
        py::arg("need_da"), py::arg("need_db"), py::arg("num_sms"), "fp32 elements of workspace lora_backward needs.");
  m.def(
      "lora_backward",
      [](std::uintptr_t dy, int64_t lddy, std::uintptr_t x, int64_t ldx, int dtype, int64_t M, int64_t N, int64_t K,
         int64_t r, int64_t f, std::uintptr_t a, int a_dtype, int64_t a_stride_j, int64_t a_stride_k, std::uintptr_t b,
         int b_dtype, int64_t b_stride_n, int64_t b_stride_j, std::uintptr_t u, double scale,
         std::uintptr_t seed_offset, uint32_t keep_threshold, double inv_keep, std::uintptr_t dxt, int64_t lddx,
         std::uintptr_t da, int da_dtype, std::uintptr_t db, int db_dtype, std::uintptr_t workspace, int64_t num_sms,
         std::uintptr_t stream) {
        require_device("lora_backward");
        py::gil_scoped_release release;
        lora_backward(as_ptr<const void>(dy), lddy, as_ptr<const void>(x), ldx, static_cast<DType>(dtype), M, N, K, r,
                      f, matrix(a, a_dtype, a_stride_j, a_stride_k), matrix(b, b_dtype, b_stride_n, b_stride_j),
                      as_ptr<const float>(u), static_cast<float>(scale),
                      LoraDropout{as_ptr<const int64_t>(seed_offset), keep_threshold}, static_cast<float>(inv_keep),
                      as_ptr<void>(dxt), lddx, as_ptr<void>(da), static_cast<DType>(da_dtype), as_ptr<void>(db),
                      static_cast<DType>(db_dtype), as_ptr<float>(workspace), num_sms, as_stream(stream),
                      "lora_backward");
      },
      py::arg("dy"), py::arg("lddy"), py::arg("x"), py::arg("ldx"), py::arg("dtype"), py::arg("M"), py::arg("N"),
      py::arg("K"), py::arg("r"), py::arg("f"), py::arg("a"), py::arg("a_dtype"), py::arg("a_stride_j"),
      py::arg("a_stride_k"), py::arg("b"), py::arg("b_dtype"), py::arg("b_stride_n"), py::arg("b_stride_j"),
      py::arg("u"), py::arg("scale"), py::arg("seed_offset"), py::arg("keep_threshold"), py::arg("inv_keep"),
      py::arg("dxt"), py::arg("lddx"), py::arg("da"), py::arg("da_dtype"), py::arg("db"), py::arg("db_dtype"),
      py::arg("workspace"), py::arg("num_sms"), py::arg("stream"),
      "dxT = keep (du A) inv_keep, dA = inv_keep du[:, f:]^T (keep x), dB = dy^T u[:, f:] with du = scale dy B "
      "(tensor cores; null outputs are skipped).");
  m.def(
      "lora_plan",
      [](int64_t M, int64_t K, int64_t N, int64_t r, int64_t f, int dtype, int64_t num_sms, bool need_dx,
         bool need_da, bool need_db) {
        const LoraPlanInfo p =
            lora_plan(M, K, N, r, f, static_cast<DType>(dtype), num_sms, need_dx, need_da, need_db);
        py::dict out;
        out["rank_chunk"] = p.rank_chunk;
        out["chunks"] = p.chunks;
        out["shrink_k_panels"] = p.shrink_k_panels;
        out["expand_c_panels"] = p.expand_c_panels;
        out["dy_m_panels"] = p.dy_m_panels;
        out["dy_n_panels"] = p.dy_n_panels;
        out["x_m_panels"] = p.x_m_panels;
        out["forward_workspace"] = p.forward_workspace;
        out["backward_workspace"] = p.backward_workspace;
        out["counters"] = p.counters;
        return out;
      },
      py::arg("M"), py::arg("K"), py::arg("N"), py::arg("r"), py::arg("f"), py::arg("dtype"), py::arg("num_sms"),
      py::arg("need_dx"), py::arg("need_da"), py::arg("need_db"),
      "The block decomposition lora_forward / lora_backward use (no device needed).");
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
}

}  // namespace treelora
