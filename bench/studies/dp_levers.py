"""Which DP levers pay: the ``private`` preset with one setting changed at a time, on a fast proxy.

The proxy is one client of the preset without Flower: client 0's split, the noise its planner would
calibrate for the whole schedule (``federation.rounds`` x ``train.local_steps`` DP-SGD steps at the
preset's epsilon), the same local rounds back to back, and its own held-out split scored after each
round. It leaves out the averaging over clients (which only lowers the noise), so its accuracies are a
floor for the federated run; what it is for is comparing levers side by side in minutes, not hours.

    python -m bench run dp_levers                              # every lever, seed 0
    python -m bench run dp_levers --levers "private preset" "adapter: LoRA" --set dp.target_epsilon=3

Results are appended to ``<runs>/levers.jsonl``; the table, every lever that file holds, goes to
bench/results/dp_levers.json (``--render`` rewrites it from the file alone); docs/studies/ holds what it found.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from bench.cells import bench_parser, finished, record, settings
from bench.results import Column, save
from fed.config.sources import parse_override, resolve
from fed.precision import resolve_precision
from fed.privacy.ledger import calibrate_noise
from fed.privacy.mechanism import DpSettings
from fed.privacy.planner import sample_rate
from fed.session import adapted_model, client_data, with_local_labels
from fed.train import evaluate, round_lr, train_round

LEVERS: dict[str, list[str]] = {
    "private preset": [],
    "head: BERT pooler over [CLS] (model.pooling=cls)": ["model.pooling=cls"],
    "optimiser: AdamW, lr 5e-3": ["train.optimizer=adamw", "train.lr=5e-3"],
    "SGD lr 2.0": ["train.lr=2.0"],
    "data: 4,000 examples in all (quickstart)": ["data.max_examples=4000"],
    "Poisson batch 64": ["train.batch_size=64"],
    "clipping norm 0.1 (lr x10)": ["dp.max_grad_norm=0.1", "train.lr=5.0"],
    "adapter: LoRA": ["adapter.kind=lora"],
    "rank 4": ["adapter.rank=4", "adapter.alpha=8"],
    "rank 16": ["adapter.rank=16", "adapter.alpha=32"],
    "targets: every projection (q, k, v, attention output, MLP)": ['adapter.targets=["query","key","value","dense"]'],
    "per-layer clipping, head 1/2 of the bound": ["dp.head_clip_share=0.5"],
    "per-layer clipping, head 1/10 of the bound": ["dp.head_clip_share=0.1"],
    "adapter scale 0.5 (alpha 4)": ["adapter.alpha=4"],
    "LoRA at scale 0.5 (alpha 4)": ["adapter.kind=lora", "adapter.alpha=4"],
    "the mixed-domains recipe: LoRA scale 0.5, [CLS] head, AdamW 5e-3": [
        "adapter.kind=lora",
        "adapter.alpha=4",
        "model.pooling=cls",
        "train.optimizer=adamw",
        "train.lr=5e-3",
    ],
    "no DP": ["dp.enabled=false"],
    "adapter scale 8 (alpha 64)": ["adapter.alpha=64"],
    "adapter scale 32 (alpha 256)": ["adapter.alpha=256"],
    "LoRA at scale 8 (alpha 64)": ["adapter.kind=lora", "adapter.alpha=64"],
    "optimiser: AdamW, lr 1e-3, with LoRA": ["adapter.kind=lora", "train.optimizer=adamw", "train.lr=1e-3"],
    "4x the steps: batch 64, 24 a round, lr 0.25": ["train.batch_size=64", "train.local_steps=24", "train.lr=0.25"],
    "4x the steps at scale 8 (alpha 64)": [
        "train.batch_size=64",
        "train.local_steps=24",
        "train.lr=0.25",
        "adapter.alpha=64",
    ],
    "8x the steps: batch 32, 48 a round, lr 0.1": ["train.batch_size=32", "train.local_steps=48", "train.lr=0.1"],
    "no-DP ceiling: all the data on one client, LoRA, AdamW 1e-3, 6 x 100 steps of batch 32": [
        "federation.num_clients=1",
        "dp.enabled=false",
        "adapter.kind=lora",
        "train.optimizer=adamw",
        "train.lr=1e-3",
        "train.batch_size=32",
        "train.local_steps=100",
        "federation.rounds=6",
        "train.micro_batch=0",
    ],
    "the last block, lr 0.5 (the preset until 2026-12-02)": ["model.layers=0", "train.lr=0.5"],
    "SGD lr 0.5": ["train.lr=0.5"],
}


def proxy(overrides: list[str], eval_limit: int) -> dict[str, Any]:
    """Client 0 of the config alone: its planned mechanism, its rounds, its held-out accuracy per round."""
    cfg = with_local_labels(resolve("private", overrides))
    adapter, task = adapted_model(cfg)
    data = client_data(cfg, 0)
    t, n = cfg.train, len(data.train)
    q = sample_rate(t.batch_size, n)
    dp = None
    if cfg.dp.enabled:
        sigma = calibrate_noise(
            cfg.dp.target_epsilon, cfg.dp.delta, q, cfg.federation.rounds * t.local_steps, cfg.dp.accountant
        )
        dp = DpSettings(
            sigma, cfg.dp.max_grad_norm, q, n, mode=cfg.dp.grad_sample_mode, head_clip_share=cfg.dp.head_clip_share
        )
    gen = torch.Generator().manual_seed(cfg.seed)
    precision = resolve_precision(t.precision)
    curve, start = [], time.perf_counter()
    for round_ in range(1, cfg.federation.rounds + 1):  # adapted_model handed the cached model back as built
        lr = round_lr(t.lr, t.lr_schedule, round_, cfg.federation.rounds)
        train_round(
            adapter,
            task,
            data.train,
            steps=t.local_steps,
            batch_size=t.batch_size,
            lr=lr,
            weight_decay=t.weight_decay,
            dp=dp,
            gen=gen,
            optimizer=t.optimizer,
            momentum=t.momentum,
            precision=precision,
            micro_batch=t.micro_batch,
        )
        scores = evaluate(adapter, task, data.test, batch_size=t.eval_batch_size, limit=eval_limit, precision=precision)
        curve.append(round(scores["accuracy"], 3))
        print(f"  round {len(curve)}: accuracy {curve[-1]:.3f}", flush=True)
    return {
        "accuracy": curve[-1],
        "curve": curve,
        "n": n,
        "sample_rate": q,
        "noise_multiplier": dp.noise_multiplier if dp else 0.0,
        "wall_s": time.perf_counter() - start,
    }


COLUMNS = (
    Column("lever (one change from the preset)"),
    Column("final accuracy", digits=3),
    Column("vs preset", digits=3),
    Column("accuracy by round"),
    Column("noise multiplier", digits=3),
    Column("wall", "min", digits=1),
)


def table(results: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One row per lever, its gap to the unchanged preset where the log holds that run."""
    base = next((r["accuracy"] for r in results if r["lever"] == "private preset"), None)
    return [
        (
            r["lever"],
            r["accuracy"],
            r["accuracy"] - base if base is not None else None,
            ", ".join(f"{a:.2f}" for a in r["curve"]),
            r["noise_multiplier"],
            r["wall_s"] / 60,
        )
        for r in results
    ]


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-dp-levers", seeds=False)
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--eval-limit", type=int, default=600, help="held-out examples scored per round")
    args = parser.parse_args()
    for item in args.overrides:
        parse_override(item)  # a typo stops here, before the first lever runs
    log = Path(args.runs) / "levers.jsonl"
    for lever in [] if args.render else args.levers:
        print(lever, flush=True)
        overrides = [*args.overrides, *LEVERS[lever]]
        record(log, {"lever": lever}, resolve("private", overrides), proxy(overrides, args.eval_limit))
    results = finished(log)  # the table holds every lever the log has, not only this call's
    about = (
        f"`python -m bench run dp_levers` with overrides {settings(args.overrides)}: the `private` preset's client 0 "
        f"alone (its "
        f"split, its planned noise, no averaging over clients: a floor for the federated run), held-out "
        f"accuracy on {args.eval_limit} examples after each local round."
    )
    save("dp_levers", "DP levers, one at a time", about, COLUMNS, table(results), args.results)
    print(about, *table(results), sep="\n")


if __name__ == "__main__":
    main()
