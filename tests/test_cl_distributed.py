"""treelora.cl.distributed on 2 gloo processes (CPU): the one-collective gradient average against the single-process
gradient of the union batch (float64), identical TreeLoRA state on every rank and equal to a 1-process run on the
union batches, the fingerprint catching a perturbed bank, FSDP2 with a sharded base, the FSDP refusals, rank-0 writes,
and the sampler's 1-vs-N batches.

All 2-process scenarios run in ONE spawn of two workers (module fixture) to pay the start-up (about 3 s per process
on 2 cores) once; each scenario saves its results and the tests below compare them with references computed here.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from treelora.cl import TreeLoRA, TreeLoRAConfig
from treelora.cl.distributed import (
    DistributedContext,
    ShardedBatchSampler,
    StateMismatchError,
    UnsupportedParallelismError,
    all_reduce_gradients,
    broadcast_parameters,
    check_fsdp,
    check_identical_across_ranks,
    fully_shard_frozen,
    init_distributed,
    mean_across_ranks,
    method_fingerprints,
    run_on_main,
    save_on_main,
    shard,
    shutdown_distributed,
    state_fingerprint,
)
from treelora.nn import inject_lora

WORLD = 2
# Whole 2-process run (imports included) normally takes 10-20 s on a loaded 2-core machine.
SPAWN_TIMEOUT_S = 240
WIDTH, CLASSES, GLOBAL_BATCH, TASKS, STEPS = 12, 3, 8, 4, 4

CONFIGS = {
    "paper": TreeLoRAConfig.paper(),
    "official": TreeLoRAConfig.official(),
    "sparse": TreeLoRAConfig.paper(update_density=0.5),
}


# --- the model, data and loop shared by the workers and the 1-process references ------------------------------------


class Tiny(nn.Module):
    """Four tanh blocks (LoRA targets, L = 4, D = 4 * 12) and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(4))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def make_method(config: TreeLoRAConfig) -> tuple[nn.Module, TreeLoRA]:
    torch.manual_seed(0)
    model = Tiny().double()
    layers = inject_lora(model, r"blocks\.\d+", r=4, lora_alpha=8)
    method = TreeLoRA(layers, config)
    method.add_parameters(list(model.head.parameters()))
    return model, method


