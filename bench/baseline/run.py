"""Run the reference recipe (``bench/baseline/app.py``) in Flower's simulation and print what it measured.

    python -m bench.baseline.run [--dp] [--rounds 3] [--steps 10] [--clients 4] [--examples 4000] --out result.json

The JSON holds per-round wall times (from the server, between the ends of consecutive rounds), bytes
up and down (all clients, all rounds) and the final accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "TRANSFORMERS_VERBOSITY": "error",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dp", action="store_true", help="Opacus make_private, noise multiplier --sigma")
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    os.environ.update(ENV)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from flwr.simulation import run_simulation

    from bench.baseline import app

    app.SETTINGS.update(
        clients=args.clients, rounds=args.rounds, steps=args.steps, examples=args.examples, dp=args.dp, sigma=args.sigma
    )
    start = time.perf_counter()
    run_simulation(
        server_app=app.server,
        client_app=app.client,
        num_supernodes=args.clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": False},
        },
    )
    result = {**app.RESULT, "wall_s": time.perf_counter() - start, "clients": args.clients, "rounds": args.rounds}
    args.out.write_text(json.dumps(result))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
