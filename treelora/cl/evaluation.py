"""Scoring a task's test set: classification accuracy, multiple-choice accuracy by option likelihood, and exact match
of greedy answers."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from treelora.cl.batching import BatchBuilder
from treelora.cl.distributed import shard
from treelora.cl.objectives import TaskHeads
from treelora.data.stream import LabelledData, Stream
from treelora.models import LoadedModel


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes (and its output returns) the key/value cache: ``cache`` in
    transformers releases that renamed it (5.x; they warn on the old name), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Evaluator:
    """Accuracy of the model, as it is now, on any task's test set, or counts on one rank's share of it.

    Under several processes each rank scores the test items ``rank, rank + N, ...`` (:meth:`counts`) and the trainer
    sums the counts over ranks: the same numbers as one process scoring everything, in 1/N of the time.

    Args:
        stream: the tasks. model: the backbone (with its LoRA layers). heads: the classification heads.
        batches: builds the input tensors. eval_batch_size: batch size of classification tasks (multiple-choice
            questions are scored one at a time, their options sharing the prompt's key/value cache).
        rank, world_size: this process's share of every test set (default: the whole set).
    """

    def __init__(
        self,
        stream: Stream,
        model: LoadedModel,
        heads: TaskHeads,
        batches: BatchBuilder,
        eval_batch_size: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.stream, self.loaded, self.heads, self.batches = stream, model, heads, batches
        self.eval_batch_size = eval_batch_size
        shard([], rank, world_size)  # validates rank and world_size
        self.rank, self.world_size = rank, world_size

    @property
    def device(self) -> torch.device:
        return self.batches.device

    def evaluate(self, task: int, upto: int) -> float:
        """Accuracy in [0, 1] on ``task``'s test set (this rank's share of it under several processes) with the model
        as it is after training task ``upto``."""
        correct, total = self.counts(task, upto)
        return correct / total

    @torch.no_grad()
    def counts(self, task: int, upto: int) -> tuple[int, int]:
        """(correct, scored) on this rank's share of ``task``'s test set with the model as it is after training task
        ``upto`` (class-incremental heads: those of tasks 0..max(upto, task)). A share can be empty: (0, 0)."""
        self.loaded.model.eval()
        t = self.stream.tasks[task]
        if t.kind == "classification":
            return self.classification_counts(task, max(upto, task))
        items = shard(t.test, self.rank, self.world_size)
        if t.metric == "multiple_choice":
            return self.multiple_choice_correct(items), len(items)
        return self.exact_match_correct(items), len(items)

    def classification_counts(self, task: int, upto: int) -> tuple[int, int]:
        """(correct, scored) over this rank's share of ``task``'s test examples: an example is correct when its
        arg-max class (among the heads :meth:`TaskHeads.logits` uses) is the label."""
        data: LabelledData = self.stream.tasks[task].test
        index = shard(range(len(data)), self.rank, self.world_size)
        correct = 0
        bs = self.eval_batch_size
        for start in range(0, len(index), bs):
            items = [(task, i) for i in index[start : start + bs]]
            batch = self.batches.classification(items, "test")
            logits, classes = self.heads.logits(self.loaded.features(batch), task, upto)
            pred = torch.tensor(classes, device=self.device)[logits.argmax(1)]
            correct += int((pred == batch["labels"]).sum())
        return correct, len(index)

    @torch.no_grad()
    def option_scores(self, items: list[dict]) -> list[torch.Tensor]:
        """Per item, the total log-likelihood (float64) of each option's tokens after the prompt: a tensor of
        len(options) per item.

        The prompt runs once per item and its key/value cache is shared by the options (4 options cost one prompt
        pass instead of four); the prompt is cut on the left so that prompt + the longest option fit ``max_length``.
        """
        model = self.loaded.model
        model.eval()
        tok = self.loaded.tokenizer
        max_length = self.batches.max_length
        cache_name = cache_keyword(model)
        scores = []
        for item in items:
            options = [tok.encode(" " + o, add_special_tokens=False) for o in item["options"]]
            options = [a[: max_length - 1] for a in options]
            width = max(len(a) for a in options)
            prompt = tok.encode(item["prompt"], add_special_tokens=False)[-max(max_length - width, 1) :]
            out = model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1)
            first = out.logits[0, -1].float().log_softmax(-1)
            cache = getattr(out, cache_name)
            cache.batch_repeat_interleave(len(options))
            ids = torch.full((len(options), width), tok.pad_token_id, dtype=torch.long)
            for i, a in enumerate(options):
                ids[i, : len(a)] = torch.tensor(a)
            # Right padding needs no mask here: a padded position comes after every real token of its row.
            rest = model(input_ids=ids.to(self.device), **{cache_name: cache}).logits.float().log_softmax(-1)
            row = torch.empty(len(options), dtype=torch.float64)
            for i, a in enumerate(options):
                row[i] = float(first[a[0]]) + sum(float(rest[i, k - 1, a[k]]) for k in range(1, len(a)))
            scores.append(row)
        return scores

    def multiple_choice_correct(self, items: list[dict]) -> int:
        """How many items' best option (the highest total log-likelihood after the prompt) is the answer."""
        scores = self.option_scores(items)
        return sum(item["options"][int(s.argmax())] == item["answer"] for item, s in zip(items, scores))

    def exact_match_correct(self, items: list[dict]) -> int:
        """Greedy generation, one item at a time; how many stripped answers equal the reference."""
        tok = self.loaded.tokenizer
        correct = 0
        for item in items:
            prompt, answer = self.batches.encode_pair(item["prompt"], item["answer"])
            ids = torch.tensor([prompt], device=self.device)
            out = self.loaded.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=len(answer) + 8,
                pad_token_id=tok.pad_token_id,
            )
            text = tok.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True)
            correct += text.strip() == item["answer"].strip()
        return correct
