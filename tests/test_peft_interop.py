"""PEFT interoperability: adapters saved by stock PEFT load into treelora and vice versa with the same outputs, and
PEFT's get_peft_model builds treelora's fused layer once it is registered."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from tests.tiny_models import CASE_IDS, CASES, TimmStyleViT, peft_and_treelora, randomize_peft_adapters
from treelora.nn import LoRALinear, inject_lora, load_adapter, lora_layers, save_adapter

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

MAX_DIFF = 1e-5

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (after the importorskip above)

import treelora.peft as treelora_peft  # noqa: E402


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _randomize(model: nn.Module, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)


@pytest.fixture
def registered_globally():
    treelora_peft.register()
    yield
    treelora_peft.unregister()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_peft_saved_adapter_loads_into_treelora(case, tmp_path):
    base, peft_model, _ = peft_and_treelora(case, r=4, lora_alpha=12, lora_dropout=0.05)
    peft_model.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    layers = load_adapter(model, tmp_path)
    assert layers == lora_layers(model) and layers
    assert all(layer.scaling == 3.0 and layer.lora_dropout == 0.05 for layer in layers)
    x = case.make_input()
    with torch.no_grad():
        expected, got, plain = case.run(peft_model, x), case.run(model, x), case.run(base, x)
    print(f"{case.name}: PEFT-saved adapter in treelora, max diff {max_diff(got, expected):.2e}")
    assert max_diff(expected, plain) > 1e-3
    assert max_diff(got, expected) <= MAX_DIFF


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_treelora_saved_adapter_loads_into_stock_peft(case, tmp_path):
    base, _, model = peft_and_treelora(case, r=4, lora_alpha=8)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not any(isinstance(m, treelora_peft.PeftLoRALinear) for m in peft_model.modules())
    x = case.make_input()
    with torch.no_grad():
        expected, got = case.run(model, x), case.run(peft_model, x)
    print(f"{case.name}: treelora-saved adapter in stock PEFT, max diff {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) <= MAX_DIFF


def test_stack_mixed_ranks_and_rslora_round_trip_through_peft(tmp_path):
    torch.manual_seed(0)
    base = TimmStyleViT(depth=3).eval()
    model = copy.deepcopy(base)
    first = inject_lora(model, ["qkv"], r=4, lora_alpha=8, lora_depth=2)
    inject_lora(model, ["fc2"], r=2, lora_alpha=4, use_rslora=True, lora_dropout=0.1)
    _randomize(model, seed=1)
    first[0].freeze_adapter()
    first[0].freeze_adapter()
    _randomize(model, seed=2)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["rank_pattern"]  # mixed: alphas rewritten for plain scaling
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        in_peft = peft_model(x)
        reloaded = copy.deepcopy(base)
        layers = load_adapter(reloaded, tmp_path)
        in_treelora = reloaded(x)
    print(
        f"stacked/mixed adapter: PEFT diff {max_diff(in_peft, expected):.2e}, "
        f"treelora diff {max_diff(in_treelora, expected):.2e}"
    )
    assert max_diff(in_peft, expected) <= MAX_DIFF
    assert max_diff(in_treelora, expected) <= MAX_DIFF
    original = lora_layers(model)
    assert [layer.frozen_rank for layer in layers] == [layer.frozen_rank for layer in original] == [8, 0, 0, 0, 0]
    for new, old in zip(layers, original):
        assert (new.r, new.lora_alpha, new.use_rslora, new.lora_dropout) == (
            old.r,
            old.lora_alpha,
            old.use_rslora,
            old.lora_dropout,
        )
        assert torch.equal(new.lora_A, old.lora_A) and torch.equal(new.frozen_B, old.frozen_B)


def test_load_into_existing_layers_and_modules_to_save(tmp_path):
    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["qkv"], modules_to_save=["head"], use_rslora=True)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    randomize_peft_adapters(peft_model)
    with torch.no_grad():
        peft_model.base_model.model.head.modules_to_save["default"].weight.mul_(3.0)
    peft_model.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    layers = inject_lora(model, ["qkv"], r=3)
    assert load_adapter(model, tmp_path) == layers
    assert layers[0].use_rslora and layers[0].lora_alpha == 6
    assert torch.equal(model.head.weight, peft_model.base_model.model.head.modules_to_save["default"].weight)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(model(x), peft_model(x)) <= MAX_DIFF
    out = tmp_path / "again"
    save_adapter(model, out, modules_to_save=["head"])
    again = PeftModel.from_pretrained(copy.deepcopy(base), out)
    with torch.no_grad():
        assert max_diff(again(x), peft_model(x)) <= MAX_DIFF


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_get_peft_model_with_registered_layer_matches_stock_peft(case):
    base, stock, _ = peft_and_treelora(case, r=4, lora_alpha=8)
    config = treelora_peft.register(LoraConfig(r=4, lora_alpha=8, target_modules=list(case.targets)))
    fused = get_peft_model(copy.deepcopy(base), config)
    fused.load_state_dict(stock.state_dict())
    kinds = {type(m) for m in fused.modules() if hasattr(m, "lora_A")}
    assert kinds == {treelora_peft.PeftLoRALinear}
    x = case.make_input()
    grads = []
    for model in (stock, fused):
        xi = x.clone().requires_grad_(True)
        out = case.run(model, xi)
        out.square().sum().backward()
        adapter_grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
        grads.append((out, xi.grad, adapter_grads))
    (out_s, dx_s, g_s), (out_f, dx_f, g_f) = grads
    worst = max([max_diff(out_f, out_s), max_diff(dx_f, dx_s)] + [max_diff(a, b) for a, b in zip(g_f, g_s)])
    print(f"{case.name}: registered layer vs stock PEFT, worst diff {worst:.2e} over {len(g_s)} adapter grads")
    assert len(g_f) == len(g_s) > 0 and worst <= MAX_DIFF


def test_global_registration_builds_fused_layers_for_from_pretrained(tmp_path, registered_globally):
    assert treelora_peft.is_registered()
    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["qkv"]))
    assert isinstance(stock.base_model.model.blocks[0].attn.qkv, treelora_peft.PeftLoRALinear)
    randomize_peft_adapters(stock)
    stock.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(loaded.base_model.model.blocks[1].attn.qkv, treelora_peft.PeftLoRALinear)
    treelora_peft.unregister()
    assert not treelora_peft.is_registered()
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert not isinstance(plain.base_model.model.blocks[1].attn.qkv, treelora_peft.PeftLoRALinear)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(loaded(x), plain(x)) <= MAX_DIFF
        with loaded.disable_adapter():
            assert max_diff(loaded(x), base(x)) <= MAX_DIFF
        merged = loaded.merge_and_unload()
        assert max_diff(merged(x), plain(x)) <= MAX_DIFF


def test_registered_layer_falls_back_to_peft_for_variants():
    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    dora = LoraConfig(r=2, target_modules=["qkv"], use_dora=True)
    stock = get_peft_model(copy.deepcopy(base), copy.deepcopy(dora))
    randomize_peft_adapters(stock)
    fused = get_peft_model(copy.deepcopy(base), treelora_peft.register(dora))
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert max_diff(fused(x), stock(x)) <= MAX_DIFF


def test_load_errors_name_the_problem(tmp_path):
    torch.manual_seed(0)
    base = TimmStyleViT().eval()
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["qkv"]))
    stock.save_pretrained(tmp_path / "r4")
    wrong_rank = copy.deepcopy(base)
    inject_lora(wrong_rank, ["qkv"], r=8)
    with pytest.raises(ValueError, match="trainable rank is 4.*r=8: mismatched shapes"):
        load_adapter(wrong_rank, tmp_path / "r4")
    assert all(layer.r == 8 for layer in lora_layers(wrong_rank))
    narrow = TimmStyleViT(dim=16)
    with pytest.raises(ValueError, match=r"\(in, out\) = \(32, 96\).*\(16, 48\): mismatched shapes"):
        load_adapter(narrow, tmp_path / "r4")
    assert not lora_layers(narrow)  # nothing changed
    with pytest.raises(ValueError, match="module 'blocks.2.attn.qkv', which"):
        deep = get_peft_model(TimmStyleViT(depth=3), LoraConfig(r=4, target_modules=["qkv"]))
        deep.save_pretrained(tmp_path / "deep")
        load_adapter(copy.deepcopy(base), tmp_path / "deep")
    extra = copy.deepcopy(base)
    inject_lora(extra, ["qkv", "fc2"], r=4)
    with pytest.raises(ValueError, match="does not cover"):
        load_adapter(extra, tmp_path / "r4")
    assert len(load_adapter(extra, tmp_path / "r4", strict=False)) == 2
    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["qkv"], use_dora=True)).save_pretrained(
        tmp_path / "dora"
    )
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(copy.deepcopy(base), tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(copy.deepcopy(base), tmp_path / "missing")
    with pytest.raises(ValueError, match="bare LoRALinear"):
        save_adapter(LoRALinear(nn.Linear(4, 4), r=2), tmp_path / "bare")
    with pytest.raises(ValueError, match="no treelora.nn.LoRALinear"):
        save_adapter(copy.deepcopy(base), tmp_path / "none")
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        treelora_peft.register({"r": 4})


def test_peft_is_imported_only_when_used(monkeypatch):
    code = (
        "import sys, torch, treelora.nn, treelora.peft\n"
        "m = treelora.nn.inject_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), ['0'], r=2)\n"
        "assert 'peft' not in sys.modules, 'peft imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "peft", None)  # as if peft were not installed
    with pytest.raises(ImportError, match=r"pip install 'treelora\[peft\]'"):
        treelora_peft.register()
