"""Does ``fed plan``'s memory estimate (``fed.memory``) hold? One DP-SGD step of a causal LM, its peak memory
measured against the estimate, at several lengths.

Each measurement runs in a fresh Python process, so no earlier model, batch or allocator cache hides or
inflates its peak: the process imports the libraries, reads its resident memory (the floor), builds the
adapted model, and runs one DP step (hooks, a batch of exactly ``--batch`` examples each exactly ``length``
tokens long) while a thread samples its resident set size every millisecond. The measured figure is the peak
over the floor: weights, activations, per-sample gradients, optimiser state, and whatever the allocator and
the frameworks add, which the estimate leaves out. The step's own share (the peak over the resident memory
after the build) is reported beside it. On a GPU the peak is CUDA's allocated maximum instead. Run:
    python -m bench run llm_memory                            # SmolLM2-135M, lengths 128 and 512, batch 8
    python -m bench run llm_memory --model tiny-llama --lengths 16 --batch 2   # CI size
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from bench.results import RESULTS, Column, save

_PAGE = 4096


def _rss() -> int:
    """This process's resident set size in bytes (Linux ``/proc/self/statm``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * _PAGE


class PeakSampler:
    """The largest resident set size seen by a thread reading it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def measure_one(model: str, length: int, batch: int, device: str, overrides: list[str]) -> dict[str, object]:
    """One DP step in this process: the estimate's parts and the measured peak, in bytes."""
    import torch

    from bench.llm_steps import synthetic_rows
    from fed.config.sources import resolve
    from fed.device import resolve_device
    from fed.memory import estimate
    from fed.precision import resolve_precision
    from fed.privacy import dpsgd  # noqa: F401  (Opacus, imported before the floor is read: not the step's)
    from fed.privacy.mechanism import DpSettings
    from fed.session import adapted_model
    from fed.train import train_round

    warnings.filterwarnings("ignore", message="Full backward hook")
    cfg = resolve(
        "instruct",
        [
            f"model.name={model}",
            f"model.max_length={length}",
            f"train.batch_size={batch}",
            f"train.micro_batch={batch}",
            f"train.device={device}",
            "dp.enabled=true",
            "dp.noise_multiplier=1.0",
            *overrides,
        ],
    )
    where = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, where.type)
    floor = _rss()
    adapter, task = adapted_model(cfg, str(where))
    built = _rss()
    rows = synthetic_rows(batch, length)
    dp = DpSettings(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, num_examples=batch)  # all rows: batch
    if where.type == "cuda":
        torch.cuda.reset_peak_memory_stats(where)
    with PeakSampler() as sampler:
        train_round(
            adapter,
            task,
            rows,
            steps=1,
            batch_size=batch,
            lr=1e-3,
            weight_decay=0.0,
            dp=dp,
            gen=torch.Generator().manual_seed(0),
            precision=precision,
            micro_batch=batch,
        )
    found = estimate(adapter.model, cfg, activation_bytes=precision.itemsize)
    gpu = int(torch.cuda.max_memory_allocated(where)) if where.type == "cuda" else None
    return {
        "length": length,
        "batch": batch,
        "estimate": dict(found.rows()),
        "measured": gpu if gpu is not None else sampler.peak - floor,
        "step": None if gpu is not None else sampler.peak - built,
        "where": "GPU, CUDA allocated peak" if gpu is not None else "CPU, resident set peak over the floor",
    }


def _child(args: argparse.Namespace) -> None:
    print(json.dumps(measure_one(args.model, args.child, args.batch, args.device, args.overrides)))


def _in_fresh_process(args: argparse.Namespace, length: int) -> dict[str, object]:
    command = [sys.executable, "-m", "bench.llm_memory", "--child", str(length), "--model", args.model]
    command += ["--batch", str(args.batch), "--device", args.device, *(f"--set={o}" for o in args.overrides)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the measurement at length {length} failed:\n{done.stderr[-2000:]}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


COLUMNS = (
    Column("length", "tokens"),
    Column("weights", "MiB", digits=0),
    Column("activations", "MiB", digits=0),
    Column("per-sample grads", "MiB", digits=0),
    Column("optimiser", "MiB", digits=0),
    Column("estimate", "MiB", digits=0),
    Column("measured", "MiB", digits=0),
    Column("measured / estimate", "x", digits=2),
    Column("estimate without weights", "MiB", digits=0),
    Column("measured step over the built model", "MiB", digits=0),
)
"""One row per length: where the estimate puts the memory, its total, and the measured peaks."""


def _mib(n: object) -> float | None:
    return None if n is None else int(str(n)) / 2**20


def main(argv: list[str] | None = None, out: Path = RESULTS) -> Path | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model.name (a shipped alias or a path)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples in the step")
    parser.add_argument("--device", default="cpu", help="train.device (the CPU by default: its peak is RSS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as fed simulate")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)  # one measurement, this process
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return None
    started = time.perf_counter()
    results = [_in_fresh_process(args, length) for length in args.lengths]
    rows = []
    for r in results:
        est: dict[str, int] = r["estimate"]  # type: ignore[assignment]  # parsed from the child's JSON
        measured = int(str(r["measured"]))
        parts = (est["weights"], est["activations"], est["per-sample gradients"], est["optimizer and gradients"])
        rows.append(
            (
                r["length"],
                *(_mib(part) for part in parts),
                _mib(est["total"]),
                _mib(measured),
                measured / est["total"],
                _mib(est["total"] - est["weights"]),
                _mib(r["step"]),
            )
        )
    about = (
        f"`{args.model}`, one DP-SGD step (hooks) of exactly {args.batch} examples x length tokens, each length in "
        f"a fresh process; {results[0]['where']}, sampled every millisecond. "
        f"Wall {time.perf_counter() - started:.0f} s."
    )
    title = "Memory of a DP step of a causal LM: the estimate against the measured peak"
    return save("llm_memory", title, about, COLUMNS, rows, out)


if __name__ == "__main__":
    main()
