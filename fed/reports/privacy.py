"""The report of a run: ``report.html`` (self-contained, opens offline) and a terminal summary.

For a DP run everything privacy-related is recomputed from ``privacy.json`` (the events are the
accountant's whole state), so the page shows the numbers a reviewer can check: per-client epsilon over
rounds, the remaining budget, the parameters behind each number, RDP against PRV, the guarantee in words,
every flag the server raised and accuracy against epsilon. A run without DP gets no epsilon anywhere (0
would read as perfect privacy): its page says first that it has no guarantee, then shows its utility curves.
A ``privacy.json`` written mid-run carries only the run's accountant; ``cross_checked`` fills in the other.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, get_args

import matplotlib

matplotlib.use("Agg")  # headless, and chosen before pyplot is imported
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from fed.config import Accountant
from fed.privacy.client_level import composed_epsilon
from fed.privacy.distributed import skellam_epsilon
from fed.privacy.ledger import DpSgdEvent, epsilon
from fed.reports.curves import accuracy_against_epsilon, curves_figure

NO_GUARANTEE = "no privacy guarantee: DP was off in this run (dp.enabled = false)"


def guarded(privacy: dict[str, Any]) -> bool:
    """Whether the run has any guarantee: example level (``enabled``) or client level."""
    return bool(privacy["enabled"] or privacy.get("client_level"))


def _events(entry: dict[str, Any]) -> list[DpSgdEvent]:
    return [DpSgdEvent(**e) for e in entry.get("events", [])]


def epsilon_by_round(entry: dict[str, Any], delta: float, accountant: str) -> list[tuple[int, float]]:
    """(round, epsilon spent up to and including it) for every round with an event, in ledger order
    (the order events were spent; run ids are random and say nothing about order)."""
    events = _events(entry)
    points = []
    for i, event in enumerate(events):
        if i + 1 == len(events) or (events[i + 1].run, events[i + 1].round) != (event.run, event.round):
            points.append((event.round, epsilon(events[: i + 1], delta, accountant)))
    return points


def client_level_checked(level: dict[str, Any]) -> dict[str, Any]:
    """The client-level section with its epsilon by round and both accountants' figures recomputed from its
    rounds (one sampled-Gaussian step each; under distributed DP one Skellam release each, RDP only), whatever
    the file says."""
    mechanism = level.get("mechanism")
    if mechanism is not None:
        return _distributed_checked(level, mechanism)
    events = [(r["noise_multiplier"], r["sample_rate"]) for r in level["rounds"]]
    delta, accountant = level["delta"], level["accountant"]
    return {
        **level,
        "epsilon": composed_epsilon(events, delta, accountant),
        **{f"epsilon_{acc}": composed_epsilon(events, delta, acc) for acc in get_args(Accountant)},
        "epsilon_by_round": [
            {"round": r["round"], "epsilon": composed_epsilon(events[: i + 1], delta, accountant)}
            for i, r in enumerate(level["rounds"])
        ],
    }


def _distributed_checked(level: dict[str, Any], mechanism: dict[str, Any]) -> dict[str, Any]:
    """Distributed DP's section recomputed from its Skellam parameters and the number of rounds released."""

    def after(rounds: int) -> float:
        terms = (mechanism["skellam_l1"], mechanism["skellam_l2"], mechanism["skellam_mu"])
        return skellam_epsilon(*terms, rounds, level["delta"])

    released = level["rounds"]
    return {
        **level,
        "epsilon": after(len(released)),
        "epsilon_rdp": after(len(released)),
        "epsilon_prv": None,
        "epsilon_by_round": [{"round": r["round"], "epsilon": after(i + 1)} for i, r in enumerate(released)],
    }


