"""Per-round ClientApp start-up in deployment: Flower starts a fresh ``flwr-clientapp`` process for every
message, so each round pays the imports, the model build and the data load again.

Runs what that process runs, in a fresh interpreter each time, and prints the phases, beside the floor:
a fresh interpreter that only imports the libraries a DP client cannot do without (torch, the transformers
classes that load a model and its tokenizer, Opacus, datasets, Flower's ClientApp), which no change inside
fedlora can go below:
``python -m bench run clientapp_startup [--model default] [--repeats 3]``. Record the machine's load with
the figures (the script prints the 1-minute load average before and after): wall time grows with
outside load, CPU time (user + system of the process) much less, so it estimates an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.results import Column, save

PROBE = r"""
import json, resource, sys, time
def cpu():
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime
t0, c0 = time.perf_counter(), cpu()
import clients.app  # what flwr-clientapp imports: the ClientApp module and everything it pulls in
t1, c1 = time.perf_counter(), cpu()
from fed.config.sources import resolve
from fed.session import client_session
cfg = resolve("quickstart", sys.argv[2:])
session = client_session(cfg, 0, sys.argv[1])
t2, c2 = time.perf_counter(), cpu()
print(json.dumps({"imports_s": t1 - t0, "build_s": t2 - t1, "total_s": t2 - t0, "total_cpu_s": c2 - c0,
                  "imports_cpu_s": c1 - c0, "rows": len(session.data.train)}))
"""


FLOOR = r"""
import json, resource, time
t0 = time.perf_counter()
import torch, opacus, datasets, flwr.app, flwr.clientapp
from transformers import AutoModelForSequenceClassification, AutoTokenizer
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"floor_s": time.perf_counter() - t0, "floor_cpu_s": use.ru_utime + use.ru_stime}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "node.csv"
        data.write_text(
            "text,label\n" + "".join(f"sample text number {i},{'neg' if i % 2 else 'pos'}\n" for i in range(200))
        )
        overrides = [
            f"model.name={args.model}",
            "data.labels=neg,pos",
            "adapter.kind=ffa-lora",
            "dp.enabled=true",
            "dp.target_epsilon=8",
        ]
        env = {
            **os.environ,
            "PYTHONPATH": str(root),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error",
            "OMP_WAIT_POLICY": "PASSIVE",
        }
        load_before = os.getloadavg()[0]
        print(f"load average before: {load_before:.2f}")
        runs = []
        for argv in ([PROBE, str(data), *overrides], [FLOOR]):  # fedlora's start-up, then the floor
            for _ in range(args.repeats):
                out = subprocess.run(
                    [sys.executable, "-c", *argv], env=env, check=True, capture_output=True, text=True, cwd=root
                ).stdout
                runs.append(json.loads(out.strip().splitlines()[-1]))
                print(runs[-1])
        load = (load_before, os.getloadavg()[0])
        print(f"load average after: {load[1]:.2f}")
    rows = []
    for key in ("imports_s", "build_s", "total_s", "imports_cpu_s", "total_cpu_s", "floor_s", "floor_cpu_s"):
        values = sorted(r[key] for r in runs if key in r)
        rows.append((key.removesuffix("_s"), values[len(values) // 2], values[0], values[-1]))
        print(rows[-1])
    about = (
        f"A fresh interpreter importing the ClientApp and building model `{args.model}` with a node file under DP "
        f"(FFA-LoRA, target epsilon 8), {args.repeats} times, then the floor: an interpreter that imports only "
        f"torch, transformers, Opacus, datasets and Flower's ClientApp. Wall seconds, and CPU seconds (user + "
        f"system) where the phase says cpu. Load average {load[0]:.2f} before, {load[1]:.2f} after."
    )
    columns = (Column("phase"), *(Column(name, "s", digits=2) for name in ("median", "min", "max")))
    save("clientapp_startup", "ClientApp start-up per message", about, columns, rows)


if __name__ == "__main__":
    main()
