"""SPEC §1: README.md is the front door and docs/ holds the rest, one file per reader's question. Every relative
link in them resolves to a file and an anchor that exist, and every file of docs/ is reachable from the README."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def prose(path):
    """The lines of a Markdown file outside fenced code blocks."""
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def anchors(path):
    """GitHub's anchors of a file's headings: lower case, punctuation dropped, spaces as hyphens, repeats
    numbered."""
    seen = {}
    for line in prose(path):
        match = re.match(r"#{1,6} (.*)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            yield slug if count == 0 else f"{slug}-{count}"


def links(path):
    for line in prose(path):
        for target in LINK.findall(line):
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto: are not checked
                yield target


def test_the_readme_is_a_front_door_of_about_250_lines():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 320
    for part in ("## Two commands", "make run", "make test", "## HTTP API", "curl ", "## Configuration",
                 "## Running in production", "## Where to read more"):
        assert part in readme, part


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_an_anchor(page):
    targets = list(links(page))
    for target in targets:
        file_part, _, anchor = target.partition("#")
        resolved = (page.parent / file_part).resolve() if file_part else page
        assert resolved.exists(), f"{page.name}: {target} (no file {resolved})"
        if anchor:
            assert resolved.suffix == ".md", f"{page.name}: {target} (an anchor in a file that is not Markdown)"
            assert anchor in set(anchors(resolved)), f"{page.name}: {target} (no heading with that anchor)"


def test_every_page_of_docs_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    for page in PAGES[1:]:
        assert page.resolve() in linked, f"docs/{page.name} is not linked from README.md"


def test_the_link_checker_finds_a_broken_link(tmp_path):
    """The checks above would fail on a missing file or anchor (they are not vacuous)."""
    page = tmp_path / "page.md"
    (tmp_path / "other.md").write_text("# A heading: `with` code\n\n## A heading: `with` code\n")
    page.write_text("[ok](other.md#a-heading-with-code) [ok](other.md#a-heading-with-code-1) [missing](gone.md) "
                    "[bad](other.md#nowhere) [web](https://example.org/x)\n```\n[code](not-checked.md)\n```\n")
    found = list(links(page))
    assert found == ["other.md#a-heading-with-code", "other.md#a-heading-with-code-1", "gone.md", "other.md#nowhere"]
    assert set(anchors(tmp_path / "other.md")) == {"a-heading-with-code", "a-heading-with-code-1"}
