"""TreeLoRA's configuration: every place where the paper and the released code differ is a named option.

Two presets: :meth:`TreeLoRAConfig.paper` (the default: the algorithm as the paper describes it) and
:meth:`TreeLoRAConfig.official` (the behaviour of the authors' released code, which produced the published LLM
numbers). The table in :class:`TreeLoRAConfig`'s docstring lists every option with its value in both presets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from treelora.cl._checks import check_bool, check_choice, check_int, check_number
from treelora.ops.similarity import METRICS

SIGNATURES = ("grad", "delta", "param")
SIGNATURE_WINDOWS = ("task", "last_epoch")
ACCUMULATORS = ("running_mean", "scaled_sum")
SPLITS = ("principal", "mean_distance", "mean_dot")
SEARCHES = ("lcb", "softmax", "random", "last")
TIE_BREAKS = ("random", "first")
RESETS = ("task", "epoch")
REGULARIZERS = ("official", "l1", "none")
WARMUPS = ("none", "task", "epoch")
STORAGE_DTYPES = ("float32", "bfloat16")
ADAPTERS = ("shared", "stacked")
PRESETS = ("paper", "official")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _override(base: TreeLoRAConfig, overrides: dict[str, Any]) -> TreeLoRAConfig:
    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown TreeLoRAConfig options {unknown}; known: {sorted(known)}")
    return replace(base, **overrides)


@dataclass
class TreeLoRAConfig:
    """Options of the TreeLoRA method (SPEC section 7).

    ================================  ============  ==============  ==========================================
    option                            ``paper()``   ``official()``  meaning
    ================================  ============  ==============  ==========================================
    ``signature``                     grad          param           what a task's signature G_k is: mean dL/dA
                                                                    (grad), A_end - A_start (delta) or mean A
                                                                    values (param)
    ``signature_window``              task          last_epoch      steps averaged into G_k: the whole task or
                                                                    only its last epoch
    ``accumulator``                   running_mean  scaled_sum      online statistic: running mean, or the
                                                                    released code's acc += x / steps_per_epoch
                                                                    (a partial sum until the epoch ends)
    ``scale_signature_by_layers``     False         True            the released code's bug that adds every
                                                                    sample L times (signatures scaled by L)
    ``split``                         principal     mean_dot        K-D tree split rule
    ``use_differences``               False         True            build the tree on consecutive differences
                                                                    G_k - G_{k-1} instead of G_k
    ``leaf_size``                     1             1               a node with at most this many tasks is a
                                                                    leaf
    ``metric``                        l1            l1              distance between the current signature and
                                                                    a stored one (and mean_distance's score)
    ``normalize_distances``           True          False           divide distances by the bank's spread per
                                                                    layer so the LCB bonus has unit scale
    ``search``                        lcb           softmax         per-step task selection: hierarchical LCB
                                                                    descent, the released code's softmax
                                                                    sampler, uniform random or the last task
                                                                    (ablations)
    ``lcb_c``                         2.0           2.0             exploration weight c in
                                                                    mu - c * sqrt(log(t + 1) / n)
    ``tie_break``                     random        random          equal LCBs: seeded coin or first child
    ``search_reset``                  task          epoch           when the search statistics restart
    ``regularizer``                   l1            official        penalty toward the selected tasks
    ``official_signed``               False         True            divide by the signed R as the released code
                                                                    does (flips the pull when R > 0)
    ``reg_lambda``                    2.0           0.5             regularizer weight lambda
    ``lambda_warmup``                 none          epoch           linear ramp of lambda from 0 over each task
                                                                    or each epoch
    ``update_density``                1.0           1.0             fraction of each LoRA tensor updated per
                                                                    step (top |grad|); 1.0 = dense
    ``storage_dtype``                 float32       float32         bank storage dtype (float32 or bfloat16)
    ``max_tasks``                     None          None            bank budget; beyond it the two closest
                                                                    entries are merged
    ``keep_snapshots``                False         False           keep each task's A snapshot even when the
                                                                    regularizer does not need it
    ``adapter``                       shared        shared          one adapter trained through the stream, or
                                                                    a frozen stack plus a fresh adapter per task
    ``seed``                          0             0               seed of the search's random generator
    ================================  ============  ==============  ==========================================

    Optimiser settings live in :class:`treelora.cl.OptimizerConfig`; the released code used Adam with
    betas (0.9, 0.95), lr 1e-4, no weight decay.
    """

    signature: str = _opt(
        "grad",
        "Task signature. 'grad' (paper): mean over the task's steps of dL/dA per module, the paper's expected "
        "gradient direction restricted to the adapter. 'delta': A at task end minus A at task start. 'param' "
        "(released code): mean of the A values, which differ from task to task by the accumulated update.",
    )
    signature_window: str = _opt(
        "task",
        "Which steps are averaged into a signature: 'task' (all of them) or 'last_epoch' (the released code resets "
        "its accumulator every epoch and stores the last one).",
    )
    accumulator: str = _opt(
        "running_mean",
        "'running_mean': q <- q + (x - q) / n, so q is a mean at every step. 'scaled_sum' (released code): "
        "q <- q + x / steps_per_epoch, equal to the epoch mean only at the epoch's end; mid-epoch distances are "
        "dominated by the stored signatures' norms. Requires signature_window='last_epoch'.",
    )
    scale_signature_by_layers: bool = _opt(
        False,
        "Reproduce the released code's accumulation bug that adds each sample L times (L = number of modules). "
        "Signatures are then L times larger while the softmax sampler's exploration radius is not, so exploration "
        "weighs about L times less, and the root-child rescaling factor (a dot-product median) changes: on in the "
        "official preset because reproducing its selections needs it, off everywhere else.",
    )
    split: str = _opt(
        "principal",
        "K-D tree split rule. 'principal': projection on the top principal direction of the node's layer-l "
        "signatures, split at the true median (separates groups of similar tasks). 'mean_distance' (paper's text): "
        "distance to the group mean, which mixes well-separated groups and is kept for ablation. 'mean_dot' "
        "(released code): dot product with the group mean, lower median, '>=' goes left, halve the list when a "
        "side is empty, a leaf at depth >= L.",
    )
    use_differences: bool = _opt(
        False,
        "Build the tree on consecutive differences D_0 = G_0, D_k = G_k - G_{k-1} (released code: with param "
        "signatures a difference is the task's accumulated update). The search and the regularizer always use "
        "the raw signatures.",
    )
    leaf_size: int = _opt(1, "A tree node holding at most this many tasks is a leaf (>= 1).")
    metric: str = _opt(
        "l1",
        f"Distance between the current signature and a stored one, one of {METRICS}; L1 is the paper's choice "
        "('more robust in high dimensions'). Similarities (dot, cosine) are negated into costs.",
    )
    normalize_distances: bool = _opt(
        True,
        "Divide each layer's distance by the bank's spread at that layer (mean distance of the stored signatures "
        "to their mean), so distances between tasks are about 1 and the LCB bonus c * sqrt(log(t + 1) / n) has a "
        "meaningful scale whatever the gradients' magnitude. The released code uses raw L1 distances.",
    )
    search: str = _opt(
        "lcb",
        "Per-step task selection per layer. 'lcb' (paper): descend the tree from the root to the child with the "
        "lower LCB. 'softmax' (released code): sample from a softmax over range-normalised scores with its "
        "root-child rescaling (note its score favours larger distances). 'random': uniform (Table 5's "
        "'random search' ablation). 'last': the most recent task at every layer (anchor to the previous task's "
        "adapter, no tree: the baseline that isolates the tree's contribution).",
    )
    lcb_c: float = _opt(2.0, "Exploration weight c of the LCB (the paper's 2); >= 0.")
    tie_break: str = _opt(
        "random",
        "How the LCB search breaks ties between children (e.g. two unexplored ones): 'random' uses the seeded "
        "generator, 'first' takes the left child.",
    )
    search_reset: str = _opt(
        "task",
        "When the search statistics restart: at each task (paper) or at each epoch (released code).",
    )
    regularizer: str = _opt(
        "l1",
        "Penalty toward the selected tasks. 'l1' (paper's Eq. 3 read in parameter space): "
        "lambda * sum_l ||A_l - P_{k_l}[l]||_1 / D_l with P the selected task's A snapshot. 'official' (released "
        "code): R = -sum_l <A_l, G_{k_l}[l]>, added as lambda * loss * R / |R| (value pinned to lambda * loss), which "
        "pulls A toward the selected signature; meant for param signatures. 'none': no penalty and no search.",
    )
    official_signed: bool = _opt(
        False,
        "With regularizer='official': divide by the signed R.detach() as the released code does, which pulls A "
        "toward G while R < 0 (the usual case) and pushes it away once R > 0. False keeps the R < 0 direction "
        "always.",
    )
    reg_lambda: float = _opt(
        2.0,
        "Regularizer weight lambda, >= 0. 2.0 was chosen on the default run (wordnet-supersense, minilm) from "
        "{0.5, 1, 2, 4} over seeds 0-2: ACC 66.4 / 66.5 / 67.0 / 67.1 %, BWT 1.4 / 0.8 / 0.7 / 0.7 % "
        "(scripts/readme_tables.py ablation). The paper uses 0.5 for LLMs and 0.1 for ViTs; the official preset "
        "keeps the released scripts' 0.5.",
    )
    lambda_warmup: str = _opt(
        "none",
        "Linear ramp lambda * t / T of the regularizer weight: 'none', over each task ('task', T = steps in the "
        "task) or over each epoch ('epoch', released code, restarting every epoch).",
    )
    update_density: float = _opt(
        1.0,
        "Sparse update: per step only the top fraction of each LoRA tensor's entries by |grad| is updated; the rest "
        "keep their values and optimizer moments. In (0, 1]; 1.0 is the dense update.",
    )
    storage_dtype: str = _opt(
        "float32",
        "Bank storage dtype, 'float32' or 'bfloat16' (halves the bank; distances still accumulate in fp32).",
    )
    max_tasks: int | None = _opt(
        None,
        "Bank budget in stored signatures; when exceeded the two closest entries are merged (mean weighted by "
        "how many tasks each holds). None: unbounded.",
    )
    keep_snapshots: bool = _opt(
        False,
        "Keep each task's A snapshot in the bank even when the regularizer does not need it (per-task export). "
        "regularizer='l1' always keeps them.",
    )
    adapter: str = _opt(
        "shared",
        "'shared': one adapter trained through the whole stream (paper and released code). 'stacked': after each "
        "task its adapter is frozen into the layer's stack and a fresh one is trained (O-LoRA style; needs "
        "treelora.nn.LoRALinear layers).",
    )
    seed: int = _opt(0, "Seed of the generator the search draws from (ties, softmax samples).")

    def __post_init__(self) -> None:
        self._check_choice("signature", SIGNATURES)
        self._check_choice("signature_window", SIGNATURE_WINDOWS)
        self._check_choice("accumulator", ACCUMULATORS)
        self._check_choice("split", SPLITS)
        self._check_choice("metric", METRICS)
        self._check_choice("search", SEARCHES)
        self._check_choice("tie_break", TIE_BREAKS)
        self._check_choice("search_reset", RESETS)
        self._check_choice("regularizer", REGULARIZERS)
        self._check_choice("lambda_warmup", WARMUPS)
        self._check_choice("storage_dtype", STORAGE_DTYPES)
        self._check_choice("adapter", ADAPTERS)
        for name in (
            "scale_signature_by_layers",
            "use_differences",
            "normalize_distances",
            "official_signed",
            "keep_snapshots",
        ):
            check_bool(f"TreeLoRAConfig.{name}", getattr(self, name))
        check_int("TreeLoRAConfig.leaf_size", self.leaf_size, low=1)
        check_int("TreeLoRAConfig.seed", self.seed, low=0)
        if self.max_tasks is not None:
            check_int("TreeLoRAConfig.max_tasks", self.max_tasks, low=1)
        check_number("TreeLoRAConfig.lcb_c", self.lcb_c, low=0.0)
        check_number("TreeLoRAConfig.reg_lambda", self.reg_lambda, low=0.0)
        check_number("TreeLoRAConfig.update_density", self.update_density, low=0.0, high=1.0, low_open=True)
        if self.accumulator == "scaled_sum" and self.signature_window != "last_epoch":
            raise ValueError(
                "TreeLoRAConfig.accumulator='scaled_sum' sums x / steps_per_epoch and is a mean only over one epoch: "
                f"it needs signature_window='last_epoch', got {self.signature_window!r}"
            )
        if self.accumulator == "scaled_sum" and self.signature == "delta":
            raise ValueError(
                "TreeLoRAConfig.accumulator='scaled_sum' does not apply to signature='delta' "
                "(a delta is a difference of parameters, not an average)"
            )

    # --- validation helpers ---------------------------------------------------------------------------------------

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        check_choice(f"TreeLoRAConfig.{name}", getattr(self, name), choices)

    # --- presets --------------------------------------------------------------------------------------------------

    @classmethod
    def paper(cls, **overrides: Any) -> TreeLoRAConfig:
        """The algorithm as the paper describes it (the default); keyword arguments override single options."""
        return _override(cls(), overrides)

    @classmethod
    def official(cls, **overrides: Any) -> TreeLoRAConfig:
        """The released code's behaviour: parameter signatures over the last epoch (with its x L accumulation),
        mean_dot splits on consecutive differences, softmax sampling reset every epoch, the signed official
        regularizer ramped over each epoch."""
        base = cls(
            signature="param",
            signature_window="last_epoch",
            accumulator="scaled_sum",
            scale_signature_by_layers=True,
            split="mean_dot",
            use_differences=True,
            normalize_distances=False,
            search="softmax",
            search_reset="epoch",
            regularizer="official",
            official_signed=True,
            lambda_warmup="epoch",
            reg_lambda=0.5,
        )
        return _override(base, overrides)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> TreeLoRAConfig:
        """``paper`` or ``official``, with overrides."""
        return getattr(cls, check_choice("preset", name, PRESETS))(**overrides)

    # --- serialisation --------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TreeLoRAConfig:
        return _override(cls(), dict(data))

    @classmethod
    def help(cls) -> dict[str, str]:
        """Option name -> help text."""
        return {f.name: f.metadata["help"] for f in fields(cls)}
