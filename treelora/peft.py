"""PEFT integration: make PEFT's ``get_peft_model`` / ``PeftModel.from_pretrained`` build treelora's fused layer.

:class:`PeftLoRALinear` is PEFT's own ``lora.Linear`` (same adapter dicts, state-dict keys, merge, adapter switching,
saving, and the same name: it shows as ``lora.Linear`` in ``repr``, ``get_layer_status()`` and error messages) whose
forward runs :func:`treelora.ops.lora_linear` whenever the call is plain LoRA and nothing else would observe the base
layer's call:

* one active adapter, not merged, adapters enabled, no DoRA or other variant, no LoRA bias, no ``adapter_names``;
* a plain ``nn.Linear`` base whose weight is materialised (not on the meta device) and whose call has no hooks: no
  forward / pre-forward / backward hooks on the base layer or the adapter's ``lora_A`` / ``lora_B`` / dropout, no
  global module hooks, no ``forward`` replaced on the instance (accelerate's ``_hf_hook``, which is how
  ``cpu_offload`` and ``device_map`` offloading load weights just in time);
* x on the base weight's device, in the base weight's dtype (under ``torch.autocast`` any floating dtype).

Every other call goes to PEFT's forward unchanged, so registering never changes what a model computes (up to
floating-point rounding, below), and errors are stock PEFT's: an fp16 input into an fp32 model raises the
``RuntimeError`` PEFT's ``nn.Linear`` call raises.

Dtypes. With adapters in another dtype than the activations (PEFT keeps fp32 adapters on a bf16 / fp16 model by
default), stock PEFT casts x to the adapter's dtype and computes the LoRA branch in fp32. treelora computes the branch
in the activation dtype with fp32 accumulation (SPEC 3.1: x is never round-tripped through fp32 in memory): the
Triton and CUDA backends round A and B to bf16 / fp16 inside the kernel; the torch backend on CPU computes fp16 /
bf16 inputs in fp32 throughout. The outputs agree within a few bf16 roundings of the output's magnitude
(``tests/test_peft_parity.py`` derives the bound and prints the measured error).

Two ways to register (peft is imported only when one is used; it is an optional dependency, ``treelora[peft]``):

* ``register(config)``: PEFT's documented route, ``LoraConfig._register_custom_module`` on that config only. PEFT
  does not save that mapping (it is not a config field, so ``adapter_config.json`` has no trace of it): load such an
  adapter back with :func:`from_pretrained`, which registers the loaded config before PEFT builds the layers;
* ``register()``: for every LoRA config from now on (until :func:`unregister`), by routing PEFT's layer factory for
  plain ``nn.Linear`` targets to :class:`PeftLoRALinear`; ``PeftModel.from_pretrained`` then builds fused layers too.

Either way the targets PEFT would give to another layer type keep it: quantized or other ``nn.Linear`` subclasses,
tensor-subclass weights (torchao), ``target_parameters``, Megatron configs, 8-/4-bit models.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from typing import Any

import torch
import torch.nn as nn
from torch.nn.modules import module as _module_globals

from treelora.nn.layer import fused_lora_forward

__all__ = ["from_pretrained", "is_registered", "register", "unregister"]  # and PeftLoRALinear (built on access)

_INSTALL_HINT = "treelora.peft needs the peft package: pip install 'treelora[peft]'"
_MIN_PEFT = (0, 16)  # LoRA layers keep their variants in ``lora_variant`` from PEFT 0.16 on
_original_create_new_module = None

# The hook dictionaries torch consults when a module is called: on the module itself and process-wide.
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _import_peft():
    try:
        import peft
        from peft import LoraConfig, PeftModel
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora.model import LoraModel
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    found = tuple(int(part) for part in re.findall(r"\d+", peft.__version__)[:2])
    if found < _MIN_PEFT:
        raise ImportError(
            f"treelora.peft needs peft >= {'.'.join(map(str, _MIN_PEFT))}, found {peft.__version__}: "
            "pip install -U 'treelora[peft]'"
        )
    return LoraConfig, PeftModel, lora_layer, LoraModel


def _plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _plain_tensor(t: torch.Tensor | None) -> bool:
    """A parameter that holds an ordinary dense tensor (not a quantized / tensor-subclass weight)."""
    return t is None or (type(t) in (torch.Tensor, nn.Parameter) and type(t.data) is torch.Tensor)


def _called_plainly(module: nn.Module) -> bool:
    """Whether ``module(x)`` is exactly ``type(module).forward(module, x)``: no hooks and no instance ``forward``."""
    if "forward" in vars(module) or hasattr(module, "_hf_hook"):
        return False
    return not any(getattr(module, name, None) for name in _MODULE_HOOKS)


def _global_hooks_present() -> bool:
    return any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOKS)


def _takes_over(lora_config: Any, target: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Whether PEFT's factory, left alone, would build its plain ``lora.Linear`` for this target (the one layer
    treelora replaces); every other dispatch stays PEFT's."""
    base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
    return (
        _plain_linear(base)
        and _plain_tensor(base.weight)
        and _plain_tensor(base.bias)
        and kwargs.get("parameter_name") is None
        and not kwargs.get("loaded_in_8bit", False)
        and not kwargs.get("loaded_in_4bit", False)
        and getattr(lora_config, "megatron_config", None) is None
    )


