"""Running a continual-learning method under ``torch.distributed`` (SPEC 9) without touching the algorithm.

The one rule that keeps every rank's TreeLoRA state identical: **average the gradients across ranks after
``loss.backward()`` and before ``method.after_backward()``**. Then every rank reads the same gradients, so the running
signature, the distances fed to the search, the AdamW step and the parameters are the same everywhere; the bank and
the tree are built from those, and the search's random draws come from a generator seeded by the config and advanced
by the same number of draws on every rank. No TreeLoRA statistic needs a collective of its own: the per-step cost is
the one gradient all-reduce that DDP would make anyway (:func:`all_reduce_gradients`), and
:func:`check_identical_across_ranks` proves the claim at every task end with one small all-gather of hashes.

What stays per rank: the task loss value. TreeLoRA's ``official`` regularizer scales its penalty by
``loss.detach()``, which on a rank is the loss of that rank's shard; but the penalty's gradient is linear in that
scale, so the weighted gradient average computes ``λ · (Σ_r n_r loss_r / Σ_r n_r) · ∇(R/|R|)``, which is exactly the
single-process penalty gradient on the union batch. The ``l1`` penalty does not depend on the loss at all. So the
loss is **not** all-reduced per step for the algorithm; only the value a harness logs or checks for NaN should be (one
scalar, :func:`mean_across_ranks`, at the steps where it is read back anyway), so that every rank stops together.
Integrations that add the penalty *after* the gradients were averaged (``treelora.integrations``) must reduce the loss
value first, since the penalty is then no longer averaged.

Data: :class:`ShardedBatchSampler` (or :func:`shard` on a harness's own batch lists) gives rank r the entries
``global_batch[r::N]`` of the same global batches a single process would see, so N processes with per-rank batch B/N
train on exactly the batches of one process with batch B. With ``torch.utils.data.DistributedSampler`` the same holds
when the dataset size is a multiple of B (``DistributedSampler(dataset, N, r, seed=s)`` with ``batch_size=B // N``
versus ``DistributedSampler(dataset, 1, 0, seed=s)`` with ``batch_size=B``); otherwise it pads the epoch with repeated
examples and the last batches differ.

DDP itself also satisfies the rule (it averages gradients during ``backward``), and is what a model already wrapped
in ``DistributedDataParallel`` (e.g. by Hugging Face's Trainer) uses. The treelora harness uses
:func:`all_reduce_gradients` instead because (1) it weights each rank by its example count, so an uneven final batch
averages exactly where DDP's plain mean would not; (2) parameters without a gradient (other tasks' heads) stay
``None`` in the same collective, where DDP needs ``find_unused_parameters`` (a graph walk and a second all-reduce per
step); (3) the model stays unwrapped, so its ``state_dict`` keys, ``generate`` and evaluation are unchanged.

FSDP: supported with the **frozen base sharded and the LoRA parameters replicated** (:func:`fully_shard_frozen`:
FSDP2's ``fully_shard`` with the adapters as ``ignored_params``, their gradients averaged by
:func:`all_reduce_gradients`). TreeLoRA reads every layer's whole LoRA-A at every step (signature, distances,
penalty), so sharded adapters would need an all-gather per step for a few MB of parameters; the base weights are
where the memory is. Sharded LoRA parameters and FSDP1's ``FullyShardedDataParallel`` (which flattens parameters into
one buffer) are refused by :func:`check_fsdp` with a clear error.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")

# torchrun (and torch.distributed.launch) set these for every worker.
ENV_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BACKENDS = ("gloo", "nccl")
# A collective that waits longer than this raises instead of hanging (torch's default is 10 minutes for gloo, 10 for
# nccl; kept explicit because a rank that crashed mid-task otherwise stalls the others for that long).
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class StateMismatchError(RuntimeError):
    """The method's state (bank, tree, search, generator, running signature, ...) differs between ranks."""


class UnsupportedParallelismError(RuntimeError):
    """The model is wrapped in a way TreeLoRA cannot train (FSDP1, or LoRA parameters sharded by FSDP2)."""


