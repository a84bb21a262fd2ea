"""Large cohorts: driver and actor memory at 10, 100 and 1,000 clients a round, and where the driver's goes.

Two measurements in one run:

1. **Where the driver's memory goes** (``breakdown``): in a fresh process per cohort size, the quickstart's
   server strategy aggregates ``n`` fabricated replies (real payloads, valid claims) while a thread samples
   the process's RSS; each phase of the round is labelled (Flower's reply messages held, decoding and
   validation, bounded influence, the rules, the aggregation error), and the RSS high-water mark reached
   by the end of each phase, over two cohort sizes, gives what each phase adds per sampled client.
2. **The whole tree** (``tree``): one ``fed simulate`` of the quickstart per cohort size (1,000 virtual
   clients, 4 rounds, 1 local step, evaluation off, 2 actors), its process tree sampled every 0.2 s: the
   driver's peak, each actor's peak, each actor's warm-up (its growth over round 2, while the caches that
   are bounded fill) and its growth a round after that (rounds 3 to the last: what a long run would keep
   adding), the whole tree's peak, and the driver's slope per sampled client against the reply's own size.
   Two rounds cannot tell the one from the other; hence four.

    python -m bench run cohorts                             # 10, 100, 1000 a round: about 20 min on 2 cores
    python -m bench run cohorts --sampled 10 100 --virtual 100   # a quick look
    python -m bench run cohorts --code ../other-checkout    # measure another checkout's code (a "before")

Targets: driver slope at most 2x a reply's adapter bytes per sampled client, actor growth at most 5 MB a
round, the whole tree under 8 GB at 1,000 clients a round.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bench.results import Column

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("start", "messages", "read", "bound", "rules", "aggregation_error", "done")
"""The driver's round, in order: what each phase's RSS high-water mark adds is what that phase holds."""
WHERE = {
    "messages": "Flower's reply messages (their record bytes)",
    "read": "decoding + validation (decoded deltas)",
    "bound": "bounded influence (capped weights, clipped deltas)",
    "rules": "the aggregation rules",
    "aggregation_error": "the aggregation error (clients' dense products)",
}


class RssSampler:
    """The process's own RSS sampled every ``interval`` s in a thread, its high-water mark kept per phase."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.phase, self.peaks = interval, "start", {}
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * self._page / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.see()
            time.sleep(self.interval)

    def see(self) -> None:
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self.rss_mb())

    def enter(self, phase: str) -> None:
        self.see()
        self.phase = phase
        self.see()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.see()
        self._stop.set()
        self._thread.join()