def _build(target: nn.Module, adapter_name: str, config: Any = None, **kwargs: Any) -> nn.Module | None:
    """PEFT's custom-module factory signature: a :class:`PeftLoRALinear`, or None to let PEFT's next dispatcher
    (quantized layers, ``target_parameters``, its default) build the layer."""
    if config is None or not _takes_over(config, target, kwargs):
        return None
    return _layer_class()(target, adapter_name, config=config, **kwargs)


def _new_layer() -> nn.Module:
    cls = _layer_class()
    return cls.__new__(cls)


@functools.cache
def _layer_class() -> type:
    _, _, lora_layer, _ = _import_peft()
    stock = lora_layer.Linear

    class PeftLoRALinear(stock):
        """PEFT's ``lora.Linear`` with treelora's fused forward (see the module docstring for when it applies)."""

        def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
            if config.fan_in_fan_out:
                # PEFT's own factory resets the flag for nn.Linear targets (their weight is (out, in)) before it
                # builds the layer; keeping it would transpose the delta on merge.
                warnings.warn(
                    "fan_in_fan_out=True does not apply to a torch.nn.Linear target, whose weight is stored "
                    "(out, in): setting the LoraConfig's fan_in_fan_out to False",
                    UserWarning,
                    stacklevel=2,
                )
                config.fan_in_fan_out = False
            super().__init__(base_layer, adapter_name, config=config, **kwargs)

        def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict[str, Any]) -> str | None:
            """The adapter the fused op can compute exactly as PEFT would, or None when PEFT's forward must run."""
            if args or any(v is not None for v in kwargs.values()):
                return None  # adapter_names (mixed batches) or a variant's keyword (aLoRA offsets)
            if self.disable_adapters or self.merged or self.fan_in_fan_out:
                return None
            present = [a for a in self.active_adapters if a in self.lora_A]
            if len(present) != 1:
                return None
            name = present[0]
            if name in self.lora_variant or self.lora_bias.get(name, False):
                return None
            base, lora_A, lora_B = self.base_layer, self.lora_A[name], self.lora_B[name]
            dropout = self.lora_dropout[name]
            if not (_plain_linear(base) and _plain_linear(lora_A) and _plain_linear(lora_B)):
                return None
            if lora_A.bias is not None or lora_B.bias is not None or type(dropout) not in (nn.Identity, nn.Dropout):
                return None
            if _global_hooks_present() or not all(_called_plainly(m) for m in (base, lora_A, lora_B, dropout)):
                return None
            weight, bias = base.weight, base.bias
            if weight.requires_grad or (bias is not None and bias.requires_grad):
                return None  # a trainable base layer: PEFT's forward gives it its gradient
            tensors = [weight, lora_A.weight, lora_B.weight] + ([bias] if bias is not None else [])
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                return None
            if any(t.is_meta or t.device != x.device for t in tensors):
                return None  # offloaded (meta) weights, or a device mismatch PEFT reports in its own words
            if not torch.is_autocast_enabled(x.device.type):
                if x.dtype != weight.dtype or (bias is not None and bias.dtype != weight.dtype):
                    return None  # stock nn.Linear raises on mixed dtypes; so does PEFT's forward
            if not getattr(self, "cast_input_dtype_enabled", True) and lora_A.weight.dtype != x.dtype:
                return None  # peft.helpers.disable_input_dtype_casting: PEFT feeds x uncast to lora_A
            return name

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            """x: (..., in) -> (..., out)."""
            name = self._fused_adapter(x, args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[name]
            p = dropout.p if type(dropout) is nn.Dropout else 0.0
            base = self.base_layer
            return fused_lora_forward(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],  # a float, or a 0-dim tensor after prepare_model_for_compiled_hotswap
                p,
                dropout.training,
            )

        def __reduce_ex__(self, protocol: int):
            # The class carries stock lora.Linear's name (below), so pickle's lookup by name would find the stock
            # class: rebuild through this module instead (torch.save(model), copy.deepcopy).
            reduced = super().__reduce_ex__(protocol)
            return (_new_layer, ()) + tuple(reduced[2:])

    # What PEFT users see (repr, get_layer_status().module_type, messages that print the class) is stock's.
    PeftLoRALinear.__name__ = stock.__name__
    PeftLoRALinear.__qualname__ = stock.__qualname__
    PeftLoRALinear.__module__ = stock.__module__
    return PeftLoRALinear


