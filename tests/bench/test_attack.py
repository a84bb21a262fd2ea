"""One of five clients sends sign-flipped, 20x scaled deltas every round, through a real simulation.

Every run starts from the same fresh adapter. With the server's defaults (capped weights, adaptive
norm clipping) the attacker's reply is clipped, and the model stays at chance-level loss: the damage
is bounded, but so is the learning, since the clipped reply still cancels most of the honest ones. A
coordinate-wise median holds the attacker off: the run still learns the task (above 0.8 accuracy; chance
is 0.5). With the defaults off, the eval loss explodes."""

from __future__ import annotations

import math

import pytest

from bench.security.redteam import hostile_client
from fed.config.sources import resolve
from simulations.run import simulate

pytestmark = pytest.mark.slow

TINY = [
    "model.name=tiny-bert",
    "data.name=synthetic",
    "data.max_examples=0",
    "federation.num_clients=5",
    "federation.rounds=3",
    "train.local_steps=8",
    "train.batch_size=16",
    "train.max_eval_examples=64",
    "train.lr=3e-2",
]


def _final(tmp_path, name: str, extra: list[str]) -> dict:
    """The last round of a run in which client 0 sends -20 times its delta."""
    cfg = resolve("quickstart", [*TINY, *extra])
    run = simulate(cfg, tmp_path, name=name, client=hostile_client(-20.0))
    lines = run.metrics()
    assert all(line["clients"] == 5 for line in lines)  # every round hears all five, the attacker included
    return lines[-1]


def test_defaults_bound_the_attacker_and_the_median_holds_it_off(tmp_path):
    defended = _final(tmp_path, "defended", [])
    median = _final(tmp_path, "median", ["strategy.rule=median"])
    undefended = _final(tmp_path, "undefended", ["strategy.weighting=examples", "strategy.clip=off"])
    chance = math.log(2)  # the loss of a uniform prediction over the two classes
    assert defended["clipped"] == 1 and defended["eval_loss"] < 1.1 * chance  # bounded, not taken over
    assert median["eval_accuracy"] > 0.8  # learns despite the attacker (chance: 0.5)
    assert undefended["clipped"] == 0
    assert undefended["eval_loss"] > 3 * median["eval_loss"] and undefended["eval_loss"] > 3 * chance
