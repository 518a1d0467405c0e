"""README.md and docs/*.md: every flag of every verb is documented, and every link between them lands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gpt2kit.cli import _verb_parsers, build_parser
from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _text() -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in PAGES)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("verb", sorted(_verb_parsers(build_parser())))
def test_every_flag_of_a_verb_is_documented(verb):
    parser = _verb_parsers(build_parser())[verb]
    flags = {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}
    text = _text()
    missing = sorted(f for f in flags if not re.search(re.escape(f) + r"(?![\w-])", text))
    assert not missing, f"gpt2kit {verb}: {missing} are in no page of README.md or docs/"


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"docs/{p.name}" not in readme] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_between_pages_land(page: Path):
    text = page.read_text(encoding="utf-8")
    for target, anchor in re.findall(r"\]\((?!https?:)([^)#\s]*)(?:#([^)\s]+))?\)", text):
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: a link to {target}, which does not exist"
        if anchor and path.suffix == ".md":
            code_free = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
            slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", code_free, re.M)}
            assert anchor in slugs, f"{page.name}: no heading of {target or page.name} has the anchor #{anchor}"
