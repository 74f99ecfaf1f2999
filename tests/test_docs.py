"""The documentation points at things that exist: relative links, their #anchors, and `make` targets.

Covers README.md and every docs/*.md (whatever files are added there later).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 120  # the front door: readable in five minutes; depth goes into docs/

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # [text](target "title"); images too below
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
MAKE = re.compile(r"(?:^|[\s;&|(])make\s+([A-Za-z0-9][\w.-]*)")


def _split(text: str) -> tuple[list[str], list[str]]:
    """(prose lines, code): prose outside fenced blocks with inline code removed; code = fenced lines + inline spans."""
    prose, code, fenced = [], [], False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if fenced:
            code.append(line)
        else:
            code.extend(match.group(2) for match in INLINE_CODE.finditer(line))
            prose.append(INLINE_CODE.sub("", line))
    return prose, code


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (not - or _), spaces → hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(2), heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (repeated headings get -1, -2, … as on GitHub)."""
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
        elif not fenced and (match := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def relative_links(path: Path) -> list[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    targets = [t for line in prose for pattern in (LINK, IMAGE) for t in pattern.findall(line)]
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: …


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return {name for line in text.splitlines() if (m := re.match(r"^([\w.-]+)\s*:(?!=)", line)) for name in [m[1]]}


def test_there_are_docs_to_check():
    assert len(DOCS) > 1 and all(path.is_file() for path in DOCS)
    assert sum(len(relative_links(path)) for path in DOCS) > 10


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_and_anchor_exists(doc):
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        linked = (doc.parent / file_part).resolve() if file_part else doc
        if not linked.exists():
            broken.append(f"{target}: no {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.relative_to(REPO)}")
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_make_target_named_exists(doc):
    _, code = _split(doc.read_text(encoding="utf-8"))
    named = {target for snippet in code for target in MAKE.findall(snippet)}
    assert named - makefile_targets() == set()


def test_the_readme_is_a_short_front_door_that_links_every_doc():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= README_MAX_LINES
    assert "make demo" in readme and "make test" in readme
    linked = {(REPO / target.partition("#")[0]).resolve() for target in relative_links(REPO / "README.md")}
    assert {path for path in DOCS[1:] if path.resolve() not in linked} == set()


def test_slug_follows_github():
    assert slug("`cog predict`") == "cog-predict"
    assert slug("Busy server (409)") == "busy-server-409"
    assert slug("Default scheduler: DPM-Solver++ 2M at 25 steps") == "default-scheduler-dpm-solver-2m-at-25-steps"
    assert slug("The fast path: `jsd.optimize`") == "the-fast-path-jsdoptimize"