def cross_checked(privacy: dict[str, Any]) -> dict[str, Any]:
    """``privacy`` with every client's missing RDP or PRV figure recomputed from its events (a copy), and the
    client-level section recomputed from its rounds."""
    clients = {
        cid: {
            **entry,
            **{
                f"epsilon_{acc}": epsilon(_events(entry), privacy["delta"], acc)
                for acc in get_args(Accountant)
                if entry.get(f"epsilon_{acc}") is None
            },
        }
        for cid, entry in privacy["clients"].items()
    }
    level = privacy.get("client_level")
    return {**privacy, "clients": clients, "client_level": client_level_checked(level) if level else None}


def guarantees(privacy: dict[str, Any]) -> list[dict[str, Any]]:
    """Each guarantee of the run, side by side: level, unit, adjacency, trust, epsilon under both accountants,
    delta, the mechanism's noise and sampling, and how many events it composes."""
    rows = []
    if privacy["enabled"]:
        clients = privacy["clients"].values()
        rows.append(
            {
                "level": "example",
                "unit": privacy.get("unit") or "example",
                "adjacency": privacy.get("adjacency") or "one training example of one client",
                "trust": privacy.get("trust") or "each client only",
                "epsilon": privacy["max_epsilon"],
                "epsilon_rdp": max((e.get("epsilon_rdp") or 0 for e in clients), default=0.0),
                "epsilon_prv": max((e.get("epsilon_prv") or 0 for e in clients), default=0.0),
                "delta": privacy["delta"],
                "noise": max((e["noise_multiplier"] or 0 for e in clients), default=0.0),
                "sample_rate": max((e["sample_rate"] or 0 for e in clients), default=0.0),
                "events": f"{sum(len(e['events']) for e in clients)} DP-SGD rounds, {len(privacy['clients'])} clients",
            }
        )
    level = privacy.get("client_level")
    if level:
        rows.append(
            {
                "level": "client",
                "unit": level["unit"],
                "adjacency": level["adjacency"],
                "trust": level["trust"],
                "epsilon": level["epsilon"],
                "epsilon_rdp": level.get("epsilon_rdp"),
                "epsilon_prv": level.get("epsilon_prv"),
                "delta": level["delta"],
                "noise": level["noise_multiplier"],
                "sample_rate": level["sample_rate"],
                "events": _client_level_events(level),
            }
        )
    return rows


def _client_level_events(level: dict[str, Any]) -> str:
    """What the client level composes, in words: the server's releases, or the clients' noised secure sums."""
    mechanism = level.get("mechanism")
    if mechanism is None:
        return f"{len(level['rounds'])} server releases ({level['clipping']} clip, now {level['clip']:.4g})"
    return (
        f"{len(level['rounds'])} SecAgg+ sums noised by the clients (Skellam; {mechanism['min_survivors']} survivors "
        "assumed; sampling not credited)"
    )


GUARANTEE_COLUMNS = ("level", "unit", "adjacency", "trust", "epsilon", "RDP", "PRV", "delta", "noise", "q", "events")


def _guarantee_cells(row: dict[str, Any]) -> list[str]:
    def num(value: Any) -> str:
        return "-" if value is None else format(value, ".4g")

    return [
        row["level"],
        row["unit"],
        row["adjacency"],
        row["trust"],
        num(row["epsilon"]),
        num(row["epsilon_rdp"]),
        num(row["epsilon_prv"]),
        num(row["delta"]),
        num(row["noise"]),
        num(row["sample_rate"]),
        row["events"],
    ]


