"""FFA-LoRA (Sun et al., ICLR 2024): A frozen at its seeded init, only B trained and sent.

Because A is identical on every party (derived from the run seed, never sent), the mean of the B
deltas times A *is* the mean of the clients' updates: aggregation is exact, and DP noise on B enters
the weight update linearly. The fingerprint of A rides in the metrics so the server can refuse a
client whose A differs.

Heterogeneous client ranks come for free: A has the maximum rank, a client of rank r_k uses its first
r_k rows and trains the first r_k columns of B (the rest stay zero in its delta), so the mean of the
zero-padded B deltas times A is exactly the mean of the clients' ``B_k·A[:r_k]`` updates.
"""

from __future__ import annotations

from torch import nn

from fed.adapters.base import AdapterSpec, TensorGroup
from fed.adapters.families.lora import Lora, inject_lora
from fed.adapters.registry import register_family


@register_family
class FfaLora(Lora):
    kind = "ffa-lora"
    product_pairs = False  # A is shared and frozen: the mean of B is exact already

    def inject(self, model: nn.Module, spec: AdapterSpec, seed: int) -> tuple[TensorGroup, ...]:
        paths = inject_lora(model, spec, seed)
        for path in paths:
            model.get_parameter(f"{path}.lora_A.weight").requires_grad_(False)
        return (
            TensorGroup("lora_A", tuple(f"{p}.lora_A.weight" for p in paths), trainable=False, sent=False),
            TensorGroup("lora_B", tuple(f"{p}.lora_B.weight" for p in paths), trainable=True, sent=True, rank_axis=1),
        )
