"""The ``private`` preset's DP recipe replayed on its linear head alone, in seconds, beside the ceiling that
no linear head over the same features passes.

Under DP at this budget the adapter adds little to what the head reads: a federated run of the preset ends
within about 0.01 of this replay (docs/studies/2026-12-03-head-replay.md). So the head's optimisation and
the features it reads set what a run reaches, and both can be measured without the trunk in the loop. The
bench reads the frozen trunk's pooled features of every row once (the preset's block), applies the head's input
transform (``model.center``, ``model.scale``), then replays the federation on a zero-initialised linear head in closed
form: each client's split, Poisson batches at the client's planned rate, every example's gradient
(``(softmax - onehot)`` times ``[x, 1]``) clipped to ``dp.max_grad_norm``, Gaussian noise at the multiplier
the client's planner calibrates for the whole schedule, SGD with momentum restarted each round, and the
server's step on the mean delta (weights as ``strategy.weighting``; the server's delta-norm clip, which clips
about one reply a round at most in the preset's runs, is left out). It scores every held-out row after each
round. The ceiling is the converged non-private probe of ``bench/layer_probe.py`` fitted on the same split.

    python -m bench run head_replay                                  # the preset and its levers, seeds 0-2
    python -m bench run head_replay --set dp.target_epsilon=3

The table goes to bench/results/head_replay.json.
"""

from __future__ import annotations

import statistics
import time

import torch
from datasets import Dataset

from bench.cells import bench_parser, settings
from bench.results import Column, save
from bench.studies.layer_probe import block_features, probe
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.models import MeanPooledClassifier
from fed.precision import model_device, resolve_precision
from fed.privacy.ledger import calibrate_noise
from fed.privacy.planner import sample_rate
from fed.session import adapted_model, client_data, dataset, with_local_labels
from fed.train import round_lr
from strategies.influence import bounded_weights

LEVERS: dict[str, list[str]] = {
    "private preset": [],
    "without model.scale": ["model.scale=false"],
    "8 rounds": ["federation.rounds=8"],
    "neither (the preset before 2026-12-03's scale)": ["model.scale=false", "federation.rounds=8"],
}
SPLITS = {"iid": ["data.partition=iid"], "dirichlet-0.5": ["data.partition=dirichlet", "data.alpha=0.5"]}


def pooled_features(cfg: RunConfig) -> tuple[torch.Tensor, dict[int, int]]:
    """The top kept block's mean-pooled feature of every row of the run's dataset (before the head's own
    centring and scaling), and each ``row_id``'s position."""
    adapter, task = adapted_model(with_local_labels(cfg))
    model = adapter.model
    if not isinstance(model, MeanPooledClassifier):
        raise SystemExit("the replay reads a mean-pooled head: keep model.pooling=mean")
    rows: Dataset = dataset(cfg)
    precision = resolve_precision(cfg.train.precision, model_device(model).type)
    features = block_features(model, task, rows, precision)[-1]
    return features, {int(r): i for i, r in enumerate(rows["row_id"])}


def head_input(cfg: RunConfig, pooled: torch.Tensor) -> torch.Tensor:
    """What the head of ``cfg``'s model reads: ``(pooled - center) / scale``, from the model itself."""
    model = adapted_model(with_local_labels(cfg))[0].model
    return (pooled - model.center) / model.scale


def split_rows(cfg: RunConfig, position: dict[int, int]) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Each client's training rows, all held-out rows (as positions), and every position's label."""
    y = torch.zeros(len(position), dtype=torch.long)
    clients, held_out = [], []

    def place(part: Dataset) -> list[int]:
        where = [position[int(r)] for r in part["row_id"]]
        y[where] = torch.tensor([int(v) for v in part["label"]])
        return where

    for client in range(cfg.federation.num_clients):
        data = client_data(with_local_labels(cfg), client)
        clients.append(torch.tensor(place(data.train)))
        held_out.extend(place(data.test))
    return clients, torch.tensor(held_out), y


def clipped_gradient_sum(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, clip: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum over examples of each example's cross-entropy gradient (weight, bias), each clipped to
    ``clip`` in L2 over both (0 = no clipping, as without DP)."""
    error = torch.softmax(x @ weight.T + bias, 1)
    error[torch.arange(len(y)), y] -= 1
    if clip:  # the gradient (e, e x^T) of one example has norm |e| sqrt(|x|^2 + 1)
        norms = error.norm(dim=1) * torch.sqrt((x**2).sum(1) + 1)
        error = error * torch.clamp(clip / (norms + 1e-12), max=1.0)[:, None]
    return error.T @ x, error.sum(0)


