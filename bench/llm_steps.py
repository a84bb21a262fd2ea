"""A causal LM at the length people fine-tune at: tokens per second of a plain and a DP-SGD step (LoRA and
FFA-LoRA), the peak memory, and the share of a DP step spent drawing its noise from the OS CSPRNG.

Prepared for a GPU (``train.device = auto`` takes one when present; the card is named in the result) and run
on the CPU at tiny sizes by the tests, so it is known to work before a GPU is lent. Every example is a
synthetic instruction row longer than ``--length`` tokens, so each is cut to exactly that length: tokens per
step are ``batch x length`` (a DP step's batch is Poisson-sampled, ``--batch`` on average). Modes are timed
interleaved (``clipping_modes.paired``); ratios are medians of per-repeat ratios with their quartiles. Run:
    python -m bench run llm_steps                                   # SmolLM2-135M, length 512, batch 8
    python -m bench run llm_steps --set train.gradient_checkpointing=true
    python -m bench run llm_steps --model tiny-llama --length 32 --batch 2 --steps 2 --repeats 1   # CI size
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch
from datasets import Dataset

from bench.clipping_modes import _step_s, device_name, paired, ratio
from bench.results import RESULTS, Column, save
from fed.config.sources import resolve
from fed.device import resolve_device
from fed.precision import model_device, resolve_precision
from fed.privacy import secure_rng
from fed.privacy.mechanism import DpSettings
from fed.session import adapted_model

EXAMPLES_PER_BATCH = 8  # the synthetic data set holds this many batches, so Poisson sampling has room


def synthetic_rows(count: int, length: int) -> Dataset:
    """``count`` instruction rows whose prompt and response together exceed ``length`` tokens of any tokenizer."""
    words = ["the", "federated", "client", "trains", "a", "small", "adapter", "on", "its", "own", "private", "text"]
    text = " ".join(words[i % len(words)] for i in range(length))
    return Dataset.from_dict({"prompt": [f"question {k}: {text}" for k in range(count)], "response": [text] * count})


@contextmanager
def timed_noise() -> Iterator[list[float]]:
    """Seconds spent in ``secure_rng.normal`` (the DP noise), one entry per draw, while the context is open."""
    spent: list[float] = []
    draw = secure_rng.normal

    def timed(*args, **kwargs) -> torch.Tensor:
        start = time.perf_counter()
        try:
            return draw(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    with mock.patch.object(secure_rng, "normal", timed):
        yield spent


def peak_memory(device: torch.device) -> float:
    """The GPU's peak allocated memory since the last reset, else this process's peak resident memory (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_kind(device: torch.device) -> str:
    """What ``peak_memory`` measures on ``device``."""
    return "GPU, allocated" if device.type == "cuda" else "process peak RSS, all modes"


def measure(kind: str, args: argparse.Namespace) -> tuple[list[tuple[object, ...]], str]:
    """One row per mode (plain, DP with hooks) for adapter ``kind``, and what it ran on."""
    cfg = resolve(
        "instruct",
        [
            *args.overrides,
            f"model.name={args.model}",
            f"model.max_length={args.length}",
            f"adapter.kind={kind}",
            f"train.device={args.device}",
        ],
    )
    device = resolve_device(cfg.train.device)
    adapter, task = adapted_model(cfg, str(device))  # placed before injection, as a client's model is
    precision = resolve_precision(cfg.train.precision, model_device(adapter.model).type)
    rows = synthetic_rows(args.batch * EXAMPLES_PER_BATCH, args.length)
    session = SimpleNamespace(adapter=adapter, task=task, data=SimpleNamespace(train=rows))
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1 / EXAMPLES_PER_BATCH, num_examples=len(rows))
    peaks: dict[str, float] = {}
    noise: list[float] = []

    def time_round(settings: DpSettings | None) -> float:
        name = "plain" if settings is None else "dp"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with timed_noise() as spent:
            seconds = _step_s(
                session, steps=args.steps, batch_size=args.batch, micro_batch=0, dp=settings, precision=precision
            )
        if settings is not None:
            noise.append(sum(spent) / args.steps / seconds)
        peaks[name] = peak_memory(device)
        return seconds

    times = paired(time_round, {"plain": None, "dp": dp}, args.repeats)
    tokens = args.batch * args.length
    share = statistics.median(noise[1:] or noise)  # the warm-up round's share left out when there are others
    rows = [
        (
            kind,
            mode,
            tokens / statistics.median(times[mode]),
            statistics.median(times[mode]),
            ratio(times, mode),
            peaks[mode],
            100 * share if mode == "dp" else None,
        )
        for mode in ("plain", "dp")
    ]
    return rows, f"{kind}: {cfg.model.name} on {device_name(device)}, base in {precision}, memory {memory_kind(device)}"


COLUMNS = (
    Column("adapter"),
    Column("step"),
    Column("tokens/s", digits=0),
    Column("s/step", "s", digits=3),
    Column("/ plain"),
    Column("peak memory", "GiB", digits=2),
    Column("noise share of the step", "%", digits=1),
)


def main(argv: list[str] | None = None, out: Path = RESULTS) -> Path:
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model.name (a shipped alias or a path)")
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (DP: expected)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode, interleaved")
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as fed simulate")
    args = parser.parse_args(argv)
    if min(args.length, args.batch, args.steps, args.repeats) < 1:
        parser.error("--length, --batch, --steps and --repeats must each be at least 1")
    started = time.perf_counter()
    table, notes = [], []
    for kind in ("lora", "ffa-lora"):
        rows, note = measure(kind, args)
        table += rows
        notes.append(note)
        print(*rows, sep="\n", flush=True)
    about = (
        f"`{args.model}` at length {args.length}, batch {args.batch} (DP: Poisson, expected), {args.steps} steps "
        f"per timed round, {args.repeats} interleaved repeats; DP: hooks, noise multiplier 1. "
        f"{'; '.join(notes)}. Wall {time.perf_counter() - started:.0f} s."
    )
    return save("llm_steps", "Causal LM steps: tokens per second, memory, noise share", about, COLUMNS, table, out)


if __name__ == "__main__":
    main()
