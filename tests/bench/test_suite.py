"""The bench suite as one: its index matches bench/README.md, every bench it names is runnable through
``python -m bench run``, results carry where they were measured, and docs/benchmarks.md is their rendering."""

from __future__ import annotations

import importlib
import json
import re

import pytest

from bench import results, suite
from bench.__main__ import main


def test_the_readme_holds_the_index():
    readme = (results.ROOT / "bench" / "README.md").read_text()
    assert suite.index_markdown() in readme, "bench/README.md's table drifted: paste `python -m bench list`"


@pytest.mark.parametrize("name", list(suite.BENCHES))
def test_every_bench_in_the_index_has_a_main(name):
    assert callable(importlib.import_module(suite.BENCHES[name].module).main)


def test_a_result_records_date_machine_commit_and_card(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench", "--seeds", "0"])
    path = results.save("demo", "A demo", "| a |\n|---|\n| 1 |", tmp_path)
    record = json.loads(path.read_text())
    assert record["command"] == "python -m bench run demo --seeds 0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", record["date"])
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", record["commit"])
    assert record["machine"] and record["card"]
    page = results.render(results.load(tmp_path))
    assert "## A demo" in page and record["commit"] in page and "| 1 |" in page


def test_a_file_that_is_not_a_result_is_refused_by_name(tmp_path):
    (tmp_path / "odd.json").write_text('{"bench": "odd"}')
    with pytest.raises(ValueError, match=r"odd.json.*lacks \['title'"):
        results.load(tmp_path)


def test_docs_benchmarks_is_the_rendering_of_the_results():
    assert results.DOC.read_text() == results.render(results.load()), "run `python -m bench report`"


def test_list_prints_the_index(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out == suite.index_markdown()