def replay(
    cfg: RunConfig, x: torch.Tensor, y: torch.Tensor, clients: list[torch.Tensor], held_out: torch.Tensor
) -> list[float]:
    """Held-out accuracy after each round of the preset's federation on a linear head alone."""
    t, dp, fed = cfg.train, cfg.dp, cfg.federation
    generator = torch.Generator().manual_seed(cfg.seed)
    weight, bias = torch.zeros(int(y.max()) + 1, x.shape[1]), torch.zeros(int(y.max()) + 1)
    clip = dp.max_grad_norm if dp.enabled else 0.0
    curve = []
    for round_ in range(1, fed.rounds + 1):
        lr = round_lr(t.lr, t.lr_schedule, round_, fed.rounds)
        deltas = []
        for rows in clients:
            q = sample_rate(t.batch_size, len(rows))
            sigma = (
                calibrate_noise(dp.target_epsilon, dp.delta, q, fed.rounds * t.local_steps, dp.accountant)
                if dp.enabled
                else 0.0
            )
            w, b = weight.clone(), bias.clone()
            vw, vb = torch.zeros_like(w), torch.zeros_like(b)
            for _ in range(t.local_steps):
                batch = rows[torch.rand(len(rows), generator=generator) < q]
                gw, gb = clipped_gradient_sum(x[batch], y[batch], w, b, clip)
                gw = (gw + sigma * clip * torch.randn(gw.shape, generator=generator)) / (q * len(rows))
                gb = (gb + sigma * clip * torch.randn(gb.shape, generator=generator)) / (q * len(rows))
                vw, vb = t.momentum * vw + gw, t.momentum * vb + gb
                w, b = w - lr * vw, b - lr * vb
            deltas.append((w - weight, b - bias))
        weights, _ = bounded_weights([len(r) for r in clients], cfg.strategy.weighting, cfg.strategy.max_weight_ratio)
        total = sum(weights)
        weight = weight + fed.server_lr * sum(c * d[0] for c, d in zip(weights, deltas)) / total
        bias = bias + fed.server_lr * sum(c * d[1] for c, d in zip(weights, deltas)) / total
        curve.append(float(((x[held_out] @ weight.T + bias).argmax(1) == y[held_out]).float().mean()))
    return curve


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-head-replay")
    args = parser.parse_args()
    if args.render:
        raise SystemExit("head_replay keeps no log to render from: run it without --render (about 5 minutes)")
    start = time.perf_counter()
    base = resolve("private", args.overrides)
    pooled, position = pooled_features(base)
    rows = []
    ceilings: dict[tuple[str, int], float] = {}
    for lever, changes in LEVERS.items():
        lever_cfg = resolve("private", [*args.overrides, *changes])
        if lever_cfg.model.layers != base.model.layers or lever_cfg.model.name != base.model.name:
            raise SystemExit(f"{lever!r} changes the block the head reads; the replay reads one")
        x = head_input(lever_cfg, pooled)  # the lever's model settings fix it: split and seed leave it alone
        for split, split_changes in SPLITS.items():
            finals = []
            for seed in args.seeds:
                cfg = resolve("private", [*args.overrides, *changes, *split_changes, f"seed={seed}"])
                clients, held_out, y = split_rows(cfg, position)
                finals.append(replay(cfg, x, y, clients, held_out)[-1])
                if (split, seed) not in ceilings:  # the probe standardises: the head's transform is moot
                    train = torch.cat(clients)
                    ceilings[split, seed] = probe(pooled[train], y[train], pooled[held_out], y[held_out])
            ceiling = statistics.fmean(ceilings[split, s] for s in args.seeds)
            rows.append((lever, split, ", ".join(f"{a:.3f}" for a in finals), statistics.fmean(finals), ceiling))
            print(rows[-1], flush=True)
    about = (
        f"`python -m bench run head_replay` with overrides {settings(args.overrides)} (epsilon "
        f"{base.dp.target_epsilon:g} unless overridden, {(time.perf_counter() - start) / 60:.1f} min): the "
        f"`private` preset's federation replayed on its linear head alone over the frozen block "
        f"{base.model.layers or 'last'} features, final accuracy on every held-out row; the ceiling is the "
        f"converged non-private linear probe of the same features on the same split. Per-seed ceilings: "
        + ", ".join(f"{sp} seed {s} {c:.3f}" for (sp, s), c in sorted(ceilings.items()))
        + "."
    )
    columns = (
        Column("lever"),
        Column("split"),
        Column(f"accuracy, seeds {', '.join(map(str, args.seeds))}"),
        Column("mean", digits=3),
        Column("ceiling (mean)", digits=3),
    )
    save(
        "head_replay", "The head alone: a replay of the private preset's DP recipe", about, columns, rows, args.results
    )
    print(about, *rows, sep="\n")


if __name__ == "__main__":
    main()
