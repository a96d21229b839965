"""Adapter save/load in PEFT's format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Weights are stored under PEFT's keys, ``base_model.model.<module>.lora_A.weight`` (r, in) and ``.lora_B.weight``
(out, r), so stock PEFT (``PeftModel.from_pretrained``) loads a treelora adapter and treelora loads a stock PEFT
adapter. A layer's frozen stack is saved as part of one adapter of rank r_f + r (A_all, B_all) with the lora_alpha
that keeps its scaling, which is exactly the output PEFT then computes. treelora's own per-layer settings (the
frozen/trainable split, lora_alpha, rsLoRA, dropout) travel in the safetensors metadata, which PEFT ignores, so a
treelora round trip restores the layers exactly.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from treelora._io import atomic_write
from treelora.nn.inject import check_wrappable, freeze_base_parameters, parent_index, replace_module
from treelora.nn.layer import LoRALinear, check_alpha, check_dropout, check_rank

WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # what PEFT wrote before it switched to safetensors
CONFIG_NAME = "adapter_config.json"
KEY_PREFIX = "base_model.model."
METADATA_KEY = "treelora"
METADATA_VERSION = 1

# PEFT LoRA variants whose forward differs from plain LoRA: loading them as plain LoRA would be silently wrong.
UNSUPPORTED_CONFIG_FLAGS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "arrow_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "layer_replication",
    "target_parameters",
)


def _named_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not named:
        raise ValueError(f"{type(model).__name__} contains no treelora.nn.LoRALinear layers (see inject_lora)")
    if named[0][0] == "":
        raise ValueError(
            "save_adapter/load_adapter need the model that contains the LoRALinear layers, not a bare "
            "LoRALinear: PEFT's format names each adapter by its module path"
        )
    return named


def _pattern_value(patterns: dict[str, Any], name: str) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that regex-matches a dotted suffix of ``name``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _module_names_outside_lora(model: nn.Module) -> list[str]:
    lora = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    return [n for n, _ in model.named_modules() if n and not any(n.startswith(p + ".") for p in lora)]


def _target_modules(model: nn.Module, wrapped: list[str]) -> list[str] | str:
    """PEFT target_modules that select exactly ``wrapped``: the list of names, or a full-match regex when a name is
    also the dotted suffix of another module's name (PEFT would wrap that one too)."""
    chosen = set(wrapped)
    ambiguous = any(
        n not in chosen and any(n.endswith("." + w) for w in wrapped) for n in _module_names_outside_lora(model)
    )
    if ambiguous:
        return "(" + "|".join(re.escape(w) for w in wrapped) + ")"
    return list(wrapped)


