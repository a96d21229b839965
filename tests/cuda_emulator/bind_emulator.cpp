// Python bindings of the emulator's controls and self-tests, added to the emulated module by build.py (which makes
// the module's init function call bind_emulator first).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "runtime.h"
#include "selftest.h"

namespace py = pybind11;

namespace treelora_emulator {

void bind_emulator(py::module_& m) {
  m.def(
      "emulator_configure",
      [](int sm_count, bool reverse_order) {
        if (sm_count < 1) throw std::invalid_argument("emulator_configure: sm_count must be >= 1");
        emu::config().sm_count = sm_count;
        emu::config().reverse_order = reverse_order;
      },
      py::arg("sm_count"), py::arg("reverse_order"),
      "Set the SM count the emulated device reports and whether blocks and threads run in descending order.");
  m.def(
      "emulator_counters",
      []() {
        const emu::Counters& c = emu::counters();
        py::dict out;
        out["launches"] = c.launches;
        out["blocks"] = c.blocks;
        out["threads"] = c.threads;
        out["bank_conflicts"] = c.bank_conflicts;
        return out;
      },
      "Kernel launches, blocks and threads run, and the extra shared-memory wavefronts (bank conflicts) of the "
      "ldmatrix and 16-byte shared stores, since the module was loaded.");
  py::module_ st = m.def_submodule("selftest", "Kernels that check the emulator itself (tests/cuda_emulator).");
  st.def("butterfly", &emu_selftest::butterfly, py::arg("threads"), py::arg("blocks"));
  st.def("rotate", &emu_selftest::rotate, py::arg("threads"), py::arg("blocks"), py::arg("sync"));
  st.def("barrier_after_early_exit", &emu_selftest::barrier_after_early_exit);
  st.def("shuffle_with_ended_lanes", &emu_selftest::shuffle_with_ended_lanes);
  st.def("barrier_and_shuffle_deadlock", &emu_selftest::barrier_and_shuffle_deadlock);
  st.def("misaligned_vector_load", &emu_selftest::misaligned_vector_load);
  st.def("shared_index_out_of_range", &emu_selftest::shared_index_out_of_range);
  st.def("launch_error", &emu_selftest::launch_error, py::arg("threads"));
  st.def("ldmatrix", &emu_selftest::ldmatrix, py::arg("trans"), py::arg("row_stride"));
  st.def("mma", &emu_selftest::mma, py::arg("bf16"), py::arg("a"), py::arg("b"), py::arg("c"));
  st.def("float_to_half_bits", &emu_selftest::float_to_half_bits, py::arg("values"));
  st.def("half_bits_to_float", &emu_selftest::half_bits_to_float, py::arg("bits"));
  st.def("float_to_bfloat16_bits", &emu_selftest::float_to_bfloat16_bits, py::arg("values"));
  st.def("bfloat16_bits_to_float", &emu_selftest::bfloat16_bits_to_float, py::arg("bits"));
}

}  // namespace treelora_emulator
