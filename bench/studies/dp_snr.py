"""Why the adapter learns nothing measurable under DP at the ``private`` preset's budget: one DP-SGD step's
signal against its noise, for the head and for the adapter apart.

A DP step releases the mean of the batch's clipped per-example gradients plus Gaussian noise of norm about
``sigma * C / B * sqrt(d)`` over a group of ``d`` coordinates. The bench takes one batch of the preset's size
from client 0's training rows, computes every example's gradient one example at a time (plain autograd, no
Opacus), clips it flat to ``dp.max_grad_norm`` over all trained tensors as the preset does, and reports per
group (head, adapter):

- the median per-example gradient norm (before clipping): how much of the bound the group takes;
- the norm of the clipped mean: the signal one step releases;
- the noise norm at each epsilon, with the noise multiplier the client's planner calibrates for the run;
- their ratio (the per-step SNR), and ``sqrt(steps * clients)`` times it: the most a whole run could gain
  if the mean gradient kept one direction through every step of every client (noise adds up in square
  root, such a signal linearly). Below 1, even that best case leaves the group's total move mostly noise.

It measures at the run's start (a zero head passes no gradient back, so the adapter's is exactly zero) and at
the global state a finished run's checkpoint holds.

    python -m bench run dp_snr runs/<a finished run of the private preset> [...]
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.results import Column, save
from fed.adapters.base import Adapter
from fed.config import RunConfig
from fed.privacy.ledger import calibrate_noise
from fed.privacy.planner import sample_rate
from fed.run.checkpoint import Checkpoint
from fed.run.rundir import RunDir
from fed.session import adapted_model, client_data, with_local_labels
from fed.tasks import Task
from fed.train import per_example_losses

EPSILONS = (8.0, 3.0, 1.0)


def clipped_mean(
    adapter: Adapter, task: Task, batch: dict[str, torch.Tensor], clip: float
) -> tuple[dict[str, torch.Tensor], list[float], list[float]]:
    """The mean over an encoded ``batch`` of each example's gradient (of the loss ``fed.train`` minimises)
    clipped flat to ``clip`` (per trained tensor), and each example's unclipped gradient norm over the head's
    tensors and over the adapter's."""
    names = adapter.names(trainable=True)
    head = set(adapter.head_names())
    params = dict(adapter.model.named_parameters())
    total = {n: torch.zeros_like(params[n]) for n in names}
    head_norms, adapter_norms = [], []
    for i in range(len(batch["input_ids"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        objective = per_example_losses(adapter, task, adapter.model, one)[1]
        grads = dict(zip(names, torch.autograd.grad(objective.sum(), [params[n] for n in names])))
        h = math.sqrt(sum(float(g.pow(2).sum()) for n, g in grads.items() if n in head))
        a = math.sqrt(sum(float(g.pow(2).sum()) for n, g in grads.items() if n not in head))
        factor = min(1.0, clip / max(math.hypot(h, a), 1e-12))
        for n, g in grads.items():
            total[n] += factor * g
        head_norms.append(h)
        adapter_norms.append(a)
    count = len(head_norms)
    return {n: t / count for n, t in total.items()}, head_norms, adapter_norms


@dataclass(frozen=True)
class Probe:
    """What a run's DP recipe fixes for every state measured: the batch, and the noise norm per coordinate
    group at each epsilon."""

    batch: dict[str, torch.Tensor]
    clip: float
    sigmas: list[float]
    expected_batch: float
    best_case: float
    """sqrt(steps x clients): the most a run's steps can add a signal of fixed direction over the noise."""

    @classmethod
    def of(cls, cfg: RunConfig, task: Task) -> Probe:
        data = client_data(cfg, 0).train
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.train.batch_size]
        q = sample_rate(cfg.train.batch_size, len(data))
        steps = cfg.federation.rounds * cfg.train.local_steps
        return cls(
            batch=task.encode(data[pick.tolist()]),
            clip=cfg.dp.max_grad_norm,
            sigmas=[calibrate_noise(e, cfg.dp.delta, q, steps, cfg.dp.accountant) for e in EPSILONS],
            expected_batch=q * len(data),
            best_case=math.sqrt(steps * cfg.federation.num_clients),
        )


def step_rows(probe: Probe, state: str, adapter: Adapter, task: Task) -> list[tuple[object, ...]]:
    """The table's rows (head, adapter) for ``adapter``'s current state under the run's DP recipe."""
    adapter.model.eval()  # as under DP: dropout off
    mean, head_norms, adapter_norms = clipped_mean(adapter, task, probe.batch, probe.clip)
    head = set(adapter.head_names())
    rows = []
    for group, norms, mine in (
        ("head", head_norms, lambda n: n in head),
        ("adapter", adapter_norms, lambda n: n not in head),
    ):
        d = sum(t.numel() for n, t in mean.items() if mine(n))
        signal = math.sqrt(sum(float(t.pow(2).sum()) for n, t in mean.items() if mine(n)))
        noise = [s * probe.clip / probe.expected_batch * math.sqrt(d) for s in probe.sigmas]
        rows.append(
            (
                state,
                group,
                d,
                statistics.median(norms),
                signal,
                " / ".join(f"{n:.3f}" for n in noise),
                " / ".join(f"{signal / n:.3f}" for n in noise),
                " / ".join(f"{probe.best_case * signal / n:.2f}" for n in noise),
            )
        )
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", help="finished runs of one DP recipe (their config and checkpoint)")
    args = parser.parse_args()
    rows: list[tuple[object, ...]] = []
    configs = [with_local_labels(RunDir(Path(path)).config()) for path in args.run_dirs]
    for path, cfg in zip(args.run_dirs, configs):
        if not cfg.dp.enabled or cfg.dp.head_clip_share:
            raise SystemExit(
                f"{path}: the bench replays flat DP clipping; this run has dp.enabled="
                f"{cfg.dp.enabled}, dp.head_clip_share={cfg.dp.head_clip_share}"
            )
        adapter, task = adapted_model(cfg)
        probe = Probe.of(cfg, task)
        final = Checkpoint.load(RunDir(Path(path)).checkpoint)
        label = f"{cfg.adapter.kind}, eps {cfg.dp.target_epsilon:g}, seed {cfg.seed}"
        rows += step_rows(probe, f"{label}: start", adapter, task)
        adapter.load(final.arrays)
        rows += step_rows(probe, f"{label}: after round {final.round}", adapter, task)
    cfg = configs[0]
    about = (
        f"`python -m bench run dp_snr` on the finished runs below: one batch of {cfg.train.batch_size} of "
        f"client 0's training rows, each example's gradient by autograd alone, clipped flat to "
        f"{cfg.dp.max_grad_norm:g}; noise at the multiplier each epsilon calibrates for "
        f"{cfg.federation.rounds} x {cfg.train.local_steps} steps; the best case multiplies the per-step "
        f"SNR by sqrt(steps x {cfg.federation.num_clients} clients)."
    )
    at = f"eps {' / '.join(f'{e:g}' for e in EPSILONS)}"
    columns = (
        Column("state"),
        Column("group"),
        Column("coordinates"),
        Column("median per-example norm", digits=3),
        Column("clipped mean's norm", digits=4),
        Column(f"noise norm, {at}"),
        Column(f"SNR per step, {at}"),
        Column(f"best case over the run, {at}"),
    )
    save("dp_snr", "Signal and noise of one DP step, head and adapter", about, columns, rows)
    print(about, *rows, sep="\n")


if __name__ == "__main__":
    main()
