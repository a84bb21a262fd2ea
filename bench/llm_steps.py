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
from typing import get_args
from unittest import mock

import torch
from datasets import Dataset

from bench.clipping_modes import _step_s, device_name, paired, ratio
from bench.results import RESULTS, Column, save
from fed.config import DPConfig, NoiseSource
from fed.config.sources import resolve
from fed.device import resolve_device
from fed.models import _source, resolve_model_name
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


RANDOM_LLAMAS = {
    # TinyLlama-1.1B's shape on SmolLM2's vocabulary: about 1.0B parameters, random weights (speed only)
    "random-llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32),
    "random-llama-tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}
TOKENIZER_OF = {"random-llama-1b": "SmolLM2-135M-Instruct", "random-llama-tiny": "tiny-llama"}


def random_llama(name: str) -> Path:
    """A randomly initialised Llama checkpoint of ``RANDOM_LLAMAS[name]``'s shape, saved once in fedlora's cache
    with a shipped tokenizer: a local checkpoint directory, which ``model.name`` takes like any other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fed.models import cache_root, load_tokenizer

    target = cache_root() / "models" / name
    if (target / "config.json").is_file():
        return target
    tokenizer = load_tokenizer(TOKENIZER_OF[name], "causal-lm")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **RANDOM_LLAMAS[name],
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    tmp = target.with_name(f".{name}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target)
    return target


def baseline_steps(model_dir: str, rows: Dataset, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Seconds per step of the hand-built recipe of ``bench/baseline`` (transformers + PEFT LoRA r=8 on q/v +
    Opacus ``make_private`` with Poisson batches) on the same rows, plain and DP: median over ``--repeats``
    rounds of ``--steps`` steps, after one warm-up step. The model's own token-mean loss, as people write it."""
    from opacus import PrivacyEngine
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    texts = [f"{p} {r}" for p, r in zip(rows["prompt"], rows["response"])]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=args.length, return_tensors="pt")
    data = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"])
    seconds: dict[str, float] = {}
    for mode in ("plain", "dp"):
        base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).to(device)
        config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(base, config).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True)
        if mode == "dp":
            model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
            )

        batches = (b for _ in iter(int, 1) for b in loader if len(b[0]))  # endless, empty Poisson batches skipped
        rounds = []
        for repeat in range(args.repeats + 1):  # the first: a warm-up step
            start = time.perf_counter()
            for _ in range(1 if repeat == 0 else args.steps):
                ids, mask = (t.to(device) for t in next(batches))
                optimizer.zero_grad()
                model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
                optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rounds.append((time.perf_counter() - start) / args.steps)
        seconds[mode] = statistics.median(rounds[1:])
    return seconds


def shared_gpu_simulation(model: str, args: argparse.Namespace) -> str:
    """A 4-client, 2-round DP simulation whose clients share one GPU (``simulation.gpus_per_client = 0.25``):
    its wall time, or why it was skipped."""
    if not torch.cuda.is_available():
        return "skipped: no CUDA GPU visible (it shares one GPU among 4 clients; run it where one is)"
    import tempfile

    from simulations.run import simulate

    overrides = [
        f"model.name={model}",
        f"model.max_length={args.length}",
        "federation.num_clients=4",
        "federation.rounds=2",
        f"train.local_steps={args.steps}",
        f"train.batch_size={args.batch}",
        "train.device=cuda",
        "simulation.gpus_per_client=0.25",
        "dp.enabled=true",
        "dp.noise_multiplier=1.0",
        *args.overrides,
    ]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        simulate(resolve("instruct", overrides), out)
    return f"4 clients x 2 rounds of {args.steps} DP steps on one GPU: {time.perf_counter() - start:.0f} s wall"


def noise_draws(size: int, device: torch.device, repeats: int) -> dict[str, float]:
    """Milliseconds one step's noise for ``size`` trained values takes from each ``dp.noise_source`` on
    ``device``: the median of ``repeats`` draws after one warm-up."""
    seconds: dict[str, float] = {}
    for source in get_args(NoiseSource):
        secure_rng.normal((size,), 1.0, torch.float32, device, source)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            secure_rng.normal((size,), 1.0, torch.float32, device, source)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        seconds[source] = 1e3 * statistics.median(times)
    return seconds