def _modules_to_save(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    found: dict[str, nn.Module] = {}
    for entry in names:
        hits = [(n, m) for n, m in model.named_modules() if n and (n == entry or n.endswith("." + entry))]
        if not hits:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of {type(model).__name__}")
        for n, m in hits:
            if any(isinstance(sub, LoRALinear) for sub in m.modules()):
                raise ValueError(f"modules_to_save entry {entry!r} matches {n!r}, which holds LoRA layers")
            found[n] = m
    return found


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    modules_to_save: Sequence[str] | None = None,
    base_model_name_or_path: str | None = None,
) -> None:
    """Write the model's LoRA adapters to ``directory`` in PEFT's format (files replaced atomically).

    Args:
        model: the model containing :class:`LoRALinear` layers (as returned to :func:`inject_lora`).
        directory: created if missing.
        modules_to_save: names (or name suffixes) of extra modules saved whole, e.g. a new classification head;
            PEFT's ``modules_to_save``.
        base_model_name_or_path: recorded in the config; default ``model.config._name_or_path`` when present.

    Layers whose rank, lora_alpha or rsLoRA setting differ from the most common one are described by PEFT's
    ``rank_pattern`` / ``alpha_pattern``; with mixed rsLoRA settings the alphas are rewritten for plain scaling.
    """
    from safetensors.torch import save_file

    named = _named_lora_layers(model)
    use_rslora = all(layer.use_rslora for _, layer in named)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, int | float] = {}
    layers_meta: dict[str, dict[str, Any]] = {}
    for name, layer in named:
        A, B = layer.adapter_weights()
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = B.detach().cpu().contiguous()
        rank = A.shape[0]
        ranks[name] = rank
        if layer.use_rslora == use_rslora and layer.frozen_rank == 0:
            alphas[name] = _number(layer.lora_alpha)
        else:  # the alpha that gives this layer's scaling at the saved rank under the saved rsLoRA setting
            alphas[name] = _number(layer.scaling * (math.sqrt(rank) if use_rslora else rank))
        layers_meta[name] = {
            "frozen_rank": layer.frozen_rank,
            "lora_alpha": layer.lora_alpha,
            "use_rslora": layer.use_rslora,
            "lora_dropout": layer.lora_dropout,
        }
    extra = _modules_to_save(model, modules_to_save) if modules_to_save else {}
    for mname, module in extra.items():
        for key, value in module.state_dict().items():
            tensors[f"{KEY_PREFIX}{mname}.{key}"] = value.detach().cpu().contiguous()
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropout = collections.Counter(layer.lora_dropout for _, layer in named).most_common(1)[0][0]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": _target_modules(model, [n for n, _ in named]),
        "rank_pattern": {re.escape(n): k for n, k in ranks.items() if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in alphas.items() if a != alpha},
        "use_rslora": use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "modules_to_save": sorted(extra) or None,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
    }
    meta = {"format": "pt", METADATA_KEY: json.dumps({"version": METADATA_VERSION, "layers": layers_meta})}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata=meta))

    def write_config(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(config, fh, indent=2, sort_keys=True)
            fh.write("\n")

    atomic_write(out / CONFIG_NAME, write_config)


def _read_adapter(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    with open(config_path, encoding="utf-8") as fh:
        config = json.load(fh)
    weights = directory / WEIGHTS_NAME
    meta: dict[str, Any] = {}
    if weights.is_file():
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(weights), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            for key in fh.keys():
                tensors[key] = fh.get_tensor(key)
        if raw:
            meta = json.loads(raw)
            if meta.get("version") != METADATA_VERSION:
                raise ValueError(
                    f"{weights} carries treelora metadata version {meta.get('version')!r}; this "
                    f"version of treelora reads version {METADATA_VERSION}"
                )
    elif (directory / LEGACY_WEIGHTS_NAME).is_file():
        tensors = torch.load(directory / LEGACY_WEIGHTS_NAME, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {directory}")
    return config, tensors, meta


def _check_config(config: dict[str, Any], where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where / CONFIG_NAME} has peft_type {config.get('peft_type')!r}; only LORA adapters load")
    for flag in UNSUPPORTED_CONFIG_FLAGS:
        if config.get(flag):
            raise ValueError(
                f"{where / CONFIG_NAME} sets {flag}={config[flag]!r}, a PEFT LoRA variant that "
                "treelora's LoRALinear does not implement"
            )


def _split_keys(tensors: dict[str, torch.Tensor], config: dict[str, Any], where: Path):
    adapters: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    extras: dict[str, torch.Tensor] = {}
    save_names = config.get("modules_to_save") or []
    unknown = []
    for key, value in tensors.items():
        rest = key[len(KEY_PREFIX) :] if key.startswith(KEY_PREFIX) else None
        if rest is None:
            unknown.append(key)
        elif rest.endswith(".lora_A.weight"):
            adapters[rest[: -len(".lora_A.weight")]]["A"] = value
        elif rest.endswith(".lora_B.weight"):
            adapters[rest[: -len(".lora_B.weight")]]["B"] = value
        elif any(re.match(rf"(^|.*\.){re.escape(m)}\.", rest) for m in save_names):
            extras[rest] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"{where / WEIGHTS_NAME} has weights treelora cannot load (not plain LoRA A/B or "
            f"modules_to_save): {sorted(unknown)[:5]}"
        )
    for name, pair in adapters.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise ValueError(f"{where / WEIGHTS_NAME} has no {missing} for module {name!r}")
    return dict(adapters), extras


def _tensor_at(model: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer of ``model`` at dotted path ``key``, or None."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    found = dict(module.named_parameters(recurse=False)).get(attr)
    return found if found is not None else dict(module.named_buffers(recurse=False)).get(attr)


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, strict: bool = True) -> list[LoRALinear]:
    """Load a PEFT-format LoRA adapter (saved by treelora or by stock PEFT) into ``model`` in place.

    Modules named in the adapter that are still plain ``nn.Linear`` are wrapped in :class:`LoRALinear` (rank from the
    weights, lora_alpha / rsLoRA / dropout from the config, the rest of the model frozen as by :func:`inject_lora`);
    existing LoRALinear layers receive the weights and the adapter's scaling and must have the same trainable rank.
    The whole file is checked before anything changes, so a failed load leaves the model as it was.

    Args:
        model: the base model (or one already holding LoRALinear layers at the adapter's module paths).
        directory: folder with ``adapter_config.json`` and ``adapter_model.safetensors`` (or the older ``.bin``).
        strict: raise when the model has LoRALinear layers the adapter does not cover.

    Returns:
        The LoRALinear layers that were loaded, shallowest first.
    """
    where = Path(directory)
    config, tensors, meta = _read_adapter(where)
    _check_config(config, where)
    adapters, extras = _split_keys(tensors, config, where)
    if not adapters:
        raise ValueError(f"{where / WEIGHTS_NAME} holds no LoRA weights")
    layers_meta = meta.get("layers", {})
    plan = []
    for name, pair in adapters.items():
        A, B = pair["A"], pair["B"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"the adapter has weights for module {name!r}, which {type(model).__name__} does not have"
            ) from None
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"module {name!r}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not an "
                "(r, in) / (out, r) pair"
            )
        in_f, out_f = getattr(module, "in_features", None), getattr(module, "out_features", None)
        if (A.shape[1], B.shape[0]) != (in_f, out_f):
            raise ValueError(
                f"module {name!r}: the adapter is for (in, out) = ({A.shape[1]}, {B.shape[0]}) but the "
                f"module has (in, out) = ({in_f}, {out_f}): mismatched shapes"
            )
        rank = A.shape[0]
        lm = layers_meta.get(name)
        if lm is not None:
            frozen = lm["frozen_rank"]
            alpha, rslora, dropout = lm["lora_alpha"], lm["use_rslora"], lm["lora_dropout"]
        else:
            frozen = 0
            pattern_alpha = _pattern_value(config.get("alpha_pattern") or {}, name)
            alpha = config.get("lora_alpha", 8) if pattern_alpha is None else pattern_alpha
            rslora, dropout = bool(config.get("use_rslora", False)), config.get("lora_dropout", 0.0)
        if not isinstance(frozen, int) or not 0 <= frozen < rank:
            raise ValueError(f"module {name!r}: frozen rank {frozen!r} is impossible for an adapter of rank {rank}")
        trainable = check_rank(f"the trainable rank of module {name!r}", rank - frozen)
        alpha = check_alpha(f"lora_alpha of module {name!r}", alpha)
        dropout = check_dropout(f"lora_dropout of module {name!r}", dropout)
        if isinstance(module, LoRALinear):
            if module.r != trainable:
                raise ValueError(
                    f"module {name!r}: the adapter's trainable rank is {trainable} (rank {rank}, "
                    f"{frozen} frozen) but the LoRALinear has r={module.r}: mismatched shapes"
                )
            if module.merged:
                raise RuntimeError(f"module {name!r} is merged; unmerge() it before loading new adapter weights")
        else:
            parent = model.get_submodule(name.rpartition(".")[0])
            check_wrappable(name, module, parent)
        plan.append((name, module, A, B, frozen, trainable, alpha, rslora, dropout))
    if strict:
        uncovered = [n for n, m in model.named_modules() if isinstance(m, LoRALinear) and n not in adapters]
        if uncovered:
            raise ValueError(
                f"the model has LoRALinear layers the adapter does not cover: {uncovered[:5]} "
                "(pass strict=False to load the others anyway)"
            )
    extra_targets = []
    for key, value in extras.items():
        target = _tensor_at(model, key)
        if target is None:
            raise ValueError(f"the adapter saves {key!r} (modules_to_save) but the model has no such tensor")
        if target.shape != value.shape:
            raise ValueError(
                f"modules_to_save tensor {key!r}: the adapter has shape {tuple(value.shape)}, the model "
                f"{tuple(target.shape)}: mismatched shapes"
            )
        extra_targets.append((target, value))

    wrapped_any = False
    index = parent_index(model)
    with torch.no_grad():
        for _, module, A, B, frozen, trainable, alpha, rslora, dropout in plan:
            if isinstance(module, LoRALinear):
                layer = module
                layer.lora_alpha, layer.use_rslora = alpha, rslora
            else:
                layer = LoRALinear(module, trainable, alpha, dropout, rslora)
                replace_module(index, module, layer)
                wrapped_any = True
            layer.set_frozen_stack(A[:frozen], B[:, :frozen])
            layer.lora_A.copy_(A[frozen:])
            layer.lora_B.copy_(B[:, frozen:])
        for target, value in extra_targets:
            target.copy_(value)
    if wrapped_any:
        freeze_base_parameters(model)
        for target, _ in extra_targets:
            if isinstance(target, nn.Parameter):
                target.requires_grad_(True)
    loaded = {id(m) for m in model.modules() if isinstance(m, LoRALinear)} & {
        id(model.get_submodule(name)) for name in adapters
    }
    return [m for m in model.modules() if id(m) in loaded]
