"""What "an example" means per task: how rows become tensors and what each example's loss is.

The loss is returned per example (shape ``[batch]``), never pre-averaged over the batch: DP-SGD clips
per example, and a causal LM's loss is the mean over *that example's* answer tokens, so no example's
gradient depends on the length of another (a batch-coupled loss would void the clipping bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

IGNORE = -100


class Task(Protocol):
    def encode(self, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]: ...

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-example loss and per-example correctness (1.0/0.0, or NaN where it has no meaning)."""
        ...

    def overlong(self, rows: dict[str, list[Any]]) -> int:
        """How many rows are longer than ``max_length`` tokens (``encode`` truncates them)."""
        ...

    def lengths(self, rows: dict[str, list[Any]]) -> list[int]:
        """Tokens each row occupies once encoded (truncation included): what padding is measured against."""
        ...


@dataclass(frozen=True)
class Classification:
    tokenizer: Any
    max_length: int

    def encode(self, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(rows["text"]), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.as_tensor(rows["label"], dtype=torch.long),
        }

    def overlong(self, rows: dict[str, list[Any]]) -> int:
        return sum(len(ids) > self.max_length for ids in self.tokenizer(list(rows["text"]))["input_ids"])

    def lengths(self, rows: dict[str, list[Any]]) -> list[int]:
        return [min(len(ids), self.max_length) for ids in self.tokenizer(list(rows["text"]))["input_ids"]]

    def _logits(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._logits(model, batch), batch["labels"], reduction="none")

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._logits(model, batch)
        loss = F.cross_entropy(logits, batch["labels"], reduction="none")
        return loss, (logits.argmax(-1) == batch["labels"]).float()


@dataclass(frozen=True)
class CausalLM:
    """Instruction tuning: the loss covers the response tokens only (the prompt is context)."""

    tokenizer: Any
    max_length: int

    def _prompt(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return f"### Instruction:\n{prompt}\n### Response:\n"

    def overlong(self, rows: dict[str, list[Any]]) -> int:
        eos = self.tokenizer.eos_token or ""
        texts = [self._prompt(p) + r + eos for p, r in zip(rows["prompt"], rows["response"])]
        return sum(len(ids) > self.max_length for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def lengths(self, rows: dict[str, list[Any]]) -> list[int]:
        return self.encode(rows)["attention_mask"].sum(1).tolist()

    def encode(self, rows: dict[str, list[Any]]) -> dict[str, torch.Tensor]:
        eos = self.tokenizer.eos_token or ""
        ids, labels = [], []
        for prompt, response in zip(rows["prompt"], rows["response"]):
            p = self.tokenizer(self._prompt(prompt), add_special_tokens=False)["input_ids"]
            r = self.tokenizer(response + eos, add_special_tokens=False)["input_ids"]
            p = p[-(self.max_length // 2) :]  # keep the end of a long prompt, where the question is
            r = r[: self.max_length - len(p)]
            ids.append(p + r)
            labels.append([IGNORE] * len(p) + r)
        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([x + [pad] * (width - len(x)) for x in ids]),
            "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
            "labels": torch.tensor([x + [IGNORE] * (width - len(x)) for x in labels]),
        }

    def per_example_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        targets = batch["labels"][:, 1:]
        token_loss = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), targets, reduction="none", ignore_index=IGNORE
        )  # [batch, seq-1]
        counted = (targets != IGNORE).sum(1).clamp(min=1)
        return token_loss.sum(1) / counted

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        loss = self.per_example_loss(model, batch)
        return loss, torch.full_like(loss, float("nan"))


def make_task(task: str, tokenizer: Any, max_length: int) -> Task:
    """The task object for a config's ``task`` value."""
    kinds: dict[str, Callable[[Any, int], Task]] = {"classification": Classification, "causal-lm": CausalLM}
    if task not in kinds:
        raise ValueError(f"unknown task {task!r}; accepted: {', '.join(kinds)}")
    return kinds[task](tokenizer, max_length)
