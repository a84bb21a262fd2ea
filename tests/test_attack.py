"""One of five clients sends sign-flipped, 20x scaled deltas every round, through a real simulation.

With the server's defaults (capped weights, adaptive norm clipping) the run ends within a few points
of the clean run; with them off, the damage is plain."""

from __future__ import annotations

import pytest

from fed.presets import resolve
from simulations.attack import hostile_client
from simulations.run import simulate

pytestmark = pytest.mark.slow

TINY = ["model.name=tiny-bert", "data.name=synthetic", "data.max_examples=0", "federation.num_clients=5",
        "federation.rounds=3", "train.local_steps=8", "train.batch_size=16", "train.max_eval_examples=64",
        "train.lr=3e-2"]


def _final(tmp_path, name: str, extra: list[str], attacked: bool) -> dict:
    cfg = resolve("quickstart", [*TINY, *extra])
    run = simulate(cfg, tmp_path, name=name, **({"client": hostile_client(-20.0)} if attacked else {}))
    lines = run.metrics()
    assert all(line["clients"] == 5 for line in lines)  # every round hears all five, the attacker included
    return lines[-1]


def test_defaults_hold_off_a_sign_flipping_scaling_attacker(tmp_path):
    clean = _final(tmp_path, "clean", [], attacked=False)
    defended = _final(tmp_path, "defended", [], attacked=True)
    undefended = _final(tmp_path, "undefended", ["strategy.weighting=examples", "strategy.clip=off"], attacked=True)
    assert clean["eval_accuracy"] > 0.8  # the task is learnable in this budget
    assert defended["clipped"] == 1 and defended["eval_accuracy"] >= clean["eval_accuracy"] - 0.1
    assert undefended["clipped"] == 0
    assert undefended["eval_accuracy"] <= clean["eval_accuracy"] - 0.2
    assert undefended["eval_loss"] > 3 * clean["eval_loss"]
