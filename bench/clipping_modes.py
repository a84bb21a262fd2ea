"""Which Opacus clipping mode is fastest for our adapters? Times local steps side by side in one run.

Prints, per adapter kind (and per ``train.micro_batch`` asked for), the step time of plain training and of
DP-SGD with per-sample gradient hooks and with ghost clipping, and their ratios to plain training: each
repeat times one round of every mode back to back, and the ratio is the median of the per-repeat ratios.
DP rounds draw Poisson batches (``batch_size`` examples on average) and run with dropout off. Run:
    python -m bench run clipping_modes [--preset quickstart] [--steps 8] [--repeats 5] [--micro-batches 0 16 8 4] \
        [--set key=value ...]
    python -m bench run clipping_modes --preset instruct         # SmolLM2-135M, causal LM
The model runs where ``train.device`` puts it (``--device``, default ``auto``: a CUDA GPU when one is present,
named in the output), in the precision
``train.precision`` resolves to there (``auto``: bfloat16 where the hardware computes it natively).
Ratios, not seconds, are the result: the machine may be shared (see the load average printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from bench.results import Column, save
from fed.config.sources import resolve
from fed.precision import model_device, resolve_precision
from fed.privacy.mechanism import DpSettings
from fed.session import client_session
from fed.train import train_round


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def _step_s(
    session, *, steps: int, batch_size: int, micro_batch: int, dp: DpSettings | None, precision: torch.dtype
) -> float:
    """Seconds per step of one local round of ``steps`` steps (the Opacus set-up of a DP round included)."""
    start = time.perf_counter()
    train_round(
        session.adapter,
        session.task,
        session.data.train,
        steps=steps,
        batch_size=batch_size,
        lr=1e-3,
        weight_decay=0.0,
        dp=dp,
        gen=torch.Generator().manual_seed(0),
        micro_batch=micro_batch,
        precision=precision,
    )
    if model_device(session.adapter.model).type == "cuda":
        torch.cuda.synchronize()  # kernels run asynchronously: time them to their end
    return (time.perf_counter() - start) / steps


Mode = TypeVar("Mode")


def paired(time_round: Callable[[Mode], float], modes: dict[str, Mode], repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each mode, the modes interleaved within every repeat (in a rotating order, after
    one untimed round each): a slow spell of a shared machine, or a first round's lazy set-up, then hits
    every mode alike, and per-repeat ratios cancel it."""
    order = list(modes)
    for mode in order:
        time_round(modes[mode])  # warm-up: lazy initialisation, allocator growth, a GPU's kernel selection
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in order[repeat % len(order) :] + order[: repeat % len(order)]:
            times[mode].append(time_round(modes[mode]))
    return times


def ratio(times: dict[str, list[float]], mode: str, against: str = "plain") -> str:
    """Median of the per-repeat ratios ``mode`` / ``against``, with their quartiles."""
    ratios = sorted(t / p for t, p in zip(times[mode], times[against]))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return f"{statistics.median(ratios):.2f} [{q1:.2f}-{q3:.2f}]"


def main() -> None:
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--steps", type=int, default=8, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per mode, interleaved")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument(
        "--micro-batches",
        type=int,
        nargs="+",
        default=None,
        help="train.micro_batch values to time plain and hooks steps at (default: the preset's)",
    )
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda, cuda:N or mps")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1:
        parser.error(f"--repeats {args.repeats} and --steps {args.steps}: each must be at least 1")
    load_before = os.getloadavg()[0]
    rows = []
    for kind in ("lora", "ffa-lora"):
        cfg = resolve(args.preset, [*args.overrides, f"adapter.kind={kind}", f"train.device={args.device}"])
        session = client_session(cfg, 0)  # the model placed on train.device before the adapter is injected
        device = model_device(session.adapter.model)
        print(f"device: {device_name(device)}  load average before: {load_before:.2f}")
        precision = resolve_precision(cfg.train.precision, device.type)
        print(f"{kind}: {cfg.model.name}, base in {precision}", flush=True)
        n, bs = len(session.data.train), cfg.train.batch_size
        dp = {
            mode: DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=bs / n, num_examples=n, mode=mode)
            for mode in ("hooks", "ghost")
        }
        for micro in args.micro_batches or [cfg.train.micro_batch]:

            def time_round(
                settings: DpSettings | None, micro: int = micro, session=session, bs: int = bs, precision=precision
            ) -> float:
                ghost = settings is not None and settings.mode == "ghost"  # ghost clipping runs whole batches
                return _step_s(
                    session,
                    steps=args.steps,
                    batch_size=bs,
                    micro_batch=0 if ghost else micro,
                    dp=settings,
                    precision=precision,
                )

            times = paired(time_round, {"plain": None, **dp}, args.repeats)
            med = {mode: statistics.median(t) for mode, t in times.items()}
            rows.append(
                (
                    kind,
                    f"{cfg.model.name}, {precision}",
                    micro,
                    med["plain"],
                    med["hooks"],
                    med["ghost"],
                    ratio(times, "hooks"),
                    ratio(times, "ghost"),
                )
            )
            print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    about = (
        f"Seconds per DP step on {device_name(device)}, preset `{args.preset}`, {args.steps} steps per timed round, "
        f"{args.repeats} interleaved repeats: medians over the repeats; ratios: median [quartiles] of the "
        f"per-repeat ratios. Load average {load_before:.2f} before, {load_after:.2f} after."
    )
    columns = (
        Column("adapter"),
        Column("model, base precision"),
        Column("micro-batch"),
        *(Column(mode, "s", digits=3) for mode in ("plain", "hooks", "ghost")),
        Column("hooks / plain"),
        Column("ghost / plain"),
    )
    save("clipping_modes", "Clipping modes: seconds per step", about, columns, rows)


if __name__ == "__main__":
    main()