def peak_memory(device: torch.device) -> float:
    """The GPU's peak allocated memory since the last reset, else this process's peak resident memory (GiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_kind(device: torch.device) -> str:
    """What ``peak_memory`` measures on ``device``."""
    return "GPU, allocated" if device.type == "cuda" else "process peak RSS, all modes"


def measure(model: str, kind: str, args: argparse.Namespace) -> tuple[dict[str, dict[str, object]], str]:
    """Adapter ``kind`` on ``model``, per mode (plain, DP with hooks): its figures by column name (the noise
    draws on the DP mode's), and what it ran on."""
    cfg = resolve(
        "instruct",
        [
            *args.overrides,
            f"model.name={model}",
            f"model.max_length={args.length}",
            f"adapter.kind={kind}",
            f"train.device={args.device}",
        ],
    )
    device = resolve_device(cfg.train.device)
    adapter, task = adapted_model(cfg, str(device))  # placed before injection, as a client's model is
    precision = resolve_precision(cfg.train.precision, model_device(adapter.model).type)
    rows = _rows(args)
    session = SimpleNamespace(adapter=adapter, task=task, data=SimpleNamespace(train=rows))
    dp = DpSettings(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        sample_rate=1 / EXAMPLES_PER_BATCH,
        num_examples=len(rows),
        noise_source=cfg.dp.noise_source,
    )
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
    trained = sum(p.numel() for p in adapter.trainable_parameters())
    draws = noise_draws(trained, device, max(3, args.repeats))
    tokens = args.batch * args.length
    share = statistics.median(noise[1:] or noise)  # the warm-up round's share left out when there are others
    figures: dict[str, dict[str, object]] = {}
    for mode in ("plain", "dp"):
        median = statistics.median(times[mode])
        figures[mode] = {
            "tokens/s": tokens / median,
            "s/step": median,
            "/ plain": ratio(times, mode),
            "peak memory": peaks[mode],
            "noise share of the step": 100 * share if mode == "dp" else None,
            "noise values": trained if mode == "dp" else None,
            **{f"noise draw, {source}": ms if mode == "dp" else None for source, ms in draws.items()},
        }
    note = f"{kind} on {Path(model).name}: {device_name(device)}, base in {precision}, memory {memory_kind(device)}"
    return figures, note


def _rows(args: argparse.Namespace) -> Dataset:
    return synthetic_rows(args.batch * EXAMPLES_PER_BATCH, args.length)


COLUMNS = (
    Column("model"),
    Column("adapter"),
    Column("step"),
    Column("tokens/s", digits=0),
    Column("s/step", "s", digits=3),
    Column("/ plain"),
    Column("peak memory", "GiB", digits=2),
    Column("noise share of the step", "%", digits=1, none=""),
    Column("recipe s/step", "s", digits=3, none=""),
    Column("recipe / fedlora", "x", digits=2, none=""),
    Column("noise values", none=""),
    *(Column(f"noise draw, {source}", "ms", digits=1, none="") for source in get_args(NoiseSource)),
)
"""One row per model, adapter and step: fedlora's figures, the hand-built recipe's beside LoRA's, and on DP
rows the time one draw of the step's noise (every trained value) takes from each ``dp.noise_source``."""


def main(argv: list[str] | None = None, out: Path = RESULTS) -> Path:
    warnings.filterwarnings("ignore", message="Full backward hook")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model.name (a shipped alias or a path)")
    parser.add_argument("--length", type=int, default=512, help="tokens per example")
    parser.add_argument("--batch", type=int, default=8, help="examples per step (DP: expected)")
    parser.add_argument("--steps", type=int, default=4, help="steps per timed round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per mode, interleaved")
    parser.add_argument(
        "--large",
        default="random-llama-1b",
        help=f"a second, larger model.name timed alike ({', '.join(RANDOM_LLAMAS)}: random weights, speed only; none)",
    )
    parser.add_argument("--device", default="auto", help="train.device: auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value, as fed simulate")
    args = parser.parse_args(argv)
    if min(args.length, args.batch, args.steps, args.repeats) < 1:
        parser.error("--length, --batch, --steps and --repeats must each be at least 1")
    started = time.perf_counter()
    table: list[tuple[object, ...]] = []
    notes = []
    device = resolve_device(args.device)
    for model in [args.model, *([] if args.large == "none" else [args.large])]:
        name = str(random_llama(model)) if model in RANDOM_LLAMAS else model
        for kind in ("lora", "ffa-lora"):
            figures, note = measure(name, kind, args)
            notes.append(note)
            recipe = None
            if kind == "lora":
                recipe = baseline_steps(_source(resolve_model_name(name, "causal-lm")), _rows(args), args, device)
            for mode, row in figures.items():
                mine = float(str(row["s/step"]))
                theirs = (recipe[mode], recipe[mode] / mine) if recipe else (None, None)
                cells = {"model": Path(name).name, "adapter": kind, "step": mode, **row}
                cells["recipe s/step"], cells["recipe / fedlora"] = theirs
                table.append(tuple(cells[c.name] for c in COLUMNS))
                print(table[-1], flush=True)
    about = (
        f"Length {args.length}, batch {args.batch} (DP: Poisson, expected), {args.steps} steps per timed round, "
        f"{args.repeats} interleaved repeats; DP: hooks, noise multiplier 1, noise from `dp.noise_source` "
        f"(default: {DPConfig().noise_source}); `/ plain`: median of the per-repeat ratios [quartiles]. "
        f"{'; '.join(notes)}. The recipe: the same LoRA steps in the hand-built recipe of `bench/baseline` "
        "(transformers + PEFT + Opacus `make_private`, padded to the length). A noise draw: one step's noise "
        "(every trained value of the adapter, in one draw, float64 Box-Muller summed four times as Opacus's secure "
        "mode does) from each `dp.noise_source`, median of the draws.\n\n"
        f"Shared GPU: {shared_gpu_simulation(args.model, args)}. Wall {time.perf_counter() - started:.0f} s."
    )
    return save("llm_steps", "Causal LM steps: tokens per second, memory, noise share", about, COLUMNS, table, out)


if __name__ == "__main__":
    main()
