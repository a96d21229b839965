"""Scoring a task's test set: classification accuracy, multiple-choice accuracy by option likelihood, and exact match
of greedy answers."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from treelora.cl.batching import BatchBuilder
from treelora.cl.objectives import TaskHeads
from treelora.data.stream import LabelledData, Stream
from treelora.models import LoadedModel


def cache_keyword(model: nn.Module) -> str:
    """The name under which ``model``'s forward takes (and its output returns) the key/value cache: ``cache`` in
    transformers releases that renamed it (5.x; they warn on the old name), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Evaluator:
    """Accuracy of the model, as it is now, on any task's test set.

    Args:
        stream: the tasks. model: the backbone (with its LoRA layers). heads: the classification heads.
        batches: builds the input tensors. eval_batch_size: batch size of classification tasks (multiple-choice
            questions are scored one at a time, their options sharing the prompt's key/value cache).
    """

    def __init__(
        self, stream: Stream, model: LoadedModel, heads: TaskHeads, batches: BatchBuilder, eval_batch_size: int
    ) -> None:
        self.stream, self.loaded, self.heads, self.batches = stream, model, heads, batches
        self.eval_batch_size = eval_batch_size

    @property
    def device(self) -> torch.device:
        return self.batches.device

    @torch.no_grad()
    def evaluate(self, task: int, upto: int) -> float:
        """Accuracy in [0, 1] on ``task``'s test set with the model as it is after training task ``upto``
        (class-incremental heads: those of tasks 0..max(upto, task))."""
        self.loaded.model.eval()
        t = self.stream.tasks[task]
        if t.kind == "classification":
            return self.classification_accuracy(task, max(upto, task))
        if t.metric == "multiple_choice":
            return self.multiple_choice_accuracy(t.test)
        return self.exact_match_accuracy(t.test)

    def classification_accuracy(self, task: int, upto: int) -> float:
        """Share of ``task``'s test examples whose arg-max class (among the heads :meth:`TaskHeads.logits` uses) is
        the label."""
        data: LabelledData = self.stream.tasks[task].test
        correct = 0
        bs = self.eval_batch_size
        for start in range(0, len(data), bs):
            items = [(task, i) for i in range(start, min(start + bs, len(data)))]
            batch = self.batches.classification(items, "test")
            logits, classes = self.heads.logits(self.loaded.features(batch), task, upto)
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

    def multiple_choice_accuracy(self, items: list[dict]) -> float:
        """Pick the option with the highest total log-likelihood after the prompt; accuracy over items."""
        scores = self.option_scores(items)
        correct = sum(item["options"][int(s.argmax())] == item["answer"] for item, s in zip(items, scores))
        return correct / len(items)

    def exact_match_accuracy(self, items: list[dict]) -> float:
        """Greedy generation, one item at a time; an answer is right when its stripped text equals the reference."""
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
        return correct / len(items)
