"""Accuracy against client-level epsilon (DP-FedAvg) for 8, 32 and 100 clients, and the clients per round it
needs to stay within 2 points of the same federation without DP.

Each cell replays a federation on the ``private`` preset's model and head (the frozen MiniLM block-4
features, centred and scaled as the head reads them, ``bench.studies.head_replay``) with the server's own
mechanism from ``fed.privacy.client_level``: every client sampled independently at
``federation.fraction_train``, trains the zero-initialised linear head without DP-SGD (plain SGD with
momentum on fixed-size batches), its round update (weight and bias jointly) clipped to ``dp.client_clip``,
the clipped updates summed, Gaussian noise from the OS CSPRNG added, the sum divided by the expected
clients per round ``q N``, then the server step. The noise multiplier is calibrated so the whole run spends
the cell's client-level epsilon (RDP, ``dp.delta``), one sampled-Gaussian step per round; ``inf`` is the
same federation with no clipping, no noise and the rule's own mean. Every held-out row is scored after the
last round. 300 and 1,000 clients extend the axis to find where the 2-point gap closes (with every client
sampled each round, the clients per round are N).

    python -m bench run client_dp_utility                         # 5 sizes x 4 epsilons x 3 seeds (resumable)
    python -m bench run client_dp_utility --clients 8 --seeds 0   # one row
    python -m bench run client_dp_utility --render                # the table from the cells logged so far

Finished cells are appended to ``<runs>/results.jsonl`` at once and skipped when the grid runs again; the
features are cached in ``<runs>/features.safetensors``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.cells import SPREAD, bench_parser, finished, settings, spread
from bench.results import Column, Table, save
from bench.studies.head_replay import head_input, pooled_features, split_rows
from fed.config import RunConfig
from fed.config.sources import resolve
from fed.privacy.client_level import ClientMechanism
from fed.privacy.ledger import calibrate_noise
from strategies.influence import clip_deltas

CLIENTS = (8, 32, 100, 300, 1000)
EPSILONS = ("inf", "8", "3", "1")
SETTINGS = [
    "data.partition=iid",
    "federation.rounds=8",
    "federation.server_lr=1.0",
    "train.local_steps=5",
    "train.batch_size=32",
    "train.lr=0.05",
    "dp.client_clip=0.5",
]
"""A small federation (few rounds and local steps) at the preset's documented no-DP learning rate scale:
clients train without DP-SGD here, only the server's client-level mechanism."""
GAP = 0.02


def features(base: RunConfig, runs: Path) -> tuple[torch.Tensor, dict[int, int]]:
    """The head's input for every row and each row id's position, read once and cached (safetensors)."""
    cache = runs / "features.safetensors"
    if cache.exists():
        saved = load_file(cache)
        return saved["x"], {int(r): i for i, r in enumerate(saved["row_id"].tolist())}
    pooled, position = pooled_features(base)
    x = head_input(base, pooled)
    row_ids = torch.tensor(sorted(position, key=position.__getitem__), dtype=torch.int64)
    runs.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous(), "row_id": row_ids}, cache)
    return x, position


def local_update(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: RunConfig, generator
) -> dict[str, torch.Tensor]:
    """One client's round without DP-SGD: ``local_steps`` of SGD with momentum on fixed-size batches of its rows."""
    t = cfg.train
    w, b = weight.clone(), bias.clone()
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    for _ in range(t.local_steps):
        batch = torch.randperm(len(y), generator=generator)[: t.batch_size]
        error = torch.softmax(x[batch] @ w.T + b, 1)
        error[torch.arange(len(batch)), y[batch]] -= 1
        gw, gb = error.T @ x[batch] / len(batch), error.mean(0)
        vw, vb = t.momentum * vw + gw, t.momentum * vb + gb
        w, b = w - t.lr * vw, b - t.lr * vb
    return {"weight": w - weight, "bias": b - bias}


def replay(cfg: RunConfig, epsilon: str, x: torch.Tensor, y: torch.Tensor, clients, held_out) -> dict[str, Any]:
    """Final held-out accuracy of one cell, the noise multiplier it ran at and the clients it averaged per round."""
    fed, dp = cfg.federation, cfg.dp
    generator = torch.Generator().manual_seed(cfg.seed)
    classes = int(y.max()) + 1
    weight, bias = torch.zeros(classes, x.shape[1]), torch.zeros(classes)
    private = epsilon != "inf"
    sigma = calibrate_noise(float(epsilon), dp.delta, fed.fraction_train, fed.rounds, "rdp") if private else 0.0
    mechanism = ClientMechanism(sigma, fed.fraction_train, fed.num_clients, dp.client_clip) if private else None
    sampled = []
    for _ in range(fed.rounds):
        chosen = (torch.rand(len(clients), generator=generator) < fed.fraction_train).nonzero().flatten().tolist()
        sampled.append(len(chosen))
        updates = [local_update(x[clients[k]], y[clients[k]], weight, bias, cfg, generator) for k in chosen]
        if mechanism is not None:
            clipped, _ = clip_deltas(updates, dp.client_clip)  # the server's joint clip per reply
            zeros = {"weight": torch.zeros_like(weight), "bias": torch.zeros_like(bias)}
            total = {n: sum((c[n] for c in clipped), zeros[n]) for n in zeros}
            step = mechanism.noised_mean(total, dp.client_clip)
        elif updates:
            step = {n: sum(u[n] for u in updates) / len(updates) for n in ("weight", "bias")}
        else:
            continue
        weight, bias = weight + fed.server_lr * step["weight"], bias + fed.server_lr * step["bias"]
    accuracy = float(((x[held_out] @ weight.T + bias).argmax(1) == y[held_out]).float().mean())
    return {"accuracy": accuracy, "noise_multiplier": sigma, "clients_per_round": statistics.fmean(sampled)}