class CollectiveError(RuntimeError):
    """A collective failed on this rank: usually because another rank stopped (crashed, raised, was killed) and left
    the group, in which case that rank's own error says why; otherwise a network or backend failure."""


@contextmanager
def _collective(what: str, group: Any = None) -> Iterator[None]:
    """Turn a failure of the torch.distributed call inside the block into a :class:`CollectiveError` that names the
    collective and this rank (gloo raises a bare RuntimeError such as "Connection closed by peer")."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        try:
            rank, world = dist.get_rank(group), dist.get_world_size(group)
        except (RuntimeError, ValueError):  # the group is gone already
            rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(
            f"{what} failed on rank {rank} of {world}: another rank probably stopped (its own error says why). "
            f"Backend: {first}"
        ) from exc


# --- process group --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size``, its ``local_rank`` on the node, the collective
    ``backend`` (None for a single process) and the ``device`` it trains on. ``owns_process_group``: the group was
    created by :func:`init_distributed` (and :func:`shutdown_distributed` destroys it)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def record(self, state_identical_across_ranks: bool) -> dict[str, Any]:
        """The ``"distributed"`` entry of a run's results."""
        return {
            "world_size": self.world_size,
            "backend": self.backend,
            "state_identical_across_ranks": bool(state_identical_across_ranks),
        }


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def current_context(device: str | torch.device | None = None) -> DistributedContext:
    """The context of an already initialised default process group, or a single-process context; initialises
    nothing."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistributedContext(device=_resolve_device(device, 0))
    local_rank = _env_int("LOCAL_RANK")
    rank = dist.get_rank()
    local_rank = rank if local_rank is None else local_rank
    return DistributedContext(
        rank=rank,
        local_rank=local_rank,
        world_size=dist.get_world_size(),
        backend=str(dist.get_backend()),
        device=_resolve_device(device, local_rank),
    )


def init_distributed(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> DistributedContext:
    """Join the process group torchrun describes, or report a single process.

    An already initialised default group is used as it is. Otherwise, when ``WORLD_SIZE`` > 1 in the environment
    (torchrun sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), the default group is
    created with ``backend`` (default: ``nccl`` for a CUDA device, ``gloo`` for CPU); on CUDA the device is
    ``cuda:LOCAL_RANK`` and is made current. Without those variables (or with ``WORLD_SIZE=1``) nothing is
    initialised and the context says world size 1.

    Args:
        device: ``cpu``, ``cuda`` (means ``cuda:LOCAL_RANK``) or an explicit device; None: CUDA when available.
        backend: ``gloo`` or ``nccl``; None picks by device.
        timeout: how long a collective waits for the other ranks before raising.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    if dist.is_available() and dist.is_initialized():
        context = current_context(device)
        if context.device.type == "cuda":
            torch.cuda.set_device(context.device)
        return context
    world_size = _env_int("WORLD_SIZE")
    if world_size is None or world_size == 1:
        return DistributedContext(device=_resolve_device(device, 0))
    if world_size < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world_size}")
    missing = [name for name in ENV_VARS if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but {missing} are not set: launch with torchrun "
            "(e.g. torchrun --standalone --nproc-per-node 2 ...), which sets all of "
            f"{list(ENV_VARS)}"
        )
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    resolved = _resolve_device(device, local_rank)
    if backend is None:
        backend = "nccl" if resolved.type == "cuda" else "gloo"
    if backend == "nccl" and resolved.type != "cuda":
        raise ValueError(f"backend 'nccl' needs a CUDA device, got device {resolved}")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, timeout=timeout)
    return DistributedContext(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        backend=backend,
        device=resolved,
        owns_process_group=True,
    )


