"""TreeLoRA's per-step cost: a full training step against a plain LoRA step, and the bookkeeping alone.

Benchmarks (provider ``treelora-torch`` on CPU; on a GPU the ops pick their fastest backend):

* ``test_step_vs_plain_lora``: one training step (forward, TreeLoRA's before_backward, backward, after_backward,
  AdamW step) of a 6-layer BERT-sized encoder built from a ``BertConfig`` (hidden 768, 12 heads, seq 128; LoRA r = 8
  on query and value: L = 12 modules) with 10 past tasks in the bank, against the same step with the plain
  :class:`treelora.cl.SeqLoRA` on the same model, run back to back in alternating order; the
  target is on the median of the per-round ratios (medians of each are recorded too). Target: TreeLoRA's step <= 1.05x
  the plain step.
* ``test_bookkeeping_vs_past_tasks``: TreeLoRA's own work per step (select, observe the distances, regularizer
  forward and backward, gradient signature) with 1, 2 and 50 past tasks, alternated, at the BERT adapter shape
  (L = 12, in = 768) and at the Llama-2-7B one (L = 64, in = 4096). Target: equal within noise (ratio 50 / 1 <= 1.10).
  With one past task the paper's search has no tree to descend and skips the descent's dozen small ops, so 50 / 2
  (the same ops on a bigger bank) is recorded too; at the small shape a 1-task bank also stays in cache while the
  rows picked from a 50-task bank come from memory.
* ``test_bookkeeping_llama7b_shape``: the same bookkeeping at the Llama-2-7B adapter shape (L = 64 q/v modules,
  r = 8, in = 4096, 7 past tasks), with the ops it runs counted by ``torch.profiler`` (top-level aten ops on CPU;
  kernel launches on a GPU) and the host synchronisations counted. Reference, the released code at this shape
  (PAPER.md §7): 5L + 8 = 328 host syncs, about 1150 launches, about 61 ms per step on 2 CPU cores. For the official
  preset the same arithmetic written the released code's way (:class:`ReleasedBookkeeping`, provider
  ``eager-reference``) is timed side by side, since absolute CPU times on a shared 2-core machine drift a lot.

Run: ``python -m pytest bench/bench_treelora_step.py --benchmark-only -q -s`` (three to four minutes on a 2-core CPU).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import alternating_medians, record, synchronized
from torch import nn

from treelora.cl import ContinualMethod, GradientTree, SeqLoRA, TreeLoRA, TreeLoRAConfig
from treelora.nn import inject_lora

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
# The CPU targets are stated for 2 threads (the CI machines' core count). TREELORA_BENCH_THREADS (default 2) overrides
# it: on a 2-core machine shared with other jobs, 2 OpenMP threads wait on each other and a BERT step varies 2-6x
# between rounds, while 1 thread gives stable side-by-side ratios.
CPU_THREADS = int(os.environ.get("TREELORA_BENCH_THREADS", "2"))
RANK = 8
STEP_TARGET = 1.05
BOOKKEEPING_TARGET = 1.10
RELEASED_CODE = {"host_syncs": 328, "launches": 1150, "cpu_ms": 61.0}  # PAPER.md §7, L = 64

_skip_gpu = pytest.mark.skipif(not HAS_CUDA, reason="GPU shape: needs a CUDA GPU")
_skip_cpu = pytest.mark.skipif(HAS_CUDA, reason="CPU shape: run on a machine without a GPU")
BERT_SHAPES = [
    pytest.param({"batch": 2, "seq": 128}, marks=_skip_cpu, id="cpu-b2-s128"),
    pytest.param({"batch": 32, "seq": 128}, marks=_skip_gpu, id="gpu-b32-s128"),
]


@pytest.fixture(autouse=True, scope="module")
def _cpu_threads():
    if HAS_CUDA:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(before)


def _config(preset: str) -> TreeLoRAConfig:
    return TreeLoRAConfig.from_preset(preset)


def add_past_tasks(method: TreeLoRA, count: int, seed: int = 0) -> None:
    """Fill the bank with ``count`` random signatures (and snapshots) and build the tree, as after ``count`` tasks."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    L, D = method.bank.num_layers, method.bank.width
    for k in range(count):
        signature = torch.randn(L, D, generator=gen).to(DEVICE) * 1e-2
        snapshot = torch.randn(L, D, generator=gen).to(DEVICE) * 1e-2 if method.bank.keep_snapshots else None
        method.bank.add(signature, k, snapshot)
    cfg = method.config
    method.tree = GradientTree.from_signatures(
        method.bank.signatures,
        split=cfg.split,
        metric=cfg.metric,
        leaf_size=cfg.leaf_size,
        use_differences=cfg.use_differences,
    )


