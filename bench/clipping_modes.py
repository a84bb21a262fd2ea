"""Which Opacus clipping mode is fastest for our adapters? Times local steps side by side in one run.

Prints, per adapter kind (and per ``train.micro_batch`` asked for), the median step time of plain training
and of DP-SGD with per-sample gradient hooks and with ghost clipping, as ratios to plain training. Run:
    python bench/clipping_modes.py [--preset quickstart] [--steps 12] [--micro-batches 0 16 8 4] [--set key=value ...]
    python bench/clipping_modes.py --preset instruct         # SmolLM2-135M, causal LM
The model runs on a CUDA GPU when one is present (``--device auto``, named in the output), in the precision
``train.precision`` resolves to there (``auto``: bfloat16 where the hardware computes it natively).
Ratios, not seconds, are the result: the machine may be shared (see the load average printed).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
import warnings

import torch

from fed.precision import model_device, resolve_precision
from fed.presets import resolve
from fed.privacy.mechanism import DpSettings
from fed.session import client_session
from fed.train import train_round


def pick_device(setting: str) -> torch.device:
    """``auto``: the first CUDA GPU when torch sees one, else the CPU; ``cuda`` without a GPU is refused."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU on this machine; use --device cpu or auto")
    return torch.device(setting)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def _median_step_s(session, *, steps: int, batch_size: int, micro_batch: int, dp: DpSettings | None,
                   precision: torch.dtype) -> float:
    times = []
    for _ in range(3):  # three repeats, one step each timed as a round of `steps` steps
        start = time.perf_counter()
        train_round(session.adapter, session.task, session.data.train, steps=steps, batch_size=batch_size,
                    lr=1e-3, weight_decay=0.0, dp=dp, gen=torch.Generator().manual_seed(0), micro_batch=micro_batch,
                    precision=precision)
        if model_device(session.adapter.model).type == "cuda":
            torch.cuda.synchronize()  # kernels run asynchronously: time them to their end
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None,
                        help="train.micro_batch values to time plain and hooks steps at (default: the preset's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)
    print(f"device: {device_name(device)}  load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'adapter':10} {'micro':>5} {'plain s/step':>12} {'hooks s/step':>12} {'hooks/plain':>12} "
          f"{'ghost/plain':>12} {'ghost/hooks':>12}")
    for kind in ("lora", "ffa-lora"):
        cfg = resolve(args.preset, [*args.overrides, f"adapter.kind={kind}"])
        session = client_session(cfg, 0)
        session.adapter.model.to(device)
        precision = resolve_precision(cfg.train.precision, device.type)
        print(f"{kind}: {cfg.model.name}, base in {precision}", flush=True)
        n, bs = len(session.data.train), cfg.train.batch_size
        dp = {mode: DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=bs / n, num_examples=n,
                               mode=mode) for mode in ("hooks", "ghost")}
        time_step = functools.partial(_median_step_s, session, steps=args.steps, batch_size=bs, precision=precision)
        ghost = time_step(micro_batch=0, dp=dp["ghost"])  # ghost clipping runs whole batches
        for micro in args.micro_batches or [cfg.train.micro_batch]:
            plain, hooks = time_step(micro_batch=micro, dp=None), time_step(micro_batch=micro, dp=dp["hooks"])
            print(f"{kind:10} {micro:5d} {plain:12.3f} {hooks:12.3f} {hooks / plain:12.2f} {ghost / plain:12.2f} "
                  f"{ghost / hooks:12.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