def _client_level_plot(level: dict[str, Any]) -> tuple[str, str] | None:
    """(caption, base64 PNG) of the client-level epsilon after each released round, with its cap."""
    points = [(p["round"], p["epsilon"]) for p in level["epsilon_by_round"]]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot([r for r, _ in points], [e for _, e in points], marker="o", label="client level")
    if level.get("target_epsilon"):
        ax.axhline(level["target_epsilon"], color="crimson", linestyle="--", label=f"cap {level['target_epsilon']:g}")
    ax.set(
        xlabel="round",
        ylabel=f"epsilon ({level['accountant'].upper()}, delta={level['delta']:g})",
        title="client-level epsilon (one whole client)",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ("Client-level epsilon after each round the server released (trusts the server).", _png(fig))


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(privacy: dict[str, Any]) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the epsilon curves and the budget bars."""
    clients, delta, accountant = privacy["clients"], privacy["delta"], privacy["accountant"]
    target = privacy.get("target_epsilon") or 0
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (cid, entry) in enumerate(clients.items()):
        points = epsilon_by_round(entry, delta, accountant)
        if points:  # markers and dashes differ so that clients with identical budgets stay visible
            ax.plot(
                [r for r, _ in points],
                [e for _, e in points],
                marker="osD^v<>"[i % 7],
                linestyle=["-", "--", ":", "-."][i % 4],
                markersize=9 - i % 4,
                alpha=0.8,
                label=f"client {cid}",
            )
    if target:
        ax.axhline(target, color="crimson", linestyle="--", label=f"target {target:g}")
    ax.set(xlabel="round", ylabel=f"epsilon ({accountant.upper()}, delta={delta:g})", title="epsilon spent per client")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    curves = _png(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    names = [f"client {c}" for c in clients]
    bars = {
        acc: [float("nan") if e.get(f"epsilon_{acc}") is None else e[f"epsilon_{acc}"] for e in clients.values()]
        for acc in get_args(Accountant)
    }  # a missing figure (mid-run file) draws no bar
    ax.bar(names, bars["rdp"], width=0.4, label="RDP", align="edge")
    ax.bar(names, bars["prv"], width=-0.4, label="PRV", align="edge")
    if target:
        ax.axhline(target, color="crimson", linestyle="--", label=f"target {target:g}")
    ax.set(ylabel="epsilon", title="final epsilon: RDP against PRV (same events)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    return [
        ("Epsilon spent by each client, round by round.", curves),
        ("The same events under two accountants: RDP (an upper bound) and PRV (tighter).", _png(fig)),
    ]


COLUMNS = (
    "client",
    "epsilon",
    "server",
    "client-reported",
    "RDP",
    "PRV",
    "remaining",
    "noise",
    "sample rate",
    "steps",
    "n",
    "secure RNG",
    "flags",
)


def _rows(privacy: dict[str, Any]) -> list[list[str]]:
    def num(value: Any, fmt: str = ".4g") -> str:
        return "-" if value is None else format(value, fmt)

    return [
        [
            cid,
            num(e["epsilon"]),
            num(e["server_epsilon"]),
            num(e["client_reported_epsilon"]),
            num(e.get("epsilon_rdp")),
            num(e.get("epsilon_prv")),
            num(e["remaining"]),
            num(e["noise_multiplier"]),
            num(e["sample_rate"]),
            str(e["steps"]),
            num(e["num_examples"], "d"),
            {True: "yes", False: "NO", None: "-"}[e["secure_rng"]],
            str(len(e["flags"])),
        ]
        for cid, e in privacy["clients"].items()
    ]


STYLE = """<style>body{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}figure{display:inline-block;margin:0 1em 1em 0}img{max-width:100%}
.ok{color:#176e2c}.flagged{color:#b3261e}code{background:#f3f3f3;padding:0 3px}</style>"""


def _figures(figures: list[tuple[str, str]]) -> str:
    esc = html.escape
    return "".join(
        f'<figure><img alt="{esc(c)}" src="data:image/png;base64,{p}"><figcaption>{esc(c)}</figcaption></figure>'
        for c, p in figures
    )


def _utility(lines: list[dict[str, Any]], dp: bool) -> list[tuple[str, str]]:
    """(caption, base64 PNG) of the run's per-round curves and, for a DP run, accuracy against epsilon."""
    shown = [
        (
            "Loss and accuracy per round" + (", and the largest client epsilon." if dp else "."),
            curves_figure(lines, dp=dp),
        )
    ]
    if dp:
        shown.append(
            (
                "Accuracy after each round against the largest client epsilon spent by then.",
                accuracy_against_epsilon(lines),
            )
        )
    return [(caption, _png(fig)) for caption, fig in shown if fig is not None]


def _page(title: str, body: str) -> str:
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
{STYLE}</head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>"""


def render_html(privacy: dict[str, Any], title: str, lines: list[dict[str, Any]] | None = None) -> str:
    """One HTML page with the plots embedded as data URIs: no file or network access when opened.
    ``lines`` (``metrics.jsonl``) add the utility curves."""
    lines = lines or []
    if not guarded(privacy):
        curves = _figures(_utility(lines, dp=False)) or "<p>No round finished: there is nothing to draw.</p>"
        return _page(
            title,
            f"""<p><b class="flagged">This run has no privacy guarantee</b>: DP was off
(<code>dp.enabled = false</code>), so nothing bounds what its updates reveal about any training example.</p>
<h2>Utility</h2>{curves}""",
        )
    esc = html.escape
    side = "".join(
        f"<tr>{''.join(f'<td>{esc(cell)}</td>' for cell in _guarantee_cells(row))}</tr>" for row in guarantees(privacy)
    )
    body = f"""<h2>Guarantees</h2><p>Each level is accounted apart; neither figure bounds the other's neighbours.</p>
<table><tr>{"".join(f"<th>{c}</th>" for c in GUARANTEE_COLUMNS)}</tr>{side}</table>"""
    if privacy["enabled"]:
        body += _example_level_html(privacy)
    if privacy.get("client_level"):
        body += _client_level_html(privacy["client_level"])
    return _page(title, body + f"<h2>Utility</h2>{_figures(_utility(lines, dp=True))}")


def _items(xs: list[str]) -> str:
    return "".join(f"<li>{html.escape(x)}</li>" for x in xs)


def _example_level_html(privacy: dict[str, Any]) -> str:
    """The example-level part of the page: per-client table, curves, releases, flags."""
    esc = html.escape
    flags = privacy["flags"] + [f"client {c}: {f}" for c, e in privacy["clients"].items() for f in e["flags"]]
    table = "".join(f"<tr>{''.join(f'<td>{esc(cell)}</td>' for cell in row)}</tr>" for row in _rows(privacy))
    figures = _figures(_plots(privacy)) if privacy["clients"] else ""
    status = "ok" if not flags else "flagged"
    target = f", target {privacy['target_epsilon']:g}" if privacy["target_epsilon"] else ""
    return f"""<h2>Example level (DP-SGD on each client)</h2>
<p>Largest epsilon of any client: <b>{privacy["max_epsilon"]:.4g}</b> at delta = {privacy["delta"]:g}
({esc(privacy["accountant"].upper())} accountant{target}); clipping bound {privacy.get("max_grad_norm")};
randomness: {esc(str(privacy.get("rng")))}; status: <b class="{status}">{status}</b>.</p>
<h3>The guarantee</h3><p>{esc(privacy["guarantee"])}</p>
<h3>Per client</h3><p>"epsilon" is the larger of the server's recomputation from the events it received and
the client's own report.</p>
<table><tr>{"".join(f"<th>{c}</th>" for c in COLUMNS)}</tr>{table}</table>
{figures}
<h3>Released in the clear</h3><ul>{_items(privacy["released_in_clear"])}</ul>
<p>Reply timing in this run: {esc(str(privacy.get("timing")))}</p>
<h3>Not covered</h3><ul>{_items(privacy["not_covered"])}</ul>
<h3>Flags</h3>{f"<ul>{_items(flags)}</ul>" if flags else '<p class="ok">none</p>'}"""


def _client_level_html(level: dict[str, Any]) -> str:
    """The client-level part of the page: the guarantee, its trust, the curve, the rounds, flags."""
    esc = html.escape
    plot = _client_level_plot(level)
    cap = f", cap {level['target_epsilon']:g}" if level.get("target_epsilon") else ""
    stop = level.get("stopped_at_round")
    stopped = f" The cap stopped training at round {stop}." if stop else ""
    return f"""<h2>Client level (DP-FedAvg on the server)</h2>
<p>Epsilon: <b>{level["epsilon"]:.4g}</b> at delta = {level["delta"]:g} ({esc(level["accountant"].upper())}
accountant{cap}) after {len(level["rounds"])} released rounds; noise multiplier {level["noise_multiplier"]:.4g}
(update {level["update_noise_multiplier"]:.4g}), client sample rate {level["sample_rate"]:g} of
{level["population"]} clients (fixed denominator {level["expected_clients"]:g}), {esc(level["clipping"])} clipping,
bound now {level["clip"]:.4g}; randomness: {esc(str(level["rng"]))}.{stopped}</p>
<h3>The guarantee</h3><p>{esc(level["guarantee"])}</p>
<p><b>Trust:</b> {esc(level["trust"])}.</p>
{_figures([plot]) if plot else ""}
<h3>Not covered</h3><ul>{_items(level["not_covered"])}</ul>
<h3>Flags</h3>{f"<ul>{_items(level['flags'])}</ul>" if level["flags"] else '<p class="ok">none</p>'}"""


def write_report(run_dir: Path) -> Path:
    """``report.html`` next to ``privacy.json`` in ``run_dir`` (RDP and PRV both, whatever the file holds),
    with the utility curves of its ``metrics.jsonl``."""
    privacy = cross_checked(json.loads((run_dir / "privacy.json").read_text()))
    metrics = run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    kind = "Privacy report" if guarded(privacy) else "Run report (no DP)"
    out = run_dir / "report.html"
    out.write_text(render_html(privacy, f"{kind} · {run_dir.name}", lines))
    return out


def summary(privacy: dict[str, Any], console: Console) -> None:
    """The terminal view of the same numbers (fewer columns than the page, to fit 80 characters)."""
    if not guarded(privacy):
        console.print(f"[bold red]{NO_GUARANTEE}[/bold red]; report.html shows its utility curves only")
        return
    side = Table(title="guarantees, side by side")
    words = ("adjacency", "trust", "events")
    for column in GUARANTEE_COLUMNS:
        if column not in words:
            side.add_column(column, justify="right", no_wrap=True)
    rows = guarantees(privacy)
    for row in rows:
        side.add_row(*(c for c, name in zip(_guarantee_cells(row), GUARANTEE_COLUMNS) if name not in words))
    console.print(side)
    for row in rows:
        console.print(f"{row['level']} level: neighbours {row['adjacency']}; trusts {row['trust']}; {row['events']}")
    if privacy.get("client_level"):
        for flag in privacy["client_level"]["flags"]:
            console.print(f"[red]client-level flag:[/red] {flag}")
    if not privacy["enabled"]:
        return
    table = Table(title=f"privacy per client (delta {privacy['delta']:g})")
    for column in ("client", "eps", "eps PRV", "left", "noise", "q", "steps", "n", "RNG", "flags"):
        table.add_column(column, justify="right", no_wrap=True)
    for cid, e in privacy["clients"].items():
        left = "-" if e["remaining"] is None else f"{e['remaining']:.3g}"
        prv = "-" if e.get("epsilon_prv") is None else f"{e['epsilon_prv']:.4g}"
        table.add_row(
            cid,
            f"{e['epsilon']:.4g}",
            prv,
            left,
            f"{e['noise_multiplier'] or 0:.3g}",
            f"{e['sample_rate'] or 0:.3g}",
            str(e["steps"]),
            str(e["num_examples"] or "-"),
            {True: "ok", False: "NO", None: "-"}[e["secure_rng"]],
            str(len(e["flags"])),
        )
    console.print(table)
    flags = privacy["flags"] + [f"client {c}: {f}" for c, e in privacy["clients"].items() for f in e["flags"]]
    for flag in flags:
        console.print(f"[red]flag:[/red] {flag}")
    console.print(
        f"largest epsilon: [bold]{privacy['max_epsilon']:.4g}[/bold] ({privacy['accountant'].upper()}) · "
        f"randomness: {privacy.get('rng')}"
    )
