"""Benchmark results as data, and the pages generated from them.

Each bench ends with ``save``: one file ``bench/results/<bench>.json`` holding its figures as rows with
named columns and units, what it measured (``about``), the command that made it and where it ran: the
date, the machine, the commit, the card (the GPU, or the CPU when there is none) and the machine's load.
``python -m bench report`` rewrites docs/benchmarks.md, and the what-to-expect table of README.md, from
those files alone: every figure on either page has a JSON a command regenerates. The schema is documented
in bench/README.md; ``problems`` is its one check, on save and on load.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
README = ROOT / "README.md"
FIELDS = ("bench", "title", "about", "command", "date", "machine", "commit", "card", "load", "columns", "rows")
"""What every result holds. Optional: ``figures`` (image paths from the repository root) and ``tables``
(further tables below the rows, each a ``Table``: a grid's per-seed cells, its verdicts)."""


class Column(NamedTuple):
    """One column of a result's rows: its name (the rows' key), its unit ("" for none), the decimals a float
    is shown with (None: as Python writes it) and what an empty cell (null) says."""

    name: str
    unit: str = ""
    digits: int | None = None
    none: str = "–"


def commit(root: Path = ROOT) -> str:
    """The commit checked out at ``root``, marked ``-dirty`` when the tree has changes other than results (the
    figures may then not be its)."""
    git = ["git", "-C", str(root)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, check=True)
        outputs = [":!bench/results", ":!docs/benchmarks.md", ":!README.md"]
        changed = [*git, "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs]
        dirty = subprocess.run(changed, capture_output=True, text=True)  # results written so far are no change
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _card() -> str:
    """The accelerator torch sees, else the CPU with its core count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def environment() -> dict[str, Any]:
    """Where and when a result was measured, and how busy the machine was: the 1, 5 and 15-minute load
    averages at the end (the 15-minute one spans most benches), since wall times grow with outside load."""
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.node()} ({platform.system()} {platform.release()}, Python {platform.python_version()})",
        "commit": commit(),
        "card": _card(),
        "load": [round(value, 2) for value in os.getloadavg()],
    }


class Table(NamedTuple):
    """A further table of a result, shown below its rows under ``title``: figures that do not share the main
    table's columns (a grid's per-seed cells, its verdicts)."""

    title: str
    columns: Sequence[Column]
    rows: Sequence[Sequence[Any]]


def _as_table(columns: Sequence[Column], rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """``columns`` and ``rows`` (each a sequence in the columns' order) as a record stores them."""
    names = [c.name for c in columns]
    return {"columns": [c._asdict() for c in columns], "rows": [dict(zip(names, row, strict=True)) for row in rows]}


def _table_problems(columns: Any, rows: Any, where: str) -> list[str]:
    """What keeps ``columns`` and ``rows`` from being a table (none: they are one); ``where`` names it."""
    try:
        names = [Column(**column).name for column in columns]
    except TypeError as error:
        return [f"{where}columns {columns!r} are not {list(Column._fields)} objects ({error})"]
    found = []
    if not names or len(set(names)) != len(names):
        found.append(f"{where}columns {names} are not distinct names")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or list(row) != names:
            found.append(f"{where}row {i} {row!r} does not hold exactly the columns {names}, in order")
        elif bad := [k for k, v in row.items() if not (v is None or isinstance(v, str | int | float))]:
            found.append(f"{where}row {i}: {bad} hold neither a number, a string nor null")
    return found


def problems(record: dict[str, Any]) -> list[str]:
    """What keeps ``record`` from being a bench result (none: it is one)."""
    missing = [field for field in FIELDS if field not in record]
    if missing:
        return [f"it lacks {missing} (a result holds {list(FIELDS)})"]
    found = []
    for field in FIELDS[:8]:
        if not isinstance(record[field], str) or not record[field]:
            found.append(f"{field} is {record[field]!r}, not a non-empty string")
    load = record["load"]
    if not (isinstance(load, list) and len(load) == 3 and all(v is None or isinstance(v, int | float) for v in load)):
        found.append(f"load is {load!r}, not the three load averages [1, 5, 15 min] (null: not recorded)")
    found += _table_problems(record["columns"], record["rows"], "")
    if not record["rows"]:
        found.append("rows is empty: a result holds at least one measured row")
    for i, extra in enumerate(record.get("tables", [])):
        if not isinstance(extra, dict) or sorted(extra) != ["columns", "rows", "title"]:
            found.append(f"tables[{i}] is {extra!r}, not an object of exactly title, columns and rows")
        elif not isinstance(extra["title"], str) or not extra["title"]:
            found.append(f"tables[{i}]: title {extra['title']!r} is not a non-empty string")
        else:
            found += _table_problems(extra["columns"], extra["rows"], f"tables[{i}] ({extra['title']}): ")
    return found


def save(
    bench: str,
    title: str,
    about: str,
    columns: Sequence[Column],
    rows: Sequence[Sequence[Any]],
    results: Path = RESULTS,
    figures: Sequence[str] = (),
    tables: Sequence[Table] = (),
) -> Path:
    """Write ``bench``'s result (replacing its last one): its rows (each a sequence in ``columns``' order),
    what they measured, the command that made it (as ``python -m bench run``, with this process's arguments)
    and the environment. ``figures``: images (paths from the repository root) the bench drew from the rows;
    ``tables``: further tables, shown below the rows."""
    record: dict[str, Any] = {
        "bench": bench,
        "title": title,
        "about": about,
        "command": shlex.join(["python", "-m", "bench", "run", bench, *sys.argv[1:]]),
        **environment(),
        **_as_table(columns, rows),
    }
    if figures:
        record["figures"] = list(figures)
    if tables:
        record["tables"] = [{"title": t.title, **_as_table(t.columns, t.rows)} for t in tables]
    if found := problems(record):
        raise ValueError(f"{bench}: not a bench result: {'; '.join(found)}")
    results.mkdir(parents=True, exist_ok=True)
    path = results / f"{bench}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def load(results: Path = RESULTS) -> list[dict[str, Any]]:
    """Every result in ``results``, by bench name; a file that is not one is refused, naming what is wrong."""
    records = []
    for path in sorted(results.glob("*.json")):
        record = json.loads(path.read_text())
        if found := problems(record):
            raise ValueError(f"{path}: not a bench result: {'; '.join(found)}")
        records.append(record)
    return records


def _cell(value: Any, column: Column) -> str:
    if value is None:
        return column.none
    if isinstance(value, float):
        return f"{value:,.{column.digits}f}" if column.digits is not None else f"{value:g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value).replace("|", "\\|")


def table(record: dict[str, Any]) -> str:
    """A result's rows (or one of its ``tables``) as a Markdown table, each column headed by its name and unit."""
    columns = [Column(**column) for column in record["columns"]]
    head = [f"{c.name} ({c.unit})" if c.unit else c.name for c in columns]
    lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(columns)]
    lines += [f"| {' | '.join(_cell(row[c.name], c) for c in columns)} |" for row in record["rows"]]
    return "\n".join(lines)


def provenance(record: dict[str, Any]) -> str:
    """Where a result comes from, on one line: its command, date, machine, commit, card and load."""
    values = record["load"]
    shown = ", ".join("–" if v is None else f"{v:.2f}" for v in values)
    load = "load not recorded" if all(v is None for v in values) else f"load {shown} (1, 5, 15 min)"
    return (
        f"`{record['command']}` · {record['date']} · {record['machine']} · commit `{record['commit']}` · "
        f"{record['card']} · {load}"
    )


HEADER = """# Benchmarks

<!-- generated by `python -m bench report` from bench/results/*.json: edit the benches, not this page -->

Figures a command regenerates: each section is one bench's last result (`bench/results/<name>.json`),
with the date, machine, commit, card and load it was measured under. What each bench answers, how long it
runs and its target: [the bench index](../bench/README.md). Earlier measurements, kept as they were, are in
the dated [studies](studies/README.md).
"""


def render(records: list[dict[str, Any]]) -> str:
    """docs/benchmarks.md: the header, then one section per result."""
    sections = []
    for r in records:
        images = "".join(f"\n![{r['title']}]({os.path.relpath(ROOT / f, DOC.parent)})\n" for f in r.get("figures", []))
        extra = "".join(f"\n**{t['title']}**\n\n{table(t)}\n" for t in r.get("tables", []))
        sections.append(f"## {r['title']}\n\n{provenance(r)}\n\n{r['about'].strip()}\n\n{table(r)}\n{extra}{images}")
    return "\n".join([HEADER, *sections]) if sections else HEADER + "\nNo bench has written a result yet.\n"


EXPECT = "presets"
"""The bench whose rows are README.md's what-to-expect table."""
BLOCK = re.compile(r"(<!-- expect: .*? -->\n).*?(<!-- /expect -->)", re.S)


def expect_block(records: list[dict[str, Any]]) -> str:
    """README.md's what-to-expect table: the ``presets`` result's rows and where they were measured, or a
    line saying no such result exists yet (never a figure from prose)."""
    record = next((r for r in records if r["bench"] == EXPECT), None)
    if record is None:
        return f"No result yet: `python -m bench run {EXPECT}` measures this table.\n"
    source = f"[bench/results/{EXPECT}.json](bench/results/{EXPECT}.json)"
    return f"{table(record)}\n\nMeasured {record['date']} on {record['card']}, commit `{record['commit']}`: {source}.\n"


def readme(records: list[dict[str, Any]], text: str) -> str:
    """``text`` (README.md) with its marked what-to-expect block regenerated from ``records``."""
    if not BLOCK.search(text):
        raise ValueError("README.md has no `<!-- expect: ... -->` ... `<!-- /expect -->` block to regenerate")
    return BLOCK.sub(lambda m: m.group(1) + expect_block(records) + m.group(2), text)


def write_docs(results: Path = RESULTS, doc: Path = DOC, readme_path: Path = README) -> list[Path]:
    """Regenerate ``doc`` and the what-to-expect block of ``readme_path`` from the results in ``results``."""
    records = load(results)
    doc.write_text(render(records))
    readme_path.write_text(readme(records, readme_path.read_text()))
    return [doc, readme_path]
