"""What secure aggregation costs per round: time and bytes against plain aggregation, in simulation and on the
deployment engine.

Each cell runs the same short federation three ways: plain, SecAgg+ (``federation.secure_aggregation``), and
SecAgg+ with distributed DP (``dp.level = "client"``). The round's wall time is the server's own per-round
figure in metrics.jsonl (sampling to the next global, training included); the bench reports the median of
the rounds after the first (the first pays start-up) and the ratio to plain. Bytes are what the round's
messages carried each way: plain counts the train messages and replies, SecAgg+ its four stages. Training
is kept short (one local step) so that the aggregation's own cost shows.

``python -m bench run secagg_cost`` (simulation at 4, 10 and 40 clients, deployment at 4 nodes on loopback).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.results import Column, save
from deploy.launcher import Cluster, Layout
from deploy.pki import make_pki
from fed.config import RunConfig
from fed.config.sources import resolve
from simulations.run import simulate

BASE = [
    "federation.rounds=3",
    "federation.fraction_evaluate=0",
    "train.local_steps=1",
    "train.batch_size=8",
    "data.max_examples=0",
]
"""Short rounds: one local step, no evaluation, every client each round."""
MODES = {
    "plain": [],
    "secagg": ["federation.secure_aggregation=true"],
    "secagg + distributed DP": [
        "federation.secure_aggregation=true",
        "dp.enabled=true",
        "dp.level=client",
        "dp.client_noise_multiplier=1",
    ],
}
COLUMNS = (
    Column("engine"),
    Column("clients"),
    Column("mode"),
    Column("round wall, median", "s", digits=2),
    Column("vs plain", "x", digits=2),
    Column("bytes down per round", "MB", digits=2),
    Column("bytes up per round", "MB", digits=2),
    Column("clients aggregated"),
)


def _config(preset: str, clients: int, mode: str) -> RunConfig:
    return resolve(preset, [*BASE, f"federation.num_clients={clients}", *MODES[mode]])


def _summary(run_dir: Path) -> tuple[float, float, float, int]:
    """Median round wall after the first, mean bytes down and up per round (MB), clients aggregated per round."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    later = [line["wall_s"] for line in lines[1:]] or [lines[0]["wall_s"]]
    down = statistics.mean(line["bytes_down"] for line in lines) / 1e6
    up = statistics.mean(line["bytes_up"] for line in lines) / 1e6
    return statistics.median(later), down, up, min(line["clients"] for line in lines)


def _simulated(preset: str, clients: int, mode: str, out: Path) -> Path:
    return simulate(_config(preset, clients, mode), out, name=f"sim-{clients}-{mode.split()[0]}").path


def _deployed(preset: str, nodes: int, mode: str, root: Path) -> Path:
    layout = Layout(root)
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes)
    policy = {"dp-opt-out": "true", "reply-delay": 0}  # the nodes add their own noise share; no reply grid
    with Cluster(layout) as cluster:
        cluster.start_superlink()
        for node in range(nodes):
            cluster.register(node)
            cluster.start_node(node, None, nodes, policy=policy)
        return cluster.run(_config(preset, nodes, mode), "bench", timeout=3600)


def _rows(engine: str, clients: int, runs: dict[str, Path]) -> list[tuple[object, ...]]:
    plain = _summary(runs["plain"])[0]
    rows = []
    for mode, run_dir in runs.items():
        wall, down, up, aggregated = _summary(run_dir)
        rows.append((engine, clients, mode, wall, wall / plain, down, up, aggregated))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="quickstart")
    parser.add_argument("--clients", default="4,10,40", help="simulated client counts")
    parser.add_argument("--nodes", default="4", help="deployed node counts (empty: none)")
    args = parser.parse_args()
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in [int(c) for c in args.clients.split(",") if c]:
            runs = {mode: _simulated(args.preset, clients, mode, Path(tmp)) for mode in MODES}
            rows += _rows("simulation", clients, runs)
            print(*rows[-len(MODES) :], sep="\n", flush=True)
            _save(rows, args)
        for nodes in [int(n) for n in args.nodes.split(",") if n]:
            runs = {
                mode: _deployed(args.preset, nodes, mode, Path(tmp) / f"deploy-{nodes}-{i}")
                for i, mode in enumerate(MODES)
            }
            rows += _rows("deployment", nodes, runs)
            print(*rows[-len(MODES) :], sep="\n", flush=True)
            _save(rows, args)


def _save(rows: list[tuple[object, ...]], args: argparse.Namespace) -> None:
    about = (
        f"The `{args.preset}` preset with one local step, no evaluation and every client every round, 3 rounds, run "
        "plain, with SecAgg+ (`federation.secure_aggregation`) and with SecAgg+ plus distributed DP (`dp.level = "
        '"client"`, z = 1). Round wall: the server\'s per-round time in metrics.jsonl, median of rounds 2-3 (training '
        "included); vs plain: that over the plain run's. Bytes: what the round's messages carried, plain its train "
        "messages and replies, SecAgg+ all four stages. Simulation: Flower's Ray engine in one process; deployment: a "
        f"SuperLink and one SuperNode per client on loopback (TLS, node authentication, resident ClientApps). "
        f"Load at the start: `{Path('/proc/loadavg').read_text().strip()}` (2 shared cores)."
    )
    save("secagg_cost", "Secure aggregation: cost per round against plain aggregation", about, COLUMNS, rows)


if __name__ == "__main__":
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    main()
