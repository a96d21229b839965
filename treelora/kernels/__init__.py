"""Raw kernels and their launchers, one folder per kernel language; no autograd, no modules.

* ``torch/``: the pure-PyTorch backend of every op family (any device; the CPU fallback).
* ``triton/``: Triton kernels and their launchers (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).
* ``cuda/``: launchers of the CUDA C++ kernels of ``csrc/`` in the compiled extension ``treelora._C``.
* ``constants.py``: dtypes, dtype and metric codes and the similarity clamp shared by both kernel languages (the C++
  side reads the generated ``csrc/kernel_constants.h``); ``env.py``: the machine as the backends see it (one reading
  of ``TRITON_INTERPRET``), their reasons' wording and the device guard of every launch.

Each backend module implements one op family with the same entry points in every language (see
:mod:`treelora.backends`). The ops layer (treelora/ops) imports them lazily, only when their backend runs, so
``import treelora`` never imports triton. Nothing here imports treelora.ops or any layer above it
(tests/test_layering.py).
"""
