# treelora developer commands. `make test` is what CI runs (.ci/run); `make demo` is the main job.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first, pinned to the CPU wheel, so that nothing later pulls a multi-GB CUDA build of torch.
TORCH_PIN := torch==2.13.0

.PHONY: install install-test demo test test-cpu test-interpreter test-cuda-emulated bench lint

install:
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e .

install-test:
	$(PIP) install $(TORCH_PIN)
	$(PIP) install -e ".[test]"

demo: install
	$(PYTHON) -m treelora info
	$(PYTHON) -m treelora demo

# Three lanes: CPU (everything that runs without a GPU), the Triton interpreter, and the CUDA C++ kernels on the
# CPU emulator in tests/cuda_emulator. On a GPU machine the requires_cuda tests of the CPU lane run for real.
test: install-test
	$(MAKE) test-cpu test-interpreter test-cuda-emulated kernel-report

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

# Results land in bench/results/<device>/all.json (one file per benchmark module when a single one is run).
bench: install-test
	$(PYTHON) -m pytest bench --benchmark-only -q

lint:
	$(PYTHON) -m ruff check treelora tests bench scripts examples setup.py
	$(PYTHON) -m ruff format --check treelora tests bench scripts examples setup.py
