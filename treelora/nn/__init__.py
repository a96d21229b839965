"""LoRA layers, model injection, merge/unmerge and PEFT-format adapter save/load.

* :class:`LoRALinear` wraps an ``nn.Linear`` (PEFT's parameter layout) and runs the fused ``lora_linear`` op, with an
  optional stack of frozen adapters under the trainable one.
* :func:`inject_lora` wraps a model's matching linear layers and returns them shallowest first (TreeLoRA's "layers");
  :func:`merge_and_unload` / :func:`unload` give the plain model back.
* :func:`save_adapter` / :func:`load_adapter` read and write PEFT's ``adapter_model.safetensors`` +
  ``adapter_config.json``; :mod:`treelora.peft` makes PEFT's own ``get_peft_model`` build fused layers.
"""

from treelora.nn.adapter_io import load_adapter, save_adapter
from treelora.nn.inject import inject_lora, merge_and_unload, unload
from treelora.nn.layer import LoRALinear, disable_adapters, lora_layers

__all__ = [
    "LoRALinear",
    "disable_adapters",
    "inject_lora",
    "load_adapter",
    "lora_layers",
    "merge_and_unload",
    "save_adapter",
    "unload",
]
