"""Bytes a client sends per round, per adapter family and transport dtype, against the physical minimum.

The minimum is the trained-and-sent elements times the bytes per element (4 for float32, 2 for
bfloat16); what travels is Flower's ArrayRecord, each tensor's raw bytes under its name, counted as
``ArrayRecord.count_bytes()`` (the figure in ``metrics.jsonl``). The overhead is the tensor names.

    python -m bench run wire_bytes [--model default] [--set adapter.rank=16 ...]
"""

from __future__ import annotations

import argparse
from typing import get_args

from bench.results import Column, save
from fed.adapters import kinds
from fed.config import WireDtype
from fed.config.sources import resolve
from fed.session import adapted_model
from fed.wire import to_record

ITEMSIZE = {"float32": 4, "bfloat16": 2}
COLUMNS = (
    Column("family"),
    Column("tensors sent"),
    Column("elements"),
    Column("wire dtype"),
    Column("minimum", "bytes"),
    Column("sent", "bytes"),
    Column("overhead", "%", digits=2),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    for kind in kinds():
        cfg = resolve("quickstart", [f"model.name={args.model}", f"adapter.kind={kind}", *args.set])
        state = adapted_model(cfg)[0].sent_state()
        elements = sum(t.numel() for t in state.values())
        for wire in get_args(WireDtype):
            minimum, sent = elements * ITEMSIZE[wire], to_record(state, wire).count_bytes()
            rows.append((kind, len(state), elements, wire, minimum, sent, 100 * (sent - minimum) / minimum))
            print(rows[-1], flush=True)
    about = (
        f"What one client sends per round (`ArrayRecord.count_bytes()`), model `{args.model}` with the quickstart's "
        f"targets and ranks, overrides {' '.join(args.set) or 'none'}, against the physical minimum (trained-and-sent "
        "elements times bytes per element); the overhead is the tensor names."
    )
    save("wire_bytes", "Bytes on the wire against the physical minimum", about, COLUMNS, rows)


if __name__ == "__main__":
    main()