def task_batches(task: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Global batches of one task: labels from a random linear teacher per task."""
    gen = torch.Generator().manual_seed(100 + task)
    teacher = torch.randn(WIDTH, CLASSES, generator=gen, dtype=torch.float64)
    out = []
    for _ in range(STEPS):
        x = torch.randn(GLOBAL_BATCH, WIDTH, generator=gen, dtype=torch.float64)
        out.append((x, (x @ teacher).argmax(1)))
    return out


def run_stream(config: TreeLoRAConfig, rank: int, world: int, fsdp: bool = False) -> dict:
    """TreeLoRA driven by its hooks over TASKS tasks, each rank on its shard of every global batch, gradients averaged
    before after_backward(); the state is checked across ranks at every task end."""
    model, method = make_method(config)
    if fsdp:
        fully_shard_frozen(model, method)
    selections, trees, banks, fingerprints = [], [], [], []
    for task in range(TASKS):
        method.begin_task(task, STEPS, 1)
        method.begin_epoch(0)
        for x, y in task_batches(task):
            local = shard(list(range(len(x))), rank, world)
            loss = F.cross_entropy(model(x[local]), y[local])
            method.before_backward(loss).backward()
            all_reduce_gradients(method.parameters(), weight=len(local))
            method.after_backward()
            method.step()
            selections.append(None if method.last_selection is None else method.last_selection.tolist())
        method.end_task()
        fingerprints.append(check_identical_across_ranks(method, label=f"end of task {task}"))
        trees.append(method.tree.to_nested())
        banks.append(method.bank.signatures.clone())
    return {
        "selections": selections,
        "trees": trees,
        "banks": banks,
        "fingerprints": fingerprints,
        "params": [p.detach().clone() for p in method.parameters()],
        "method": method,
    }


class Heads(nn.Module):
    """A shared trunk and one head per task: an example of task t uses only head t (data-dependent use)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.trunk = nn.Linear(5, 4).double()
        self.heads = nn.ModuleList(nn.Linear(4, 3).double() for _ in range(3))

    def loss(self, x: torch.Tensor, y: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        per_example = [F.cross_entropy(self.heads[int(t)](h[i : i + 1]), y[i : i + 1]) for i, t in enumerate(task)]
        return torch.stack(per_example).mean()


def gradient_data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (n,), generator=gen)
    # Tasks 0 and 1 only: head 2 is never used. With the stride-2 shard of 5 examples, rank 0 holds 0, 2, 4 and
    # rank 1 holds 1, 3, so head 1 (examples 0 and 4) gets a gradient on rank 0 only.
    task = torch.tensor([1, 0, 0, 0, 1][:n])
    return x, y, task


def gradients(rank: int, world: int, n: int) -> list[torch.Tensor | None]:
    model = Heads()
    x, y, task = gradient_data(n)
    local = shard(list(range(n)), rank, world)
    if local:
        model.loss(x[local], y[local], task[local]).backward()
    all_reduce_gradients(list(model.parameters()), weight=len(local))
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


# --- the workers ----------------------------------------------------------------------------------------------------


def _scenarios(ctx: DistributedContext, out: Path) -> dict:
    rank, world = ctx.rank, ctx.world_size
    res: dict = {"context": (ctx.rank, ctx.world_size, ctx.backend, ctx.owns_process_group)}
    res["grads_uneven"] = gradients(rank, world, 5)
    res["grads_empty_shard"] = gradients(rank, world, 1)
    res["mean"] = float(mean_across_ranks(torch.tensor(float(rank + 1)), weight=rank + 1))
    p = nn.Parameter(torch.full((3, 2), float(rank)))
    broadcast_parameters([p])
    res["broadcast"] = p.detach().clone()

    for name, config in CONFIGS.items():
        result = run_stream(config, rank, world)
        method = result.pop("method")
        res[name] = result
    # A deliberately perturbed bank on rank 1 only: every rank must raise and name rank 1 and the bank.
    if rank == 1:
        method.bank._signatures[0, 0, 0] += 1e-3
    try:
        check_identical_across_ranks(method, label="the perturbation test")
        res["perturbed"] = None
    except StateMismatchError as exc:
        res["perturbed"] = str(exc)

    with warnings.catch_warnings():
        # FSDP2 warns that LoRALinear's output is a view (an in-place op on it would skip its hook); none follows.
        warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
        result = run_stream(CONFIGS["paper"], rank, world, fsdp=True)
        res["fsdp"] = {k: v for k, v in result.items() if k != "method"}
        from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

        model, method = make_method(CONFIGS["paper"])
        fully_shard(model)
        try:
            check_fsdp(method, model)
            res["fsdp_sharded_lora"] = None
        except UnsupportedParallelismError as exc:
            res["fsdp_sharded_lora"] = str(exc)
        model, method = make_method(CONFIGS["paper"])
        wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"), use_orig_params=True)
        try:
            check_fsdp(method, wrapped)
            res["fsdp1"] = None
        except UnsupportedParallelismError as exc:
            res["fsdp1"] = str(exc)

    save_on_main({"written_by": rank}, out / "main.pt")
    res["main_file_seen"] = torch.load(out / "main.pt")["written_by"]
    res["run_on_main_value"] = run_on_main(lambda: f"from rank {rank}")

    def fail() -> None:
        raise ValueError("disk full")

    try:
        run_on_main(fail)
        res["run_on_main_error"] = None
    except (ValueError, RuntimeError) as exc:
        res["run_on_main_error"] = f"{type(exc).__name__}: {exc}"
    return res


def _worker(rank: int, port: int, out: str, world: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.set_num_threads(1)
    ctx = init_distributed(device="cpu")
    try:
        results = _scenarios(ctx, Path(out))
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        shutdown_distributed(ctx)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("distributed")
    context = mp.start_processes(
        _worker, args=(_free_port(), str(out), WORLD), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {WORLD} gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --- tests: 2 processes ---------------------------------------------------------------------------------------------


def test_context_from_torchrun_environment(ranks):
    assert [r["context"] for r in ranks] == [(0, 2, "gloo", True), (1, 2, "gloo", True)]


@pytest.mark.parametrize("case, n", [("grads_uneven", 5), ("grads_empty_shard", 1)])
def test_gradient_all_reduce_equals_union_batch_gradient(ranks, case, n):
    """float64: the weighted average over ranks (3 + 2 examples; or 1 + 0, rank 1 running no backward) equals the
    gradient of the mean loss over the union batch; a head used on one rank only gets its gradient on both; a head
    used nowhere stays None."""
    model = Heads()
    model.loss(*gradient_data(n)).backward()
    reference = [None if p.grad is None else p.grad for p in model.parameters()]
    assert reference[-1] is None and reference[-2] is None  # head 2 unused
    for r in ranks:
        for got, ref in zip(r[case], reference):
            if ref is None:
                assert got is None
            else:
                err = (got - ref).abs().max().item()
                assert err <= 1e-14 * max(1.0, ref.abs().max().item()), err
    # Rank 1 never used head 1 (its examples are tasks 0 / none) yet holds the union gradient of head 1.
    assert reference[4] is not None and ranks[1][case][4] is not None


def test_mean_and_broadcast(ranks):
    for r in ranks:
        assert r["mean"] == pytest.approx((1 * 1 + 2 * 2) / 3, rel=1e-7)
        torch.testing.assert_close(r["broadcast"], torch.zeros(3, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_treelora_state_identical_across_ranks_and_equal_to_one_process(ranks, name):
    """Same seed, gradients averaged before after_backward(): every rank ends every task with bit-identical state
    (bank, tree, search, generator, running signature, moments, parameters), and the run equals one process on the
    union batches: the same trees, the same selection at every step, signatures and parameters equal to rounding."""
    r0, r1 = ranks[0][name], ranks[1][name]
    assert r0["fingerprints"] == r1["fingerprints"]
    assert "treelora.bank" in r0["fingerprints"][0] and "parameters" in r0["fingerprints"][0]
    single = run_stream(CONFIGS[name], rank=0, world=1)
    assert r0["trees"] == single["trees"]
    assert r0["selections"] == single["selections"]
    assert sum(s is not None for s in single["selections"]) == (TASKS - 1) * STEPS
    for got, ref in zip(r0["banks"], single["banks"]):
        err = (got - ref).abs().max().item()
        # fp32 signatures of averaged float64 gradients: the two runs differ only in the summation order of the
        # gradient (one batch of 8 vs 4 + 4), a few fp32 ulps.
        assert err <= 1e-5 * ref.abs().max().item(), err
    for got, ref in zip(r0["params"], single["params"]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_fingerprint_check_names_the_perturbed_rank_and_component(ranks):
    for r in ranks:
        message = r["perturbed"]
        assert message is not None
        assert "rank 1 differs from rank 0 in ['treelora.bank']" in message
        assert "the perturbation test" in message


def test_fsdp2_sharded_base_replicated_lora_matches_plain_run(ranks):
    """FSDP2 shards the frozen base, LoRA and head stay replicated: same states across ranks, the same trees and
    selections as without FSDP, parameters equal to rounding."""
    fsdp, plain = ranks[0]["fsdp"], ranks[0]["paper"]
    assert fsdp["fingerprints"] == ranks[1]["fsdp"]["fingerprints"]
    assert fsdp["trees"] == plain["trees"]
    assert fsdp["selections"] == plain["selections"]
    for got, ref in zip(fsdp["params"], plain["params"]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-9)


def test_fsdp_layouts_that_cannot_work_are_refused(ranks):
    for r in ranks:
        assert "sharded by FSDP2" in r["fsdp_sharded_lora"] and "ignored_params" in r["fsdp_sharded_lora"]
        assert "FSDP1 FullyShardedDataParallel" in r["fsdp1"] and "fully_shard_frozen" in r["fsdp1"]


def test_rank0_writes_and_errors_reach_every_rank(ranks):
    assert [r["main_file_seen"] for r in ranks] == [0, 0]
    assert [r["run_on_main_value"] for r in ranks] == ["from rank 0", "from rank 0"]
    assert ranks[0]["run_on_main_error"] == "ValueError: disk full"
    assert ranks[1]["run_on_main_error"] == "RuntimeError: rank 0 failed while writing: ValueError: disk full"


# --- tests: one process ---------------------------------------------------------------------------------------------


def test_single_process_context_and_noops(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.world_size, ctx.rank, ctx.backend, ctx.is_main, ctx.owns_process_group) == (1, 0, None, True, False)
    assert ctx.record(True) == {"world_size": 1, "backend": None, "state_identical_across_ranks": True}
    p = nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    all_reduce_gradients([p], weight=5)
    assert p.grad.tolist() == [3.0, 3.0]
    assert run_on_main(lambda: 4) == 4


def test_torchrun_environment_incomplete(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_PORT.*torchrun"):
        init_distributed(device="cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
        init_distributed(device="cpu")


def test_bad_arguments_named():
    p = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="params is empty"):
        all_reduce_gradients([])
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        all_reduce_gradients([p], weight=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        init_distributed(backend="mpi")
    with pytest.raises(ValueError, match="rank must be an int in"):
        shard([1, 2], 2, 2)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        ShardedBatchSampler(10, 0, rank=0, world_size=1)


def test_fingerprint_is_canonical_and_sensitive():
    model, method = make_method(CONFIGS["paper"])
    for task in range(2):
        method.begin_task(task, STEPS, 1)
        for x, y in task_batches(task):
            method.before_backward(F.cross_entropy(model(x), y)).backward()
            method.after_backward()
            method.step()
        method.end_task()
    state = method.state_dict()
    fp = method_fingerprints(method)
    assert fp == method_fingerprints(method)
    assert state_fingerprint(state) == state_fingerprint(dict(reversed(list(state.items()))))
    assert {"treelora.bank", "treelora.tree", "treelora.search", "treelora.generator", "treelora.acc"} <= set(fp)
    # One bit of one signature, one step of the generator, one search count: each changes only its component.
    method.bank._signatures[1, 2, 3] = torch.nextafter(method.bank._signatures[1, 2, 3], torch.tensor(1e9))
    changed = {k for k, v in method_fingerprints(method).items() if fp[k] != v}
    assert changed == {"treelora.bank"}
    torch.rand(1, generator=method.generator)
    changed = {k for k, v in method_fingerprints(method).items() if fp[k] != v}
    assert changed == {"treelora.bank", "treelora.generator"}
    assert state_fingerprint(torch.zeros(2)) != state_fingerprint(torch.zeros(2, dtype=torch.float64))
    assert state_fingerprint(torch.zeros(2)) != state_fingerprint(torch.zeros(1, 2))
    assert state_fingerprint([1, 2]) != state_fingerprint((1, 2))
    assert state_fingerprint(0.0) != state_fingerprint(-0.0)
    assert state_fingerprint(1) != state_fingerprint(True)
    with pytest.raises(TypeError, match="cannot fingerprint an object of type object"):
        state_fingerprint(object())


# --- the sampler's 1-vs-N story -------------------------------------------------------------------------------------


def _reference_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One process: DistributedSampler with one replica (its permutation is randperm(n) seeded with seed + epoch),
    batched by a DataLoader of batch size B."""
    sampler = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return [b.tolist() for b in DataLoader(range(n), batch_size=batch, sampler=sampler)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n, batch", [(24, 6), (25, 6), (13, 6), (7, 3)])
def test_sharded_sampler_gives_the_one_process_batches(world, n, batch):
    for epoch in (0, 1):
        reference = _reference_batches(n, batch, seed=3, epoch=epoch)
        per_rank = []
        for rank in range(world):
            sampler = ShardedBatchSampler(n, batch, rank=rank, world_size=world, seed=3)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert len(sampler) == len(reference)
        assert all(len(b) == len(reference) for b in per_rank)
        for step, global_batch in enumerate(reference):
            parts = [per_rank[r][step] for r in range(world)]
            assert sorted(i for part in parts for i in part) == sorted(global_batch)
            assert [len(p) for p in parts] == [len(global_batch[r::world]) for r in range(world)]


def test_sharded_sampler_drop_last():
    sampler = ShardedBatchSampler(13, 6, rank=1, world_size=2, drop_last=True)
    assert len(sampler) == 2 and [len(b) for b in sampler] == [3, 3]


def test_distributed_sampler_recipe_matches_when_the_size_is_a_multiple_of_the_batch():
    """The recipe with torch's own DistributedSampler: 2 replicas with batch B/2 union to the 1-replica batches of B
    when n is a multiple of B; otherwise its padding repeats examples and the last batches differ (use
    ShardedBatchSampler)."""

    def two_rank_batches(n: int, batch: int) -> list[list[int]]:
        loaders = []
        for rank in range(2):
            sampler = DistributedSampler(range(n), num_replicas=2, rank=rank, shuffle=True, seed=3)
            loaders.append([b.tolist() for b in DataLoader(range(n), batch_size=batch // 2, sampler=sampler)])
        return [sorted(a + b) for a, b in zip(*loaders)]

    reference = [sorted(b) for b in _reference_batches(24, 6, seed=3, epoch=0)]
    assert two_rank_batches(24, 6) == reference
    reference = [sorted(b) for b in _reference_batches(25, 6, seed=3, epoch=0)]
    assert two_rank_batches(25, 6) != reference
