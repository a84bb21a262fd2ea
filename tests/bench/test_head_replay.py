"""bench/head_replay.py's closed-form per-example gradients of a linear head, each clipped, against
autograd one example at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bench.studies import head_replay


@pytest.mark.parametrize("clip", [0.0, 0.5, 100.0])
def test_clipped_gradient_sum_equals_a_per_example_autograd_loop(clip: float) -> None:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen) * 3, torch.randint(0, 3, (12,), generator=gen)
    weight, bias = torch.randn(3, 5, generator=gen), torch.randn(3, generator=gen)
    want_w, want_b = torch.zeros_like(weight), torch.zeros_like(bias)
    for i in range(len(y)):
        w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        F.cross_entropy(x[i : i + 1] @ w.T + b, y[i : i + 1]).backward()
        norm = torch.sqrt(w.grad.pow(2).sum() + b.grad.pow(2).sum())
        factor = min(1.0, clip / float(norm)) if clip else 1.0
        want_w += factor * w.grad
        want_b += factor * b.grad
    got_w, got_b = head_replay.clipped_gradient_sum(x, y, weight, bias, clip)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=1e-5)
