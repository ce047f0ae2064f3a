"""Every relative link in the repository's Markdown resolves inside a clone.

A link to a file must name a file of the repository (not one beside it, as the seed
documents are on a developer's machine, nor an absolute path); a link with ``#anchor`` to
a Markdown file must name one of that file's headings, as GitHub spells its anchors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"venv", "build", "dist", "node_modules", "__snapshots__"}
"""Besides hidden directories (.git, .venv, caches): not the project's documents."""

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: Path) -> list[Path]:
    """The Markdown files of the repository, hidden and build directories left out."""
    return sorted(
        p
        for p in root.rglob("*.md")
        if not any(
            part.startswith(".") or part in SKIP_DIRS for part in p.relative_to(root).parts[:-1]
        )
    )


def _prose_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def links(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and reference definition."""
    found: list[tuple[int, str]] = []
    for number, raw in _prose_lines(text):
        line = _INLINE_CODE.sub("", raw)
        found.extend((number, m.group(1)) for m in _LINK.finditer(line))
        if m := _REFERENCE.match(line):
            found.append((number, m.group(1)))
    return found


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup, lower case, punctuation
    (except ``-`` and ``_``) removed, spaces made hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor the headings of a Markdown text define (repeats get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in _prose_lines(text):
        m = _HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(root: Path) -> list[str]:
    """``file:line: target: why`` for every relative link that does not resolve inside
    ``root`` (to an existing file, and to an existing heading when it names one)."""
    problems = []
    for md in markdown_files(root):
        text = md.read_text(encoding="utf-8")
        for number, target in links(text):
            if _SCHEME.match(target):
                continue  # http:, https:, mailto:: not a file of the clone
            where = f"{md.relative_to(root)}:{number}: {target}"
            path_part, _, anchor = target.partition("#")
            if path_part.startswith("/"):
                problems.append(f"{where}: an absolute path is not in a clone")
                continue
            dest = (md.parent / path_part).resolve() if path_part else md
            if not dest.is_relative_to(root):
                problems.append(f"{where}: outside the repository")
            elif not dest.exists():
                problems.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text("utf-8")):
                problems.append(f"{where}: no heading with that anchor")
    return problems


def test_every_relative_link_resolves_inside_the_repository() -> None:
    files = markdown_files(REPO)
    assert REPO / "README.md" in files and REPO / "docs" / "events.md" in files
    assert sum(len(links(f.read_text(encoding="utf-8"))) for f in files) > 50
    problems = broken_links(REPO)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_the_checker_finds_each_kind_of_broken_link(tmp_path: Path) -> None:
    """It cannot pass by finding nothing: each kind of bad link in a tree is reported."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (tmp_path / "seed.md").write_text("# Seed\n")
    (repo / "docs" / "b.md").write_text("# Exit codes\n\n## Exit codes\n\n### `ENGINE_STOPPED`\n")
    (repo / "README.md").write_text(
        "[ok](docs/b.md) [ok](docs/b.md#exit-codes-1) [ok](docs/b.md#engine_stopped)\n"
        "[ok](https://example.org/x) [ok](#a-title) `[code](nowhere.md)`\n"
        "# A title\n"
        "```\n[in a block](nowhere.md)\n```\n"
        "[outside](../seed.md) [missing](docs/c.md) [anchor](docs/b.md#nope)\n"
        "[abs](/etc/passwd)\n"
        "[ref]: docs/d.md\n"
    )
    problems = broken_links(repo)
    assert [p.split(": ", 1)[0] for p in problems] == [
        *["README.md:7"] * 3,
        "README.md:8",
        "README.md:9",
    ]
    assert [p.rsplit(": ", 1)[1] for p in problems] == [
        "outside the repository",
        "no such file",
        "no heading with that anchor",
        "an absolute path is not in a clone",
        "no such file",
    ]