def cell_config(overrides: list[str], clients: int, seed: int) -> RunConfig:
    return resolve("private", [*SETTINGS, *overrides, f"federation.num_clients={clients}", f"seed={seed}"])


def run(args: Any) -> None:
    """Every cell of the grid not logged yet, seed by seed, each appended to the log as it finishes."""
    runs = Path(args.runs)
    log = runs / "results.jsonl"
    done = {(r["clients"], r["epsilon"], r["seed"]) for r in finished(log) if r.get("overrides") == args.overrides}
    x, position = features(cell_config(args.overrides, args.clients[0], 0), runs)
    for seed in args.seeds:
        for n in args.clients:
            todo = [e for e in args.epsilons if (n, e, seed) not in done]
            if not todo:
                continue
            cfg = cell_config(args.overrides, n, seed)
            clients, held_out, y = split_rows(cfg, position)
            for epsilon in todo:
                start = time.perf_counter()
                figures = replay(cfg, epsilon, x, y, clients, held_out)
                line = {"clients": n, "epsilon": epsilon, "seed": seed, "overrides": args.overrides, **figures}
                line["wall_s"] = round(time.perf_counter() - start, 2)
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "a") as handle:
                    handle.write(json.dumps(line) + "\n")
                print(line, flush=True)


COLUMNS = (Column("clients (= per round)"), Column("epsilon"), *SPREAD, Column("z", digits=2))
"""One row per client count and epsilon; z: the calibrated noise multiplier (none without DP)."""
NEEDS = (Column("epsilon"), Column("clients per round within 2 points of no DP"))


def table(records: list[dict[str, Any]], overrides: list[str]) -> tuple[list[tuple[object, ...]], Table]:
    """Accuracy (mean ± std over seeds) per clients and epsilon, and, per epsilon, the fewest clients per round
    whose accuracy is within GAP of no DP at the same count."""
    cells: dict[tuple[int, str], list[float]] = {}
    sigmas: dict[tuple[int, str], float] = {}
    for r in records:
        if r.get("overrides") == overrides:
            cells.setdefault((r["clients"], r["epsilon"]), []).append(r["accuracy"])
            sigmas[r["clients"], r["epsilon"]] = r["noise_multiplier"]
    sizes = sorted({n for n, _ in cells})
    eps = [e for e in EPSILONS if any((n, e) in cells for n in sizes)]
    rows: list[tuple[object, ...]] = [
        (n, e, *spread(cells[n, e]), sigmas[n, e] if e != "inf" else None)
        for n in sizes
        for e in eps
        if (n, e) in cells
    ]
    needs: list[tuple[object, ...]] = []
    for e in eps[1:]:
        within = [
            n
            for n in sizes
            if (n, e) in cells
            and (n, "inf") in cells
            and statistics.fmean(cells[n, "inf"]) - statistics.fmean(cells[n, e]) <= GAP
        ]
        needs.append((e, min(within) if within else f"more than {max(sizes)}"))
    return rows, Table("Clients per round to stay within 2 points of no DP", NEEDS, needs)


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-client-dp")
    parser.add_argument("--clients", type=int, nargs="+", default=list(CLIENTS))
    parser.add_argument("--epsilons", nargs="+", default=list(EPSILONS), choices=EPSILONS)
    args = parser.parse_args()
    start = time.perf_counter()
    if not args.render:
        run(args)
    records = finished(Path(args.runs) / "results.jsonl")
    if not records:
        raise SystemExit(f"no cell in {args.runs}/results.jsonl yet")
    base = cell_config(args.overrides, args.clients[0], 0)
    about = (
        f"`python -m bench run client_dp_utility` with overrides {settings([*SETTINGS, *args.overrides])} on the "
        f"`private` preset's model and head (block {base.model.layers} mean-pooled, centred, scaled; IID split), "
        f"{base.federation.rounds} rounds x {base.train.local_steps} local steps, every client sampled with "
        f"q = {base.federation.fraction_train:g}, fixed clip {base.dp.client_clip:g}, client-level delta "
        f"{base.dp.delta:g} (RDP); final accuracy on every held-out row, mean ± std over seeds ({len(records)} "
        f"cells logged; this call {(time.perf_counter() - start) / 60:.1f} min). z is the calibrated noise "
        f"multiplier; the noise std on the mean update is z x clip / (clients per round)."
    )
    rows, needs = table(records, args.overrides)
    title = "Client-level DP: accuracy against epsilon and clients per round"
    save("client_dp_utility", title, about, COLUMNS, rows, args.results, tables=[needs])
    print(about, *rows, *needs.rows, sep="\n")


if __name__ == "__main__":
    main()
