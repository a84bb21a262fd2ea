"""Pictures of a run's rounds: losses and accuracy (``curves.png``), plus for a DP run the largest client
epsilon per round and accuracy against epsilon. A run without DP has no epsilon to draw: an epsilon axis
at 0 would read as perfect privacy, where such a run has no guarantee at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, they never open windows
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

UTILITY_PANELS = [("loss", ["train_loss", "eval_loss"]), ("accuracy", ["eval_accuracy"])]
EPSILON_PANEL = ("epsilon", ["epsilon_max", "client_epsilon"])
"""The largest example-level epsilon of any client, and the client-level epsilon of the run (each when on)."""


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(line["round"], line[key]) for line in lines if line.get(key) is not None]
    return [r for r, _ in points], [v for _, v in points]


def curves_figure(lines: list[dict[str, Any]], *, dp: bool, title: str = "") -> Figure | None:
    """One panel per quantity the ``metrics.jsonl`` lines hold (epsilon only when ``dp``); None when there
    is nothing to draw."""
    panels = [*UTILITY_PANELS, *([EPSILON_PANEL] if dp else [])]
    panels = [(name, keys) for name, keys in panels if any(_series(lines, k)[0] for k in keys)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            rounds, values = _series(lines, key)
            if rounds:
                ax.plot(rounds, values, marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def accuracy_against_epsilon(lines: list[dict[str, Any]]) -> Figure | None:
    """Evaluation accuracy after each round against the largest client epsilon spent by then (a DP run's
    utility for its privacy); None when the lines hold no round with both."""
    points = [
        (line["epsilon_max"], line["eval_accuracy"])
        for line in lines
        if line.get("epsilon_max") is not None and line.get("eval_accuracy") is not None
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([e for e, _ in points], [a for _, a in points], marker="o")
    ax.set(xlabel="largest client epsilon so far", ylabel="eval accuracy", title="accuracy against epsilon")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_curves(lines: list[dict[str, Any]], path: Path, *, dp: bool, title: str = "") -> Path | None:
    """Write the per-round curves of ``metrics.jsonl`` lines to ``path``; None when there is nothing to draw."""
    fig = curves_figure(lines, dp=dp, title=title)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
