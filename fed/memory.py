"""What one client's training holds in memory, estimated from the model's shape and the run config.

Four parts, in bytes: the **weights** (every parameter, as stored: float32), the **activations** a backward
pass needs for one forward chunk of ``chunk x length`` tokens, the **per-sample gradients** DP-SGD with hooks
keeps for a whole batch until its step, and the **optimizer** state plus the summed gradient of the trained
tensors. The base is frozen, so its matrix products save no inputs for a weight gradient; what a Llama-type
block keeps per token (counted from autograd's saved tensors of SmolLM2 under scaled dot-product attention,
which never materialises the ``length x length`` scores) is about ``12 hidden + 5 intermediate`` values: its
norms' inputs and outputs, the attention's query, key, value and output before and after the rotary embedding,
the MLP's gate, up and activation tensors, the adapter's inputs. The loss keeps the logits twice (shifted,
and transposed for the cross-entropy) and the backward pass adds their gradient: ``3 vocab`` float32 values
per token. Gradient checkpointing keeps one ``hidden``-wide input per block, plus one block's activations
while it is recomputed. An estimate, not a bound: padding to the longest text of a batch only lowers it, a
Poisson batch may exceed its expected size, and the allocator's caching and framework buffers come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fed.config import RunConfig

PER_TOKEN_HIDDEN = 12  # values of width `hidden` a frozen block keeps per token for the backward pass
PER_TOKEN_INTERMEDIATE = 5  # values of width `intermediate` (the MLP's gate, up and activation tensors)
PER_TOKEN_VOCAB = 3  # float32 values of width `vocab` per token: the logits twice and their gradient


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    activations: int
    per_sample: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.per_sample + self.optimizer

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("weights", self.weights),
            ("activations", self.activations),
            ("per-sample gradients", self.per_sample),
            ("optimizer and gradients", self.optimizer),
            ("total", self.total),
        ]


def _shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(hidden, intermediate, blocks, vocab) from the model's Hugging Face config (GPT-2 names them apart)."""
    c: Any = model.config  # every model fedlora loads carries its Hugging Face config
    hidden = int(getattr(c, "hidden_size", None) or c.n_embd)
    intermediate = int(getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * hidden)
    return hidden, intermediate, int(c.num_hidden_layers), int(c.vocab_size)


def estimate(model: nn.Module, cfg: RunConfig, activation_bytes: int = 4) -> MemoryEstimate:
    """The estimate for ``model`` (adapter injected, so its trainable tensors are known) trained as ``cfg`` says;
    ``activation_bytes``: 2 when the base runs in bfloat16 (``train.precision``), else 4."""
    hidden, intermediate, blocks, vocab = _shape(model)
    t = cfg.train
    ghost = cfg.dp.example_level and cfg.dp.grad_sample_mode == "ghost"
    chunk = t.batch_size if t.micro_batch == 0 or ghost else min(t.micro_batch, t.batch_size)
    tokens = chunk * cfg.model.max_length
    per_block = PER_TOKEN_HIDDEN * hidden + PER_TOKEN_INTERMEDIATE * intermediate
    kept = (blocks * hidden + per_block) if t.gradient_checkpointing else blocks * per_block
    causal = cfg.task == "causal-lm"
    activations = tokens * (kept * activation_bytes + (PER_TOKEN_VOCAB * vocab * 4 if causal else 0))
    params = list(model.parameters())
    trained = sum(p.numel() for p in params if p.requires_grad)
    states = {"adamw": 2, "sgd": 1 if t.momentum > 0 else 0}[t.optimizer]
    per_sample = t.batch_size * trained * 4 if cfg.dp.example_level and not ghost else 0
    return MemoryEstimate(
        weights=sum(p.numel() * p.element_size() for p in params),
        activations=activations,
        per_sample=per_sample,
        optimizer=(1 + states) * trained * 4,
    )


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"
