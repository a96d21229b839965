"""Raw kernels and their launchers (no autograd, no modules).

Triton kernels live in ``lora.py``, ``similarity.py`` and ``masked_update.py``; Python launchers of the compiled CUDA
extension in ``cuda_*.py``. These modules are imported lazily by the ops layer, only when their backend runs, so
``import treelora`` never imports triton. Set ``TRITON_INTERPRET=1`` before importing a Triton module to run its
kernels on CPU tensors in the interpreter.
"""
