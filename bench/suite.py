"""The benchmark suite's index: every bench, what it answers, how long it runs, its figure and target.

``python -m bench list`` prints it, bench/README.md holds it as a table (a test keeps the two equal) and
``python -m bench run NAME`` runs one bench by its name here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bench:
    module: str  # what ``python -m bench run NAME`` imports; its ``main()`` reads ``sys.argv``
    question: str
    duration: str  # on 2 CPU cores, at the bench's defaults
    figure: str
    target: str
    json: bool  # False: it prints its table and writes no result yet


BENCHES = {
    "presets": Bench(
        "bench.presets",
        "What does a user see running the shipped presets (README.md's what-to-expect table)?",
        "about 20 min (quickstart 3, instruct 5, private 12)",
        "first and final eval metric, largest client epsilon, wall time per preset",
        "none: what to expect",
        True,
    ),
    "wire_bytes": Bench(
        "bench.wire_bytes",
        "How many bytes does a client send per round, against the physical minimum?",
        "10 s",
        "bytes sent per family and wire dtype",
        "overhead (tensor names) under 1.5%",
        True,
    ),
    "adapters_accuracy": Bench(
        "bench.adapters_accuracy",
        "Does each adapter family's paper claim hold against LoRA (bench/grids/families.toml), with and without DP?",
        "about 3-6 min a cell, 120 cells (7 families and the claims' arms x 2 tasks x 2 x 3 seeds; resumable)",
        "final accuracy per family, task and privacy, each claim's verdict (docs/img/adapters_accuracy.png)",
        "none: each claim judged by the test the grid file states",
        True,
    ),
    "family_steps": Bench(
        "bench.family_steps",
        "How long is a local step of each adapter family, relative to LoRA (plain and DP-SGD)?",
        "about 10 min with --dp",
        "seconds per step and the ratio to LoRA, families interleaved in one process",
        "none: a comparison",
        True,
    ),
    "dp_utility": Bench(
        "bench.dp_utility",
        "What accuracy does the `private` preset reach at epsilon 8, 3 and 1?",
        "about 11 min a cell, 48 cells (resumable)",
        "accuracy against epsilon (docs/img/dp_utility.png)",
        "0.80 at eps 8, 0.78 at eps 3, 0.76 at eps 1",
        True,
    ),
    "client_dp_utility": Bench(
        "bench.client_dp_utility",
        "What accuracy does client-level DP (DP-FedAvg) reach at 8, 32 and 100 clients, and how many clients per "
        "round keep it within 2 points of no DP?",
        "minutes (the private preset's head replayed; features read once; resumable)",
        "accuracy against client-level epsilon per client count",
        "none: a measurement",
        True,
    ),
    "vs_baseline": Bench(
        "bench.vs_baseline",
        "Is fedlora as fast and as accurate as the reference Flower + PEFT + Opacus recipe?",
        "about 20 min",
        "accuracy, wall time and memory of both",
        "same accuracy, no slower",
        True,
    ),
    "clipping_modes": Bench(
        "bench.clipping_modes",
        "Which Opacus clipping mode is fastest for adapter-sized tensors?",
        "about 5 min",
        "seconds per step: plain, hooks, ghost",
        "the default (hooks) is the fastest on CPU",
        True,
    ),
    "llm_steps": Bench(
        "bench.llm_steps",
        "How fast is a plain and a DP step of a causal LM (SmolLM2-135M and a random ~1B Llama) at length 512, "
        "against the PEFT + Opacus recipe, in how much memory, and how much of a DP step is drawing the noise?",
        "minutes on a GPU; tens of minutes on 2 CPU cores (the tests run it at tiny sizes)",
        "tokens per second, peak memory, noise share, the recipe's s/step and each noise source's draw, per "
        "model, adapter and step",
        "none yet: prepared for a GPU",
        True,
    ),
    "llm_memory": Bench(
        "bench.llm_memory",
        "Does fed plan's memory estimate hold for a causal LM's DP step at lengths 128 and 512?",
        "about 3 min on 2 CPU cores (one fresh process per length)",
        "estimated and measured peak memory per length",
        "measured within 1.5x of the estimate",
        True,
    ),
    "clientapp_startup": Bench(
        "bench.clientapp_startup",
        "How long does a deployed ClientApp take to start for each message?",
        "about 1 min",
        "imports, model build and the import floor",
        "3 s (below this machine's import floor)",
        True,
    ),
    "resident_overhead": Bench(
        "bench.resident_overhead",
        "What does a deployed node spend per message besides training, resident against per-message ClientApps?",
        "about 40 min (4 deployments of 3 rounds)",
        "per-message overhead, first and later messages, and round walls, per model and mode",
        "under 1 s after the first message in resident mode",
        True,
    ),
    "secagg_cost": Bench(
        "bench.secagg_cost",
        "What does secure aggregation cost per round against plain aggregation, simulated and deployed?",
        "about 25 min (4, 10, 40 simulated clients, 4 deployed nodes; three modes each)",
        "round wall and bytes each way per round, per engine, client count and mode",
        "within 3x of plain at 10 clients",
        True,
    ),
    "book_scale": Bench(
        "bench.book_scale",
        "How long does the server spend per round on privacy.json at 1,000 clients?",
        "10 s",
        "seconds per round of bookkeeping",
        "well under a round's training time",
        True,
    ),
    "scale": Bench(
        "bench.scale",
        "How do wall time and memory grow with 10, 100 and 1,000 simulated clients?",
        "about 15 min",
        "wall and peak memory per client count",
        "1,000 clients on one machine",
        True,
    ),
    "cohorts": Bench(
        "bench.cohorts",
        "How much driver and actor memory does each sampled client cost at 10, 100 and 1,000 clients a round, "
        "and where does the driver's go?",
        "about 25 min (4 rounds each; 1,000 a round is 15 of them)",
        "driver, actor and tree peaks; actor warm-up and growth a round after; driver slope per sampled client; "
        "the driver's memory by phase",
        "driver slope at most 2x a reply's adapter, actors grow at most 5 MB a round past warm-up, 1,000 a round "
        "under 8 GB",
        True,
    ),
    "attack": Bench(
        "bench.security.attack",
        "How much does one sign-flipping, scaling client hurt, with bounded influence on?",
        "about 10 min",
        "accuracy with and without the attacker",
        "within a point of the clean run",
        True,
    ),
    "privacy_audit": Bench(
        "bench.security.privacy_audit",
        "Does a canary audit of the whole DP reply find more leakage than the epsilon claimed?",
        "about 10 min",
        "empirical epsilon lower bound against the claim",
        "lower bound below the claimed epsilon",
        True,
    ),
    "dp_levers": Bench(
        "bench.studies.dp_levers",
        "Study: which levers make the `private` preset learn under DP, one at a time?",
        "about 2 min a lever",
        "final accuracy per lever",
        "finished (docs/studies)",
        True,
    ),
    "layer_probe": Bench(
        "bench.studies.layer_probe",
        "Study: which block should the head read (linear probes without DP)?",
        "about 2 min",
        "probe accuracy per block",
        "finished (docs/studies)",
        True,
    ),
    "head_replay": Bench(
        "bench.studies.head_replay",
        "Study: does the DP recipe on the head alone reach the features' ceiling?",
        "about 13 min",
        "replayed accuracy against the probe ceiling",
        "finished (docs/studies)",
        True,
    ),
    "dp_snr": Bench(
        "bench.studies.dp_snr",
        "Study: one DP step's signal against its noise, head and adapter apart",
        "about 3 min a run",
        "per-step SNR per group",
        "finished (docs/studies)",
        True,
    ),
}

COLUMNS = ("name", "what it answers", "runs", "figure", "target", "JSON result")


def index_markdown() -> str:
    """The index as the Markdown table bench/README.md holds."""
    rows = [
        f"| `{name}` | {b.question} | {b.duration} | {b.figure} | {b.target} | {'yes' if b.json else 'not yet'} |"
        for name, b in BENCHES.items()
    ]
    return "\n".join([f"| {' | '.join(COLUMNS)} |", "|" + "---|" * len(COLUMNS), *rows]) + "\n"
