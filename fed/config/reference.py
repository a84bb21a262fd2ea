"""Everything written about the config keys, generated from the dataclasses in ``fed.config``.

The dataclasses are the one source: a field's type gives its accepted values, its default the
default, its attribute docstring the explanation. From them come ``docs/configuration.md``
(:func:`markdown`), ``fed config --list`` (:func:`rows`), and the ``[tool.flwr.app.config]`` block
that pyproject.toml must declare for Flower (:func:`flower_block`); tests compare the committed
files with these functions, so a new or changed field cannot leave them behind.
"""

from __future__ import annotations

import ast
import functools
import inspect
import itertools
import re
import textwrap
from typing import Any

import tomli_w

from fed.config import Key, RunConfig, keys, sections
from fed.config.sources import APP_KEYS

MARKDOWN_PATH = "docs/configuration.md"
"""Where the generated reference lives, relative to the repository root."""


def _attribute_docs(cls: type) -> dict[str, str]:
    """A class's attribute docstrings (the string right below each annotated field), which Python keeps
    only in the source, so they are read back from it."""
    node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(node, ast.ClassDef)  # the source of a class is its class statement
    body = node.body
    return {
        stmt.target.id: inspect.cleandoc(doc.value.value)
        for stmt, doc in itertools.pairwise(body)
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(stmt.target, ast.Name)
        and isinstance(doc, ast.Expr)
        and isinstance(doc.value, ast.Constant)
        and isinstance(doc.value.value, str)
    }


@functools.cache
def docs() -> dict[str, str]:
    """Every dotted key and every section name -> its docstring, as one paragraph."""
    found = {name: " ".join(doc.split()) for name, doc in _attribute_docs(RunConfig).items()}
    for section, cls in sections().items():
        found.update({f"{section}.{name}": " ".join(doc.split()) for name, doc in _attribute_docs(cls).items()})
    return found


def summary(doc: str) -> str:
    """A docstring's first sentence: the one line a terminal table has room for."""
    return re.split(r"(?<=\.)\s+(?=[A-Z])", doc, maxsplit=1)[0]


def value_text(value: Any) -> str:
    """A value as it is written in a preset or after ``--set`` (TOML: ``true``, ``""``, ``[]``)."""
    return tomli_w.dumps({"v": list(value) if isinstance(value, tuple) else value}).removeprefix("v = ").strip()


def accepts(key: Key) -> str:
    """What a key accepts, in words: its choices, else its type's name."""
    if key.documented:
        return ", ".join(key.documented)
    return "list of str" if key.kind is tuple else key.kind.__name__


def rows() -> list[tuple[str, str, str, str]]:
    """(key, default, accepts, one-line doc) per key, as plain text for a terminal."""
    defaults = RunConfig().to_flat()
    return [
        (name, value_text(defaults[name]), accepts(key), summary(docs()[name]).replace("``", ""))
        for name, key in keys().items()
    ]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell (a ``|`` would end the cell)."""
    return text.replace("|", "\\|")


def _table(names: list[str]) -> list[str]:
    """Markdown table rows of some keys: key, accepted values, default, full docstring."""
    lines = ["| key | accepts | default | meaning |", "|---|---|---|---|"]
    defaults = RunConfig().to_flat()
    for name in names:
        key = keys()[name]
        accepted = ", ".join(f"`{c}`" for c in key.documented) if key.documented else accepts(key)
        lines.append(
            f"| `{name}` | {_cell(accepted)} | `{_cell(value_text(defaults[name]))}` | {_cell(docs()[name])} |"
        )
    return lines


def markdown() -> str:
    """The whole of docs/configuration.md: the top-level keys, then one table per section."""
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from the dataclasses in fed/config/__init__.py: edit them, then run",
        "     fed config --markdown > docs/configuration.md (tests/config/test_config.py compares the two). -->",
        "",
        "A run is configured by a preset (`fed/config/presets/*.toml`, or a path to a TOML file), then "
        "`--set key=value`",
        "overrides or Flower's run-config. A bad key or value stops the run before any work, naming it and what is",
        "accepted. Defaults below are the dataclasses'; a preset may set others: `fed config --list --preset NAME`",
        "shows a preset's values.",
        "",
        "## Top level",
        "",
        *_table([name for name in keys() if "." not in name]),
    ]
    for section in sections():
        lines += [
            "",
            f"## `{section}`",
            "",
            docs()[section],
            "",
            *_table([name for name in keys() if name.startswith(f"{section}.")]),
        ]
    return "\n".join(lines) + "\n"


def flower_block() -> str:
    """The ``[tool.flwr.app.config]`` tables pyproject.toml must hold: Flower refuses undeclared run-config
    keys, so every config key is declared, with ``""`` meaning "keep the preset's value"."""
    top = {**APP_KEYS, **{name: "" for name in keys() if "." not in name}}
    lines = [
        "[tool.flwr.app.config]",
        '# Flower accepts only run-config keys declared here. "" = take the value from the preset.',
        *(f"{name} = {value_text(value)}" for name, value in top.items()),
    ]
    for section in sections():
        lines += [
            "",
            f"[tool.flwr.app.config.{section}]",
            *(f'{name.partition(".")[2]} = ""' for name in keys() if name.startswith(f"{section}.")),
        ]
    return "\n".join(lines) + "\n"
