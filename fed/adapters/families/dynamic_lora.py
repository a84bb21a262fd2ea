"""Dynamic LoRA (Liao et al., arXiv 2501.14859): layer-importance rank allocation and an input gate.

The paper gives two mechanisms, at abstract level only: reallocating adapter capacity across layers
by their importance, and adapting to the input. Our federated formulation (docs/architecture.md):

    h = W0 x + s · g(x) · B · diag(m) · A x,     g(x) = 1 + tanh(wᵀx)   (per token)

- ``A`` (r_max × d_in) and ``B`` (d_out × r_max) have a fixed maximum rank ``r_max = 2·rank``, so tensor
  shapes never change; the rank mask ``m`` (a 0/1 vector, ``rank_mask``) switches slots on and off.
  Every layer starts with ``rank`` slots on; the total ``rank × layers`` is the budget.
- The mask is **server-owned**: the server scores each layer by the change the round's aggregated
  update made to its dense update, per active slot, and reallocates the budget between rounds
  (``allocate_ranks``, applied by ``DynamicLora.after_aggregate``). Clients read it and never train
  it. The scores are computed from aggregated deltas only (under DP: post-processing), so nothing a
  client computes from its activations leaves it except through the DP-SGD update.
- The gate ``w`` is an ``nn.Linear(d_in, 1)`` trained on the client like A and B (zero init: g = 1,
  plain LoRA at the start) and averaged by the server; under DP it is clipped and noised with them.
- The per-layer weighting is the rank allocation itself (``s = alpha / rank`` is fixed), so no extra
  trainable scale (which would need its own grad sampler) is involved.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from fed.adapters.base import Adapter, AdapterFamily, AdapterSpec, Aggregation, Product, TensorGroup, replace_linears
from fed.adapters.registry import register_family
from fed.seeding import generator


def max_rank(rank: int) -> int:
    """The fixed slot count per layer: a layer may grow to twice the mean rank."""
    return 2 * rank


class DynamicLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-masked LoRA update scaled by a per-token input gate."""

    def __init__(self, base: nn.Linear, spec: AdapterSpec, gen: torch.Generator) -> None:
        super().__init__()
        dtype, slots = base.weight.dtype, max_rank(spec.rank)
        self.base_layer = base
        self.lora_A = nn.Linear(base.in_features, slots, bias=False, dtype=dtype)
        self.lora_B = nn.Linear(slots, base.out_features, bias=False, dtype=dtype)
        self.gate = nn.Linear(base.in_features, 1, bias=False, dtype=dtype)
        mask = torch.cat([torch.ones(spec.rank, dtype=dtype), torch.zeros(slots - spec.rank, dtype=dtype)])
        self.rank_mask = nn.Parameter(mask, requires_grad=False)
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=gen)
            self.lora_B.weight.zero_()
            self.gate.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.dropout(x)
        gate = 1 + torch.tanh(self.gate(u))
        return self.base_layer(x) + self.scaling * gate * self.lora_B(self.lora_A(u) * self.rank_mask)

    def products(self, get: Callable[[str], torch.Tensor]) -> dict[str, Product]:
        """``s·B·diag(m)·A``: the update at gate 1 (the gate scales it per token, ``1 + tanh`` in (0, 2))."""
        return {"": (self.scaling * (get("lora_B.weight") * get("rank_mask")) @ get("lora_A.weight"), None)}


def allocate_ranks(scores: list[float], total: int, cap: int) -> list[int]:
    """Split ``total`` rank slots over layers in proportion to ``scores``, each layer in ``[1, cap]``.

    Highest-averages (D'Hondt) apportionment: every layer starts at 1, then each next slot goes to
    the layer with the largest ``score / (slots + 1)`` that is below ``cap`` (ties: the earlier
    layer). Deterministic, and the sum is exactly ``total``.
    """
    if not 1 <= total / len(scores) <= cap:
        raise ValueError(f"rank budget {total} cannot give {len(scores)} layers between 1 and {cap} slots each")
    ranks = [1] * len(scores)
    for _ in range(total - len(scores)):
        open_ = [i for i in range(len(scores)) if ranks[i] < cap]
        best = max(open_, key=lambda i: (scores[i] / (ranks[i] + 1), -i))
        ranks[best] += 1
    return ranks


