"""Per-message overhead of a deployed node, resident against per-message ClientApp runtime (deploy/resident.py).

A real deployment on loopback (TLS, node authentication, 2 SuperNodes, 3 rounds) per model and mode. Each
node logs with timestamps (``FLWR_LOG_LEVEL=DEBUG``); for every message the bench reads, in that node's log,
when the SuperNode had it (``Received successfully``), when it sent the reply (``Sending: ...``) and the
training or evaluation time the ClientApp logged in between (``trained ... in S s``, ``evaluated in S s``).
Overhead = delivered to reply sent, minus that time: process start, imports, model build, data, DP set-up,
Flower's own polling. First message of each node apart from later ones; the rounds' wall time beside.

``python -m bench run resident_overhead`` (MiniLM under DP, quickstart-like; then the ``instruct`` preset's
SmolLM2-135M); ``--models minilm`` for one. Timings move with outside load: the 1-minute load average is
recorded before and after each deployment.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.results import Column, save
from deploy.launcher import Cluster, Layout
from deploy.pki import make_pki
from fed.config.sources import resolve

MODELS = {
    "minilm": (
        "quickstart",
        ["adapter.kind=ffa-lora", "dp.enabled=true", "dp.target_epsilon=8", "federation.fraction_evaluate=1"],
    ),
    "smollm2": ("instruct", []),
}
"""Each model's preset and overrides: MiniLM as ``quickstart`` under DP, SmolLM2-135M as ``instruct``."""
LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\S*:\s+(.*)$")
COMPUTE = re.compile(r"(?:trained \d+ steps|evaluated) in ([0-9.]+) s")


@dataclass(frozen=True)
class Message:
    """One message at one node: delivered to reply sent, and the training or evaluation inside it."""

    kind: str
    wall_s: float
    compute_s: float

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.compute_s


def _stamp(text: str) -> float:
    return time.mktime(time.strptime(text[:19], "%Y-%m-%d %H:%M:%S")) + int(text[20:23]) / 1000


def messages(log: str) -> list[Message]:
    """The node's messages in order, from its log (lines without a timestamp are ignored)."""
    found: list[Message] = []
    received: float | None = None
    compute = 0.0
    for raw in log.splitlines():
        match = LINE.search(raw)
        if match is None:
            continue
        at, text = _stamp(match.group(1)), match.group(2)
        if text.startswith("Received successfully"):
            received, compute = at, 0.0
        elif (timed := COMPUTE.search(text)) is not None:
            compute += float(timed.group(1))
        elif text.startswith("Sending: ") and received is not None:
            found.append(Message(text.split()[1], at - received, compute))
            received = None
    return found


def deployment(model: str, resident: bool, root: Path, rounds: int, nodes: int) -> dict:
    """One deployed run; its messages per node, the rounds' wall times and the load around it."""
    preset, overrides = MODELS[model]
    cfg = resolve(preset, [*overrides, f"federation.num_clients={nodes}", f"federation.rounds={rounds}"])
    layout = Layout(root)
    make_pki(layout.pki.root, ["127.0.0.1", "localhost"], nodes)
    load = [os.getloadavg()[0]]
    with Cluster(layout, resident=resident) as cluster:
        cluster.start_superlink()
        for node in range(nodes):
            cluster.register(node)
            # reply-delay 0: a DP reply leaves as soon as it is built, so the hold that hides a node's timing
            # (a 30 s grid by default) is not counted as start-up overhead
            cluster.start_node(node, None, nodes, policy={"dp-opt-out": "true", "evaluate": "true", "reply-delay": 0})
        run_dir = cluster.run(cfg, "bench", timeout=3600)
    load.append(os.getloadavg()[0])
    walls = [json.loads(line)["wall_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    per_node = [messages(layout.log(f"node-{node}").read_text(errors="replace")) for node in range(nodes)]
    return {"rounds": walls, "nodes": per_node, "load": load}  # each round's own wall time (server/app.py)


COLUMNS = (
    Column("model"),
    Column("mode"),
    Column("messages"),
    Column("first message, per node", "s"),
    Column("later messages, median", "s", digits=2),
    Column("later, min", "s", digits=2),
    Column("later, max", "s", digits=2),
    Column("round walls", "s"),
    Column("load before", digits=1),
    Column("load after", digits=1),
)


def _row(model: str, mode: str, result: dict) -> tuple[object, ...]:
    """One deployment as a row of COLUMNS: each node's first-message overhead, the later messages' median and
    range, each round's wall and the 1-minute load average before and after."""
    first = [m[0].overhead_s for m in result["nodes"] if m]
    later = [x.overhead_s for m in result["nodes"] for x in m[1:]]
    spread = (statistics.median(later), min(later), max(later)) if later else (None, None, None)
    return (
        model,
        mode,
        sum(len(m) for m in result["nodes"]),
        " / ".join(f"{x:.2f}" for x in first),
        *spread,
        " / ".join(f"{w:.1f}" for w in result["rounds"]),
        *result["load"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="minilm,smollm2", help=f"comma-separated, of {sorted(MODELS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}; known: {sorted(MODELS)}")
    os.environ["FLWR_LOG_LEVEL"] = "DEBUG"  # timestamps in the nodes' logs (inherited by every Flower process)
    uptime = Path("/proc/loadavg").read_text().strip()
    rows: list[tuple[object, ...]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for resident in (True, False):
                mode = "resident" if resident else "per-message"
                result = deployment(model, resident, Path(tmp) / f"{model}-{mode}", args.rounds, args.nodes)
                rows.append(_row(model, mode, result))
                print(rows[-1], flush=True)
                _save(rows, args, uptime)  # after each deployment: an interrupted bench keeps what it measured


def _save(rows: list[tuple[object, ...]], args: argparse.Namespace, uptime: str) -> None:
    about = (
        f"Per-message overhead of a deployed SuperNode: delivered to reply sent, minus the training and evaluation "
        f"time its ClientApp logged, over {args.nodes} nodes and {args.rounds} rounds on loopback (TLS, node "
        "authentication), each node on its partition of the preset's data. MiniLM: `quickstart` with FFA-LoRA under "
        "DP (target epsilon 8), train and evaluate messages; SmolLM2-135M: `instruct`. Resident: one process per "
        "node keeps its imports and the run's model (deploy/resident.py); per-message: Flower's fresh "
        "`flwr-clientapp` per message. Nodes reply at once (`--reply-delay 0`): the DP reply grid that hides a "
        "node's timing is off here, or it would be counted as overhead. "
        f"/proc/loadavg at the start: `{uptime}` (2 shared cores)."
    )
    save("resident_overhead", "Deployed per-message overhead, resident against per-message", about, COLUMNS, rows)


if __name__ == "__main__":
    main()