def shutdown_distributed(context: DistributedContext) -> None:
    """Destroy the default process group if ``context`` created it (a group the caller made is left alone)."""
    if context.owns_process_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def abort_distributed() -> None:
    """Leave the default process group at once, whoever created it, so that the other ranks do not wait for this one.

    Called on a rank that stops with an error while the others may be inside (or about to enter) a collective: gloo
    closes this rank's connections, so their pending collective raises at once ("Connection closed by peer", turned
    into :class:`CollectiveError`) instead of waiting for the timeout; NCCL communicators are torn down with the
    group. The group cannot be used afterwards. Nothing happens without an initialised group."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def end_worker_process(code: int) -> NoReturn:
    """End a process of a multi-process run with exit status ``code``: flush the standard streams, then ``os._exit``.

    The interpreter's own shutdown is skipped on purpose. With torch 2.13 the gloo process group can outlive
    ``destroy_process_group`` (something inside torch keeps a reference to it once a custom op has run), and when one
    of its worker threads is still releasing the last collective's tensors while the interpreter shuts down, it needs
    the GIL and aborts the process ("terminate called without an active exception", exit status -6): about 1 run in
    5 of a 2-process run on a 2-core machine. Call it last, after :func:`shutdown_distributed`."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can be written anyway
            pass
    os._exit(code)


