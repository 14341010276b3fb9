"""The documentation's links: every relative link in README.md and docs/*.md points to a file of the repository that
exists (and a #fragment into a Markdown file to one of its headings), and README links every page of docs/.

Links are found with markdown-it (rich's Markdown parser), so that code blocks and code spans, which hold example
paths rather than links, are not mistaken for links.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from markdown_it import MarkdownIt

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MD = MarkdownIt("commonmark").enable("table")


def _inline_tokens(path: Path):
    for token in MD.parse(path.read_text()):
        yield token
        yield from token.children or ()


def links(path: Path) -> list[str]:
    """Every link and image target of a Markdown file."""
    out = []
    for t in _inline_tokens(path):
        if t.type == "link_open":
            out.append(str(t.attrGet("href")))
        elif t.type == "image":
            out.append(str(t.attrGet("src")))
    return out


def anchors(path: Path) -> set[str]:
    """The fragment ids GitHub gives the file's headings: the heading's text, lower-cased, without punctuation other
    than '-' and '_', spaces as '-', and '-1', '-2', ... on repeats."""
    tokens = MD.parse(path.read_text())
    out: set[str] = set()
    for opening, inline in zip(tokens, tokens[1:]):
        if opening.type != "heading_open":
            continue
        text = "".join(c.content for c in inline.children or () if c.type in ("text", "code_inline"))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in out:
            n += 1
            candidate = f"{slug}-{n}"
        out.add(candidate)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(doc: Path):
    broken = []
    for href in links(doc):
        parts = urlsplit(href)
        if parts.scheme or parts.netloc:  # https:, mailto:, //host: not files of this repository
            continue
        target = (doc.parent / unquote(parts.path)).resolve() if parts.path else doc
        if not target.is_relative_to(ROOT):
            broken.append(f"{href}: leaves the repository")
        elif not target.exists():
            broken.append(f"{href}: no such file {target.relative_to(ROOT)}")
        elif parts.fragment and target.suffix == ".md" and parts.fragment not in anchors(target):
            broken.append(f"{href}: no heading '#{parts.fragment}' in {target.relative_to(ROOT)}")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {'; '.join(broken)}"


def test_readme_links_every_docs_page():
    linked = {(ROOT / unquote(urlsplit(h).path)).resolve() for h in links(ROOT / "README.md")}
    unlinked = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert len(DOCS) > 5 and not unlinked, f"README.md's Documentation section does not link {unlinked}"


def test_link_checks_see_what_they_check(tmp_path: Path):
    """The parser finds links outside code and none inside it; the anchors are GitHub's."""
    page = tmp_path / "page.md"
    page.write_text("# A `b.c`: d\n\n## A `b.c`: d\n\n[x](other.md#y) ![i](img.png)\n\n`[no](link.md)`\n\n"
                    "```\n[no](block.md)\n```\n")
    assert links(page) == ["other.md#y", "img.png"]
    assert anchors(page) == {"a-bc-d", "a-bc-d-1"}