def __getattr__(name: str) -> Any:
    if name == "PeftLoRALinear":
        return _layer_class()
    raise AttributeError(f"module 'treelora.peft' has no attribute {name!r}")


def register(config: Any = None) -> Any:
    """Make PEFT build :class:`PeftLoRALinear` for plain ``nn.Linear`` targets.

    Args:
        config: a ``peft.LoraConfig`` to register on (returned, for chaining into ``get_peft_model``); None
            registers for every LoRA config until :func:`unregister` (idempotent). A config's registration is not
            saved by ``save_pretrained``: load with :func:`from_pretrained` to get fused layers back.
    """
    global _original_create_new_module
    LoraConfig, _, _, LoraModel = _import_peft()
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
        config._register_custom_module({nn.Linear: _build})
        return config
    if _original_create_new_module is not None:
        return None
    original = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        if not any(isinstance(base, key) for key in custom):  # a config's own mapping goes first, as in PEFT
            module = _build(target, adapter_name, config=lora_config, **kwargs)
            if module is not None:
                return module
        return original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(_create_new_module)
    _original_create_new_module = original
    return None


def unregister() -> None:
    """Undo :func:`register` () (configs registered one by one keep their mapping)."""
    global _original_create_new_module
    if _original_create_new_module is None:
        return
    _, _, _, LoraModel = _import_peft()
    LoraModel._create_new_module = staticmethod(_original_create_new_module)
    _original_create_new_module = None


def is_registered() -> bool:
    """Whether :func:`register` () is in effect."""
    return _original_create_new_module is not None


def from_pretrained(model: nn.Module, model_id: str | os.PathLike, **kwargs: Any) -> Any:
    """``PeftModel.from_pretrained`` with the saved LoRA config registered first, so the loaded model has
    treelora's fused layers: the call that restores ``register(config)`` after ``save_pretrained``.

    Args:
        model: the base model (modified in place, as by PEFT).
        model_id: a folder written by ``save_pretrained`` (or a hub id, as for PEFT).
        kwargs: passed on to ``PeftModel.from_pretrained`` (``adapter_name``, ``is_trainable``, ``config``,
            ``subfolder``, ...). With ``config`` given, that config is registered and used.

    Returns:
        the ``PeftModel``.
    """
    LoraConfig, PeftModel, _, _ = _import_peft()
    config = kwargs.pop("config", None)
    if config is None:
        hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if kwargs.get(k) is not None}
        config = LoraConfig.from_pretrained(model_id, **hub)
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"treelora.peft.from_pretrained loads LoRA adapters; {model_id} holds a "
            f"{getattr(config, 'peft_type', type(config).__name__)} adapter: use peft.PeftModel.from_pretrained"
        )
    return PeftModel.from_pretrained(model, model_id, config=register(config), **kwargs)