def num_ranks(group: Any = None) -> int:
    """Number of ranks in ``group`` (default: the default group); 1 when no process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


# --- gradients and values -------------------------------------------------------------------------------------------


def _reduce_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """The widest floating dtype among ``tensors``; half types widen to fp32 so that the sum over ranks does not round
    to 8 (bf16) or 11 (fp16) bits."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def all_reduce_gradients(
    params: Iterable[torch.Tensor],
    weight: float | int | torch.Tensor = 1.0,
    group: Any = None,
    *,
    present: Sequence[bool] | None = None,
    values: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Replace every parameter's gradient by the weighted mean over ranks ``Σ_r w_r g_r / Σ_r w_r``, in ONE
    collective.

    The gradients are packed into one flat buffer (as a DDP bucket would be) followed by ``values`` (if any), one "has
    a gradient" flag per parameter and the rank's weight, all-reduced with a sum, and unpacked. With ``weight`` = the
    number of examples (or tokens) the rank's loss is a mean over, the result is the gradient of the mean loss over the
    union of the ranks' batches, also when the shards are uneven or one is empty (weight 0, no backward). A parameter
    whose gradient is None on every rank keeps None (no spurious zero gradient reaches the optimizer, so its moments
    and weight decay stay untouched); one that has a gradient on some rank gets the mean on every rank. All ranks must
    pass the same parameters in the same order. A single process leaves the gradients as they are.

    Which parameters have a gradient somewhere is read back from the summed flags (one host read of P numbers, a
    synchronisation with the device) only when some parameter has none on this rank and ``present`` is not given.
    A caller that knows it from the global batch (the treelora trainer: the adapters, and the heads of the tasks in
    the batch) passes ``present`` and the step stays free of host synchronisation.

    Args:
        params: the trainable parameters (e.g. ``method.parameters()``), same order on every rank.
        weight: this rank's weight w_r >= 0 (default 1: the plain mean over ranks). Σ_r w_r must be > 0.
        group: the process group (default: the default group).
        present: optional, one bool per parameter, the same on every rank: does the parameter have a gradient on at
            least one rank. A parameter with a gradient here must be marked True.
        values: optional (K,) numbers averaged with the same weights in the same collective (e.g. the rank's loss,
            so that every rank logs and checks the loss of the union batch without a second collective).

    Returns:
        the (K,) weighted mean of ``values`` over ranks (detached; ``values`` itself in a single process), or None
        when ``values`` is None.
    """
    params = list(params)
    if not params:
        raise ValueError("params is empty: pass the trainable parameters, e.g. method.parameters()")
    if isinstance(weight, torch.Tensor):
        if weight.numel() != 1:
            raise ValueError(f"weight must be a number or a 1-element tensor, got shape {tuple(weight.shape)}")
    elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"weight must be a number >= 0 (this rank's example count), got {weight!r}")
    if values is not None and (not isinstance(values, torch.Tensor) or values.dim() != 1):
        got = f"shape {tuple(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"values must be a 1-D tensor, got {got}")
    local = [p.grad is not None for p in params]
    if present is not None:
        present = [bool(x) for x in present]
        if len(present) != len(params):
            raise ValueError(f"present has {len(present)} entries, params {len(params)}")
        wrong = [i for i, (has, known) in enumerate(zip(local, present)) if has and not known]
        if wrong:
            raise ValueError(f"params{wrong[:6]} have a gradient on this rank but are marked absent in present")
    if num_ranks(group) == 1:
        return None if values is None else values.detach()
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"params must all be on one device, got {sorted(str(d) for d in devices)}")
    device = params[0].device
    for i, p in enumerate(params):
        if p.grad is not None and p.grad.shape != p.shape:
            raise ValueError(f"params[{i}].grad has shape {tuple(p.grad.shape)}, the parameter {tuple(p.shape)}")
    # From the parameters, not the gradients: a rank without gradients must build the same buffer as the others.
    dtype = _reduce_dtype(params)
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    extra = 0 if values is None else values.numel()
    # Layout: [w_r * grads (zeros where None) | w_r * values | one flag per parameter | w_r].
    pieces = [
        p.grad.reshape(-1).to(dtype) if has else torch.zeros(n, dtype=dtype, device=device)
        for p, n, has in zip(params, sizes, local)
    ]
    if values is not None:
        pieces.append(values.detach().to(device=device, dtype=dtype))
    w = torch.as_tensor(weight, dtype=dtype, device=device).reshape(1)
    flags = torch.tensor(local, dtype=dtype).to(device, non_blocking=True)
    buffer = torch.cat([*pieces, flags, w])
    buffer[: total + extra].mul_(w)
    with _collective("the gradient all-reduce", group):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    # Σ w_r = 0 only when every rank's weight is 0; the sums are then 0 too and the gradients become 0, not NaN.
    mean = buffer[: total + extra].div_(buffer[-1].clamp_min(torch.finfo(dtype).tiny))
    if present is None:
        if all(local):
            present = local
        else:
            # Some parameter has no gradient here (an unused head, an empty shard): whether another rank produced one
            # is read from the summed flags, one host read of P numbers. This is the case in which DDP needs
            # find_unused_parameters, which reads its used-parameter bitmap on the host too; when every parameter has
            # a local gradient (the usual LoRA case) nothing is read and the step stays free of host synchronisation.
            flags_sum = buffer[total + extra : total + extra + len(params)]
            present = (flags_sum > 0).tolist()
    offset = 0
    for p, n, has in zip(params, sizes, present):
        if has:
            view = mean[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = view.to(p.dtype).clone()
            else:
                p.grad.copy_(view)
        offset += n
    return None if values is None else mean[total:].clone()


def broadcast_parameters(params: Iterable[torch.Tensor], src: int = 0, group: Any = None) -> None:
    """Copy rank ``src``'s values of ``params`` to every rank in one flattened broadcast (what DDP does when it wraps
    a model), so that adapters initialised from different random states start equal."""
    params = list(params)
    if not params or num_ranks(group) == 1:
        return
    with torch.no_grad():
        dtype = _reduce_dtype(params)
        flat = torch.cat([p.detach().reshape(-1).to(dtype) for p in params])
        with _collective("the parameter broadcast", group):
            dist.broadcast(flat, src=src, group=group)
        offset = 0
        for p in params:
            p.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


def mean_across_ranks(value: torch.Tensor, weight: float | int | torch.Tensor = 1.0, group: Any = None) -> torch.Tensor:
    """Weighted mean over ranks of a 0-d tensor (e.g. the task loss for logging), one collective of two numbers.

    Returns a new detached tensor; a single process gets ``value`` back (detached)."""
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ValueError(f"value must be a 1-element tensor, got {value!r}")
    if num_ranks(group) == 1:
        return value.detach().clone()
    dtype = _reduce_dtype([value])
    w = torch.as_tensor(weight, dtype=dtype, device=value.device).reshape(())
    pair = torch.stack([value.detach().reshape(()).to(dtype) * w, w])
    with _collective("the mean all-reduce", group):
        dist.all_reduce(pair, op=dist.ReduceOp.SUM, group=group)
    return pair[0] / pair[1].clamp_min(torch.finfo(dtype).tiny)


def _collective_device(group: Any = None) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_across_ranks(counts: Sequence[int], group: Any = None) -> list[int]:
    """Element-wise sum over ranks of integer counts (e.g. correct answers and test items of each task scored on this
    rank's share of the test sets), exact in int64, in one collective; a single process gets ``counts`` back."""
    counts = [int(c) for c in counts]
    if num_ranks(group) == 1 or not counts:
        return counts
    buffer = torch.tensor(counts, dtype=torch.int64, device=_collective_device(group))
    with _collective("the count all-reduce", group):
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    return buffer.tolist()


# --- random state ---------------------------------------------------------------------------------------------------


def broadcast_rng_state(src: int = 0, group: Any = None) -> None:
    """Give every rank rank ``src``'s global torch RNG state (the CPU generator and, with CUDA, the current device's),
    one small collective. Use it before a step that draws random numbers which must agree on every rank (a fresh
    adapter initialised at a task boundary), when the ranks' streams have diverged (dropout draws as many numbers as
    the rank's shard holds). A single process keeps its state."""
    if num_ranks(group) == 1:
        return
    # Only when CUDA is in use already: reading a device's state would otherwise create a CUDA context on it.
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    state: list[Any] = [(torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None)]
    with _collective("the RNG state broadcast", group):
        dist.broadcast_object_list(state, src=src, group=group)
    cpu, device_state = state[0]
    torch.set_rng_state(cpu)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state)


