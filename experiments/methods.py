"""Experiment-side methods: TreeLoRA with diagnostics, and selection rules that need knowledge the library does not
have (the task families).

``treelora-diag``
    :class:`DiagTreeLoRA`: TreeLoRA that also records, per task, what the diagnosis of the search needs: the L1 norms
    of the regularizer's and the task loss's parts of ``A.grad`` (the regularizer part obtained by differentiating the
    regularizer term alone, which touches only the stacked adapters), a check of that split against an exact
    task-loss gradient every ``check_every`` steps, the task-loss-only mean gradient of A and of B, the adapter
    snapshot (A and B), the pulls per (bank entry, layer) and the distances of the finished task's signature to every
    stored one. Tensors go to ``<dump>.pt``; scalars to the run's JSON line (``diagnostics``).
``treelora-greedy``
    :class:`GreedyTreeLoRA`: full-information selection: at every step, per layer, the bank entry closest to the
    current running signature (all entries compared at once), instead of the LCB bandit's one observed arm.
``treelora-agem``
    :class:`AGEMTreeLoRA`: a gradient-space regularizer in the spirit of the paper's Eq. 3: after backward, for every
    layer, the task gradient of A is projected so that it does not conflict with the selected task's stored gradient
    signature (A-GEM's rule with that task as the memory: when <g, G_k> < 0, g <- g - s <g, G_k> / |G_k|^2 G_k;
    s = ``agem_strength``, 1 = A-GEM's projection, s > 1 over-corrects toward G_k). ``agem_target="all"`` uses
    the mean of every stored signature instead of the selected one. Records the share of (step, layer) pairs in
    conflict and the mean |cos(g, G_k)|.
``treelora-first``
    TreeLoRA anchored to the first task's adapter at every layer (with ``search='last'`` in the library this isolates
    whether the anchor's choice among past tasks matters at all).
``seqlora-freeze-a``
    SeqLoRA that stops training every LoRA A after the first task (only B and nothing else learns afterwards): the
    limit of a very large A-only penalty toward a past adapter.
``treelora-oracle``
    TreeLoRA whose selection is, for every layer, the most recent earlier task of the current task's family (the
    family labels come from ``families=[...]``, one per stream position); a task without an earlier family member
    falls back to the most recent task.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from treelora.cl.config import TreeLoRAConfig
from treelora.cl.method import ContinualMethod, OptimizerConfig, adapter_parameters
from treelora.cl.regularizer import l1_regularized_loss, official_regularized_loss
from treelora.cl.treelora import TreeLoRA
from treelora.ops import pairwise_similarity
from treelora.ops.similarity import IS_DISTANCE


def _split(options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    options = dict(options)
    return options.pop("preset", "paper"), options


class DiagTreeLoRA(TreeLoRA):
    """TreeLoRA with the diagnostics described in the module docstring (slower: use for diagnosis runs only)."""

    name = "treelora"

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        dump: str | None = None,
        check_every: int = 25,
        **options: Any,
    ) -> None:
        preset, options = _split(options)
        super().__init__(layers, TreeLoRAConfig.from_preset(preset, **options), optimizer)
        self.dump, self.check_every = dump, check_every
        self.diagnostics: dict[str, list] = {
            "reg_l1": [],  # per task: mean over steps of ||dReg/dA||_1
            "task_l1": [],  # per task: mean over steps of ||dCE/dA||_1
            "ratio": [],  # per task: mean over steps of ||dReg/dA||_1 / ||dCE/dA||_1
            "split_check_max_abs_err": [],  # per task: max |(A.grad - dReg/dA) - dCE/dA| over the checked steps
            "split_check_scale": [],  # per task: max |dCE/dA| over the checked steps
            "pulls": [],  # per task: (bank entries, L) pull counts
            "final_costs": [],  # per task: (bank entries, L) metric(final signature, G_k) / spread
        }
        self.tensors: dict[str, list[torch.Tensor]] = {
            "sig_bank": [],
            "sig_task_A": [],
            "sig_task_B": [],
            "snap_A": [],
            "snap_B": [],
        }
        self._reg_grad: torch.Tensor | None = None
        self._ce_check: torch.Tensor | None = None

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        super().begin_task(task_id, steps_per_epoch, epochs)
        L = self.num_layers
        self._sum = {"reg": 0.0, "task": 0.0, "ratio": 0.0, "n": 0, "err": 0.0, "scale": 0.0}
        self._gA = torch.zeros(L, self._layout.width)
        self._gB: list[torch.Tensor] = [torch.zeros_like(adapter_parameters(layer)[1]) for layer in self.layers]
        self._nsteps = 0
        self._pulls = torch.zeros(max(len(self.bank), 1), L)

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        out = super().before_backward(loss)
        self._reg_grad, self._ce_check = None, None
        if out is not loss:
            self._reg_grad = self._regularizer_grad(loss)
            self._pulls[self.last_selection, torch.arange(self.num_layers)] += 1
            if self._nsteps % self.check_every == 0:
                exact = torch.autograd.grad(loss, self._adapters, retain_graph=True)
                self._ce_check = self._layout.stack(list(exact)).float()
        return out

    def _regularizer_grad(self, loss: torch.Tensor) -> torch.Tensor:
        """(L, D) gradient of the regularizer term alone w.r.t. the stacked adapters, at this step's selection and
        lambda (the regularizer reads only the adapters, so this needs no pass through the model)."""
        cfg = self.config
        self._t_epoch -= 1
        self._t_task -= 1
        lam = cfg.reg_lambda * self._warmup()
        self._t_epoch += 1
        self._t_task += 1
        leaf = self.stacked_adapters().detach().float().requires_grad_(True)
        zero = loss.detach().float()
        if cfg.regularizer == "official":
            targets = self.bank.gather(self.last_selection)
            reg = official_regularized_loss(zero, leaf, targets, lam, signed=cfg.official_signed)
        else:
            snapshots = self.bank.gather(self.last_selection, snapshots=True)
            reg = l1_regularized_loss(zero, leaf, snapshots, self._inv_widths, lam)
        (grad,) = torch.autograd.grad(reg, leaf)
        return grad

    def after_backward(self) -> None:
        total = self._stacked_grads()
        task = total if self._reg_grad is None else total - self._reg_grad
        s = self._sum
        task_l1 = float(task.abs().sum())
        s["task"] += task_l1
        s["n"] += 1
        if self._reg_grad is not None:
            reg_l1 = float(self._reg_grad.abs().sum())
            s["reg"] += reg_l1
            s["ratio"] += reg_l1 / max(task_l1, 1e-30)
        if self._ce_check is not None:
            s["err"] = max(s["err"], float((task - self._ce_check).abs().max()))
            s["scale"] = max(s["scale"], float(self._ce_check.abs().max()))
        self._gA += task
        for acc, layer in zip(self._gB, self.layers):
            B = adapter_parameters(layer)[1]
            if B.grad is not None:
                acc += B.grad.detach()
        self._nsteps += 1
        super().after_backward()

    def end_task(self) -> None:
        s, n = self._sum, max(self._sum["n"], 1)
        d = self.diagnostics
        d["reg_l1"].append(s["reg"] / n)
        d["task_l1"].append(s["task"] / n)
        d["ratio"].append(s["ratio"] / n)
        d["split_check_max_abs_err"].append(s["err"])
        d["split_check_scale"].append(s["scale"])
        d["pulls"].append(self._pulls.tolist() if len(self.bank) else [])
        if len(self.bank):
            costs = pairwise_similarity(self._acc, self.bank.signatures.float(), self.config.metric)
            costs = costs if IS_DISTANCE[self.config.metric] else -costs
            if self._scale is not None:
                costs = costs / self._scale
            d["final_costs"].append(costs.tolist())
        else:
            d["final_costs"].append([])
        sig = self._acc.clone()
        super().end_task()
        t = self.tensors
        t["sig_bank"].append(self.bank.signatures[-1].float().clone() if self.config.signature != "delta" else sig)
        t["sig_task_A"].append(self._gA / max(self._nsteps, 1))
        t["sig_task_B"].append(torch.cat([g.reshape(-1) for g in self._gB]) / max(self._nsteps, 1))
        t["snap_A"].append(
            torch.stack([adapter_parameters(layer)[0].detach().reshape(-1).clone() for layer in self.layers])
        )
        t["snap_B"].append(
            torch.cat([adapter_parameters(layer)[1].detach().reshape(-1).clone() for layer in self.layers])
        )
        if self.dump:
            torch.save({k: torch.stack(v) for k, v in t.items()}, self.dump)


class _FixedSearch:
    """A search that returns a precomputed (L,) selection every step and ignores the costs."""

    def __init__(self, selection: torch.Tensor) -> None:
        self.selection = selection
        self.t = 0

    def select(self) -> torch.Tensor:
        return self.selection

    def update(self, costs: torch.Tensor, selected: torch.Tensor | None = None) -> None:
        self.t += 1

    def reset(self) -> None:
        self.t = 0

    def state_dict(self) -> dict[str, Any]:
        return {"selection": self.selection.clone(), "t": self.t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.selection, self.t = state["selection"], state["t"]


class OracleTreeLoRA(TreeLoRA):
    """Selection by task family: the most recent earlier task of the same family (else the most recent task)."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        families: Sequence[int] = (),
        **options: Any,
    ) -> None:
        preset, options = _split(options)
        super().__init__(layers, TreeLoRAConfig.from_preset(preset, **options), optimizer)
        if not families:
            raise ValueError("treelora-oracle needs families=[family of each stream position]")
        self.families = list(families)

    def _make_search(self) -> Any:
        base = super()._make_search()
        if base is None:
            return None
        k = len(self.bank)
        same = [j for j in range(k) if self.families[j] == self.families[k]]
        entry = same[-1] if same else k - 1
        return _FixedSearch(torch.full((self.num_layers,), entry, dtype=torch.int64, device=self.device))


