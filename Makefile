# treelora developer commands. `make test` is what CI runs (.ci/run); `make demo` is the main job.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first, so that nothing later pulls another build. The default is a plain `pip install torch==2.13.0` from
# the default package index (on Linux that is the CUDA build, several GB). TORCH_INDEX, empty by default, names
# another index for torch alone, e.g. PyTorch's CPU wheel index for the CPU-only wheel on a machine without a GPU.
TORCH_PIN := torch==2.13.0
TORCH_INDEX ?=
TORCH_INSTALL = $(PIP) install $(TORCH_PIN) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

.PHONY: install install-test demo test test-cpu test-interpreter test-cuda-emulated test-peft-suite bench lint

install:
	$(TORCH_INSTALL)
	$(PIP) install -e .

install-test:
	$(TORCH_INSTALL)
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m treelora info
	$(PYTHON) -m treelora demo

# Four lanes: CPU (everything that runs without a GPU, including a smoke run of the benchmark harness), the Triton
# interpreter, the CUDA C++ kernels on the CPU emulator in tests/cuda_emulator, and PEFT's own LoRA tests with
# treelora registered; then the compiled-kernel report's checks. On a GPU machine the requires_cuda tests of the CPU
# lane run for real.
test: install-test
	$(MAKE) test-cpu test-interpreter test-cuda-emulated test-peft-suite kernel-report

test-cpu:
	$(PYTHON) -m pytest -m "not interpreter" -q

test-interpreter:
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -m interpreter -q

test-cuda-emulated:
	TREELORA_CUDA_EMULATOR=1 $(PYTHON) -m pytest -m cuda_emulated -q

# Compiled-kernel report (no GPU): registers, spills, shared memory and tensor-core instructions per kernel and
# architecture, and the LoRA designs' modelled bytes and launches. Fails when a LoRA kernel for sm_90 has no
# tensor-core instruction, any LoRA kernel spills or uses local memory, or the Triton design's modelled extra bytes
# exceed its 1.10x budget. The CUDA design's 1.15x byte budget is printed as an open target: cuBLAS with beta = 1
# reads the LoRA terms back, which the models put at 1.15-1.2x on an H100 (docs/cuda_lora_design.md).
KERNEL_CHECK ?= all
KERNEL_OPEN_BUDGET ?= --open-budget cuda
.PHONY: kernel-report
kernel-report:
	$(PYTHON) -m treelora.kernels.report --check $(KERNEL_CHECK) $(KERNEL_OPEN_BUDGET)

# The installed PEFT version's tests, unpacked once into build/peft-suite (selection: tests/peft_suite/treelora_peft_suite.py).
test-peft-suite:
	$(PYTHON) scripts/peft_suite.py -q

# Reports land in bench/results/<device>/local/all.json (git-ignored); the committed references next to local/
# change only with --bench-reference. `python scripts/bench_tables.py --local` renders the run as tables.
bench: install-test
	$(PYTHON) -m pytest bench --benchmark-only -q

lint:
	$(PYTHON) -m ruff check treelora tests bench scripts examples setup.py
	$(PYTHON) -m ruff format --check treelora tests bench scripts examples setup.py
