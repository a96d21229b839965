"""TreeLoRA: layer-wise LoRA continual learning guided by a gradient-similarity tree (SPEC section 7).

Per task: the signature of the task is accumulated online from the adapters (``signature`` = grad / delta / param);
each step selects, per layer, one previous task with the search over the tree (LCB descent or the released code's
softmax sampler), observes the distance of the current running signature to the selected tasks' stored ones with one
gathered similarity call, and regularises the loss toward the selected tasks; the optimizer step can be sparse
(``update_density``). At the task's end its signature enters the bank and the tree is rebuilt.

Per training step the method makes no host synchronisation and no per-layer launches: the adapters are stacked into
one (L, D) tensor, the search is a fixed number of ops on small (L, tree nodes) tables whatever the depth, the
distances are one call of :func:`treelora.ops.accumulate_and_compare_` (or :func:`treelora.ops.pairwise_similarity`),
and the regularizer is a few tensor ops on the stacked adapters. About 60-70 compute ops per step whatever L and the
number of past tasks (bench/bench_treelora_step.py counts them).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from treelora import ops
from treelora.cl.bank import STORAGE_DTYPES, TaskBank
from treelora.cl.config import TreeLoRAConfig
from treelora.cl.method import ContinualMethod, OptimizerConfig, adapter_parameters
from treelora.cl.regularizer import (
    l1_regularized_loss,
    l1_regularizer_grad,
    official_regularized_loss,
    official_regularizer_grad,
)
from treelora.cl.search import LastSearch, LCBSearch, RandomSearch, SoftmaxSampler
from treelora.cl.tree import GradientTree
from treelora.ops.similarity import IS_DISTANCE


class _Layout:
    """Stacks per-module tensors (A matrices or their gradients) into one (L, D) tensor in a single op.

    Equal shapes are stacked directly; equal sizes are flattened then stacked; unequal sizes are concatenated and
    zero-padded to the widest module with one precomputed gather (zeros add nothing to any metric or penalty).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.shapes = [tuple(t.shape) for t in tensors]
        self.widths = [t.numel() for t in tensors]
        self.num_layers, self.width = len(tensors), max(self.widths)
        self.same_shape = len(set(self.shapes)) == 1
        self.same_width = len(set(self.widths)) == 1
        self.pad_index = None
        if not self.same_width:
            total = sum(self.widths)
            index = torch.full((self.num_layers, self.width), total, dtype=torch.int64)
            offset = 0
            for l, w in enumerate(self.widths):
                index[l, :w] = torch.arange(offset, offset + w)
                offset += w
            self.pad_index = index.reshape(-1).to(tensors[0].device)

    def stack(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        if self.same_shape:
            return torch.stack(list(tensors)).view(self.num_layers, self.width)
        flat = [t.reshape(-1) for t in tensors]
        if self.same_width:
            return torch.stack(flat)
        padded = torch.cat([*flat, flat[0].new_zeros(1)])
        return padded.index_select(0, self.pad_index).view(self.num_layers, self.width)


class TreeLoRA(ContinualMethod):
    """The TreeLoRA method on a list of LoRA layers.

    Args:
        layers: the LoRA layers, shallowest first: the list :func:`treelora.nn.inject_lora` returns, or PEFT LoRA
            layers (anything :func:`treelora.cl.adapter_parameters` understands). Layer l's signature width is
            D_l = r · in_features of its A matrix.
        config: :class:`TreeLoRAConfig` (default: the paper preset).
        optimizer: AdamW settings (:class:`treelora.cl.OptimizerConfig`).

    The hooks follow :class:`treelora.cl.ContinualMethod`'s calling order. ``before_backward`` selects one previous
    task per layer and returns the regularised loss; ``after_backward`` reads the gradients (``signature='grad'``);
    ``step`` is the (possibly sparse) AdamW step; ``end_task`` stores the signature and rebuilds the tree. Options that
    act per epoch (``signature_window='last_epoch'``, ``search_reset='epoch'``, ``lambda_warmup='epoch'``) rely on
    ``begin_epoch`` being called, as the trainer does. ``state_dict`` is taken between steps.

    Attributes:
        bank: the :class:`TaskBank` of finished tasks' signatures.
        tree: the :class:`GradientTree` over the bank (None before the first task ends).
        search: the current task's search (None on the first task or with ``regularizer='none'``).
        last_selection: (L,) int64 bank entries selected at the latest step (None when nothing was selected).
    """

    name = "treelora"
    label = "TreeLoRA"
    option_help = {
        "preset": "Starting point the other options override: 'paper' (default) or 'official' (the released code).",
        **TreeLoRAConfig.help(),
    }

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Names and values: ``preset`` plus any :class:`TreeLoRAConfig` field, checked by building the config."""
        super().check_options(options)
        cls._config_from_options(options)

    @classmethod
    def from_options(
        cls, layers: Sequence[nn.Module], optimizer: OptimizerConfig | None = None, **options: Any
    ) -> TreeLoRA:
        """``TreeLoRA(layers, TreeLoRAConfig.from_preset(preset, **other_options), optimizer)``."""
        super().check_options(options)
        return cls(layers, cls._config_from_options(options), optimizer=optimizer)

    @staticmethod
    def _config_from_options(options: Mapping[str, Any]) -> TreeLoRAConfig:
        rest = dict(options)
        return TreeLoRAConfig.from_preset(rest.pop("preset", "paper"), **rest)

    def __init__(
        self,
        layers: Sequence[nn.Module],
        config: TreeLoRAConfig | None = None,
        optimizer: OptimizerConfig | None = None,
    ) -> None:
        super().__init__(layers, optimizer)
        if config is None:
            config = TreeLoRAConfig.paper()
        if not isinstance(config, TreeLoRAConfig):
            raise TypeError(f"config must be a TreeLoRAConfig, got {type(config).__name__}")
        self.config = config
        if config.adapter == "stacked":
            missing = [type(layer).__name__ for layer in self.layers if not hasattr(layer, "freeze_adapter")]
            if missing:
                raise TypeError(
                    f"config.adapter='stacked' needs layers with freeze_adapter() "
                    f"(treelora.nn.LoRALinear); got {sorted(set(missing))}"
                )
        self._adapters = self._current_adapters()
        self.device = self._adapters[0].device
        self._layout = _Layout(self._adapters)
        L, D = self._layout.num_layers, self._layout.width
        self.bank = TaskBank(
            L,
            D,
            device=self.device,
            dtype=STORAGE_DTYPES[config.storage_dtype],
            keep_snapshots=config.keep_snapshots or config.regularizer == "l1",
            max_tasks=config.max_tasks,
            metric=config.metric,
        )
        self._inv_widths = 1.0 / torch.tensor(self._layout.widths, dtype=torch.float32, device=self.device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(config.seed)
        self.tree: GradientTree | None = None
        self.search: LCBSearch | SoftmaxSampler | RandomSearch | None = None
        self.last_selection: torch.Tensor | None = None
        self._reg_grad: torch.Tensor | None = None
        self._acc = torch.zeros(L, D, dtype=torch.float32, device=self.device)
        self._count = 0
        self._start: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        self._t_epoch = 0
        self._t_task = 0

    # --- adapters -------------------------------------------------------------------------------------------------

    def _current_adapters(self) -> list[torch.Tensor]:
        adapters = [adapter_parameters(layer)[0] for layer in self.layers]
        devices = {a.device for a in adapters}
        if len(devices) != 1:
            raise ValueError(f"all LoRA A matrices must be on one device, got {sorted(str(d) for d in devices)}")
        return adapters

    @property
    def num_layers(self) -> int:
        return self._layout.num_layers

    def stacked_adapters(self) -> torch.Tensor:
        """(L, D) the current A matrices, flattened and zero-padded, with autograd."""
        return self._layout.stack(self._adapters)

    def _stacked_grads(self) -> torch.Tensor:
        grads = [a.grad if a.grad is not None else torch.zeros_like(a) for a in self._adapters]
        return self._layout.stack(grads).float()

    # --- hooks ----------------------------------------------------------------------------------------------------

    def begin_task(self, task_id: int, steps_per_epoch: int, epochs: int) -> None:
        super().begin_task(task_id, steps_per_epoch, epochs)
        self._adapters = self._current_adapters()
        self._t_task = 0
        self._reset_accumulator()
        self._start = self.stacked_adapters().detach().float().clone() if self.config.signature == "delta" else None
        self.search = self._make_search()
        self._scale = self.bank.spread() if self.search is not None and self.config.normalize_distances else None
        self._start_epoch()

    def begin_epoch(self, epoch: int) -> None:
        super().begin_epoch(epoch)
        self._start_epoch()

    def before_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Select a previous task per layer, observe parameter-based signatures, return the regularised loss."""
        if self.task_id < 0:
            raise RuntimeError("call begin_task() before the first training step")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            got = f"shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss must be a 0-d tensor (the mean task loss), got {got}")
        cfg = self.config
        lam = cfg.reg_lambda * self._warmup()
        self._t_epoch += 1
        self._t_task += 1
        self.last_selection = self.search.select() if self.search is not None else None
        adapters = self.stacked_adapters() if cfg.signature != "grad" or self.search is not None else None
        if cfg.signature == "param":
            self._observe(adapters.detach().float())
        elif cfg.signature == "delta":
            self._observe(adapters.detach().float() - self._start)
        self._reg_grad = None
        if self.search is None:
            return loss
        # A grad signature averages the task loss's gradient: after backward, A.grad also holds the penalty's own
        # gradient (0.3-0.75x the task part in L1 on the class-incremental WordNet stream at lambda 2), which
        # after_backward subtracts in closed form.
        grad_needed = cfg.signature == "grad"
        if cfg.regularizer == "official":
            targets = self.bank.gather(self.last_selection)
            if grad_needed:
                self._reg_grad = official_regularizer_grad(
                    loss, adapters.float(), targets, lam, signed=cfg.official_signed
                )
            return official_regularized_loss(loss, adapters.float(), targets, lam, signed=cfg.official_signed)
        snapshots = self.bank.gather(self.last_selection, snapshots=True)
        if grad_needed:
            self._reg_grad = l1_regularizer_grad(adapters.float(), snapshots, self._inv_widths, lam)
        return l1_regularized_loss(loss, adapters.float(), snapshots, self._inv_widths, lam)

    def after_backward(self) -> None:
        """Observe gradient signatures (``signature='grad'``): the task loss's gradient, i.e. ``A.grad`` minus the
        regularizer's closed-form gradient."""
        if self.config.signature == "grad":
            grads = self._stacked_grads()
            if self._reg_grad is not None:
                grads = grads - self._reg_grad
            self._observe(grads)

    def step(self) -> None:
        """AdamW on the adapters (top-``update_density`` entries per tensor by |grad|) and densely on extra
        parameters, then zero the gradients."""
        density = self.config.update_density
        self._adamw_step(
            self.adapter_parameters(),
            density=density if density < 1.0 else None,
            dense_params=[p for p in self.extra if p.requires_grad],
        )

    def end_task(self) -> None:
        """Store the task's signature (and adapter snapshot), rebuild the tree; with ``adapter='stacked'`` freeze the
        adapter and start a fresh one."""
        cfg = self.config
        if cfg.signature == "delta":
            signature = self.stacked_adapters().detach().float() - self._start
            if cfg.scale_signature_by_layers:
                signature = signature * self.num_layers
        else:
            if self._count == 0:
                raise RuntimeError(
                    f"task {self.task_id} ended without an observed training step: its signature would be empty"
                )
            signature = self._acc.clone()
        snapshot = self.stacked_adapters().detach().float() if self.bank.keep_snapshots else None
        self.bank.add(signature, self.task_id, snapshot)
        self.tree = GradientTree.from_signatures(
            self.bank.signatures,
            split=cfg.split,
            metric=cfg.metric,
            leaf_size=cfg.leaf_size,
            use_differences=cfg.use_differences,
        )
        self.search = None
        self.last_selection = None
        if cfg.adapter == "stacked":
            old = {id(p) for p in self.adapter_parameters()}
            for layer in self.layers:
                layer.freeze_adapter()
            for key in old | {id(p) for p in self.adapter_parameters()}:
                self._moments.pop(key, None)
            self._adapters = self._current_adapters()

    def learned_tree(self) -> dict[str, Any] | None:
        """The gradient-similarity tree over the finished tasks (:meth:`GradientTree.to_nested`); None before the
        first task ends."""
        return None if self.tree is None else self.tree.to_nested()

    # --- internals ------------------------------------------------------------------------------------------------

    def _make_search(self) -> LCBSearch | SoftmaxSampler | RandomSearch | None:
        cfg = self.config
        if len(self.bank) == 0 or cfg.regularizer == "none":
            return None
        if cfg.search == "lcb":
            return LCBSearch(self.tree, self.num_layers, c=cfg.lcb_c, tie_break=cfg.tie_break, generator=self.generator)
        if cfg.search == "softmax":
            return SoftmaxSampler(
                self.tree,
                len(self.bank),
                self.num_layers,
                self.steps_per_epoch,
                generator=self.generator,
                device=self.device,
            )
        kind = LastSearch if cfg.search == "last" else RandomSearch
        return kind(len(self.bank), self.num_layers, generator=self.generator, device=self.device)

    def _reset_accumulator(self) -> None:
        self._acc.zero_()
        self._count = 0

    def _start_epoch(self) -> None:
        self._t_epoch = 0
        if self.config.signature_window == "last_epoch" and self.config.signature != "delta":
            self._reset_accumulator()
        if self.config.search_reset == "epoch" and self.search is not None:
            self.search.reset()

    def _warmup(self) -> float:
        """Linear λ ramp t / T, t the 0-based micro-batch index in the epoch or task."""
        mode = self.config.lambda_warmup
        if mode == "epoch":
            return self._t_epoch / self.steps_per_epoch
        if mode == "task":
            return min(1.0, self._t_task / (self.steps_per_epoch * self.epochs))
        return 1.0

    def _observe(self, sample: torch.Tensor) -> None:
        """Fold one (L, D) sample into the running signature and, when tasks were selected this step, feed the
        distances of the updated signature to the selected ones back to the search."""
        cfg = self.config
        factor = float(self.num_layers) if cfg.scale_signature_by_layers else 1.0
        selected = self.last_selection
        bank = self.bank.signatures
        distances = None
        self._count += 1
        if cfg.accumulator == "scaled_sum":
            self._acc.add_(sample, alpha=factor / self.steps_per_epoch)
            if selected is not None:
                distances = ops.pairwise_similarity(self._acc, bank, cfg.metric, index=selected)
        else:
            if factor != 1.0:
                sample = sample * factor
            # A delta is the accumulated update itself (count 1 replaces the query); the others are running means.
            count = 1 if cfg.signature == "delta" else self._count
            if selected is not None:
                distances = ops.accumulate_and_compare_(self._acc, sample, count, bank, selected, cfg.metric)
            else:
                self._acc.lerp_(sample, 1.0 / count)
        if distances is None:
            return
        costs = distances if IS_DISTANCE[cfg.metric] else -distances
        if self._scale is not None:
            costs = costs / self._scale
        self.search.update(costs)

    # --- state ----------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the stream exactly: the base method's counters and AdamW moments, the
        config, the bank, the tree, the search statistics, the generator and the running signature."""
        state = super().state_dict()
        state["treelora"] = {
            "config": self.config.to_dict(),
            "widths": list(self._layout.widths),
            "bank": self.bank.state_dict(),
            "tree": None if self.tree is None else self.tree.state_dict(),
            "search": None if self.search is None else self.search.state_dict(),
            "generator": self.generator.get_state(),
            "acc": self._acc.clone(),
            "count": self._count,
            "start": None if self._start is None else self._start.clone(),
            "scale": None if self._scale is None else self._scale.clone(),
            "t_epoch": self._t_epoch,
            "t_task": self._t_task,
            "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.epochs,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        own = state.get("treelora")
        if own is None:
            raise ValueError("state_dict has no 'treelora' entry: it was not saved by TreeLoRA.state_dict()")
        saved = TreeLoRAConfig.from_dict(own["config"])
        if saved != self.config:
            differ = sorted(k for k, v in saved.to_dict().items() if self.config.to_dict()[k] != v)
            raise ValueError(f"state_dict was saved with a different TreeLoRAConfig (options {differ} differ)")
        if list(own["widths"]) != list(self._layout.widths):
            raise ValueError(
                f"state_dict was saved for modules of widths {own['widths']}, these layers have {self._layout.widths}"
            )
        super().load_state_dict(state)
        self.steps_per_epoch, self.epochs = own["steps_per_epoch"], own["epochs"]
        self._adapters = self._current_adapters()
        self.bank.load_state_dict(own["bank"])
        self.tree = None if own["tree"] is None else GradientTree.from_state_dict(own["tree"], self.device)
        self.search = None
        if own["search"] is not None:
            self.search = self._make_search()
            self.search.load_state_dict(own["search"])
        self.last_selection = None
        self.generator.set_state(own["generator"])
        self._acc.copy_(own["acc"].to(self.device))
        self._count = own["count"]
        self._start = None if own["start"] is None else own["start"].to(self.device)
        self._scale = None if own["scale"] is None else own["scale"].to(self.device)
        self._t_epoch, self._t_task = own["t_epoch"], own["t_task"]
