"""treelora.peft against stock PEFT, side by side, where the two could part: compiled hotswap, hooks on the base layer,
accelerate offloading, fan_in_fan_out, save/load of a registered config, dtype mismatches, what the layer shows
itself as, and fp32 adapters on bf16 activations.

Every test builds the same tiny model twice (stock PEFT and registered), gives both the same adapter weights, and
compares outputs, gradients, warnings and errors; a spy on the fused op says which path each call took, so a test
cannot pass by treelora silently never running.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import warnings
from contextlib import contextmanager

import pytest
import torch
import torch.nn as nn

from tests.tiny_models import randomize_peft_adapters, tiny_llama

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402  (after the importorskip above)
from peft.tuners.lora import layer as lora_layer  # noqa: E402

import treelora  # noqa: E402
import treelora.peft as treelora_peft  # noqa: E402
from treelora import backends  # noqa: E402

EXACT = 1e-5  # fp32: both paths compute the same sums in a different order
BF16_UNIT_ROUNDOFF = 2.0**-8  # bf16 keeps 8 significant bits: rounding moves a value by at most |v| / 2^8


class MLP(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lin0 = nn.Linear(16, 24, dtype=dtype)
        self.lin1 = nn.Linear(24, 8, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(torch.relu(self.lin0(x)))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()


def pair(base: nn.Module, seed: int = 3, **config_kwargs) -> tuple[nn.Module, nn.Module]:
    """(stock PEFT model, registered PEFT model) over copies of ``base`` with identical random adapters."""
    config = dict(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]) | config_kwargs
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(**config))
    randomize_peft_adapters(stock, seed=seed)
    fused = get_peft_model(copy.deepcopy(base), treelora_peft.register(LoraConfig(**config)))
    fused.load_state_dict(stock.state_dict())
    assert fused_layers(fused) and not fused_layers(stock)
    return stock, fused


def fused_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, treelora_peft.PeftLoRALinear)]


@pytest.fixture
def fused_calls(monkeypatch):
    """How many times the registered layers took the fused path."""
    calls = []
    original = treelora_peft.fused_lora_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(treelora_peft, "fused_lora_forward", spy)
    return calls


def test_plain_call_is_fused_and_matches_stock(fused_calls):
    stock, fused = pair(MLP())
    x = torch.randn(5, 16)
    xs, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_s, out_f = stock(xs), fused(xf)
    out_s.square().sum().backward()
    out_f.square().sum().backward()
    assert len(fused_calls) == 2  # both targets fused
    grads = [
        (p.grad, q.grad)
        for (n, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters())
        if p.grad is not None
    ]
    worst = max([max_diff(out_f, out_s), max_diff(xf.grad, xs.grad)] + [max_diff(g, h) for g, h in grads])
    print(f"plain call: worst diff {worst:.2e} over output, dx and {len(grads)} adapter grads")
    assert len(grads) == 4 and worst <= EXACT


# --- what users see --------------------------------------------------------------------------------------------------


def test_layer_shows_as_stock_lora_linear():
    stock, fused = pair(MLP())
    layer_s, layer_f = stock.base_model.model.lin0, fused.base_model.model.lin0
    assert type(layer_s) is lora_layer.Linear and type(layer_f) is not lora_layer.Linear
    assert isinstance(layer_f, lora_layer.Linear)
    for attribute in ("__name__", "__qualname__", "__module__"):
        assert getattr(type(layer_f), attribute) == getattr(type(layer_s), attribute), attribute
    assert repr(fused) == repr(stock)
    assert [s.module_type for s in fused.get_layer_status()] == [s.module_type for s in stock.get_layer_status()]
    assert {s.module_type for s in fused.get_layer_status()} == {"lora.Linear"}
    assert str(type(layer_f)) == str(type(layer_s)) == "<class 'peft.tuners.lora.layer.Linear'>"


def test_registered_model_pickles_and_deep_copies_as_fused(fused_calls):
    # The class carries stock's name, so pickle's by-name lookup alone would rebuild the stock class (or fail).
    _, fused = pair(MLP())
    x = torch.randn(3, 16)
    expected = fused(x)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    for again in (torch.load(buffer, weights_only=False), copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        assert len(fused_layers(again)) == 2
        before = len(fused_calls)
        assert max_diff(again(x), expected) == 0.0
        assert len(fused_calls) == before + 2


# --- compiled hotswap ----------------------------------------------------------------------------------------------


def test_compiled_hotswap_tensor_scaling_matches_stock(tmp_path, fused_calls):
    from peft.utils.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap

    torch.manual_seed(0)
    base = MLP().eval()
    # Two adapters with different ranks and alphas: the case prepare_model_for_compiled_hotswap exists for.
    for name, r, alpha, seed in (("first", 2, 4, 1), ("second", 6, 3, 2)):
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=alpha, target_modules=["lin0", "lin1"]))
        randomize_peft_adapters(model, seed=seed)
        model.save_pretrained(tmp_path / name)
    x = torch.randn(4, 16)
    outputs = {}
    for kind in ("stock", "fused"):
        if kind == "stock":
            model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "first")
        else:
            model = treelora_peft.from_pretrained(copy.deepcopy(base), tmp_path / "first")
        prepare_model_for_compiled_hotswap(model, target_rank=6)
        scalings = [m.scaling["default"] for m in model.modules() if isinstance(m, lora_layer.Linear)]
        assert all(isinstance(s, torch.Tensor) and s.dim() == 0 for s in scalings)
        with torch.no_grad():
            first = model(x)
            hotswap_adapter(model, str(tmp_path / "second"), adapter_name="default")
            outputs[kind] = (first, model(x))
    reference = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "second")
    with torch.no_grad():
        second = reference(x)
    (first_s, second_s), (first_f, second_f) = outputs["stock"], outputs["fused"]
    print(f"hotswap: before {max_diff(first_f, first_s):.2e}, after {max_diff(second_f, second_s):.2e}")
    assert max_diff(second_s, second) <= EXACT and max_diff(first_s, second_s) > 1e-3
    assert max_diff(first_f, first_s) <= EXACT and max_diff(second_f, second_s) <= EXACT
    assert len(fused_calls) == 4  # two layers, two calls, all fused with a tensor scaling


# --- hooks and offloading ------------------------------------------------------------------------------------------


def _hooked_run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Output and dx of ``model`` with a forward hook, a pre-hook that rescales the input, and a full backward hook
    on lin0's base layer, plus the order the hooks ran in."""
    events: list[str] = []
    base = model.base_model.model.lin0.base_layer
    handles = [
        base.register_forward_pre_hook(lambda m, args: (events.append("pre"), (args[0] * 2.0,))[1]),
        base.register_forward_hook(lambda m, args, out: (events.append("fwd"), out + 1.0)[1]),
        base.register_full_backward_hook(lambda m, gin, gout: events.append("bwd")),
    ]
    xi = x.clone().requires_grad_(True)
    out = model(xi)
    out.sum().backward()
    for handle in handles:
        handle.remove()
    return out, xi.grad, events


