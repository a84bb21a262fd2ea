"""One picture of a run: losses, accuracy and the largest client epsilon per round (``curves.png``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: runs write files, they never open windows
import matplotlib.pyplot as plt


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(line["round"], line[key]) for line in lines if line.get(key) is not None]
    return [r for r, _ in points], [v for _, v in points]


def plot_curves(lines: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Write the per-round curves of ``metrics.jsonl`` lines to ``path``; None when there is nothing to draw."""
    panels = [("loss", ["train_loss", "eval_loss"]), ("accuracy", ["eval_accuracy"]), ("epsilon", ["epsilon_max"])]
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
