"""``inject_lora``: wrap a model's matching ``nn.Linear`` modules in :class:`LoRALinear`, shallowest first.

Target matching follows PEFT's ``target_modules`` so a PEFT configuration carries over unchanged: a string is a regular
expression that must match a module's full dotted name (``re.fullmatch``); a list of strings matches a module whose
name equals an entry or ends with ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
"""

from __future__ import annotations

import numbers
import re
from typing import Sequence

import torch
import torch.nn as nn

from treelora.nn.layer import LoRALinear, check_alpha, check_dropout, check_linear, check_rank


def _target_matcher(target_modules: str | Sequence[str]):
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as err:
            raise ValueError(f"target_modules {target_modules!r} is not a valid regular expression: {err}") from None
        return lambda name: pattern.fullmatch(name) is not None
    if not isinstance(target_modules, (list, tuple, set, frozenset)):
        raise TypeError(
            f"target_modules must be a regex string or a list of module names, got {type(target_modules).__name__}"
        )
    names = list(target_modules)
    if not names:
        raise ValueError("target_modules is empty: name at least one module (e.g. ['q_proj', 'v_proj'])")
    for t in names:
        if not isinstance(t, str) or not t:
            raise TypeError(f"target_modules entries must be non-empty strings, got {t!r}")
    return lambda name: any(name == t or name.endswith("." + t) for t in names)


def _inside_lora(name: str, lora_names: list[str]) -> bool:
    return any(name.startswith(prefix + ".") for prefix in lora_names)


def find_targets(model: nn.Module, target_modules: str | Sequence[str]) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module whose name matches ``target_modules``, in ``named_modules`` order.

    Modules inside an existing LoRALinear (its ``base``) are never candidates.
    """
    matches = _target_matcher(target_modules)
    lora_names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return [
        (name, module)
        for name, module in model.named_modules()
        if name and not _inside_lora(name, lora_names) and matches(name)
    ]


def parent_index(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) -> every (parent, attribute) holding it (a module registered under several names has several)."""
    index: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                index.setdefault(id(child), []).append((parent, child_name))
    return index


def check_wrappable(name: str, module: nn.Module, parent: nn.Module) -> None:
    """Raise if ``module`` (registered as ``name`` under ``parent``) cannot be replaced by a LoRALinear."""
    if isinstance(module, LoRALinear):
        raise ValueError(f"module {name!r} already has a LoRA adapter (it is a treelora LoRALinear)")
    if isinstance(parent, nn.MultiheadAttention):
        raise TypeError(
            f"module {name!r} is the out_proj of an nn.MultiheadAttention, which reads its weight directly instead "
            "of calling it: a LoRA wrapper there would be ignored"
        )
    check_linear(f"module {name!r}", module)


def freeze_base_parameters(model: nn.Module) -> None:
    """``requires_grad = False`` on every parameter except the lora_A / lora_B of LoRALinear layers."""
    adapters = {
        id(p) for layer in model.modules() if isinstance(layer, LoRALinear) for p in (layer.lora_A, layer.lora_B)
    }
    for p in model.parameters():
        if id(p) not in adapters:
            p.requires_grad_(False)


def replace_module(index: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is registered (``index`` from :func:`parent_index`, taken before any change)."""
    for parent, child_name in index[id(old)]:
        setattr(parent, child_name, new)


def inject_lora(
    model: nn.Module,
    target_modules: str | Sequence[str],
    r: int,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_depth: int | None = None,
    use_rslora: bool = False,
    *,
    adapter_dtype: torch.dtype | None = None,
) -> list[LoRALinear]:
    """Replace the matching linear layers of ``model`` (in place) by :class:`LoRALinear` and freeze the rest.

    Args:
        model: any ``nn.Module`` (Hugging Face Llama / BERT / ViT, a timm ViT whose fused ``qkv`` linear becomes one
            LoRALinear, ...).
        target_modules: regex string (full-name ``re.fullmatch``) or list of names / name suffixes, as in PEFT.
        r: adapter rank (>= 1). lora_alpha: None means r (scaling 1). lora_dropout: adapter-input dropout.
        lora_depth: keep only the first K matches (TreeLoRA's shallow layers); None keeps all.
        use_rslora: scaling alpha / sqrt(r). adapter_dtype: see :class:`LoRALinear`.

    Returns:
        The new LoRALinear modules in ``named_modules`` order, shallowest first: TreeLoRA's "layers".

    Every parameter of the model is frozen except the adapters' lora_A / lora_B (those of existing LoRALinear layers
    keep their ``requires_grad``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    r = check_rank("r", r)
    check_alpha("lora_alpha", lora_alpha)
    check_dropout("lora_dropout", lora_dropout)
    if lora_depth is not None and (
        isinstance(lora_depth, bool) or not isinstance(lora_depth, numbers.Integral) or lora_depth < 1
    ):
        raise ValueError(f"lora_depth must be None or an int >= 1, got {lora_depth!r}")
    found = find_targets(model, target_modules)
    if not found:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"target_modules {target_modules!r} matched no module of {type(model).__name__}; its linear layers "
            f"include {linear[:8]}"
        )
    unique: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in found:
        if id(module) not in seen:
            seen.add(id(module))
            unique.append((name, module))
    for name, module in unique:
        parent_name = name.rpartition(".")[0]
        check_wrappable(name, module, model.get_submodule(parent_name))
    if lora_depth is not None:
        if lora_depth > len(unique):
            raise ValueError(
                f"lora_depth={lora_depth} but target_modules {target_modules!r} matched only {len(unique)} modules"
            )
        unique = unique[:lora_depth]
    layers = []
    index = parent_index(model)
    for _, module in unique:
        layer = LoRALinear(module, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype=adapter_dtype)
        replace_module(index, module, layer)
        layers.append(layer)
    freeze_base_parameters(model)
    return layers


def _remove_lora(model: nn.Module, merge: bool, safe_merge: bool) -> nn.Module:
    if isinstance(model, LoRALinear):
        raise ValueError("pass the model that contains the LoRALinear layers; for a single layer use layer.base")
    index = parent_index(model)
    for layer in [m for m in model.modules() if isinstance(m, LoRALinear)]:
        if merge and not layer.merged:
            layer.merge(safe_merge=safe_merge)
        elif not merge and layer.merged:
            layer.unmerge()
        replace_module(index, layer, layer.base)
    return model


def merge_and_unload(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every LoRALinear (frozen stack included) into its base weight and put the plain ``nn.Linear`` back.

    Returns ``model`` (modified in place), now free of treelora modules: a checkpoint of it loads into the original
    architecture. The base parameters keep ``requires_grad = False``.
    """
    return _remove_lora(model, merge=True, safe_merge=safe_merge)


def unload(model: nn.Module) -> nn.Module:
    """Put every LoRALinear's base ``nn.Linear`` back without merging (merged layers are unmerged first)."""
    return _remove_lora(model, merge=False, safe_merge=False)
