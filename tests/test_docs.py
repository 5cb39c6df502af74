"""The documentation's links resolve and the README stays a front door.

Every relative link and image in README.md and docs/**/*.md must name an existing file or folder, and a link with
`#anchor` into a Markdown file must name one of its headings, slugged as GitHub slugs them (lower case; everything
but letters, digits, `_`, `-` and spaces dropped; spaces become `-`; a repeated slug gets `-1`, `-2`, ...).
Links inside code blocks and inline code are not links. No subprocesses, no network: external URLs are not checked.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 260
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)
# [text](target "title") and ![alt](target); the text may hold inline code (already blanked) but not brackets
LINK = re.compile(r"!?\[[^\[\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks and HTML comments."""
    text = HTML_COMMENT.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    fenced = False
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def heading_text(markdown: str) -> str:
    """A heading's rendered text: links and images by their text, inline code by its content."""
    text = re.sub(r"!?\[([^\[\]]*)\]\([^)]*\)", r"\1", markdown)
    return text.replace("`", "")


def github_slug(text: str) -> str:
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            slug = github_slug(heading_text(m.group(2)))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            if n:
                seen.setdefault(f"{slug}-{n}", 1)
    return set(seen)


def links(path: Path):
    """(line number, target) of every relative link and image in a Markdown file."""
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        line = INLINE_CODE.sub("``", line)
        targets = [m.group(1) for m in LINK.finditer(line)]
        if m := REFERENCE.match(line):
            targets.append(m.group(1))
        for target in targets:
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                yield number, target


def broken(path: Path, target: str) -> str | None:
    """Why a relative link from `path` does not resolve, or None."""
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return "no such file"
    if anchor:
        page = dest / "README.md" if dest.is_dir() else dest
        if page.suffix != ".md" or not page.exists():
            return "an anchor into something that is not a Markdown page"
        if anchor not in anchors(page):
            return f"no heading with slug {anchor!r} in {page.relative_to(ROOT)}"
    return None


def test_github_slugs():
    """Slugs of headings as GitHub renders them (anchors this README used on GitHub before it was split)."""
    assert github_slug(heading_text("Results: the eight algorithms on `tiny-shapes`")) == \
        "results-the-eight-algorithms-on-tiny-shapes"
    assert github_slug("Long runs: resume, checkpoints, stop signals, NaNs, several GPUs") == \
        "long-runs-resume-checkpoints-stop-signals-nans-several-gpus"
    assert github_slug(heading_text("DDPO-SF ([`ddpo_sf.py`](../ddpo_sf.py))")) == "ddpo-sf-ddpo_sfpy"
    assert github_slug("Stage 2: `shapes_alignment`, 3 seeds, 192 reward queries, test split".replace("`", "")) == \
        "stage-2-shapes_alignment-3-seeds-192-reward-queries-test-split"


def test_anchors_number_repeated_headings(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n## Notes\n\n```\n## not a heading\n```\n\n## Notes\n\n## Notes\n")
    assert anchors(page) == {"title", "notes", "notes-1", "notes-2"}


def test_link_finder_skips_code_and_comments(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](a.md) `[b](b.md)` ![c](img/c.png)\n<!-- [d](d.md) -->\n```\n[e](e.md)\n```\n"
                    "[f](https://example.com/f.md) [g](#local)\n[h]: h.md\n")
    assert [t for _, t in links(page)] == ["a.md", "img/c.png", "#local", "h.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page):
    problems = [f"{page.relative_to(ROOT)}:{n}: ({target}) {why}"
                for n, target in links(page) if (why := broken(page, target))]
    assert not problems, "\n".join(problems)


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into a page under docs/"


def generated(page) -> bool:
    """A report benchmark/report.py wrote (its third line says so): the same template for every benchmark run."""
    lines = page.read_text(encoding="utf-8").splitlines()
    return len(lines) > 2 and lines[2].startswith("Generated ") and "by `python benchmark/compare.py`" in lines[2]


def test_no_paragraph_in_two_pages():
    """One home per topic: a line of prose (60 characters or more; not a table row, not code) written twice is a
    paragraph copied from one page into another. Link to it instead. Generated reports share their template."""
    homes: dict[str, list[str]] = {}
    assert generated(ROOT / "docs/benchmark/summary.md") and generated(ROOT / "docs/benchmark/flow/summary.md")
    assert not generated(ROOT / "docs/benchmark/README.md")
    for page in (p for p in PAGES if not generated(p)):
        for _, line in prose_lines(page.read_text(encoding="utf-8")):
            line = line.strip()
            if len(line) >= 60 and not line.startswith("|"):
                homes.setdefault(line, []).append(str(page.relative_to(ROOT)))
    copied = {line: pages for line, pages in homes.items() if len(set(pages)) > 1}
    assert not copied, "\n".join(f"{pages}: {line}" for line, pages in copied.items())