class GreedyTreeLoRA(DiagTreeLoRA):
    """Per step and layer, the bank entry nearest to the running signature (see the module docstring)."""

    def _make_search(self) -> Any:
        base = super()._make_search()
        if base is None:
            return None
        self._greedy = _FixedSearch(torch.full((self.num_layers,), len(self.bank) - 1, dtype=torch.int64))
        return self._greedy

    def _observe(self, sample: torch.Tensor) -> None:
        super()._observe(sample)
        if self.search is not None:
            costs = pairwise_similarity(self._acc, self.bank.signatures.float(), self.config.metric)
            costs = costs if IS_DISTANCE[self.config.metric] else -costs
            self._greedy.selection = costs.argmin(0)


class AGEMTreeLoRA(DiagTreeLoRA):
    """A-GEM-style projection of the A gradients against the selected tasks' stored gradients (module docstring)."""

    def __init__(
        self,
        layers: Sequence[nn.Module],
        optimizer: OptimizerConfig | None = None,
        agem_strength: float = 1.0,
        agem_target: str = "selected",
        **options: Any,
    ) -> None:
        options.setdefault("reg_lambda", 0.0)
        super().__init__(layers, optimizer, **options)
        if agem_target not in ("selected", "all"):
            raise ValueError(f"agem_target must be 'selected' or 'all', got {agem_target!r}")
        self.agem_strength, self.agem_target = float(agem_strength), agem_target
        self.diagnostics.update({"conflict_share": [], "mean_abs_cos": []})

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        super().begin_task(task_id, steps_per_epoch, epochs)
        self._agem = {"conflicts": 0, "pairs": 0, "abs_cos": 0.0}

    def after_backward(self) -> None:
        super().after_backward()
        if self.last_selection is None:
            return
        if self.agem_target == "all":
            ref = self.bank.signatures.float().mean(0)
        else:
            ref = self.bank.gather(self.last_selection).float()
        g = self._stacked_grads()
        dot = (g * ref).sum(1)
        norm2 = ref.square().sum(1).clamp_min(1e-30)
        conflict = dot < 0
        coef = torch.where(conflict, self.agem_strength * dot / norm2, torch.zeros_like(dot))
        new = g - coef[:, None] * ref
        cos = dot / (g.norm(dim=1) * norm2.sqrt()).clamp_min(1e-30)
        a = self._agem
        a["conflicts"] += int(conflict.sum())
        a["pairs"] += conflict.numel()
        a["abs_cos"] += float(cos.abs().sum())
        for l, A in enumerate(self._adapters):
            A.grad.copy_(new[l, : A.numel()].view_as(A))

    def end_task(self) -> None:
        a = self._agem
        self.diagnostics["conflict_share"].append(a["conflicts"] / max(a["pairs"], 1))
        self.diagnostics["mean_abs_cos"].append(a["abs_cos"] / max(a["pairs"], 1))
        super().end_task()