def seed_per_rank(group: Any = None) -> None:
    """Reseed the global torch RNGs of every rank from one draw of the current (identical) state plus the rank, so
    that the ranks' dropout masks are independent of each other yet reproducible: a run resumed from a checkpoint
    draws the same masks. Call after :func:`broadcast_rng_state`; a single process keeps its state."""
    if num_ranks(group) == 1:
        return
    base = int(torch.randint(2**62, (1,)).item())
    torch.manual_seed(base + dist.get_rank(group))


# --- state fingerprints ---------------------------------------------------------------------------------------------


def _feed(h: Any, obj: Any) -> None:
    """Canonical, type-tagged encoding of a state_dict-like object into the hash ``h``."""
    if obj is None:
        h.update(b"N")
    elif isinstance(obj, bool):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, int):
        h.update(b"I%d;" % obj)
    elif isinstance(obj, float):
        h.update(b"F" + obj.hex().encode() + b";")
    elif isinstance(obj, str):
        data = obj.encode()
        h.update(b"S%d;" % len(data) + data)
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y%d;" % len(obj) + bytes(obj))
    elif isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"X{t.dtype};{tuple(t.shape)};".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy())
    elif isinstance(obj, (list, tuple)):
        h.update(b"%s%d;" % (b"L" if isinstance(obj, list) else b"T", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, dict):
        h.update(b"D%d;" % len(obj))
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (torch.dtype, torch.device)):
        _feed(h, str(obj))
    else:
        raise TypeError(f"cannot fingerprint an object of type {type(obj).__name__}")


