"""The HTML report of a DP run and of a run without DP, opened in a real (headless) browser: the page
loads offline, its text and figures are in the rendered DOM, and a screenshot comes out."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from fed.config import DPConfig
from fed.privacy.book import LedgerBook
from fed.reports.privacy import write_report
from tests.privacy.test_report import _book

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no headless browser: install Debian's chromium package to render the reports"
)
LINES = [{"round": r, "train_loss": 0.7, "eval_loss": 0.69, "eval_accuracy": 0.5 + r / 10} for r in (1, 2)]


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _run_dir(tmp_path: Path, name: str, book: LedgerBook, epsilons: tuple) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "privacy.json").write_text(json.dumps(book.report()))
    lines = [{**line, "epsilon_max": e} for line, e in zip(LINES, epsilons)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


@pytest.mark.parametrize(
    ("name", "book", "epsilons", "text", "images"),
    [
        ("dp", _book(), (2.0, 3.0), "Largest epsilon of any client", 4),
        ("plain", LedgerBook(DPConfig(enabled=False)), (None, None), "This run has no privacy guarantee", 1),
    ],
)
def test_the_report_renders_in_a_browser(tmp_path, name, book, epsilons, text, images):
    page = write_report(_run_dir(tmp_path, name, book, epsilons))
    dom = _chromium(tmp_path / "profile-dom", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert text in dom.stdout and dom.stdout.count("<img ") == images
    shot = tmp_path / f"{name}.png"
    done = _chromium(tmp_path / "profile-shot", f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