def test_base_layer_hooks_run_as_in_stock(fused_calls):
    stock, fused = pair(MLP())
    x = torch.randn(3, 16)
    out_s, dx_s, events_s = _hooked_run(stock, x)
    out_f, dx_f, events_f = _hooked_run(fused, x)
    assert events_s == events_f == ["pre", "fwd", "bwd"]
    assert len(fused_calls) == 1  # lin1 (no hooks) stays fused; lin0 runs PEFT's forward
    print(f"hooked base layer: output diff {max_diff(out_f, out_s):.2e}, dx diff {max_diff(dx_f, dx_s):.2e}")
    assert max_diff(out_f, out_s) <= EXACT and max_diff(dx_f, dx_s) <= EXACT
    fused(x)
    assert len(fused_calls) == 3  # hooks removed: both layers fused again


def test_global_module_hooks_see_the_base_layer_call(fused_calls):
    stock, fused = pair(MLP())
    x = torch.randn(3, 16)
    seen: dict[str, list[str]] = {}
    for kind, model in (("stock", stock), ("fused", fused)):
        names = {id(m): n for n, m in model.named_modules()}
        seen[kind] = []
        handle = nn.modules.module.register_module_forward_hook(
            lambda m, args, out, kind=kind, names=names: seen[kind].append(names.get(id(m), "?"))
        )
        try:
            model(x)
        finally:
            handle.remove()
    assert seen["fused"] == seen["stock"] and any(n.endswith("lin0.base_layer") for n in seen["stock"])
    assert not fused_calls