def state_fingerprint(state: Any) -> str:
    """SHA-256 (hex) of a canonical encoding of ``state``: nested dicts (keys sorted), lists, tuples, numbers
    (floats by their exact bits), strings, None and tensors (dtype, shape and raw bytes, read on the host). Equal
    states give equal fingerprints on any rank; one changed bit changes it."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def method_fingerprints(method: Any, include_parameters: bool = True) -> dict[str, str]:
    """One fingerprint per component of ``method.state_dict()``: each top-level entry, with dict entries split one
    level (TreeLoRA gives ``treelora.bank``, ``treelora.tree``, ``treelora.search``, ``treelora.generator``,
    ``treelora.acc``, ...), plus ``parameters`` (the values of ``method.parameters()``) when asked."""
    state = method.state_dict()
    out: dict[str, str] = {}
    for key in sorted(state, key=str):
        value = state[key]
        if isinstance(value, dict) and value:
            for sub in sorted(value, key=str):
                out[f"{key}.{sub}"] = state_fingerprint(value[sub])
        else:
            out[str(key)] = state_fingerprint(value)
    if include_parameters:
        out["parameters"] = state_fingerprint([p.detach() for p in method.parameters()])
    return out


def check_identical_across_ranks(
    method: Any, include_parameters: bool = True, label: str | None = None, group: Any = None
) -> dict[str, str]:
    """All-gather every rank's :func:`method_fingerprints` and raise :class:`StateMismatchError` naming the ranks and
    the components that differ from rank 0. Returns this rank's fingerprints; a single process checks nothing.

    Every rank raises together (each sees all fingerprints), so no rank is left waiting in a later collective.

    Args:
        method: a :class:`treelora.cl.ContinualMethod` (anything with ``state_dict()`` and ``parameters()``).
        include_parameters: also compare the trainable parameters' values.
        label: where the check ran, for the message (e.g. ``"end of task 3"``).
        group: the process group (default: the default group).
    """
    mine = method_fingerprints(method, include_parameters)
    world = num_ranks(group)
    if world == 1:
        return mine
    gathered: list[Any] = [None] * world
    with _collective("the state fingerprint all-gather", group):
        dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    problems = []
    for rank, theirs in enumerate(gathered[1:], start=1):
        keys = sorted(set(reference) | set(theirs))
        differ = [k for k in keys if reference.get(k) != theirs.get(k)]
        if differ:
            problems.append(f"rank {rank} differs from rank 0 in {differ}")
    if problems:
        where = f" at {label}" if label else ""
        raise StateMismatchError(
            f"{type(method).__name__} state is not identical across the {world} ranks{where}: "
            + "; ".join(problems)
            + ". Gradients must be averaged across ranks before after_backward() (all_reduce_gradients or DDP), "
            "every rank must run the same number of steps, and the adapters must start equal (broadcast_parameters)."
        )
    return mine


# --- rank-0 files ---------------------------------------------------------------------------------------------------


def is_main_process(group: Any = None) -> bool:
    """True on rank 0 (and in a single process)."""
    return num_ranks(group) == 1 or dist.get_rank(group) == 0


def barrier(group: Any = None) -> None:
    """Wait for every rank (nothing in a single process)."""
    if num_ranks(group) > 1:
        with _collective("the barrier", group):
            dist.barrier(group=group)


def run_on_main(fn: Callable[..., T], *args: Any, group: Any = None, **kwargs: Any) -> T:
    """Run ``fn(*args, **kwargs)`` on rank 0 only (writing results, checkpoints, plots), then share its return value
    with every rank. If it raises on rank 0 every rank raises (a RuntimeError carrying the message on the others), so
    none waits forever in the next collective. The return value must be picklable."""
    if num_ranks(group) == 1:
        return fn(*args, **kwargs)
    outcome: list[Any] = [None]
    error: BaseException | None = None
    if dist.get_rank(group) == 0:
        try:
            outcome[0] = ("ok", fn(*args, **kwargs))
        except Exception as exc:
            error = exc
            outcome[0] = ("error", f"{type(exc).__name__}: {exc}")
    with _collective("the broadcast after a rank-0 write", group):
        dist.broadcast_object_list(outcome, src=0, group=group)
    status, value = outcome[0]
    if error is not None:
        raise error
    if status == "error":
        raise RuntimeError(f"rank 0 failed while writing: {value}")
    return value


def save_on_main(obj: Any, path: str | os.PathLike, group: Any = None) -> None:
    """``torch.save`` on rank 0 only, atomically (a temporary file in the same folder, then a rename), then a
    barrier so every rank can read it."""

    def write() -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
        try:
            torch.save(obj, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    run_on_main(write, group=group)


# --- data -----------------------------------------------------------------------------------------------------------


def shard(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s part of a global batch: ``batch[rank::world_size]`` (the stride DistributedSampler uses), so the
    ranks' parts are disjoint and their union is the batch. The parts differ in size by at most one; a part is empty
    when the batch holds fewer entries than ranks."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    return list(batch[rank::world_size])


class ShardedBatchSampler(Sampler[list[int]]):
    """Batch sampler that gives each rank its :func:`shard` of the global batches one process would draw.

    Every rank draws the same permutation (``torch.randperm`` seeded with ``seed + epoch``, as DistributedSampler
    does), cuts it into global batches of ``batch_size`` and yields the local part ``global[rank::world_size]`` of
    each. So the ranks run the same number of steps (TreeLoRA's search and λ ramp advance per step, and must agree),
    and 2 processes see exactly the global batches of 1 process with the same seed. Weight each rank's gradient by
    ``len(local batch)`` in :func:`all_reduce_gradients` so that an uneven last batch averages exactly.

    Args:
        num_examples: dataset size.
        batch_size: the GLOBAL batch size B (each rank gets about B / world_size).
        rank, world_size: this rank and the number of ranks (default: from the initialised process group).
        shuffle: permute each epoch (False: dataset order).
        seed: permutation seed, the same on every rank.
        drop_last: drop the last global batch when it is smaller than B. Without it, a last batch with fewer than
            ``world_size`` examples leaves some ranks an empty list (their loss weight is 0; a DataLoader's default
            collate cannot batch an empty list, so use ``drop_last=True`` or a dataset size that avoids it there).
    """

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        for name, value, low in (("num_examples", num_examples, 0), ("batch_size", batch_size, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if world_size is None:
            world_size = num_ranks()
        if rank is None:
            rank = dist.get_rank() if world_size > 1 else 0
        shard([], rank, world_size)  # validates rank and world_size
        self.num_examples, self.batch_size = num_examples, batch_size
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the permutation of ``epoch`` (call before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[list[int]]:
        """This epoch's global batches (dataset indices), identical on every rank."""
        n = self.num_examples
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(n))
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield shard(batch, self.rank, self.world_size)

    def __len__(self) -> int:
        full, rest = divmod(self.num_examples, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


# --- FSDP -----------------------------------------------------------------------------------------------------------


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def check_fsdp(method: Any, model: nn.Module | None = None) -> None:
    """Refuse the FSDP layouts TreeLoRA cannot train, with the way out in the message.

    Raises :class:`UnsupportedParallelismError` when ``model`` contains FSDP1 ``FullyShardedDataParallel`` modules
    (their parameters are flattened into shared buffers and freed between forwards), or when any of the method's
    trainable parameters is an FSDP2 DTensor (sharded). Supported: a base sharded by FSDP2 with the LoRA parameters
    (and heads) replicated, as :func:`fully_shard_frozen` sets up.
    """
    if model is not None:
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:
            FullyShardedDataParallel = ()  # no FSDP1 in this torch build: nothing to detect
        wrapped = [name or "<root>" for name, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
        if wrapped:
            raise UnsupportedParallelismError(
                f"model holds FSDP1 FullyShardedDataParallel modules ({wrapped[:3]}...): they flatten parameters "
                "into shared buffers that TreeLoRA cannot read per layer. Shard the frozen base with FSDP2 instead: "
                "treelora.cl.distributed.fully_shard_frozen(model, method)."
            )
    sharded = [i for i, p in enumerate(method.parameters()) if _is_dtensor(p)]
    if sharded:
        raise UnsupportedParallelismError(
            f"{len(sharded)} of the method's trainable parameters are sharded by FSDP2 (DTensor; indices "
            f"{sharded[:6]}): TreeLoRA reads every layer's whole LoRA matrices at every step. Keep them replicated: "
            "fully_shard(module, ignored_params=set(method.parameters())), or "
            "treelora.cl.distributed.fully_shard_frozen(model, method)."
        )


def fully_shard_frozen(
    model: nn.Module,
    method: Any,
    modules: Sequence[nn.Module] = (),
    mesh: Any = None,
    **fully_shard_kwargs: Any,
) -> nn.Module:
    """Shard the frozen base of ``model`` with FSDP2 and keep the method's trainable parameters replicated.

    ``fully_shard`` is applied to each of ``modules`` (e.g. the transformer blocks, so that one block's weights are
    gathered at a time) and then to ``model``, every call with ``ignored_params`` = the method's parameters: FSDP
    neither shards nor reduces those, and :func:`all_reduce_gradients` averages their gradients as without FSDP.
    Needs an initialised process group; ``mesh`` defaults to a 1-D mesh over all ranks on the parameters' device.
    Returns ``model`` (modified in place).
    """
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("fully_shard_frozen needs an initialised process group: call init_distributed() first")
    ignored = set(method.parameters())
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next(iter(ignored)).device
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for module in modules:
        fully_shard(module, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, ignored_params=ignored, **fully_shard_kwargs)
    check_fsdp(method, model)
    return model
