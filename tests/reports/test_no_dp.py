"""A run without DP never shows an epsilon (0 would read as perfect privacy; such a run has no guarantee),
and its report is still useful: it says so first, then shows the utility curves. A DP run's report adds
accuracy against epsilon."""

from __future__ import annotations

import json
import re

from rich.console import Console

from fed.config import DPConfig
from fed.privacy.book import LedgerBook
from fed.reports.curves import curves_figure
from fed.reports.privacy import render_html
from simulations.cli import _summary, main
from tests.helpers import DP

# metrics.jsonl lines as an older run without DP wrote them: epsilon_max 0.0, not None
LINES = [
    {"round": r, "train_loss": 0.7 - r / 10, "eval_loss": 0.7, "eval_accuracy": 0.5 + r / 10, "epsilon_max": 0.0}
    for r in (1, 2)
]
DP_LINES = [{**line, "epsilon_max": e} for line, e in zip(LINES, (2.5, 4.0))]


def _images(page: str) -> int:
    return page.count('src="data:image/png;base64,')


def _epsilon_column(lines: list[dict], dp: bool) -> list[str]:
    console = Console(record=True, width=200)
    console.print(_summary(lines, dp=dp))
    rows = [line.split("│")[1:-1] for line in console.export_text().splitlines() if line.startswith("│")]
    return [cells[4].strip() for cells in rows]  # round, train loss, eval loss, acc, eps


def test_the_rounds_table_says_no_dp_where_epsilon_would_be():
    assert _epsilon_column(LINES, dp=False) == ["no DP", "no DP"]
    assert _epsilon_column(DP_LINES, dp=True) == ["2.500", "4.000"]


def test_curves_draw_no_epsilon_panel_without_dp():
    titles = [ax.get_title() for ax in curves_figure(LINES, dp=False).axes]
    assert titles == ["loss", "accuracy"]
    assert [ax.get_title() for ax in curves_figure(DP_LINES, dp=True).axes] == ["loss", "accuracy", "epsilon"]


def test_the_html_of_a_run_without_dp_opens_with_no_guarantee_and_shows_utility():
    privacy = json.loads(json.dumps(LedgerBook(DPConfig(enabled=False)).report()))
    page = render_html(privacy, "run", LINES)
    body = page.split("<body>", 1)[1]
    first = re.search(r"<p>(.*?)</p>", body, re.S)
    assert first and "no privacy guarantee" in first.group(1)
    assert "epsilon" not in body.lower() and "status" not in body  # no epsilon, no "status: ok"
    assert _images(page) == 1  # the utility curves


def test_the_html_of_a_dp_run_shows_accuracy_against_epsilon():
    privacy = json.loads(json.dumps(LedgerBook(DP).report()))
    page = render_html(privacy, "run", DP_LINES)
    assert "Accuracy after each round against the largest client epsilon" in page
    assert _images(page) == 2  # no client yet: curves and accuracy against epsilon only


def test_fed_report_on_a_run_without_dp_says_so_first(tmp_path, capsys):
    (tmp_path / "privacy.json").write_text(json.dumps(LedgerBook(DPConfig(enabled=False)).report()))
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in LINES))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("no privacy guarantee")
    assert _images((tmp_path / "report.html").read_text()) == 1
