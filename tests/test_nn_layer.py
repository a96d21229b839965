"""treelora.nn.LoRALinear and inject_lora: equal to PEFT's LoRA layer on the same weights, merge/unmerge, the frozen
stack, disabled adapters, dropout statistics and the errors bad inputs get."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from tests.tiny_models import CASE_IDS, CASES, TimmStyleViT, peft_and_treelora
from treelora.nn import LoRALinear, disable_adapters, inject_lora, lora_layers, merge_and_unload, unload

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

MAX_DIFF = 1e-5  # fp32: treelora vs PEFT on the same weights


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def _forward_backward(case, model, x):
    x = x.clone().requires_grad_(True)
    out = case.run(model, x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    return out, x.grad


@pytest.mark.parametrize("train", [False, True], ids=["eval-p0.1", "train-p0"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_outputs_and_gradients_equal_peft(case, train):
    dropout = 0.0 if train else 0.1  # train mode only with p = 0, so both sides are deterministic
    base, peft_model, model = peft_and_treelora(case, lora_dropout=dropout)
    peft_model.train(train)
    model.train(train)
    x = case.make_input()
    with torch.no_grad():
        assert max_diff(case.run(model, x), case.run(base, x)) > 1e-3  # the adapters are active
    out_p, dx_p = _forward_backward(case, peft_model, x)
    out_t, dx_t = _forward_backward(case, model, x)
    diffs = {"output": max_diff(out_t, out_p), "dx": max_diff(dx_t, dx_p)}
    inner = peft_model.base_model.model
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear):
            ref = inner.get_submodule(name)
            diffs[f"{name}.dA"] = max_diff(layer.lora_A.grad, ref.lora_A["default"].weight.grad)
            diffs[f"{name}.dB"] = max_diff(layer.lora_B.grad, ref.lora_B["default"].weight.grad)
    worst = max(diffs, key=diffs.get)
    print(f"{case.name}: worst {worst} = {diffs[worst]:.2e} over {len(diffs)} tensors")
    assert diffs[worst] <= MAX_DIFF, diffs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_merged_forward_equals_unmerged(case):
    _, _, model = peft_and_treelora(case)
    x = case.make_input()
    layers = lora_layers(model)
    weights = [layer.base.weight.detach().clone() for layer in layers]
    with torch.no_grad():
        unmerged = case.run(model, x)
        for layer in layers:
            layer.merge()
        merged = case.run(model, x)
        saved_B = [layer.lora_B.detach().clone() for layer in layers]
        for layer in layers:
            layer.lora_B.zero_()  # a merged layer must not read its adapter any more
        merged_again = case.run(model, x)
        for layer, B in zip(layers, saved_B):
            layer.lora_B.copy_(B)
            layer.unmerge()
        restored = case.run(model, x)
    print(f"{case.name}: merged vs unmerged max diff {max_diff(merged, unmerged):.2e}")
    assert max_diff(merged, unmerged) <= MAX_DIFF
    assert torch.equal(merged, merged_again)
    assert max_diff(restored, unmerged) <= MAX_DIFF
    assert all(max_diff(layer.base.weight, w) <= 1e-6 for layer, w in zip(layers, weights))


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_merge_and_unload_gives_plain_model_with_same_output(case):
    base, _, model = peft_and_treelora(case)
    lora_layers(model)[0].freeze_adapter()  # the frozen stack is merged too
    with torch.no_grad():
        lora_layers(model)[0].lora_B.normal_()
    x = case.make_input()
    with torch.no_grad():
        adapted = case.run(model, x)
        plain = merge_and_unload(model)
        assert not lora_layers(plain)
        assert set(plain.state_dict()) == set(base.state_dict())  # loads into the original architecture
        assert max_diff(case.run(plain, x), adapted) <= MAX_DIFF
    _, _, other = peft_and_treelora(case)
    lora_layers(other)[1].merge()
    with torch.no_grad():
        assert max_diff(case.run(unload(other), x), case.run(base, x)) <= MAX_DIFF


def test_unmerge_restores_weight_and_double_merge_warns():
    layer = LoRALinear(nn.Linear(16, 12), r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    w0 = layer.base.weight.detach().clone()
    delta = layer.delta_weight().detach()
    expected = (layer.lora_B.double() @ layer.lora_A.double()) * 2.0
    assert max_diff(delta, expected) <= 1e-6
    layer.merge()
    assert max_diff(layer.base.weight, w0.double() + expected) <= 1e-6
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    layer.unmerge()
    assert max_diff(layer.base.weight, w0) <= 1e-6
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_safe_merge_refuses_non_finite_adapter():
    layer = LoRALinear(nn.Linear(8, 8), r=2)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base.weight, w0) and not layer.merged


@pytest.mark.parametrize("case", [CASES[0], CASES[3]], ids=[CASE_IDS[0], CASE_IDS[3]])
def test_disable_adapters_gives_base_model(case):
    base, _, model = peft_and_treelora(case)
    x = case.make_input()
    with torch.no_grad():
        expected = case.run(base, x)
        adapted = case.run(model, x)
        lora_layers(model)[0].merge()
        with disable_adapters(model):
            disabled = case.run(model, x)
        after = case.run(model, x)
    assert max_diff(adapted, expected) > 1e-3  # the adapters do change the output
    assert max_diff(disabled, expected) <= MAX_DIFF
    assert max_diff(after, adapted) <= MAX_DIFF
    assert lora_layers(model)[0].merged and all(layer.adapters_enabled for layer in lora_layers(model))


def test_frozen_stack_output_is_sum_of_adapters_and_frozen_part_gets_no_gradient():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(24, 20), r=3, lora_alpha=6)
    nn.init.normal_(layer.lora_B)
    A1, B1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    x = torch.randn(9, 24)
    before = layer(x).detach()
    layer.freeze_adapter()
    assert layer.frozen_rank == 3
    assert max_diff(layer(x), before) <= 1e-6  # fresh B is zero: freezing changes nothing
    assert torch.count_nonzero(layer.lora_B) == 0
    nn.init.normal_(layer.lora_B)
    A2, B2 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    y = layer(x)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    xd = x.double()
    expected = (
        xd @ W.t() + b + 2.0 * ((xd @ A1.double().t()) @ B1.double().t() + (xd @ A2.double().t()) @ B2.double().t())
    )
    assert max_diff(y, expected) <= MAX_DIFF
    y.square().sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_A.grad.abs().sum() > 0
    assert layer.base.weight.grad is None
    opt.step()
    assert torch.equal(layer.frozen_A, A1) and torch.equal(layer.frozen_B, B1)
    assert not torch.equal(layer.lora_A.detach(), A2)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_state_dict_with_frozen_stack_loads_into_fresh_layer():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(10, 6), r=2)
    layer.freeze_adapter()
    layer.freeze_adapter()
    nn.init.normal_(layer.lora_B)
    fresh = LoRALinear(copy.deepcopy(layer.base), r=2)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.frozen_rank == 4
    x = torch.randn(5, 10)
    assert torch.equal(fresh(x), layer(x))


def test_scaling_alpha_defaults_and_rslora():
    assert LoRALinear(nn.Linear(4, 4), r=8).scaling == 1.0  # lora_alpha=None means alpha = r
    assert LoRALinear(nn.Linear(4, 4), r=8, lora_alpha=16).scaling == 2.0
    assert LoRALinear(nn.Linear(4, 4), r=16, lora_alpha=8, use_rslora=True).scaling == 8 / math.sqrt(16)
    assert LoRALinear(nn.Linear(4, 4), r=4, use_rslora=True).scaling == math.sqrt(4)


def test_init_is_kaiming_a_and_zero_b_and_base_frozen():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(300, 7), r=64)
    bound = 1 / math.sqrt(300)  # kaiming_uniform(a=sqrt(5)) on fan_in 300
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B) == 0
    assert not layer.base.weight.requires_grad and not layer.base.bias.requires_grad


def test_dtype_and_device_of_base_respected():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=4)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.frozen_A.dtype == torch.bfloat16
    assert layer.lora_A.device == base.weight.device
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = (
        x.double() @ base.weight.double().t()
        + base.bias.double()
        + (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    )
    assert max_diff(y, ref) <= 0.05 * max(1.0, ref.abs().max().item())
    fp32 = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), r=4, adapter_dtype=torch.float32)
    assert fp32.lora_A.dtype == torch.float32 and fp32(x).dtype == torch.bfloat16


def test_autocast_runs_in_autocast_dtype():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8), r=4)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected_dtype = nn.Linear(16, 8)(x).dtype
    assert y.dtype == expected_dtype == torch.bfloat16
    assert max_diff(y, layer(x)) <= 0.05


def test_dropout_statistics_and_mask_shared_by_forward_and_backward():
    # base weight 0, A = B = identity, scaling 1: the layer's output is exactly drop(x), and dx is mask / (1 - p).
    K, p = 128, 0.25
    base = nn.Linear(K, K, bias=False)
    layer = LoRALinear(base, r=K, lora_alpha=K, lora_dropout=p)
    with torch.no_grad():
        base.weight.zero_()
        layer.lora_A.copy_(torch.eye(K))
        layer.lora_B.copy_(torch.eye(K))
    x = (torch.rand(64, K) + 0.5).requires_grad_(True)  # no zeros, so a zero output entry means dropped
    y = layer(x)
    kept = y != 0
    rate = kept.double().mean().item()
    sd = math.sqrt(p * (1 - p) / kept.numel())
    print(f"keep rate {rate:.4f} (expected {1 - p}, sd {sd:.4f})")
    assert abs(rate - (1 - p)) < 5 * sd
    assert max_diff(y[kept], x[kept] / (1 - p)) <= 1e-6  # inverted-dropout scaling of kept entries
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, kept)  # backward used the forward's mask
    assert max_diff(x.grad[kept], torch.full_like(x.grad[kept], 1 / (1 - p))) <= 1e-6
    layer.eval()
    assert torch.equal(layer(x), x)  # no dropout in eval mode


def test_inject_returns_layers_shallowest_first_and_freezes_base():
    model = TimmStyleViT()
    names = [n for n, m in model.named_modules() if n.endswith(("qkv", "fc2"))]
    layers = inject_lora(model, ["qkv", "fc2"], r=4)
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == names
    assert layers == lora_layers(model)
    assert names == ["blocks.0.attn.qkv", "blocks.0.mlp.fc2", "blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{n}.{w}" for n in names for w in ("lora_A", "lora_B")]


def test_fused_qkv_is_one_layer():
    model = TimmStyleViT(dim=32)
    (layer,) = inject_lora(model, r"blocks\.0\.attn\.qkv", r=8, lora_alpha=16)
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)
    assert layer.lora_A.shape == (8, 32) and layer.lora_B.shape == (96, 8)


def test_lora_depth_keeps_first_k():
    model = TimmStyleViT(depth=3)
    layers = inject_lora(model, ["qkv"], r=2, lora_depth=2)
    assert len(layers) == 2
    assert isinstance(model.blocks[1].attn.qkv, LoRALinear) and not isinstance(model.blocks[2].attn.qkv, LoRALinear)


def test_module_registered_twice_is_wrapped_once():
    shared = nn.Linear(6, 6)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    layers = inject_lora(model, ["0", "2"], r=2)
    assert len(layers) == 1 and model[0] is model[2] is layers[0]


def test_bad_inputs_raise_errors_naming_the_problem():
    with pytest.raises(ValueError, match="r must be >= 1"):
        LoRALinear(nn.Linear(4, 4), r=0)
    with pytest.raises(TypeError, match="r must be an int"):
        LoRALinear(nn.Linear(4, 4), r=2.5)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(nn.Linear(4, 4), r=2, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_alpha"):
        LoRALinear(nn.Linear(4, 4), r=2, lora_alpha=float("nan"))
    with pytest.raises(TypeError, match="base must be a torch.nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)

    class Quantized(nn.Linear):
        def forward(self, x):
            return super().forward(x.round())

    with pytest.raises(TypeError, match="own forward"):
        LoRALinear(Quantized(4, 4), r=2)
    model = TimmStyleViT()
    with pytest.raises(ValueError, match="r must be >= 1"):
        inject_lora(model, ["qkv"], r=0)
    with pytest.raises(ValueError, match=r"matched no module.*blocks\.0\.attn\.qkv"):
        inject_lora(model, ["q_proj"], r=4)
    with pytest.raises(TypeError, match=r"'patch_embed\.proj'.*must be a torch\.nn\.Linear, got Conv2d"):
        inject_lora(model, ["proj"], r=4)
    with pytest.raises(ValueError, match="lora_depth=9 but"):
        inject_lora(model, ["qkv"], r=4, lora_depth=9)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        inject_lora(model, "blocks.(", r=4)
    with pytest.raises(ValueError, match="target_modules is empty"):
        inject_lora(model, [], r=4)
    assert not lora_layers(model)  # failed calls changed nothing
    inject_lora(model, ["qkv"], r=4)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, ["qkv"], r=4)
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="MultiheadAttention"):
        inject_lora(mha, ["out_proj"], r=2)
    with pytest.raises(ValueError, match="no treelora.nn.LoRALinear"):
        with disable_adapters(nn.Linear(2, 2)):
            pass
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.freeze_adapter()


def _layer_grads(layer, x, dy):
    x = x.detach().clone().requires_grad_(True)
    layer.lora_A.grad = layer.lora_B.grad = None
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_layer_on_each_gpu_backend_within_twice_torch_error(backend, dtype):
    from tests.utils import assert_close_to_ref
    from treelora import backends, use_backend
    from treelora.ops import lora_linear_ref

    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 192, device="cuda", dtype=dtype), r=8, lora_alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
        layer.freeze_adapter()
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(3, 37, 256, device="cuda", dtype=dtype)
    dy = torch.randn(3, 37, 192, device="cuda", dtype=dtype)
    A_all, B_all = layer.adapter_weights()
    why = backends.backends_for("lora_linear")[backend].reasons(
        x, layer.base.weight, layer.base.bias, A_all, B_all, layer.scaling, 0.0, layer.frozen_rank
    )
    if why:
        pytest.skip(f"{backend}: " + "; ".join(why))
    with use_backend(backend):
        got = _layer_grads(layer, x, dy)

    def reference(precision):
        W, b = layer.base.weight.to(precision), layer.base.bias.to(precision)
        xr = x.to(precision).requires_grad_(True)
        A = torch.cat([layer.frozen_A, layer.lora_A]).detach().to(precision).requires_grad_(True)
        B = torch.cat([layer.frozen_B, layer.lora_B], dim=1).detach().to(precision).requires_grad_(True)
        y = lora_linear_ref(xr, W, b, A, B, layer.scaling, frozen_rank=layer.frozen_rank)
        y.backward(dy.to(precision))
        f = layer.frozen_rank
        return y.detach(), xr.grad, A.grad[f:], B.grad[:, f:]

    ref64, baseline = reference(torch.float64), reference(dtype)
    for name, g, e, base in zip(("y", "dx", "dA", "dB"), got, ref64, baseline):
        assert_close_to_ref(f"{backend} {name}", g, e, baseline=base, dtype=dtype)
