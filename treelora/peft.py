"""PEFT integration: make PEFT's ``get_peft_model`` / ``PeftModel.from_pretrained`` build treelora's fused layer.

:class:`PeftLoRALinear` is PEFT's own ``lora.Linear`` (same adapter dicts, state-dict keys, merge, adapter switching,
saving) whose forward runs :func:`treelora.ops.lora_linear` whenever the call is plain LoRA: one active adapter, not
merged, no DoRA or other variant, no LoRA bias, no per-sample ``adapter_names``, a plain ``nn.Linear`` base. Every
other call goes to PEFT's forward unchanged, so registering never changes what a model computes, only how fast.

Two ways to register (peft is imported only when one is used; it is an optional dependency, ``treelora[peft]``):

* ``register(config)``: PEFT's documented route, ``LoraConfig._register_custom_module({nn.Linear: PeftLoRALinear})``
  on that config only;
* ``register()``: for every LoRA config from now on (until :func:`unregister`), by routing PEFT's layer factory for
  plain ``nn.Linear`` targets to :class:`PeftLoRALinear` (configs with their own custom mapping keep it).
"""

from __future__ import annotations

import functools
from typing import Any

import torch.nn as nn

from treelora.nn.layer import fused_lora_forward

__all__ = ["is_registered", "register", "unregister"]  # and PeftLoRALinear, built on first access (needs peft)

_INSTALL_HINT = "treelora.peft needs the peft package: pip install 'treelora[peft]'"
_original_create_new_module = None


def _import_peft():
    try:
        from peft import LoraConfig
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora.model import LoraModel
    except ImportError as err:
        raise ImportError(_INSTALL_HINT) from err
    return LoraConfig, lora_layer, LoraModel


def _plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


@functools.cache
def _layer_class() -> type:
    _, lora_layer, _ = _import_peft()

    class PeftLoRALinear(lora_layer.Linear):
        """PEFT's ``lora.Linear`` with treelora's fused forward (see the module docstring for when it applies)."""

        def _fused_adapter(self, args: tuple, kwargs: dict[str, Any]) -> str | None:
            """The adapter the fused op can compute on its own, or None when PEFT's forward must run."""
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
            if not _plain_linear(self.base_layer):
                return None
            dropout = self.lora_dropout[name]
            if not isinstance(dropout, (nn.Identity, nn.Dropout)):
                return None
            return name

        def forward(self, x, *args: Any, **kwargs: Any):
            """x: (..., in) -> (..., out)."""
            name = self._fused_adapter(args, kwargs)
            if name is None:
                return super().forward(x, *args, **kwargs)
            dropout = self.lora_dropout[name]
            p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
            base = self.base_layer
            return fused_lora_forward(
                x,
                base.weight,
                base.bias,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                p,
                dropout.training,
            )

    PeftLoRALinear.__module__ = __name__
    PeftLoRALinear.__qualname__ = "PeftLoRALinear"
    return PeftLoRALinear


def __getattr__(name: str) -> Any:
    if name == "PeftLoRALinear":
        return _layer_class()
    raise AttributeError(f"module 'treelora.peft' has no attribute {name!r}")


def register(config: Any = None) -> Any:
    """Make PEFT build :class:`PeftLoRALinear` for ``nn.Linear`` targets.

    Args:
        config: a ``peft.LoraConfig`` to register on (returned, for chaining into ``get_peft_model``); None
            registers for every LoRA config until :func:`unregister` (idempotent).
    """
    global _original_create_new_module
    LoraConfig, _, LoraModel = _import_peft()
    cls = _layer_class()
    if config is not None:
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
        config._register_custom_module({nn.Linear: cls})
        return config
    if _original_create_new_module is not None:
        return None
    original = LoraModel._create_new_module

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        custom = getattr(lora_config, "_custom_modules", None) or {}
        takes_over = (
            _plain_linear(base)
            and kwargs.get("parameter_name") is None
            and not lora_config.fan_in_fan_out
            and not kwargs.get("loaded_in_8bit", False)
            and not kwargs.get("loaded_in_4bit", False)
            and not any(isinstance(base, key) for key in custom)
        )
        if takes_over:
            return cls(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(_create_new_module)
    _original_create_new_module = original
    return None


def unregister() -> None:
    """Undo :func:`register` () (configs registered one by one keep their mapping)."""
    global _original_create_new_module
    if _original_create_new_module is None:
        return
    _, _, LoraModel = _import_peft()
    LoraModel._create_new_module = staticmethod(_original_create_new_module)
    _original_create_new_module = None


def is_registered() -> bool:
    """Whether :func:`register` () is in effect."""
    return _original_create_new_module is not None