# --- full training step on a BERT-sized encoder ---------------------------------------------------------------------


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, hidden: int, classes: int = 4) -> None:
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(hidden, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(input_ids=ids).last_hidden_state[:, 0])


def bert_problem(batch: int, seq: int):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=768,
        num_attention_heads=12,
        num_hidden_layers=6,
        intermediate_size=3072,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = Classifier(BertModel(config, add_pooling_layer=False), 768).to(DEVICE)
    layers = inject_lora(model, ["query", "value"], r=RANK, lora_alpha=2 * RANK)
    model.head.requires_grad_(True)
    ids = torch.randint(0, config.vocab_size, (batch, seq), device=DEVICE)
    labels = torch.randint(0, 4, (batch,), device=DEVICE)
    return model, layers, ids, labels


def training_step(model: nn.Module, method: ContinualMethod, ids: torch.Tensor, labels: torch.Tensor):
    def run():
        loss = method.before_backward(F.cross_entropy(model(ids), labels))
        loss.backward()
        method.after_backward()
        method.step()

    return run


def paired_times(first: Callable[[], object], second: Callable[[], object], rounds: int) -> list[tuple[float, float]]:
    """(first, second) seconds per round, the two run back to back in alternating order: a drift in machine load
    between rounds (large on a shared 2-core machine, where one step takes seconds) cancels within each pair."""
    timed = [synchronized(first, DEVICE), synchronized(second, DEVICE)]
    pairs = []
    for i in range(rounds):
        seconds = [0.0, 0.0]
        for j in (0, 1) if i % 2 == 0 else (1, 0):
            t0 = time.perf_counter()
            timed[j]()
            seconds[j] = time.perf_counter() - t0
        pairs.append((seconds[0], seconds[1]))
    return pairs


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("shape", BERT_SHAPES)
def test_step_vs_plain_lora(benchmark, shape, preset):
    model, layers, ids, labels = bert_problem(**shape)
    plain = SeqLoRA(layers)
    plain.add_parameters(list(model.head.parameters()))
    tree_lora = TreeLoRA(layers, _config(preset))
    tree_lora.add_parameters(list(model.head.parameters()))
    add_past_tasks(tree_lora, 10)
    steps = 1000
    plain.begin_task(10, steps, 1)
    tree_lora.begin_task(10, steps, 1)
    plain_step = training_step(model, plain, ids, labels)
    tree_step = training_step(model, tree_lora, ids, labels)
    plain_step()
    tree_step()
    pairs = paired_times(plain_step, tree_step, rounds=11 if not HAS_CUDA else 30)
    medians = {"plain": statistics.median(p for p, _ in pairs), "treelora": statistics.median(t for _, t in pairs)}
    ratios = [t / p for p, t in pairs]
    ratio = statistics.median(ratios)
    record(
        benchmark,
        op="treelora_step",
        provider="treelora-torch" if not HAS_CUDA else "treelora",
        mode="step",
        dtype=torch.float32,
        model="bert-6x768",
        layers=len(layers),
        r=RANK,
        past_tasks=10,
        preset=preset,
        **shape,
    )
    benchmark.extra_info.update(
        median_s={k: round(v, 6) for k, v in medians.items()},
        ratio_of_medians=round(medians["treelora"] / medians["plain"], 4),
        paired_ratios=[round(r, 4) for r in ratios],
        treelora_over_plain=round(ratio, 4),
        target=STEP_TARGET,
        meets_target=ratio <= STEP_TARGET,
    )
    print(
        f"\n{preset}: TreeLoRA step {medians['treelora'] * 1e3:.1f} ms vs plain LoRA {medians['plain'] * 1e3:.1f} ms; "
        f"median paired ratio {ratio:.3f}x (target <= {STEP_TARGET}), ratio of medians "
        f"{medians['treelora'] / medians['plain']:.3f}x"
    )
    benchmark.pedantic(synchronized(tree_step, DEVICE), rounds=2, warmup_rounds=0)


# --- bookkeeping alone ----------------------------------------------------------------------------------------------


class AdapterOnly(nn.Module):
    """A LoRA layer's trainable part alone (A (r, in), B (out, r)): the bookkeeping never touches the base weight."""

    def __init__(self, r: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, in_features, device=DEVICE) / in_features**0.5)
        self.lora_B = nn.Parameter(torch.randn(out_features, r, device=DEVICE) * 1e-2)


def bookkeeping_problem(preset: str, num_layers: int, in_features: int, past_tasks: int):
    torch.manual_seed(0)
    layers = [AdapterOnly(RANK, in_features, in_features) for _ in range(num_layers)]
    method = TreeLoRA(layers, _config(preset))
    add_past_tasks(method, past_tasks)
    method.begin_task(past_tasks, 1000, 1)
    adapters = [layer.lora_A for layer in layers]
    zero = torch.zeros((), device=DEVICE)

    def run():
        loss = method.before_backward(zero)
        loss.backward()
        method.after_backward()
        for a in adapters:
            a.grad = None

    return method, run


