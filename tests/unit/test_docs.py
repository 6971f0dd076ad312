"""The README and docs/ refer only to things that exist: every relative link to a file (and a
heading, for ``#anchor``), every ``make <target>`` to a Makefile target, every ``mmpipe
<command>`` in code to a real CLI subcommand."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from mmpipe.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO)) for p in pages]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def code(text: str) -> list[str]:
    """The code in a page: fenced blocks and inline spans."""
    return FENCE.findall(text) + SPAN.findall(FENCE.sub("", text))


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors(file)):
            broken.append(target)
    return broken


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([\w.-]+):(?!=)", text, re.M))


def cli_commands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_relative_links_point_to_files_and_headings_that_exist(page):
    assert broken_links(page) == []


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_make_targets_and_mmpipe_commands_exist(page):
    snippets = code(page.read_text())
    made = {t for s in snippets for t in re.findall(r"\bmake ([a-z][\w-]*)", s)}
    assert made - make_targets() == set()
    ran = {c for s in snippets for c in re.findall(r"(?<![\w./-])mmpipe ([a-z][\w-]*)", s)}
    assert ran - cli_commands() == set()


def test_the_checks_see_what_they_check(tmp_path):
    """Not vacuous: a missing file, heading, make target and command are each found."""
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[a](nope.md) [b](#title) [c](#gone) [d](https://x.org/y)\n")
    assert broken_links(page) == ["nope.md", "#gone"]
    assert {"test", "run", "setup"} <= make_targets()
    assert {"train", "run", "predict", "ui"} <= cli_commands()
    assert slug("Audio, the third modality") == "audio-the-third-modality"
    assert slug("Restore a past night / an experiment") == "restore-a-past-night--an-experiment"
    assert code("text `mmpipe nope` and\n```bash\nmake nope\n```\n") == [
        "make nope\n",
        "mmpipe nope",
    ]
