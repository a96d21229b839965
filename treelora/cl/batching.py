"""Batches for the trainer: which examples go into each training batch, and the tensors a model consumes.

Two separate jobs:

* **order**: :func:`epoch_batches` lists one epoch's batches as ``(task index, example index)`` pairs. The shuffle
  comes from a :class:`Sampler`; the default :class:`SeededShuffle` draws it from a generator seeded by
  ``(seed, task, epoch)``, so a resumed run sees the same order as an uninterrupted one, and every rank of a
  data-parallel run draws the same global batches. The trainer then gives rank r of N the entries
  ``global_batch[r::N]`` (:func:`treelora.cl.distributed.shard`), so N processes train on exactly the batches of
  one process.
* **tensors**: :class:`BatchBuilder` turns such pairs into model inputs on the device: tokenized texts or stacked
  images with labels and task ids for classification streams, right-padded ``prompt + answer`` sequences with labels
  on the answer tokens for instruct streams.
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import torch

from treelora.data.stream import Stream

Item = tuple[int, int]
"""One example: (task index in the stream, example index in that task's split)."""


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator whose seed is a fixed mix of ``keys`` (e.g. seed, task, epoch): the same keys give the same
    stream of numbers in any process."""
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class Sampler(Protocol):
    """Decides the order of an epoch's examples. Under several processes every rank must return the same order (the
    trainer shards each global batch across the ranks itself)."""

    def order(self, num_items: int, anchor: int, epoch: int) -> list[int]:
        """A permutation (or a subset) of ``range(num_items)`` for ``epoch`` of the training step anchored at task
        ``anchor``."""
        ...


class SeededShuffle:
    """A fresh uniform shuffle per (task, epoch), from :func:`seeded_generator` ``(seed, anchor, epoch)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def order(self, num_items: int, anchor: int, epoch: int) -> list[int]:
        return torch.randperm(num_items, generator=seeded_generator(self.seed, anchor, epoch)).tolist()


def epoch_batches(
    stream: Stream, tasks: Sequence[int], anchor: int, epoch: int, batch_size: int, sampler: Sampler
) -> list[list[Item]]:
    """One epoch's training batches over the train splits of ``tasks`` (several tasks mixed for joint training).

    Args:
        stream: the stream. tasks: indices of the tasks whose examples are drawn.
        anchor: the task index that seeds the order (the current task; 0 for joint training).
        epoch: 0-based epoch. batch_size: examples per batch (the last batch may be smaller).
        sampler: the order of the examples.
    Returns:
        batches of ``(task, example)`` pairs.
    """
    items = [(t, i) for t in tasks for i in range(len(stream.tasks[t].train))]
    items = [items[i] for i in sampler.order(len(items), anchor, epoch)]
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


class BatchBuilder:
    """Tensors for the model from ``(task, example)`` pairs, on ``device``.

    Args:
        stream: the tasks. tokenizer: the model's tokenizer (None for image streams).
        max_length: maximum tokens per text input (prompt + answer for instruct streams; the prompt is cut on the
            left so that the answer always fits).
        device: where the tensors go.
    """

    def __init__(self, stream: Stream, tokenizer: Any, max_length: int, device: torch.device) -> None:
        self.stream, self.tokenizer, self.max_length, self.device = stream, tokenizer, max_length, device

    def __call__(self, items: Sequence[Item], split: str) -> dict[str, Any]:
        """The batch of ``items`` from ``split`` (``"train"`` or ``"test"``), in the stream's kind of batch."""
        if self.stream.kind == "classification":
            return self.classification(items, split)
        return self.instruct(items, split)

    def text(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenized texts: ``input_ids`` and ``attention_mask`` (B, S), padded to the longest, cut at max_length."""
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

    def classification(self, items: Sequence[Item], split: str) -> dict[str, Any]:
        """``pixel_values`` (B, C, H, W) or tokenized texts, ``labels`` (B,) global class ids, ``task`` (B,)."""
        datas = [getattr(self.stream.tasks[t], split) for t, _ in items]
        if self.stream.input_kind == "image":
            batch: dict[str, Any] = {
                "pixel_values": torch.stack([d.inputs[i] for d, (_, i) in zip(datas, items)]).to(self.device)
            }
        else:
            batch = self.text([d.inputs[i] for d, (_, i) in zip(datas, items)])
        batch["labels"] = torch.stack([d.labels[i] for d, (_, i) in zip(datas, items)]).to(self.device)
        batch["task"] = torch.tensor([t for t, _ in items], device=self.device)
        return batch

    def encode_pair(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (cut on the left to fit) and of `` answer`` + end-of-sequence."""
        tok = self.tokenizer
        answer_ids = tok.encode(" " + answer, add_special_tokens=False)
        if tok.eos_token_id is not None:
            answer_ids = [*answer_ids, tok.eos_token_id]
        prompt_ids = tok.encode(prompt, add_special_tokens=False)
        room = max(self.max_length - len(answer_ids), 1)
        return prompt_ids[-room:], answer_ids[: self.max_length - 1]

    def pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
        """Right-padded ``input_ids`` / ``attention_mask`` (B, S) and ``labels`` (B, S) (-100 outside the answer) of
        (prompt, answer) id pairs, and ``num_targets``: how many answer tokens the next-token loss scores (the labels
        after the first column), counted on the host before the tensors move to the device."""
        pad = self.tokenizer.pad_token_id
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
            "num_targets": int((labels[:, 1:] != -100).sum()),
        }

    def instruct(self, items: Sequence[Item], split: str) -> dict[str, Any]:
        """The padded ``prompt + answer`` sequences of instruct items (see :meth:`pad`)."""
        pairs = []
        for t, i in items:
            item = getattr(self.stream.tasks[t], split)[i]
            pairs.append(self.encode_pair(item["prompt"], item["answer"]))
        return self.pad(pairs)
