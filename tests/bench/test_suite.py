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


COLUMNS = (results.Column("run"), results.Column("accuracy", digits=3), results.Column("wall", "min", digits=1))


def test_a_result_records_its_rows_and_where_they_were_measured(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["bench", "--seeds", "0"])
    path = results.save(
        "demo", "A demo", "What it measured.", COLUMNS, [("a|b", 0.81234, 2.0), ("c", 0.7, None)], tmp_path
    )
    record = json.loads(path.read_text())
    assert record["command"] == "python -m bench run demo --seeds 0"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC", record["date"])
    assert re.fullmatch(r"[0-9a-f]{12}(-dirty)?|unknown", record["commit"])
    assert record["machine"] and record["card"] and len(record["load"]) == 3
    assert record["rows"] == [
        {"run": "a|b", "accuracy": 0.81234, "wall": 2.0},
        {"run": "c", "accuracy": 0.7, "wall": None},
    ]
    page = results.render(results.load(tmp_path))
    assert "## A demo" in page and record["commit"] in page and "What it measured." in page
    assert "| run | accuracy | wall (min) |\n|---|---|---|\n| a\\|b | 0.812 | 2.0 |\n| c | 0.700 | – |" in page


def test_a_file_that_is_not_a_result_is_refused_by_name(tmp_path):
    (tmp_path / "odd.json").write_text('{"bench": "odd"}')
    with pytest.raises(ValueError, match=r"odd.json.*lacks \['title'"):
        results.load(tmp_path)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"load": None}, "load is None"),
        ({"commit": ""}, "commit is ''"),
        ({"rows": []}, "rows is empty"),
        ({"rows": [{"run": "a", "accuracy": 0.8}]}, r"row 0 .* does not hold exactly the columns"),
        ({"rows": [{"run": "a", "accuracy": [0.8], "wall": 1.0}]}, r"row 0: \['accuracy'\] hold neither"),
        ({"columns": [{"name": "run", "colour": "red"}]}, "are not"),
    ],
)
def test_a_result_missing_or_mangling_a_field_is_refused(tmp_path, change, says):
    path = results.save("demo", "A demo", "About.", COLUMNS, [("a", 0.8, 1.0)], tmp_path)
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=says):
        results.load(tmp_path)


def test_a_further_table_is_kept_checked_and_shown_below_the_rows(tmp_path):
    verdicts = results.Table("Verdicts", (results.Column("claim"), results.Column("held")), [("x", "yes")])
    path = results.save("demo", "A demo", "About.", COLUMNS, [("a", 0.8, 1.0)], tmp_path, tables=[verdicts])
    assert json.loads(path.read_text())["tables"] == [
        {
            "title": "Verdicts",
            "columns": [_plain("claim"), _plain("held")],
            "rows": [{"claim": "x", "held": "yes"}],
        }
    ]
    page = results.render(results.load(tmp_path))
    assert "| a | 0.800 | 1.0 |\n\n**Verdicts**\n\n| claim | held |\n|---|---|\n| x | yes |" in page
    record = json.loads(path.read_text())
    for change, says in [
        (
            [{"title": "Verdicts", "columns": record["tables"][0]["columns"]}],
            r"tables\[0\] .* not an object of exactly",
        ),
        ([{**record["tables"][0], "title": ""}], r"tables\[0\]: title '' is not"),
        ([{**record["tables"][0], "rows": [{"claim": "x"}]}], r"tables\[0\] \(Verdicts\): row 0 .* does not hold"),
    ]:
        path.write_text(json.dumps({**record, "tables": change}))
        with pytest.raises(ValueError, match=says):
            results.load(tmp_path)


def _plain(name: str) -> dict[str, object]:
    return {"name": name, "unit": "", "digits": None, "none": "–"}


def test_save_refuses_rows_that_do_not_fit_the_columns(tmp_path):
    with pytest.raises(ValueError, match="zip"):
        results.save("demo", "A demo", "About.", COLUMNS, [("a", 0.8)], tmp_path)
    assert not list(tmp_path.iterdir())


def test_docs_benchmarks_is_the_rendering_of_the_results():
    assert results.DOC.read_text() == results.render(results.load()), "run `python -m bench report`"


def test_the_readme_expectations_are_the_rendering_of_the_results():
    text = results.README.read_text()
    assert text == results.readme(results.load(), text), "run `python -m bench report`"


def test_the_readme_block_shows_no_figure_without_a_result(tmp_path):
    text = "# x\n\n<!-- expect: generated -->\n| run | 0.795 |\n<!-- /expect -->\n"
    assert results.readme([], text) == (
        "# x\n\n<!-- expect: generated -->\nNo result yet: `python -m bench run presets` measures this table.\n"
        "<!-- /expect -->\n"
    )
    results.save("presets", "Presets", "About.", COLUMNS, [("`fed simulate`", 0.8, 2.0)], tmp_path)
    shown = results.readme(results.load(tmp_path), text)
    assert "| `fed simulate` | 0.800 | 2.0 |" in shown and "0.795" not in shown
    assert "[bench/results/presets.json](bench/results/presets.json)" in shown
    with pytest.raises(ValueError, match="no `<!-- expect"):
        results.readme([], "# no block\n")


def test_list_prints_the_index(capsys):
    assert main(["list"]) == 0
    assert capsys.readouterr().out == suite.index_markdown()
