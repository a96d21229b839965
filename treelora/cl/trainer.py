"""The continual-learning trainer: a stream of tasks, a backbone with LoRA adapters, one method (SPEC 8).

For each task: train for its epochs with the method's hooks (the calling order of
:mod:`treelora.cl.method`), evaluate every task seen so far (and the next one, for forward transfer), record the row
``R[i, :]`` of the accuracy matrix with the training and evaluation times and the peak memory, and write a checkpoint
atomically. Before the first task, every task is evaluated zero-shot (the baseline of forward transfer). A run that
is stopped resumes from the last finished task and reaches the same results as an uninterrupted run with the same
seed: data order is drawn from generators seeded by (seed, task, epoch), and the global RNG state (dropout, fresh
adapter initialisation) is saved with each checkpoint.

Protocols for classification streams (``TrainerConfig.protocol``):

* ``"task"`` (task-incremental): one linear head per task over that task's classes; the task id picks the head at
  test time.
* ``"class"`` (class-incremental): the heads of all tasks seen so far are concatenated, so every class seen so far
  competes, at training and at test time; no task id is used at test time.

Instruct streams (prompts and answers) train a causal LM on the answer tokens; the prompt carries the task.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from treelora.cl import metrics
from treelora.cl.method import ContinualMethod, OptimizerConfig
from treelora.data.stream import LabelledData, Stream
from treelora.models import LoadedModel

CHECKPOINT_VERSION = 1
SCHEDULES = ("constant", "linear", "cosine")
PROTOCOLS = ("task", "class")
# Peak-memory sampling period on CPU (resident set size read from /proc): 20 ms costs well under 1% of a core.
RSS_SAMPLE_SECONDS = 0.02
# The loss is read back (a host synchronisation) for the progress bar and the NaN check only every this many steps, so
# that a GPU run does not wait for the device at every step.
SYNC_EVERY = 10


@dataclass
class TrainerConfig:
    """Settings of a continual-learning run (everything but the stream, the model and the method).

    Args:
        epochs: epochs per task: one number for every task, or one per task.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size of classification tasks (multiple-choice questions are scored one at a
            time, their options sharing the prompt's key/value cache).
        lr, betas, eps, weight_decay: AdamW settings of the adapters and heads.
        schedule: learning-rate schedule within each task: ``constant``, ``linear`` (decay to 0) or ``cosine``.
        warmup_ratio: share of each task's steps with a linear warm-up.
        max_grad_norm: gradient-norm clipping (None: none).
        max_steps_per_task: stop a task after this many optimizer steps (None: full epochs).
        rank, lora_alpha, lora_dropout: LoRA settings; target_modules: layers to wrap (None: the model's default);
            lora_depth: wrap only the first K matching layers.
        protocol: ``task`` or ``class`` (classification streams; see the module docstring).
        max_length: maximum tokens per text input (prompt + answer for instruct streams; the prompt is cut on the left).
        eval_zero_shot: evaluate every task before training (the baseline of forward transfer).
        eval_next_task: also evaluate task i + 1 after task i (R[i, i + 1], needed for forward transfer).
        seed: seeds the adapters, heads, data order and dropout.
        device: ``cpu``, ``cuda``, ``cuda:1``, ...
        checkpoint_dir: where the checkpoint is written after every task (None: no checkpoints).
        progress: print a progress line (loss, step/s) while training.
    """

    epochs: Union[int, Sequence[int]] = 1
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    max_steps_per_task: int | None = None
    rank: int = 8
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    lora_depth: int | None = None
    protocol: str = "task"
    max_length: int = 64
    eval_zero_shot: bool = True
    eval_next_task: bool = True
    seed: int = 0
    device: str = "cpu"
    checkpoint_dir: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "rank", "max_length"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        epochs = [self.epochs] if isinstance(self.epochs, int) else list(self.epochs)
        if not epochs or any(int(e) < 1 for e in epochs):
            raise ValueError(f"epochs must be >= 1 (one number or one per task), got {self.epochs}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.max_steps_per_task is not None and self.max_steps_per_task < 1:
            raise ValueError(f"max_steps_per_task must be >= 1, got {self.max_steps_per_task}")

    def epochs_for(self, task: int) -> int:
        if isinstance(self.epochs, int):
            return self.epochs
        epochs = list(self.epochs)
        return int(epochs[task] if task < len(epochs) else epochs[-1])

    def optimizer(self) -> OptimizerConfig:
        return OptimizerConfig(lr=self.lr, betas=tuple(self.betas), eps=self.eps, weight_decay=self.weight_decay)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["epochs"] = self.epochs if isinstance(self.epochs, int) else list(self.epochs)
        return out


@dataclass
class RunResult:
    """What a run produced.

    Attributes:
        method: the method's name. stream, model: names.
        R: (N, N) accuracy matrix as nested lists, ``None`` where not measured (fractions in [0, 1]); for joint
            training only the last row is measured.
        zero_shot: (N,) accuracy of the untrained model (None when not measured).
        metrics: :func:`treelora.cl.metrics.summarize` of R (ACC, BWT in three conventions, forgetting, FWT).
        train_seconds, eval_seconds: per task. peak_memory_bytes: the run's peak (CUDA allocated memory, or the
            process's resident set size on CPU); memory_kind says which.
        losses: mean training loss per task and epoch. steps: optimizer steps per task.
        tree: the learned tree (``to_nested()``) when the method has one. config: the trainer configuration.
    """

    method: str
    stream: str
    model: str
    task_names: list[str]
    R: list[list[float | None]]
    zero_shot: list[float] | None
    metrics: dict[str, float | None]
    train_seconds: list[float]
    eval_seconds: list[float]
    peak_memory_bytes: int
    memory_kind: str
    losses: list[list[float]]
    steps: list[int]
    tree: dict[str, Any] | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def train_time(self) -> float:
        return float(sum(self.train_seconds))

    def matrix(self) -> np.ndarray:
        return np.array([[np.nan if v is None else v for v in row] for row in self.R], dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train_time"] = self.train_time
        return out


# --- memory ----------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class PeakMemory:
    """Peak memory while the block runs: CUDA allocated bytes on a CUDA device, else the process's resident set size
    sampled every 20 ms by a background thread (the process-wide ``ru_maxrss`` cannot be reset between runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.kind == "rss":
            self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def current(self) -> int:
        """The peak so far."""
        if self.kind == "rss":
            return max(self.peak, _rss_bytes())
        return max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        else:
            self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))


# --- progress --------------------------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar (loss, step/s) on a terminal; on a pipe, one line per task only."""

    def __init__(self, total: int, label: str, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.out = stream or sys.stderr
        self.tty = self.enabled and self.out.isatty()
        self.start = time.perf_counter()
        self.step = 0
        self.loss = float("nan")

    def update(self, step: int, loss: float) -> None:
        self.step = step
        self.loss = loss
        if self.tty:
            self.out.write(f"\r{self._line()}")
            self.out.flush()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.step / elapsed if elapsed > 0 else 0.0
        width = 20
        done = int(width * self.step / max(self.total, 1))
        return (
            f"{self.label} [{'#' * done}{'.' * (width - done)}] {self.step}/{self.total} loss {self.loss:.4f} "
            f"{rate:.1f} step/s"
        )

    def close(self, extra: str = "") -> None:
        if self.enabled:
            self.out.write(("\r" if self.tty else "") + self._line() + extra + "\n")
            self.out.flush()


# --- data ------------------------------------------------------------------------------------------------------------


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _check_compatible(stream: Stream, model: LoadedModel) -> None:
    if stream.kind == "instruct" and model.kind != "causal":
        raise ValueError(
            f"stream {stream.name!r} is an instruction stream and needs a causal LM; model "
            f"{model.name!r} is of kind {model.kind}"
        )
    if stream.kind == "classification":
        wants = "vision" if stream.input_kind == "image" else "text"
        has = "vision" if model.kind == "vision" else "text"
        if wants != has:
            raise ValueError(
                f"stream {stream.name!r} has {stream.input_kind} inputs; model {model.name!r} is of kind {model.kind}"
            )


# --- methods ---------------------------------------------------------------------------------------------------------


def _treelora_factory(layers: Sequence[nn.Module], optimizer: OptimizerConfig, **options: Any) -> ContinualMethod:
    from treelora.cl.config import TreeLoRAConfig
    from treelora.cl.treelora import TreeLoRA

    preset = options.pop("preset", "paper")
    return TreeLoRA(layers, TreeLoRAConfig.from_preset(preset, **options), optimizer=optimizer)


def _baseline_factory(name: str) -> Callable[..., ContinualMethod]:
    def build(layers: Sequence[nn.Module], optimizer: OptimizerConfig, **options: Any) -> ContinualMethod:
        from treelora.cl import baselines

        return getattr(baselines, name)(layers, optimizer, **options)

    return build


METHODS: dict[str, Callable[..., ContinualMethod]] = {
    "treelora": _treelora_factory,
    "seqlora": _baseline_factory("SeqLoRA"),
    "olora": _baseline_factory("OLoRA"),
    "ewc": _baseline_factory("EWC"),
    "joint": _baseline_factory("JointTraining"),
}
METHOD_LABELS = {"treelora": "TreeLoRA", "seqlora": "SeqLoRA", "olora": "O-LoRA", "ewc": "EWC", "joint": "Joint"}


def canonical_method(name: str) -> str:
    """The registry key of a method name given in any case, with or without a hyphen (``O-LoRA`` -> ``olora``)."""
    key = name.strip().lower().replace("-", "").replace("_", "")
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}: choose from {', '.join(METHOD_LABELS.values())}")
    return key


# --- the trainer -----------------------------------------------------------------------------------------------------


class Trainer:
    """Runs one continual-learning method over a stream.

    Args:
        stream: the tasks (:mod:`treelora.data`).
        model: a backbone from :func:`treelora.models.load_model`; LoRA is injected into it here (it is modified in
            place: load a fresh one per run).
        method: a name from :data:`METHODS` (``treelora``, ``seqlora``, ``olora``, ``ewc``, ``joint``) or a callable
            ``(layers, optimizer) -> ContinualMethod``.
        config: :class:`TrainerConfig`.
        method_options: keyword options of the method (e.g. ``lambda_orth`` for O-LoRA, TreeLoRAConfig fields).
        callbacks: functions called as ``callback(trainer, task_index)`` after each task's checkpoint is written.
    """

    def __init__(
        self,
        stream: Stream,
        model: LoadedModel,
        method: Union[str, Callable[..., ContinualMethod]],
        config: TrainerConfig | None = None,
        method_options: dict[str, Any] | None = None,
        callbacks: Sequence[Callable[[Trainer, int], None]] = (),
    ) -> None:
        from treelora.nn import inject_lora

        self.stream, self.loaded, self.config = stream, model, config or TrainerConfig()
        _check_compatible(stream, model)
        self.device = torch.device(self.config.device)
        self.callbacks = list(callbacks)
        cfg = self.config
        self.model = model.model.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self.layers = inject_lora(
                self.model,
                cfg.target_modules or model.target_modules,
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                lora_depth=cfg.lora_depth,
            )
            self.heads = self._build_heads()
        self.method_options = dict(method_options or {})
        if isinstance(method, str):
            self.method_name = canonical_method(method)
            self.method = METHODS[self.method_name](self.layers, cfg.optimizer(), **(method_options or {}))
        else:
            self.method = method(self.layers, cfg.optimizer(), **(method_options or {}))
            self.method_name = getattr(self.method, "name", type(self.method).__name__.lower())
        self.method.add_parameters(list(self.heads.parameters()))
        self.joint = bool(getattr(self.method, "joint", False))
        n = len(stream)
        self.R = np.full((n, n), np.nan)
        self.zero_shot: np.ndarray | None = None
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self.losses: list[list[float]] = []
        self.steps: list[int] = []
        self.peak_memory = 0
        self.memory_kind = "rss"
        self.completed = -1
        self._memory: PeakMemory | None = None

    # --- heads and losses ------------------------------------------------------------------------------------------

    def _build_heads(self) -> nn.ModuleList:
        if self.stream.kind != "classification":
            return nn.ModuleList()
        hidden = self.loaded.hidden_size
        return nn.ModuleList(nn.Linear(hidden, len(t.classes)) for t in self.stream.tasks).to(self.device)

    def _seen_classes(self, upto: int) -> list[int]:
        return [c for t in self.stream.tasks[: upto + 1] for c in t.classes]

    def _logits(self, features: torch.Tensor, task: int, upto: int) -> tuple[torch.Tensor, list[int]]:
        """Logits of the rows of ``features`` (B, H) belonging to ``task``: the task's head (task-incremental) or all
        heads of tasks 0..upto (class-incremental), with the global class ids of the columns."""
        if self.config.protocol == "task":
            return self.heads[task](features), list(self.stream.tasks[task].classes)
        return torch.cat([self.heads[k](features) for k in range(upto + 1)], dim=1), self._seen_classes(upto)

    def _classification_loss(self, batch: dict[str, Any], upto: int) -> torch.Tensor:
        features = self.loaded.features(batch)
        total = features.new_zeros(())
        for task in torch.unique(batch["task"]).tolist():
            rows = batch["task"] == task
            logits, classes = self._logits(features[rows], task, upto)
            lookup = torch.full((self.stream.num_classes,), -100, dtype=torch.long, device=self.device)
            lookup[torch.tensor(classes, device=self.device)] = torch.arange(len(classes), device=self.device)
            total = total + F.cross_entropy(logits, lookup[batch["labels"][rows]], reduction="sum")
        return total / batch["labels"].shape[0]

    def _causal_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Next-token cross-entropy on the answer tokens. Logits are computed only over the columns that hold answer
        tokens (``logits_to_keep``): the LM head over the whole sequence is about a fifth of SmolLM2-135M's compute
        (49,152 x 576 of its 134.5M parameters), and the prompt positions are not scored."""
        target = batch["labels"][:, 1:]
        cols = (target != -100).any(0).nonzero().flatten()
        lo, hi = int(cols[0]), int(cols[-1]) + 1
        keep = torch.arange(lo, hi, device=self.device)
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep)
        logits = out.logits
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), target[:, lo:hi].reshape(-1), ignore_index=-100
        )

    # --- batching --------------------------------------------------------------------------------------------------

    def _text_batch(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.loaded.tokenizer(
            texts, padding=True, truncation=True, max_length=self.config.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def _classification_batch(self, items: list[tuple[int, int]], split: str) -> dict[str, Any]:
        datas = [getattr(self.stream.tasks[t], split) for t, _ in items]
        if self.stream.input_kind == "image":
            batch: dict[str, Any] = {
                "pixel_values": torch.stack([d.inputs[i] for d, (_, i) in zip(datas, items)]).to(self.device)
            }
        else:
            batch = self._text_batch([d.inputs[i] for d, (_, i) in zip(datas, items)])
        batch["labels"] = torch.stack([d.labels[i] for d, (_, i) in zip(datas, items)]).to(self.device)
        batch["task"] = torch.tensor([t for t, _ in items], device=self.device)
        return batch

    def _encode_pair(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (cut on the left to fit) and of `` answer`` + end-of-sequence."""
        tok = self.loaded.tokenizer
        answer_ids = tok.encode(" " + answer, add_special_tokens=False)
        if tok.eos_token_id is not None:
            answer_ids = [*answer_ids, tok.eos_token_id]
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        room = max(self.config.max_length - len(answer_ids), 1)
        return prompt_ids[-room:], answer_ids[: self.config.max_length - 1]

    def _pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Right-padded input_ids / attention_mask and labels (-100 outside the answer) for (prompt, answer) pairs."""
        pad = self.loaded.tokenizer.pad_token_id
        width = max(len(p) + len(a) for p, a in sequences)
        ids = torch.full((len(sequences), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (p, a) in enumerate(sequences):
            n = len(p) + len(a)
            ids[i, :n] = torch.tensor(p + a)
            mask[i, :n] = 1
            labels[i, len(p) : n] = torch.tensor(a)
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "labels": labels.to(self.device),
        }

    def _instruct_batch(self, items: list[tuple[int, int]], split: str) -> dict[str, Any]:
        pairs = []
        for t, i in items:
            item = getattr(self.stream.tasks[t], split)[i]
            pairs.append(self._encode_pair(item["prompt"], item["answer"]))
        return self._pad(pairs)

    def _train_order(self, tasks: list[int], epoch: int, anchor: int) -> list[list[tuple[int, int]]]:
        """Shuffled batches of (task, example) pairs for one epoch, from a generator seeded by (seed, task, epoch)."""
        items = [(t, i) for t in tasks for i in range(len(self.stream.tasks[t].train))]
        perm = torch.randperm(len(items), generator=_generator(self.config.seed, anchor, epoch)).tolist()
        items = [items[i] for i in perm]
        bs = self.config.batch_size
        return [items[i : i + bs] for i in range(0, len(items), bs)]

    # --- evaluation ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, task: int, upto: int) -> float:
        """Accuracy on ``task``'s test set with the model as it is after training task ``upto`` (class-incremental
        heads: those of tasks 0..max(upto, task))."""
        self.model.eval()
        t = self.stream.tasks[task]
        if t.kind == "classification":
            return self._eval_classification(task, max(upto, task))
        if t.metric == "multiple_choice":
            return self._eval_multiple_choice(t.test)
        return self._eval_exact_match(t.test)

    def _eval_classification(self, task: int, upto: int) -> float:
        data: LabelledData = self.stream.tasks[task].test
        correct = 0
        bs = self.config.eval_batch_size
        for start in range(0, len(data), bs):
            items = [(task, i) for i in range(start, min(start + bs, len(data)))]
            batch = self._classification_batch(items, "test")
            logits, classes = self._logits(self.loaded.features(batch), task, upto)
            pred = torch.tensor(classes, device=self.device)[logits.argmax(1)]
            correct += int((pred == batch["labels"]).sum())
        return correct / len(data)

    @torch.no_grad()
    def option_scores(self, items: list[dict]) -> list[torch.Tensor]:
        """Per item, the total log-likelihood (float64) of each option's tokens after the prompt: a tensor of
        len(options) per item.

        The prompt runs once per item and its key/value cache is shared by the options (4 options cost one prompt
        pass instead of four); the prompt is cut on the left so that prompt + the longest option fit ``max_length``.
        """
        self.model.eval()
        tok = self.loaded.tokenizer
        scores = []
        for item in items:
            options = [tok.encode(" " + o, add_special_tokens=False) for o in item["options"]]
            options = [a[: self.config.max_length - 1] for a in options]
            width = max(len(a) for a in options)
            prompt = tok.encode(item["prompt"], add_special_tokens=False)[-max(self.config.max_length - width, 1) :]
            out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1)
            first = out.logits[0, -1].float().log_softmax(-1)
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(options))
            ids = torch.full((len(options), width), tok.pad_token_id, dtype=torch.long)
            for i, a in enumerate(options):
                ids[i, : len(a)] = torch.tensor(a)
            # Right padding needs no mask here: a padded position comes after every real token of its row.
            rest = self.model(input_ids=ids.to(self.device), past_key_values=cache).logits.float().log_softmax(-1)
            row = torch.empty(len(options), dtype=torch.float64)
            for i, a in enumerate(options):
                row[i] = float(first[a[0]]) + sum(float(rest[i, k - 1, a[k]]) for k in range(1, len(a)))
            scores.append(row)
        return scores

    def _eval_multiple_choice(self, items: list[dict]) -> float:
        """Pick the option with the highest total log-likelihood after the prompt; accuracy over items."""
        scores = self.option_scores(items)
        correct = sum(item["options"][int(s.argmax())] == item["answer"] for item, s in zip(items, scores))
        return correct / len(items)

    def _eval_exact_match(self, items: list[dict]) -> float:
        """Greedy generation, one item at a time; an answer is right when its stripped text equals the reference."""
        tok = self.loaded.tokenizer
        correct = 0
        for item in items:
            prompt, answer = self._encode_pair(item["prompt"], item["answer"])
            ids = torch.tensor([prompt], device=self.device)
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=len(answer) + 8,
                pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            correct += text.strip() == item["answer"].strip()
        return correct / len(items)

    # --- training --------------------------------------------------------------------------------------------------

    def _lr_factor(self, step: int, total: int) -> float:
        cfg = self.config
        warmup = int(cfg.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(total - warmup, 1)
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    def _train_task(self, index: int, tasks: list[int], label: str) -> tuple[list[float], int]:
        cfg = self.config
        epochs = cfg.epochs_for(index)
        batches_per_epoch = len(self._train_order(tasks, 0, index))
        total = batches_per_epoch * epochs
        if cfg.max_steps_per_task is not None:
            total = min(total, cfg.max_steps_per_task)
            epochs = math.ceil(total / batches_per_epoch)
        steps_per_epoch = min(batches_per_epoch, total)
        base_lr = self.method.optim.lr
        self.method.begin_task(index, steps_per_epoch, epochs)
        self.model.train()
        bar = Progress(total, label, cfg.progress)
        epoch_losses, step = [], 0
        params = self.method.parameters
        for epoch in range(epochs):
            self.method.begin_epoch(epoch)
            running, count = torch.zeros((), device=self.device), 0
            for items in self._train_order(tasks, epoch, index):
                if step >= total:
                    break
                upto = len(self.stream) - 1 if self.joint else index
                if self.stream.kind == "classification":
                    loss = self._classification_loss(self._classification_batch(items, "train"), upto)
                else:
                    loss = self._causal_loss(self._instruct_batch(items, "train"))
                total_loss = self.method.before_backward(loss)
                total_loss.backward()
                self.method.after_backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_([p for p in params() if p.grad is not None], cfg.max_grad_norm)
                self.method.optim.lr = base_lr * self._lr_factor(step, total)
                self.method.step()
                self.method.optim.lr = base_lr
                running = running + loss.detach().float()
                count += 1
                step += 1
                if step % SYNC_EVERY == 0 or step == total:
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise FloatingPointError(
                            f"training loss became {value} at step {step} of task {index} "
                            f"({self.stream.tasks[index].name}); lower the learning rate"
                        )
                    bar.update(step, value)
            epoch_losses.append(float(running) / max(count, 1))
        self.method.end_task()
        bar.close()
        return epoch_losses, step

    # --- checkpoints -----------------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return Path(self.config.checkpoint_dir) / "checkpoint.pt" if self.config.checkpoint_dir else None

    def _identity(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        for key in ("checkpoint_dir", "progress", "device"):
            cfg.pop(key)
        return {
            "method": self.method_name,
            "method_options": dict(self.method_options),
            "stream": self.stream.name,
            "stream_info": dict(self.stream.info),
            "tasks": [(t.name, len(t.train), len(t.test)) for t in self.stream.tasks],
            "model": self.loaded.name,
            "config": cfg,
        }

    def _adapter_state(self) -> dict[str, torch.Tensor]:
        state = {}
        for i, layer in enumerate(self.layers):
            for name, value in layer.state_dict().items():
                if not name.startswith("base."):
                    state[f"layers.{i}.{name}"] = value.detach().cpu().clone()
        for name, value in self.heads.state_dict().items():
            state[f"heads.{name}"] = value.detach().cpu().clone()
        return state

    def _load_adapter_state(self, state: dict[str, torch.Tensor]) -> None:
        for i, layer in enumerate(self.layers):
            prefix = f"layers.{i}."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            layer.load_state_dict(own, strict=False)
        self.heads.load_state_dict({k[len("heads.") :]: v for k, v in state.items() if k.startswith("heads.")})

    def save_checkpoint(self) -> None:
        """Write the state after the last completed task, atomically (a temporary file renamed over the old one)."""
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "version": CHECKPOINT_VERSION,
            "identity": self._identity(),
            "completed": self.completed,
            "adapters": self._adapter_state(),
            "method": self.method.state_dict(),
            "R": self.R.copy(),
            "zero_shot": None if self.zero_shot is None else self.zero_shot.copy(),
            "train_seconds": list(self.train_seconds),
            "eval_seconds": list(self.eval_seconds),
            "losses": [list(x) for x in self.losses],
            "steps": list(self.steps),
            "peak_memory": self.peak_memory,
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one; False when there is none. Raises when it belongs to a
        different run (method, stream, model or settings)."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint {path} has version {state.get('version')}, expected {CHECKPOINT_VERSION}")
        mine, theirs = self._identity(), state["identity"]
        if mine != theirs:
            diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise ValueError(
                f"checkpoint {path} belongs to a different run (differs in {', '.join(diff)}); use "
                "another output folder or drop --resume"
            )
        self._load_adapter_state(state["adapters"])
        self.method.load_state_dict(state["method"])
        self.completed = state["completed"]
        self.R = state["R"]
        self.zero_shot = state["zero_shot"]
        self.train_seconds, self.eval_seconds = state["train_seconds"], state["eval_seconds"]
        self.losses, self.steps, self.peak_memory = state["losses"], state["steps"], state["peak_memory"]
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        return True

    # --- the run ---------------------------------------------------------------------------------------------------

    def run(self, resume: bool = False, log: Callable[[str], None] | None = None) -> RunResult:
        """Train task after task and return the results (resuming from the checkpoint when ``resume``)."""
        cfg = self.config
        log = log or (lambda msg: print(msg, file=sys.stderr) if cfg.progress else None)
        n = len(self.stream)
        if resume and self.load_checkpoint():
            log(f"[{self.method_name}] resumed after task {self.completed + 1}/{n} from {self.checkpoint_path}")
        else:
            torch.manual_seed(cfg.seed)
        with PeakMemory(self.device) as memory:
            self._memory = memory
            if self.completed < 0 and self.zero_shot is None and cfg.eval_zero_shot:
                start = time.perf_counter()
                self.zero_shot = np.array([self.evaluate(j, 0) for j in range(n)])
                log(
                    f"[{self.method_name}] zero-shot accuracy: "
                    + " ".join(f"{a:.3f}" for a in self.zero_shot)
                    + f" ({time.perf_counter() - start:.1f} s)"
                )
            if self.joint:
                self._run_joint(log)
            else:
                for k in range(self.completed + 1, n):
                    self._run_task(k, log)
        self.peak_memory = max(self.peak_memory, memory.peak)
        self.memory_kind = memory.kind
        self._memory = None
        return self.result()

    def _run_task(self, k: int, log: Callable[[str], None]) -> None:
        n = len(self.stream)
        label = f"[{self.method_name}] task {k + 1}/{n} {self.stream.tasks[k].name}"
        start = time.perf_counter()
        losses, steps = self._train_task(k, [k], label)
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        last = min(k + 1, n - 1) if self.config.eval_next_task else k
        for j in range(last + 1):
            self.R[k, j] = self.evaluate(j, k)
        eval_s = time.perf_counter() - start
        self._finish(k, losses, steps, train_s, eval_s, log)

    def _run_joint(self, log: Callable[[str], None]) -> None:
        n = len(self.stream)
        if self.completed == n - 1:
            return
        start = time.perf_counter()
        losses, steps = self._train_task(0, list(range(n)), f"[{self.method_name}] all {n} tasks")
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        for j in range(n):
            self.R[n - 1, j] = self.evaluate(j, n - 1)
        self._finish(n - 1, losses, steps, train_s, time.perf_counter() - start, log)

    def _finish(
        self, k: int, losses: list[float], steps: int, train_s: float, eval_s: float, log: Callable[[str], None]
    ) -> None:
        self.losses.append(losses)
        self.steps.append(steps)
        self.train_seconds.append(train_s)
        self.eval_seconds.append(eval_s)
        self.completed = k
        if self._memory is not None:  # so that a resumed run keeps the peak of the part before the interruption
            self.peak_memory = max(self.peak_memory, self._memory.current())
        row = " ".join("  -  " if np.isnan(v) else f"{v:.3f}" for v in self.R[k])
        log(f"[{self.method_name}] after task {k + 1}: {row} (train {train_s:.1f} s, eval {eval_s:.1f} s)")
        self.save_checkpoint()
        for callback in self.callbacks:
            callback(self, k)

    def result(self) -> RunResult:
        n = len(self.stream)
        R = self.R
        if self.joint:
            final = R[n - 1]
            summary: dict[str, float | None] = {"acc": float(np.mean(final)) if self.completed == n - 1 else None}
            summary.update(
                dict.fromkeys(("average_incremental_accuracy", "bwt", "bwt_gem", "bwt_official", "forgetting", "fwt"))
            )
        elif self.completed == n - 1:
            summary = dict(metrics.summarize(R, self.zero_shot))
            summary.setdefault("fwt", None)
        else:
            summary = {}
        tree = getattr(self.method, "tree", None)
        nested = tree.to_nested() if tree is not None and hasattr(tree, "to_nested") else None
        return RunResult(
            method=self.method_name,
            stream=self.stream.name,
            model=self.loaded.name,
            task_names=[t.name for t in self.stream.tasks],
            R=[[None if np.isnan(v) else float(v) for v in row] for row in R],
            zero_shot=None if self.zero_shot is None else [float(v) for v in self.zero_shot],
            metrics=summary,
            train_seconds=list(self.train_seconds),
            eval_seconds=list(self.eval_seconds),
            peak_memory_bytes=int(self.peak_memory),
            memory_kind=self.memory_kind,
            losses=self.losses,
            steps=list(self.steps),
            tree=nested,
            config=self.config.to_dict(),
        )