Layer = tuple[str, str, str]
"""A rank-masked layer's ``(mask, B, A)`` parameter names."""


def layer_scores(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], layers: Sequence[Layer]
) -> list[float]:
    """Each layer's ``‖ΔW‖_F / r``: the change the round made to its dense update ``B·diag(m)·A``, per active
    slot (so a layer is not rewarded for the rank it already holds)."""
    scores = []
    for mask, b, a in layers:
        m = before[mask].to(torch.float64)
        old = (before[b].to(torch.float64) * m) @ before[a].to(torch.float64)
        new = (after[b].to(torch.float64) * m) @ after[a].to(torch.float64)
        scores.append(float(torch.linalg.norm(new - old)) / max(float(m.sum()), 1.0))
    return scores


def reallocate(
    before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], layers: Sequence[Layer]
) -> dict[str, torch.Tensor]:
    """Between rounds: move the rank budget towards the layers the round changed most (``layer_scores``).

    The budget (the sum of the masks, constant) is split by ``allocate_ranks``. A shrinking layer keeps
    its slots with the largest ``‖B_j‖·‖A_j‖``; a growing one switches on its free slots in order.
    B's column is kept only for slots that were on this round and stay on: a slot switched on starts
    at zero (the layer's function is unchanged by it), and whatever a DP client's noise put in a slot
    that was off never counts. Without any change (every score 0) the allocation stays as it is.
    """
    out = dict(after)
    scores = layer_scores(before, after, layers)
    if not layers or not any(scores):
        return out
    total = round(sum(float(before[mask].sum()) for mask, _, _ in layers))
    cap = min(before[mask].numel() for mask, _, _ in layers)
    for (mask, b, a), rank in zip(layers, allocate_ranks(scores, total, cap)):
        active = before[mask] > 0
        weight = (torch.linalg.norm(after[b], dim=0) * torch.linalg.norm(after[a], dim=1)).tolist()
        on = sorted(torch.nonzero(active).flatten().tolist(), key=lambda j: -weight[j])  # strongest first
        off = torch.nonzero(~active).flatten().tolist()  # in slot order
        keep = torch.zeros_like(before[mask])
        keep[(on + off)[:rank]] = 1
        out[mask] = keep
        out[b] = after[b] * ((keep > 0) & active)  # a slot that was off this round holds only noise or drift
    return out


@register_family
class DynamicLora(AdapterFamily):
    kind = "dynamic-lora"
    peft_compatible = False  # the input gate has no PEFT form; exported in the fedlora format

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = replace_linears(
            model, spec.targets, lambda path, linear: DynamicLinear(linear, spec, generator(seed, "lora_A", path))
        )

        def names(part: str) -> tuple[str, ...]:
            return tuple(f"{p}.{part}" for p in paths)

        masks, b, a = names("rank_mask"), names("lora_B.weight"), names("lora_A.weight")
        return (
            TensorGroup("lora_A", a, trainable=True, sent=True),
            TensorGroup("lora_B", b, trainable=True, sent=True),
            TensorGroup("gate", names("gate.weight"), trainable=True, sent=True),
            TensorGroup("rank_mask", masks, trainable=False, sent=True, aggregation=Aggregation.ALLOCATION),
        )

    def after_aggregate(
        self, adapter: Adapter, before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Reallocate the rank budget across layers by the change the round's aggregate made (``reallocate``)."""
        parts = (adapter.group(name).params for name in ("rank_mask", "lora_B", "lora_A"))
        return reallocate(before, after, list(zip(*parts)))
