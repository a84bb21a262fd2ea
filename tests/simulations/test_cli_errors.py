"""Every user error ends as one ``error:`` line naming the bad value, exit status 2, and no traceback:
each case goes through the real ``fed`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from simulations.cli import main

TINY = ["--set", "model.name=tiny-bert", "--set", "federation.num_clients=2"]


def _one_error_line(code: int, out: str, *named: str) -> str:
    """The error line of ``out``, checked: status 2, no traceback, one ``error:`` line naming ``named``."""
    assert code == 2, out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out
    for value in named:
        assert value in lines[0], lines[0]
    return lines[0]


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_missing_data_file_through_the_installed_entry_point(tmp_path):
    missing = str(tmp_path / "missing.csv")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", *TINY, "--set", f"data.name={missing}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    line = _one_error_line(done.returncode, done.stdout + done.stderr, missing)
    assert "no such file" in line and ".csv" in line


def test_an_unreadable_data_file(tmp_path, capsys):
    garbage = tmp_path / "rows.parquet"
    garbage.write_bytes(b"these bytes are not parquet")
    line = _one_error_line(*_run(capsys, ["simulate", *TINY, "--set", f"data.name={garbage}"]), str(garbage))
    assert "cannot be read as parquet" in line


def test_a_csv_with_an_unterminated_quote(tmp_path, capsys):
    bad = tmp_path / "quote.csv"
    bad.write_text('text,label\n"never closed,1\nfine,0\n')
    line = _one_error_line(*_run(capsys, ["simulate", *TINY, "--set", f"data.name={bad}"]), str(bad))
    assert "EOF inside string" in line  # the parser's own words, not the wrapper's "an error occurred"


def test_a_column_that_is_not_there(tmp_path, capsys):
    table = tmp_path / "rows.csv"
    table.write_text("text,label\nhello,1\nbye,0\n")
    argv = ["simulate", *TINY, "--set", f"data.name={table}", "--set", "data.text_column=body"]
    line = _one_error_line(*_run(capsys, argv), "'body'")
    assert "['text', 'label']" in line  # what is accepted: the file's columns


def test_an_unreachable_epsilon_in_fed_plan(capsys):
    argv = ["plan", "--set", "dp.enabled=true", "--set", "dp.target_epsilon=0.001", "--examples", "800"]
    line = _one_error_line(*_run(capsys, argv), "dp.target_epsilon=0.001")
    assert "out of reach" in line


def test_fed_report_on_a_folder_that_is_not_a_run(tmp_path, capsys):
    _one_error_line(*_run(capsys, ["report", str(tmp_path)]), str(tmp_path), "privacy.json")


def test_fed_report_on_a_privacy_json_that_is_not_a_book(tmp_path, capsys):
    (tmp_path / "privacy.json").write_text('{"clients": ')
    _one_error_line(*_run(capsys, ["report", str(tmp_path)]), "privacy.json")


def test_resuming_a_folder_that_is_not_a_run(tmp_path, capsys):
    _one_error_line(*_run(capsys, ["simulate", "--resume", str(tmp_path)]), str(tmp_path), "config.toml")


@pytest.mark.parametrize("step", [["register"], ["supernode", "--node", "0", "--superlink", "x:1", "--data", "a.csv"]])
def test_a_deployment_folder_without_keys(tmp_path, capsys, step):
    folder = tmp_path / "deployment"
    line = _one_error_line(*_run(capsys, ["deploy", step[0], "--dir", str(folder), *step[1:]]), str(folder))
    assert "fed deploy keys" in line  # what to do instead


def test_a_deployment_folder_without_a_superlink(tmp_path, capsys):
    folder = tmp_path / "deployment"
    line = _one_error_line(*_run(capsys, ["deploy", "run", "--dir", str(folder)]), str(folder))
    assert "fed deploy superlink" in line