def test_accelerate_cpu_offload_matches_stock(fused_calls):
    from accelerate import cpu_offload

    stock, fused = pair(MLP())
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = stock(x)
        for model in (stock, fused):
            cpu_offload(model, execution_device=torch.device("cpu"))
        base = fused.base_model.model.lin0.base_layer
        assert base.weight.is_meta and hasattr(base, "_hf_hook")  # weights arrive only inside the hooked call
        out_s, out_f = stock(x), fused(x)
    print(f"cpu_offload: diff to stock {max_diff(out_f, out_s):.2e}")
    assert max_diff(out_s, before) <= EXACT and max_diff(out_f, out_s) <= EXACT
    assert not fused_calls


def test_meta_weight_without_hooks_behaves_like_stock(fused_calls):
    # A weight left on the meta device (low_cpu_mem_usage loading gone wrong): whatever torch's F.linear makes of it
    # (this torch returns an uninitialised CPU tensor, others raise), the registered layer must do the same.
    stock, fused = pair(MLP())
    for model in (stock, fused):
        layer = model.base_model.model.lin0
        layer.base_layer.weight = nn.Parameter(torch.empty_like(layer.base_layer.weight, device="meta"), False)
    x = torch.randn(3, 16)
    outcomes = []
    for model in (stock, fused):
        try:
            out = model(x)
            outcomes.append((tuple(out.shape), out.dtype, out.device))
        except Exception as err:  # noqa: BLE001 (comparing whatever stock does)
            outcomes.append((type(err), str(err)))
    assert outcomes[0] == outcomes[1]
    assert len(fused_calls) == 1  # lin1 only: lin0's weight is not materialised


# --- fan_in_fan_out ------------------------------------------------------------------------------------------------


@contextmanager
def recorded_warnings():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