def _labelled(sampler: RssSampler, phase: str, after: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        sampler.enter(phase)
        try:
            return fn(*args, **kwargs)
        finally:
            sampler.enter(after)

    return wrapped


def _settings(virtual: int, fraction: float, wire: str, rounds: int = 2) -> dict[str, Any]:
    return {
        "federation.num_clients": virtual,
        "federation.rounds": rounds,
        "federation.fraction_train": fraction,
        "federation.fraction_evaluate": 0.0,
        "train.local_steps": 1,
        "simulation.actors": 2,
        "wire.dtype": wire,
    }


def breakdown(n: int, wire: str) -> dict[str, Any]:
    """One round of ``n`` replies through the quickstart's server strategy, RSS high-water mark per phase."""
    import torch
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import strategies.core as core
    from fed.config.sources import resolve
    from fed.privacy.book import LedgerBook
    from fed.session import adapted_model
    from fed.wire import to_record
    from strategies.build import build_strategy

    for key in ("_run_id", "_node_id", "_task_id"):  # what a ServerApp's process has set for its messages
        setattr(TaskIdentity, key, 1)
    cfg = resolve("quickstart", [f"{k}={v}" for k, v in _settings(1000, 1.0, wire).items()])
    adapter, _ = adapted_model(cfg)
    global_ = adapter.sent_state()
    strategy = build_strategy(cfg, adapter, LedgerBook(cfg.dp))
    strategy._global = global_
    fingerprint, gen = adapter.fingerprint(), torch.Generator().manual_seed(0)

    def reply(node: int) -> Message:
        delta = {k: 1e-3 * torch.randn(t.shape, generator=gen) for k, t in global_.items()}
        metrics = {"partition-id": node, "round": 1, "num-examples": 3 + node % 5, "fingerprint": fingerprint}
        content = RecordDict({"metrics": MetricRecord(metrics | {"train_loss": 0.7, "steps": 1})})
        content["arrays"] = to_record(delta, wire)
        msg = Message(content, dst_node_id=1, message_type="train")
        msg.metadata.__dict__["_src_node_id"] = 1000 + node
        return msg

    with RssSampler() as sampler:
        strategy._read = _labelled(sampler, "read", "bound", strategy._read)
        core.aggregate = _labelled(sampler, "rules", "aggregation_error", core.aggregate)
        core.aggregation_error = _labelled(sampler, "aggregation_error", "done", core.aggregation_error)
        sampler.enter("messages")
        replies = [reply(node) for node in range(n)]
        reply_bytes = replies[0].content.array_records["arrays"].count_bytes()
        arrays, _ = strategy.aggregate_train(1, replies)
        sampler.enter("done")
    assert arrays is not None, "the round aggregated nothing"
    return {"n": n, "reply_bytes": reply_bytes, "peaks_mb": sampler.peaks}


def _run_breakdown(n: int, wire: str, code: Path) -> dict[str, Any]:
    """``breakdown`` in a fresh process running the code of checkout ``code``."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--breakdown", str(n), "--wire", wire]
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(argv, env=env, cwd=code, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"breakdown at {n} replies failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def where(small: dict[str, Any], large: dict[str, Any]) -> list[tuple[str, float]]:
    """What each phase of the driver's round adds per reply (MB): the growth of its high-water mark over
    the previous phases' from ``small`` to ``large`` replies."""
    rows, before = [], {"small": small["peaks_mb"]["start"], "large": large["peaks_mb"]["start"]}
    for phase in PHASES[1:-1]:
        mark_s = max(before["small"], small["peaks_mb"].get(phase, 0.0))
        mark_l = max(before["large"], large["peaks_mb"].get(phase, 0.0))
        rows.append((phase, ((mark_l - before["large"]) - (mark_s - before["small"])) / (large["n"] - small["n"])))
        before = {"small": mark_s, "large": mark_l}
    return rows


@contextmanager
def _rounds_file(path: Path) -> Iterator[Callable[[], int]]:
    """The number of rounds the run has finished, read from its metrics.jsonl."""

    def rounds() -> int:
        try:
            return path.read_text().count("\n")
        except OSError:
            return 0

    yield rounds


def tree(sampled: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``fed simulate`` with ``sampled`` of ``args.virtual`` clients a round: driver, actors, tree."""
    from bench.treemem import run_measured

    name = f"s{sampled}"
    settings = _settings(args.virtual, sampled / args.virtual, args.wire, args.rounds) | {
        "data.max_examples": args.virtual * args.rows
    }
    argv = [sys.executable, "-m", "simulations.cli", "simulate", "--preset", "quickstart", "--out", str(out)]
    argv += ["--name", name, *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "PYTHONPATH": str(args.code)}
    with _rounds_file(out / name / "metrics.jsonl") as rounds:
        measured = run_measured(argv, env=env, cwd=args.code, log=out / f"{name}.log", phase=rounds)
    if measured.returncode != 0:
        raise SystemExit(f"{sampled} a round: fed simulate exited {measured.returncode}; see {out}/{name}.log")
    lines = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    driver = next(t for t in measured.processes if "simulations.cli" in t.name)
    actors = [t for t in measured.processes if "ClientAppActor" in t.name]
    # phase k: k rounds finished, so its last sample is the end of round k + 1
    ends = [t.phase_last_mb for t in actors if all(k in t.phase_last_mb for k in range(args.rounds))]
    last = args.rounds - 1
    return {
        "sampled": sampled,
        "virtual": args.virtual,
        "driver_mb": driver.peak_mb,
        "actor_mb": [a.peak_mb for a in actors],
        "actor_warmup_mb": [end[1] - end[0] for end in ends],
        "actor_growth_mb": [(end[last] - end[1]) / (last - 1) for end in ends] if last > 1 else [],
        "tree_mb": measured.peak_mb,
        "round_s": [line["wall_s"] for line in lines],
        "reply_bytes": lines[0]["bytes_up"] / max(lines[0]["clients"], 1),
        "clients": [line["clients"] for line in lines],
    }


def columns() -> tuple[Column, ...]:
    """Two tables in one row shape: ``tree`` rows (one ``fed simulate`` per cohort size: the peaks, per-actor
    and per-round figures joined in one cell each) and ``driver`` rows (what each phase of the driver's round
    adds per reply, for this code and, with ``--before``, another checkout's). Imported here, not at the top:
    the breakdown's child runs this file against another checkout's packages."""
    from bench.results import Column

    return (
        Column("table"),
        Column("sampled a round", none=""),
        Column("phase", none=""),
        Column("code", none=""),
        Column("driver peak", "MB", digits=0, none=""),
        Column("each actor peak", "MB", none=""),
        Column("actor warm-up in round 2", "MB", none=""),
        Column("actor growth a round after", "MB", none=""),
        Column("whole tree", "MB", digits=0, none=""),
        Column("rounds", "s", none=""),
        Column("per reply", "MB", digits=2, none=""),
        Column("x reply", digits=1, none=""),
    )


def _joined(values: list[float], form: str) -> str | None:
    """Several figures of one cell (each actor's, each round's), in order; None when there are none."""
    return ", ".join(format(v, form) for v in values) or None


def tree_rows(rows: list[dict[str, Any]]) -> list[tuple[object, ...]]:
    """One ``tree`` row per cohort size measured."""
    return [
        (
            "tree",
            r["sampled"],
            None,
            None,
            r["driver_mb"],
            _joined(r["actor_mb"], ",.0f") or "not measured",
            _joined(r["actor_warmup_mb"], "+.1f") or "not measured",
            _joined(r["actor_growth_mb"], "+.1f") or "not measured",
            r["tree_mb"],
            _joined(r["round_s"], ".0f"),
            None,
            None,
        )
        for r in rows
    ]


def _verdict(largest: dict[str, Any]) -> str:
    if largest["sampled"] < 1000:
        return "not run at 1,000"
    return "met" if largest["tree_mb"] < 8192 else "missed"


def verdicts(rows: list[dict[str, Any]]) -> str:
    """The targets against the tree rows: the driver's slope per sampled client, the actors' growth, the
    whole tree at the largest size (empty below two sizes)."""
    if len(rows) < 2:
        return ""
    reply = rows[0]["reply_bytes"] / 2**20
    first, last = rows[0], rows[-1]
    slope = (last["driver_mb"] - first["driver_mb"]) / (last["sampled"] - first["sampled"])
    big = max(rows, key=lambda r: r["sampled"])
    growths = big["actor_growth_mb"]  # smaller cohorts: an actor has served too few clients to be past warm-up
    growth = (
        f"- largest actor growth a round after round 2 at {big['sampled']:,} a round: **{max(growths):+.1f} MB**; "
        f"target at most 5 MB: {'met' if max(growths) <= 5 else 'missed'}"
        if growths
        else "- actor growth: not measured (fewer than 3 rounds, or no actor process identified in the tree)"
    )
    return "\n".join(
        [
            f"- driver slope {first['sampled']:,} -> {last['sampled']:,} a round: **{slope:.2f} MB per sampled "
            f"client**, {slope / reply:.1f}x a reply's adapter ({reply:.2f} MB); target at most 2x: "
            f"{'met' if slope <= 2 * reply else 'missed'}",
            growth,
            f"- whole tree at {big['sampled']:,} a round: **{big['tree_mb'] / 1024:.2f} GB**; target under 8 GB at "
            f"1,000 a round: {_verdict(big)}",
        ]
    )


def driver_rows(
    rows: list[tuple[str, float]], reply_mb: float, before: dict[str, float] | None, label: str
) -> list[tuple[object, ...]]:
    """MB per reply each phase adds, and as a multiple of the reply; with ``before``, that checkout's first."""
    codes = [(f"before (`{label}`)", before), ("now", dict(rows))] if before is not None else [("now", dict(rows))]
    out: list[tuple[object, ...]] = []
    for phase in [*(p for p, _ in rows), "total"]:
        for code, mbs in codes:
            mb = sum(mbs.values()) if phase == "total" else mbs[phase]
            out.append(("driver", None, WHERE.get(phase, phase), code, *(None,) * 6, mb, mb / reply_mb))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sampled", type=int, nargs="*", default=[10, 100, 1000], help="clients a round")
    parser.add_argument("--virtual", type=int, default=1000, help="virtual clients")
    parser.add_argument("--rows", type=int, default=4, help="examples per client (train + test)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per cohort size (3 or more measure growth)")
    parser.add_argument("--wire", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--small", type=int, default=20, help="replies of the smaller breakdown")
    parser.add_argument("--large", type=int, default=100, help="replies of the larger breakdown")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose code runs (default: this one)")
    parser.add_argument("--before", type=Path, default=None, help="a checkout whose driver breakdown is set beside")
    parser.add_argument("--label", default="", help="names the code in the result (default: its commit)")
    parser.add_argument("--save", default="cohorts", help="result name under bench/results/ ('' : print only)")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--breakdown", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.breakdown:
        print(json.dumps(breakdown(args.breakdown, args.wire)))
        return
    args.code = args.code.resolve()
    from bench.results import commit

    args.code_label = args.label or commit(args.code)
    small, large = (_run_breakdown(n, args.wire, args.code) for n in (args.small, args.large))
    where_rows = where(small, large)
    print(json.dumps({"breakdown": [small, large]}), flush=True)
    if args.before is not None:
        args.before = args.before.resolve()
        args.before_label = commit(args.before)
        before = [_run_breakdown(n, args.wire, args.before) for n in (args.small, args.large)]
        print(json.dumps({"before": before}), flush=True)
        args.before_rows = dict(where(*before))
    reply_mb = small["reply_bytes"] / 2**20
    driver = driver_rows(where_rows, reply_mb, getattr(args, "before_rows", None), getattr(args, "before_label", ""))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for sampled in [0, *args.sampled]:  # the result is saved after each size: a long run keeps what it has
            if sampled:
                rows.append(tree(sampled, args, out))
                print(json.dumps(rows[-1]), flush=True)
            about = (
                f"`fed simulate --preset quickstart`, {args.virtual:,} virtual clients, {args.rounds} rounds, 1 local "
                f"step, evaluation off, 2 actors, wire {args.wire}, {args.rows} examples a client; code: "
                f"`{args.code_label}`. The `driver` rows: where the driver's memory goes per sampled client (the "
                f"quickstart's strategy aggregating {args.small} and {args.large} fabricated replies of "
                f"{reply_mb:.2f} MB in one process; RSS high-water mark each phase adds).\n\n" + verdicts(rows)
            )
            if args.save:
                from bench.results import RESULTS, save

                title = f"Large cohorts: driver and actor memory ({args.code_label})"
                print(save(args.save, title, about, columns(), [*tree_rows(rows), *driver], RESULTS), flush=True)


if __name__ == "__main__":
    main()
