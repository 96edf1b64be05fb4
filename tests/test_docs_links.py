"""Every link in docs/, README.md and CONTRIBUTING.md resolves: the file exists, and so does the
heading an anchor names (GitHub's slugs: lower case, punctuation dropped, spaces to hyphens)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    seen: dict[str, int] = {}
    out: set[str] = set()
    for h in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(h)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(_without_code(page.read_text(encoding="utf-8")))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_resolves(page: Path) -> None:
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http(s)://, mailto: — not fetched by tests
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with the anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_the_docs_exist_and_link_to_each_other() -> None:
    names = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert {"configuration.md", "admin-api.md", "routing.md", "architecture.md"} <= names
    assert {"operations.md"} <= names
    assert any("docs/" in t for t in links(ROOT / "README.md"))


def test_a_broken_anchor_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    page.write_text(
        "# Title\n\n## The salt and the seed\n\n[x](#the-salt-and-the-seed) [y](#nope)\n"
    )
    assert "the-salt-and-the-seed" in anchors(page)
    assert "nope" not in anchors(page)
    assert links(page) == ["#the-salt-and-the-seed", "#nope"]


# --------------------------------------------------------------------------- citations in code

CITED_SECTION = re.compile(r'README(?:\.md)?,? "([^"\n]+)"')
CITED_DOC = re.compile(r"(?<![\w/.-])docs/[\w-]+\.md")
SOURCES = sorted(p for d in ("gateway", "tests", "benchmarks") for p in (ROOT / d).rglob("*.py"))


def _headings(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    return {h.strip() for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_every_readme_section_cited_in_code_exists() -> None:
    """Comments cite README sections by title: each title is a heading of a README."""
    titles = _headings(ROOT / "README.md") | _headings(ROOT / "benchmarks" / "README.md")
    broken = [
        f"{src.relative_to(ROOT)}: README section {title!r}"
        for src in SOURCES
        for title in CITED_SECTION.findall(src.read_text(encoding="utf-8"))
        if title not in titles and " ".join(title.split()) not in titles
    ]
    assert not broken, "cited README sections that do not exist:\n" + "\n".join(broken)


def test_every_doc_cited_in_code_exists() -> None:
    broken = [
        f"{src.relative_to(ROOT)}: {doc}"
        for src in SOURCES
        for doc in CITED_DOC.findall(src.read_text(encoding="utf-8"))
        if not (ROOT / doc).exists()
    ]
    assert not broken, "cited docs that do not exist:\n" + "\n".join(broken)


def test_no_comment_cites_a_document_outside_the_repo() -> None:
    """Comments cite README, docs/ or a public spec; never the design notes the repo lacks."""
    outside = re.compile("|".join(["SPEC" + " §", "PERF" + "_NOTES", "STYLE" + " habit"]))
    pages = [*SOURCES, *PAGES, *(ROOT / "benchmarks").rglob("*.md")]
    found = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in pages
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
        if outside.search(line)
    ]
    assert not found, "cite the repo's docs or a public spec instead:\n" + "\n".join(found)
