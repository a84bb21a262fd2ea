"""Which block of the frozen trunk holds the task's signal: a linear probe on each block's mean-pooled tokens.

A DP run's head is a linear map over pooled features, and under DP at this budget the adapter adds little
to what the head reads (docs/studies/2026-11-25-dp-levers-one-at-a-time.md), so the features the head
reads set the ceiling.
This bench measures that ceiling for every block without DP: the frozen trunk's mean-pooled tokens after
each block (0 = the embeddings) for every client's training and held-out rows of the ``private`` preset's
split, then a logistic regression fitted to convergence (L-BFGS, a small L2 penalty) on all training rows,
scored on all held-out rows. No federation and no noise: an upper bound for what a head over that block
can reach, which is what ``model.layers`` picks.

    python -m bench run layer_probe                      # the private preset's data, every block
    python -m bench run layer_probe --set data.max_examples=4000

The table goes to bench/results/layer_probe.json.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from datasets import Dataset, concatenate_datasets

from bench.cells import bench_parser, settings
from bench.results import Column, save
from fed.config.sources import resolve
from fed.models import MeanPooledClassifier, mean_over_tokens
from fed.precision import autocast, model_device, resolve_precision
from fed.session import adapted_model, client_data, with_local_labels
from fed.tasks import Task
from fed.train import encode_on, length_chunks


@torch.no_grad()
def block_features(model: MeanPooledClassifier, task: Task, rows: Dataset, precision: torch.dtype) -> torch.Tensor:
    """(blocks + 1, examples, hidden): the mean over real tokens of every hidden state, row by row, with
    dropout off (as a DP step and an evaluation run it)."""
    model.eval()
    out: list[torch.Tensor | None] = [None] * len(rows)
    device = model_device(model)
    for chunk in length_chunks(task.lengths(rows[:]), list(range(len(rows))), 128):
        batch = encode_on(task, rows[chunk], device)
        with autocast(model, precision):
            states = model.trunk(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
            ).hidden_states
        pooled = torch.stack([mean_over_tokens(h.float(), batch["attention_mask"]) for h in states], 1)
        for k, i in enumerate(chunk):
            out[i] = pooled[k].cpu()
    return torch.stack(out).transpose(0, 1)  # type: ignore[arg-type]  # the loop filled every row


def probe(
    train: torch.Tensor, y_train: torch.Tensor, test: torch.Tensor, y_test: torch.Tensor, l2: float = 1e-4
) -> float:
    """Held-out accuracy of an L2-penalised logistic regression fitted to convergence on standardised features."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    weight = torch.zeros(train.shape[1], int(y_train.max()) + 1, requires_grad=True)
    bias = torch.zeros(weight.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, y_train) + l2 * (weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == y_test).float().mean())


def main() -> None:
    parser = bench_parser(__doc__, "runs/bench-layer-probe", seeds=False)
    args = parser.parse_args()
    if args.render:
        raise SystemExit("layer_probe keeps no log to render from: run it without --render (about 2 minutes)")
    cfg = with_local_labels(resolve("private", [*args.overrides, "model.layers=0"]))  # every block, to probe each
    adapter, task = adapted_model(cfg)
    model = adapter.model
    if not isinstance(model, MeanPooledClassifier):
        raise SystemExit("the probe reads a mean-pooled trunk: keep model.pooling=mean")
    splits = [client_data(cfg, i) for i in range(cfg.federation.num_clients)]
    train = concatenate_datasets([s.train for s in splits])
    test = concatenate_datasets([s.test for s in splits])
    start = time.perf_counter()
    precision = resolve_precision(cfg.train.precision, model_device(model).type)
    x_train, x_test = block_features(model, task, train, precision), block_features(model, task, test, precision)
    y_train, y_test = torch.tensor(train["label"]), torch.tensor(test["label"])
    rows = []
    for block in range(x_train.shape[0]):
        accuracy = probe(x_train[block], y_train, x_test[block], y_test)
        name = "embeddings" if block == 0 else f"block {block}" + (" (last)" if block == x_train.shape[0] - 1 else "")
        rows.append((name, accuracy))
        print(rows[-1], flush=True)
    about = (
        f"`python -m bench run layer_probe` with overrides {settings(args.overrides)}: the `private` preset's "
        f"data ({len(train)} training rows, {len(test)} held-out rows, all clients), the frozen trunk's "
        f"mean-pooled tokens after each block, an L2-penalised logistic regression fitted to convergence "
        f"without DP ({(time.perf_counter() - start) / 60:.1f} min). One standard error is about "
        f"{(0.25 / len(test)) ** 0.5:.3f}."
    )
    columns = (Column("block read by the head"), Column("linear-probe accuracy", digits=3))
    save("layer_probe", "Which block the head should read: linear probes", about, columns, rows, args.results)
    print(about, *rows, sep="\n")


if __name__ == "__main__":
    main()
