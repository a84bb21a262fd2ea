"""``fed plan`` and ``fed report``: the numbers they print against independent computations."""

from __future__ import annotations

import json
import re

import pytest
from opacus.accountants.utils import get_noise_multiplier

from fed.privacy.book import LedgerBook
from fed.privacy.ledger import DpSgdEvent, epsilon
from fed.reports.privacy import epsilon_by_round, render_html
from simulations.cli import main
from tests.helpers import DP


def _book() -> LedgerBook:
    book = LedgerBook(DP)
    for cid, steps in ((0, 10), (1, 7)):
        for r in (1, 2):
            book.observe(
                r,
                {
                    "partition-id": cid,
                    "dp-steps": steps,
                    "dp-noise-multiplier": 0.9,
                    "secure-rng": 1,
                    "dp-sample-rate": 0.04,
                    "num-examples": 800,
                    "epsilon": epsilon([DpSgdEvent(1, 0.9, 0.04, steps * r)], 1e-5, "rdp"),
                },
                run=4,
            )
    return book


def test_epsilon_by_round_composes_the_events_so_far():
    entry = _book().report()["clients"]["0"]
    points = epsilon_by_round(entry, 1e-5, "rdp")
    assert [r for r, _ in points] == [1, 2]
    assert points[1][1] == pytest.approx(epsilon([DpSgdEvent(1, 0.9, 0.04, 20)], 1e-5, "rdp"))


def test_html_is_self_contained_and_states_the_numbers():
    privacy = json.loads(json.dumps(_book().report()))
    page = render_html(privacy, "run")
    assert page.count('src="data:image/png;base64,') == 2
    assert not re.search(r'(src|href)="(https?:|file:|/)', page)  # nothing to fetch: opens offline
    assert f"{privacy['clients']['0']['epsilon']:.4g}" in page and "zero-out" in page
    assert 'status: <b class="ok">ok</b>' in page


def test_fed_report_writes_the_page_and_refuses_a_folder_without_privacy_json(tmp_path, capsys):
    (tmp_path / "privacy.json").write_text(json.dumps(_book().report()))  # mid-run: RDP only, PRV null
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").is_file()
    prv = epsilon([DpSgdEvent(1, 0.9, 0.04, 10), DpSgdEvent(2, 0.9, 0.04, 10)], 1e-5, "prv")
    assert f"{prv:.4g}" in (tmp_path / "report.html").read_text()  # the cross-check, filled in by fed report
    assert main(["report", str(tmp_path / "nope")]) == 2


def test_fed_plan_prints_the_calibrated_noise_and_checks_delta(capsys):
    code = main(
        [
            "plan",
            "--set",
            "dp.enabled=true",
            "--set",
            "dp.target_epsilon=8",
            "--examples",
            "800",
            "--set",
            "federation.rounds=5",
            "--set",
            "train.local_steps=10",
            "--set",
            "train.batch_size=32",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    sigma = get_noise_multiplier(
        target_epsilon=8, target_delta=1e-5, sample_rate=0.04, steps=50, accountant="rdp", epsilon_tolerance=0.001
    )
    printed = float(re.search(r"noise multiplier\s+([\d.]+)", out).group(1))
    assert printed == pytest.approx(sigma, rel=5e-3)
    assert (
        main(
            [
                "plan",
                "--set",
                "dp.enabled=true",
                "--set",
                "dp.target_epsilon=8",
                "--set",
                "dp.delta=1e-3",
                "--examples",
                "800",
            ]
        )
        == 2
    )
