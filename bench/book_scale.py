"""The server's privacy bookkeeping alone, at many clients: seconds per round spent writing privacy.json.

Feeds a ``LedgerBook`` the DP replies of ``--rounds`` rounds in which 10% of ``--clients`` clients take
part, each client with its own data size (so its own sample rate and history: nothing is shared between
clients' accountant caches), and times what the server does with them per round: the round's
``report()`` writes (``--writes`` per round) and ``max_epsilon()`` for the metrics line. The clients'
own epsilon is not computed here (it would warm the server's cache); they report 0.

    python -m bench run book_scale --clients 1000 --rounds 2 [--writes 2]
"""

from __future__ import annotations

import argparse
import inspect
import random
import time

from bench.results import Column, save
from fed.config import DPConfig
from fed.privacy.book import LedgerBook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--writes", type=int, default=1, help="report() calls per round (the old server made 2)")
    args = parser.parse_args()
    dp, rng = DPConfig(enabled=True, noise_multiplier=1.0, delta=1e-5), random.Random(0)
    sizes = [rng.randrange(500, 5000) for _ in range(args.clients)]
    book = LedgerBook(dp)
    mid_run = {"cross_check": False} if "cross_check" in inspect.signature(book.report).parameters else {}
    rows = []
    for round_ in range(1, args.rounds + 1):
        for cid in rng.sample(range(args.clients), max(1, args.clients // 10)):
            book.observe(
                round_,
                {
                    "partition-id": cid,
                    "dp-steps": 2,
                    "dp-noise-multiplier": 1.0,
                    "dp-sample-rate": 32 / sizes[cid],
                    "num-examples": sizes[cid],
                    "secure-rng": 1,
                    "epsilon": 0.0,
                },
                run=1,
            )
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.writes):
            book.report(**mid_run)
        book.max_epsilon()
        rows.append((round_, len(book.ledgers), time.perf_counter() - start, time.process_time() - cpu))
        print(rows[-1], flush=True)
    about = (
        f"{args.clients:,} clients, 10% sampled per round, each with its own data size (500-5,000 examples), "
        f"2 DP steps at sigma 1; the time the server spends per round on {args.writes} `privacy.json` "
        "report(s) and the metrics line's largest epsilon; wall time, and CPU time (which outside load "
        "leaves alone)."
    )
    columns = (
        Column("round"),
        Column("clients in the book"),
        Column("server bookkeeping", "s", digits=2),
        Column("its CPU", "s", digits=2),
    )
    save("book_scale", "Many clients: the server's privacy bookkeeping", about, columns, rows)


if __name__ == "__main__":
    main()
