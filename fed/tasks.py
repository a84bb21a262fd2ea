"""What "an example" means per task: how rows become tensors and what each example's loss is.

The loss is returned per example (shape ``[batch]``), never pre-averaged over the batch: DP-SGD clips
per example, and a causal LM's loss is the mean over *that example's* answer tokens, so no example's
gradient depends on the length of another (a batch-coupled loss would void the clipping bound).
"""

from __future__ import annotations

import string
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


INSTRUCTION = "### Instruction:\n{prompt}\n### Response:\n"
"""The prompt format of ``model.template = "auto"`` for a tokenizer without a chat template."""


def template_problems(template: str) -> list[str]:
    """Why ``template`` is not a ``model.template``: ``auto``, ``chat``, or a format string whose only field
    is ``{prompt}`` (literal braces doubled)."""
    if template in ("auto", "chat"):
        return []
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        return [f"model.template={template!r} is not a format string ({err}); double a literal brace: {{{{ }}}}"]
    if fields != ["prompt"]:
        return [
            f"model.template={template!r} must be 'auto', 'chat', or a format string with exactly one "
            f"field, {{prompt}} (it has {fields or 'none'}), e.g. {INSTRUCTION!r}"
        ]
    return []


@dataclass(frozen=True)
class CausalLM:
    """Instruction tuning: the loss covers the response tokens only (the prompt is context).

    ``template`` (``model.template``) turns a row's prompt into the model's input: ``chat`` renders it as one
    user turn with the tokenizer's chat template and the assistant's generation prompt; a format string puts it
    in place of ``{prompt}``; ``auto`` is ``chat`` when the tokenizer has a chat template, else ``INSTRUCTION``.
    The response follows, then the end-of-sequence token.
    """

    tokenizer: Any
    max_length: int
    template: str = "auto"

    def __post_init__(self) -> None:
        problems = template_problems(self.template)
        if problems:
            raise ValueError(problems[0])
        if self.template == "chat" and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                "model.template='chat' but this model's tokenizer has no chat template; give a format string "
                f"with {{prompt}} (e.g. {INSTRUCTION!r}) or 'auto'"
            )

    def _prompt(self, prompt: str) -> str:
        chat = self.template == "chat" or (self.template == "auto" and getattr(self.tokenizer, "chat_template", None))
        if chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        return (INSTRUCTION if self.template == "auto" else self.template).format(prompt=prompt)

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


def make_task(task: str, tokenizer: Any, max_length: int, template: str = "auto") -> Task:
    """The task object for a config's ``task`` value (``template``: a causal LM's ``model.template``)."""
    if task == "classification":
        return Classification(tokenizer, max_length)
    if task == "causal-lm":
        return CausalLM(tokenizer, max_length, template)
    raise ValueError(f"unknown task {task!r}; accepted: classification, causal-lm")