@pytest.mark.parametrize("route", ["config", "global"])
def test_fan_in_fan_out_on_linear_is_reset_as_in_stock(route, fused_calls):
    torch.manual_seed(0)
    base = MLP().eval()
    stock_config = LoraConfig(r=4, target_modules=["lin0", "lin1"], fan_in_fan_out=True)
    with recorded_warnings() as caught_s:
        stock = get_peft_model(copy.deepcopy(base), stock_config)
    randomize_peft_adapters(stock)
    config = LoraConfig(r=4, target_modules=["lin0", "lin1"], fan_in_fan_out=True)
    if route == "config":
        treelora_peft.register(config)
    else:
        treelora_peft.register()
    try:
        with recorded_warnings() as caught_f:
            fused = get_peft_model(copy.deepcopy(base), config)
    finally:
        treelora_peft.unregister()
    fifo = [w for w in caught_s if "fan_in_fan_out" in str(w.message)]
    fifo_f = [w for w in caught_f if "fan_in_fan_out" in str(w.message)]
    assert len(fifo) == len(fifo_f) == 1 and fifo[0].category is fifo_f[0].category is UserWarning
    assert stock_config.fan_in_fan_out is config.fan_in_fan_out is False
    assert len(fused_layers(fused)) == 2 and not any(m.fan_in_fan_out for m in fused_layers(fused))
    fused.load_state_dict(stock.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad():
        out_s, out_f = stock(x), fused(x)
        assert len(fused_calls) == 2
        merged_s, merged_f = stock.merge_and_unload(), fused.merge_and_unload()
        weights = [max_diff(merged_f.get_parameter(n), p) for n, p in merged_s.named_parameters()]
        print(f"fan_in_fan_out ({route}): output diff {max_diff(out_f, out_s):.2e}, merged weights {max(weights):.2e}")
        assert max_diff(out_f, out_s) <= EXACT and max(weights) <= EXACT
        assert max_diff(merged_f(x), out_s) <= EXACT


# --- registration across save / load -------------------------------------------------------------------------------


def test_config_registration_round_trips_with_from_pretrained(tmp_path, fused_calls):
    torch.manual_seed(0)
    base = tiny_llama().eval()
    targets = ["q_proj", "v_proj"]
    stock = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    randomize_peft_adapters(stock)
    fused = get_peft_model(
        copy.deepcopy(base), treelora_peft.register(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    )
    fused.load_state_dict(stock.state_dict())
    stock.save_pretrained(tmp_path / "stock")
    fused.save_pretrained(tmp_path / "fused")
    # PEFT keeps no trace of the custom-module mapping in what it saves: the files are the same as stock's.
    config_s = json.loads((tmp_path / "stock" / "adapter_config.json").read_text())
    config_f = json.loads((tmp_path / "fused" / "adapter_config.json").read_text())
    assert config_f == config_s
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fused")
    assert not fused_layers(plain)  # hence the restoring call:
    loaded = treelora_peft.from_pretrained(copy.deepcopy(base), tmp_path / "fused")
    assert len(fused_layers(loaded)) == 4 and loaded.peft_config["default"].inference_mode is True
    trainable = treelora_peft.from_pretrained(copy.deepcopy(base), tmp_path / "fused", is_trainable=True)
    assert len(fused_layers(trainable)) == 4 and any(p.requires_grad for p in trainable.parameters())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = stock(inputs_embeds=x).logits
        got = loaded(inputs_embeds=x).logits
    print(f"from_pretrained of a registered save: diff to stock {max_diff(got, expected):.2e}")
    assert max_diff(got, expected) <= EXACT and len(fused_calls) == 4
    second = treelora_peft.from_pretrained(copy.deepcopy(base), tmp_path / "stock", adapter_name="other")
    assert len(fused_layers(second)) == 4 and second.active_adapter == "other"


def test_from_pretrained_rejects_other_adapter_types(tmp_path):
    from peft import IA3Config

    get_peft_model(MLP(), IA3Config(target_modules=["lin0"], feedforward_modules=[])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="loads LoRA adapters.*IA3"):
        treelora_peft.from_pretrained(MLP(), tmp_path)


# --- dtypes --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_dtype,x_dtype",
    [(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32-model-fp16-x", "fp32-model-bf16-x", "bf16-model-fp32-x"],
)
def test_dtype_mismatch_raises_like_stock(model_dtype, x_dtype, fused_calls):
    stock, fused = pair(MLP(model_dtype))
    x = torch.randn(3, 16, dtype=x_dtype)
    errors = []
    for model in (stock, fused):
        with pytest.raises(RuntimeError) as info:
            model(x)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert not fused_calls
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the mix is legal for both
        out_s, out_f = stock(x), fused(x)
    assert out_s.dtype == out_f.dtype and len(fused_calls) == 2
    # Two layers of bf16 matmuls, each side rounding up to ~6 times per layer: 16 unit roundoffs of the output scale.
    tol = 16 * BF16_UNIT_ROUNDOFF * max(1.0, out_s.abs().max().item())
    print(f"autocast bf16 with {x_dtype} input: diff {max_diff(out_f, out_s):.2e} (tol {tol:.2e})")
    assert max_diff(out_f, out_s) <= tol


def _backend_params() -> list:
    params = []
    for name in ("torch", "triton", "cuda"):
        marks = [] if name == "torch" else [pytest.mark.requires_cuda]
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.mark.parametrize("backend", _backend_params())
def test_fp32_adapters_on_bf16_activations_within_bf16_rounding(backend, fused_calls):
    """PEFT casts x to the fp32 adapters and computes the LoRA branch in fp32; treelora computes it in x's bf16
    (fp32 accumulation; the CPU torch backend in fp32). Both differ from the exact result only by bf16 roundings:

    * PEFT: the base output rounded to bf16, then the sum rounded to bf16: 2 roundings;
    * treelora (GPU worst case): A and B rounded to bf16, the r-wide intermediate rounded, the output rounded: 4.

    Each rounding moves a value by at most u = 2^-8 of its magnitude, and every intermediate is bounded elementwise by
    ``mag = |x| |W|ᵀ + |b| + s (|x| |A|ᵀ) |B|ᵀ`` (fp32 accumulation error is ~2^-24 K, negligible), so
    ``|fused - peft| <= (2 + 4) u mag``.
    """
    device = "cuda" if backend != "torch" else "cpu"
    torch.manual_seed(0)
    base = MLP(torch.bfloat16).to(device)
    stock, fused = pair(base)
    layer = fused.base_model.model.lin0
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    why = backends.backends_for("lora_linear")[backend].reasons(
        torch.empty(2, 16, dtype=torch.bfloat16, device=device),
        layer.base_layer.weight,
        layer.base_layer.bias,
        layer.lora_A["default"].weight,
        layer.lora_B["default"].weight,
        layer.scaling["default"],
        0.0,
        0,
    )
    if why:
        pytest.skip(f"{backend} cannot run this input: {'; '.join(why)}")
    x = torch.randn(64, 16, dtype=torch.bfloat16, device=device)
    stock_layer = stock.base_model.model.lin0
    with torch.no_grad(), treelora.use_backend(backend):
        out_s, out_f = stock_layer(x), layer(x)
    assert len(fused_calls) == 1 and out_f.dtype == out_s.dtype == torch.bfloat16
    W, b = (t.double() for t in (layer.base_layer.weight, layer.base_layer.bias))
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    s = layer.scaling["default"]
    xd = x.double()
    exact = xd @ W.T + b + s * (xd @ A.T) @ B.T
    mag = xd.abs() @ W.abs().T + b.abs() + s * (xd.abs() @ A.abs().T) @ B.abs().T
    bound = 6 * BF16_UNIT_ROUNDOFF * mag
    diff = (out_f.double() - out_s.double()).abs()
    err_f, err_s = (out_f.double() - exact).abs(), (out_s.double() - exact).abs()
    print(
        f"{backend}: |fused - peft| max {diff.max().item():.3e} mean {diff.mean().item():.3e}; vs exact: fused max "
        f"{err_f.max().item():.3e} mean {err_f.mean().item():.3e}, peft max {err_s.max().item():.3e} mean "
        f"{err_s.mean().item():.3e}; bound max {bound.max().item():.3e} (6 u |..|, u = 2^-8)"
    )
    assert bool((diff <= bound).all()), f"{int((diff > bound).sum())} entries beyond 6 bf16 roundings"
    assert bool((err_f <= 4 * BF16_UNIT_ROUNDOFF * mag).all())


def test_older_peft_is_refused_with_the_version_needed(monkeypatch):
    # PEFT < 0.16 keeps no lora_variant dict on its layers, which the fused path's routing reads.
    monkeypatch.setattr(peft, "__version__", "0.15.2")
    with pytest.raises(ImportError, match=r"treelora.peft needs peft >= 0.16, found 0.15.2"):
        treelora_peft.register()


def test_disabled_input_casting_behaves_like_stock(fused_calls):
    # peft.helpers.disable_input_dtype_casting: PEFT feeds bf16 x to the fp32 adapters uncast, and torch refuses.
    from peft.helpers import disable_input_dtype_casting

    stock, fused = pair(MLP(torch.bfloat16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    errors = []
    for model in (stock, fused):
        with disable_input_dtype_casting(model), pytest.raises(RuntimeError) as info:
            model(x)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and not fused_calls
    with torch.no_grad():
        out_s, out_f = stock(x), fused(x)  # casting on again: both run, treelora fused
    assert len(fused_calls) == 2 and out_f.dtype == out_s.dtype == torch.bfloat16