class FirstTreeLoRA(TreeLoRA):
    """Anchored to bank entry 0 (the first task's adapter) at every layer."""

    def __init__(self, layers: Sequence[nn.Module], optimizer: OptimizerConfig | None = None, **options: Any) -> None:
        preset, options = _split(options)
        super().__init__(layers, TreeLoRAConfig.from_preset(preset, **options), optimizer)

    def _make_search(self) -> Any:
        if super()._make_search() is None:
            return None
        return _FixedSearch(torch.zeros(self.num_layers, dtype=torch.int64, device=self.device))


class FreezeASeqLoRA(ContinualMethod):
    """Sequential fine-tuning with every LoRA A frozen after the first task."""

    name = "seqlora-freeze-a"

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        if task_id >= 1:
            for layer in self.layers:
                adapter_parameters(layer)[0].requires_grad_(False)
        super().begin_task(task_id, steps_per_epoch, epochs)


def make(name: str):
    """A trainer method factory ``(layers, optimizer, **options)`` for an experiment method name, or None."""
    table = {
        "treelora-diag": DiagTreeLoRA,
        "treelora-oracle": OracleTreeLoRA,
        "treelora-greedy": GreedyTreeLoRA,
        "treelora-agem": AGEMTreeLoRA,
        "treelora-first": FirstTreeLoRA,
        "seqlora-freeze-a": FreezeASeqLoRA,
    }
    cls = table.get(name)
    if cls is None:
        return None
    return lambda layers, optimizer, **options: cls(layers, optimizer, **options)