@pytest.mark.parametrize("preset", ["paper", "official"])
@pytest.mark.parametrize("shape", [(12, 768), (64, 4096)], ids=["bert-L12-in768", "llama7b-L64-in4096"])
def test_bookkeeping_vs_past_tasks(benchmark, preset, shape):
    num_layers, in_features = shape
    _, one = bookkeeping_problem(preset, num_layers, in_features, 1)
    _, two = bookkeeping_problem(preset, num_layers, in_features, 2)
    _, fifty = bookkeeping_problem(preset, num_layers, in_features, 50)
    rounds = 60 if num_layers * in_features < 10**6 else 15
    medians = alternating_medians({"1": one, "2": two, "50": fifty}, rounds=rounds, warmup=3, device=DEVICE)
    ratio = medians["50"] / medians["1"]
    # A 1-task bank has no tree to descend (the search returns entry 0 in one op), so 50 / 1 includes the descent's
    # fixed cost; 50 / 2 compares two banks that run the same ops on tensors of different sizes.
    ratio_two = medians["50"] / medians["2"]
    record(
        benchmark,
        op="treelora_bookkeeping",
        provider="treelora-torch" if not HAS_CUDA else "treelora",
        mode="bookkeeping",
        dtype=torch.float32,
        layers=num_layers,
        r=RANK,
        in_features=in_features,
        preset=preset,
    )
    benchmark.extra_info.update(
        median_s={k: round(v, 7) for k, v in medians.items()},
        ratio_50_over_1=round(ratio, 4),
        ratio_50_over_2=round(ratio_two, 4),
        target=BOOKKEEPING_TARGET,
        meets_target=ratio <= BOOKKEEPING_TARGET,
    )
    print(
        f"\n{preset} at L={num_layers}, in={in_features}: bookkeeping with 1 past task {medians['1'] * 1e3:.3f} ms, "
        f"with 2 {medians['2'] * 1e3:.3f} ms, with 50 {medians['50'] * 1e3:.3f} ms: 50 / 1 {ratio:.3f}x "
        f"(target <= {BOOKKEEPING_TARGET}), 50 / 2 {ratio_two:.3f}x"
    )
    benchmark.pedantic(synchronized(fifty, DEVICE), rounds=5, warmup_rounds=1)


@contextmanager
def count_host_syncs():
    """Count ``Tensor.item`` / ``tolist`` / ``__bool__`` / ``__float__`` / ``__int__`` calls (each one a device
    synchronisation on a GPU), leaving out the similarity ops' bounds check that only runs for CPU tensors."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    counter = {"count": 0}

    def counting(name):
        original = saved[name]

        def wrapped(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            cpu_only_check = (
                name == "__bool__"
                and self.device.type == "cpu"
                and caller.co_name == "_validate"
                and caller.co_filename.replace("\\", "/").endswith("treelora/ops/similarity.py")
            )
            counter["count"] += not cpu_only_check
            return original(self, *args, **kwargs)

        return wrapped

    for name in names:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield counter
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


# Ops that only make a new view of existing memory (no kernel); autograd's unbind of the stacked adapters and its
# AccumulateGrad detach run one per layer, which is why they are reported apart.
VIEW_OPS = {
    "aten::" + name
    for name in (
        "select",
        "detach",
        "view",
        "as_strided",
        "reshape",
        "_reshape_alias",
        "unsqueeze",
        "squeeze",
        "expand",
        "slice",
        "alias",
        "t",
        "transpose",
        "permute",
        "unbind",
        "split",
        "narrow",
        "flatten",
    )
}


def count_ops(fn) -> dict[str, int]:
    """Ops one call runs: top-level aten ops, split into views and compute ops (a no-op ``aten::to`` counts as a
    view); on a GPU also the kernel launches and kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if HAS_CUDA:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
    events = prof.events()
    top = [
        e
        for e in events
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    ]

    def is_view(e) -> bool:
        no_op_to = e.name == "aten::to" and not any(c.name == "aten::_to_copy" for c in e.cpu_children)
        return e.name in VIEW_OPS or no_op_to

    out = {"aten_ops": len(top), "view_ops": sum(map(is_view, top))}
    out["compute_ops"] = out["aten_ops"] - out["view_ops"]
    if HAS_CUDA:
        out["kernel_launches"] = sum(
            e.name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel") for e in events
        )
        out["kernels"] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return out


