"""Small models for the LoRA-layer and PEFT tests, built from configs with random weights (no downloads).

Each :class:`ModelCase` builds one model, names the linear layers LoRA targets in it, and makes a float input whose
gradient the tests check (``inputs_embeds`` for the language models, ``pixel_values`` for the ViTs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

HIDDEN = 32
HEADS = 4
IMAGE = 16
PATCH = 4


def tiny_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=64,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    return BertModel(config, add_pooling_layer=False)


def tiny_hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        image_size=IMAGE,
        patch_size=PATCH,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        intermediate_size=48,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=5,
        attn_implementation="eager",
    )
    return ViTForImageClassification(config)


class TimmAttention(nn.Module):
    """timm's ViT attention: one fused ``qkv`` linear (dim -> 3 dim), then ``proj``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) / (C // self.heads) ** 0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, T, C))


class TimmBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, 2 * dim)
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmStyleViT(nn.Module):
    """A ViT laid out like timm's ``VisionTransformer`` (patch_embed.proj conv, blocks.i.attn.qkv, head)."""

    def __init__(self, dim: int = HIDDEN, depth: int = 2, heads: int = HEADS, classes: int = 5) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[TimmBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(F.gelu(x[:, 0]))


@dataclass(frozen=True)
class ModelCase:
    """One model family: how to build it, what LoRA targets in it, and how to call it with a float input."""

    name: str
    build: Callable[[], nn.Module]
    targets: tuple[str, ...]
    input_name: str
    input_shape: tuple[int, ...]
    output: Callable[[object], torch.Tensor]

    def make_input(self, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.input_shape, generator=gen)

    def run(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.output(model(**{self.input_name: x}))


CASES = [
    ModelCase("llama", tiny_llama, ("q_proj", "v_proj"), "inputs_embeds", (2, 7, HIDDEN), lambda out: out.logits),
    ModelCase(
        "bert", tiny_bert, ("query", "value"), "inputs_embeds", (2, 7, HIDDEN), lambda out: out.last_hidden_state
    ),
    ModelCase(
        "hf_vit",
        tiny_hf_vit,
        ("q_proj", "v_proj", "query", "value"),
        "pixel_values",
        (2, 3, IMAGE, IMAGE),
        lambda out: out.logits,
    ),
    ModelCase("timm_vit", TimmStyleViT, ("qkv", "fc2"), "pixel_values", (2, 3, IMAGE, IMAGE), lambda out: out),
]
CASE_IDS = [case.name for case in CASES]


def randomize_peft_adapters(peft_model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    """Give every PEFT LoRA layer random A and B (B starts at zero, which would hide any difference in its use)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict):
                for name in module.lora_A:
                    for w in (module.lora_A[name].weight, module.lora_B[name].weight):
                        w.copy_(torch.randn(w.shape, generator=gen) * std)


def copy_adapters_from_peft(peft_model: nn.Module, model: nn.Module) -> int:
    """Copy the default adapter of each PEFT layer into the treelora LoRALinear at the same path; returns how many."""
    from treelora.nn import LoRALinear

    inner = peft_model.base_model.model
    count = 0
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, LoRALinear):
                source = inner.get_submodule(name)
                layer.lora_A.copy_(source.lora_A["default"].weight)
                layer.lora_B.copy_(source.lora_B["default"].weight)
                count += 1
    return count


def peft_and_treelora(
    case: ModelCase, r: int = 4, lora_alpha: float = 8, lora_dropout: float = 0.0, seed: int = 0
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base model, stock-PEFT model, treelora model) with identical base weights and identical random adapters."""
    import copy

    from peft import LoraConfig, get_peft_model

    from treelora.nn import inject_lora

    torch.manual_seed(seed)
    base = case.build().eval()
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(case.targets))
    peft_model = get_peft_model(copy.deepcopy(base), config).eval()
    randomize_peft_adapters(peft_model)
    model = copy.deepcopy(base)
    layers = inject_lora(model, list(case.targets), r, lora_alpha, lora_dropout)
    assert copy_adapters_from_peft(peft_model, model) == len(layers) > 0
    return base, peft_model, model
