"""The docs a newcomer reads stay true: every relative link resolves inside the repository, every ``fed``
command shown in a code block parses with the CLI's own parser, and the guides keep short paragraphs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from simulations.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
GUIDES = [
    ROOT / "README.md",
    *(
        ROOT / "docs" / name
        for name in (
            "getting-started.md",
            "concepts.md",
            "deployment.md",
            "privacy.md",
            "architecture.md",
            "robustness.md",
            "families.md",
            "secure-aggregation.md",
        )
    ),
    *sorted((ROOT / "docs" / "studies").glob("*.md")),
]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
MAX_PARAGRAPH_WORDS = 120


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _links(page: Path) -> list[str]:
    text = FENCE.sub("", page.read_text())  # a code block's brackets are code, not links
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_every_relative_link_resolves_inside_the_repository(page):
    for target in _links(page):
        path = (page.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(ROOT), f"{_name(page)}: {target} points outside the repository"
        assert path.exists(), f"{_name(page)}: {target} does not exist"


def _fed_commands(page: Path) -> list[str]:
    """Each ``fed ...`` command line of the page's code blocks (continuations joined, prompts dropped)."""
    commands = []
    for block in FENCE.findall(page.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("fed "):
                commands.append(line)
    return commands


@pytest.mark.parametrize("page", [p for p in PAGES if _fed_commands(p)], ids=_name)
def test_every_fed_command_shown_parses_with_the_cli(page):
    parser = _parser()
    for command in _fed_commands(page):
        argv = shlex.split(command, comments=True)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit as exit_:  # argparse's way of refusing a command line
            pytest.fail(f"{_name(page)}: `{command}` does not parse (exit {exit_.code})")


def _paragraphs(page: Path) -> list[str]:
    """Prose paragraphs: blank-line separated, outside code blocks and tables; a list item is its own."""
    text = FENCE.sub("", page.read_text())
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        if block.lstrip().startswith("|"):
            continue
        paragraphs.extend(re.split(r"\n(?=\s*(?:[-*]|\d+\.) )", block))
    return paragraphs


@pytest.mark.parametrize("page", GUIDES, ids=_name)
def test_guides_keep_paragraphs_short(page):
    long = [p[:60] for p in _paragraphs(page) if len(p.split()) > MAX_PARAGRAPH_WORDS]
    assert not long, f"{_name(page)}: paragraphs over {MAX_PARAGRAPH_WORDS} words: {long}"


def test_the_checks_can_fail(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[gone](nowhere.md)\n\n```bash\nfed simulate --no-such-flag\n```\n\n" + "word " * 130 + "\n")
    assert _links(page) == ["nowhere.md"] and not (tmp_path / "nowhere.md").exists()
    with pytest.raises(SystemExit):
        _parser().parse_args(shlex.split(_fed_commands(page)[0])[1:])
    assert max(len(p.split()) for p in _paragraphs(page)) > MAX_PARAGRAPH_WORDS