class ReleasedBookkeeping:
    """The released code's per-micro-batch bookkeeping, restated from PAPER.md §1.2 (b), (d), (e) for timing only
    (provider ``eager-reference``): the accumulator adds the stacked A matrices L times, the sampler updates its
    statistics one layer at a time with ``.item()``, and the regularizer sums one inner product per layer."""

    def __init__(
        self, adapters: list[torch.Tensor], bank: torch.Tensor, left: list[int], factor: float, steps_per_epoch: int
    ) -> None:
        self.adapters, self.bank, self.left, self.factor = adapters, bank, left, factor
        self.T = steps_per_epoch
        k, L = bank.shape[:2]
        self.sim = torch.zeros(k, L, device=bank.device)
        self.pulls = torch.zeros(k, L, device=bank.device)
        self.current = None
        self.t = -1

    def __call__(self) -> None:
        self.t += 1
        lam = 0.5 * self.t / self.T
        stacked = torch.stack([a.reshape(-1) for a in self.adapters])
        for _ in range(stacked.shape[0]):  # the accumulation bug: the same sample added L times
            add = stacked.detach() / self.T
            self.current = add if self.current is None else self.current + add
        score = self.sim.clone()
        seen = self.pulls > 0
        score[seen] = score[seen] / self.pulls[seen]
        score -= (2 * self.pulls + 1e-5).rsqrt() * math.sqrt(math.log(2 * self.T * (self.t + 1) * (self.t + 2)))
        score = -score
        score += score.min()
        first = torch.multinomial(torch.softmax(score.sum(1), 0), 1).item()
        if first in self.left:
            score[self.left] *= self.factor
        score = score / (score.max() - score.min() + 1e-5)
        prev = torch.multinomial(torch.softmax(score, 0).T, 1).reshape(-1)
        self.pulls[prev, torch.arange(prev.shape[0], device=prev.device)] += 1
        for d, p in enumerate(prev):
            self.sim[p, d] -= (self.current[d] - self.bank[p][d]).abs().sum().item()
        reg = None
        for d, p in enumerate(prev):
            term = -(stacked[d] * self.bank[p][d]).sum()
            reg = term if reg is None else reg + term
        ce = torch.ones((), device=stacked.device)
        loss = ce - reg / (reg.detach() + 1e-5) * ce * lam
        loss.backward()
        for a in self.adapters:
            a.grad = None


@pytest.mark.parametrize("preset", ["paper", "official"])
def test_bookkeeping_llama7b_shape(benchmark, preset):
    L, in_features, past = 64, 4096, 7
    method, run = bookkeeping_problem(preset, L, in_features, past)
    for _ in range(2):
        run()
    with count_host_syncs() as syncs:
        run()
    ops = count_ops(run)
    sync_free = None
    if HAS_CUDA:
        torch.cuda.set_sync_debug_mode("error")
        try:
            run()
            sync_free = True
        except RuntimeError:
            sync_free = False
        finally:
            torch.cuda.set_sync_debug_mode("default")
    providers = {"bookkeeping": run}
    released_info = {}
    if preset == "official":
        adapters = [layer.lora_A for layer in method.layers]
        left, _ = method.tree.root_split()
        node = method.tree.nodes[method.tree.nodes[0].left]
        factor = 1.0 if node.is_leaf else min(node.threshold, 1.5)
        released = ReleasedBookkeeping(adapters, method.bank.signatures.clone(), left, factor, 1000)
        released()
        with count_host_syncs() as released_syncs:
            released()
        released_info = {
            "released_restatement_host_syncs": released_syncs["count"],
            **{f"released_restatement_{k}": v for k, v in count_ops(released).items()},
        }
        providers["eager-reference"] = released
    medians = alternating_medians(providers, rounds=15, warmup=2, device=DEVICE)
    if "eager-reference" in medians:
        released_info["released_restatement_median_ms"] = round(medians["eager-reference"] * 1e3, 3)
        released_info["treelora_over_released"] = round(medians["bookkeeping"] / medians["eager-reference"], 4)
    record(
        benchmark,
        op="treelora_bookkeeping",
        provider="treelora-torch" if not HAS_CUDA else "treelora",
        mode="bookkeeping",
        dtype=torch.float32,
        layers=L,
        r=RANK,
        in_features=in_features,
        past_tasks=past,
        preset=preset,
    )
    benchmark.extra_info.update(
        median_ms=round(medians["bookkeeping"] * 1e3, 3),
        host_syncs=syncs["count"],
        cuda_sync_free=sync_free,
        released_code_reference=RELEASED_CODE,
        **released_info,
        **ops,
    )
    print(
        f"\n{preset} at L={L}, r={RANK}, in={in_features}, {past} past tasks: "
        f"{medians['bookkeeping'] * 1e3:.2f} ms per step, {syncs['count']} host syncs, {ops} "
        f"(released code: {RELEASED_CODE}) {released_info}"
    )
    benchmark.pedantic(synchronized(run, DEVICE), rounds=10, warmup_rounds=1)
