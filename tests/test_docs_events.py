"""docs/events.md is generated from tunnel/core/events.py and must not go stale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tunnel.core import drops as drops_module
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import EventType, Reason
from tunnel.docgen import main, member_docs, render_events

DOC = Path(__file__).resolve().parents[1] / "docs" / "events.md"


def test_events_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render_events(), (
        "docs/events.md is stale: run `.venv/bin/python -m tunnel.docgen events > docs/events.md`"
    )


def test_events_doc_names_every_type_reason_and_drop() -> None:
    text = render_events()
    for event_type in EventType:
        assert f"### {event_type}\n" in text
    for code, reason in enumerate(Reason):
        assert f"| {code} | `{reason}` |" in text
    for drop in Drop:
        assert f"- `{drop}`" in text


def test_docgen_usage_error(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["nonsense"]) == 2
    assert "usage" in capsys.readouterr().err


TUNNEL = Path(__file__).resolve().parents[1] / "tunnel"


def _drop_uses() -> list[tuple[str, int, ast.expr]]:
    """(file, line, argument) of every ``count_drop(...)`` call under tunnel/."""
    uses = []
    for path in sorted(TUNNEL.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "count_drop"
            ):
                uses.extend((str(path), node.lineno, arg) for arg in node.args)
    return uses


def test_code_counts_drops_only_by_member() -> None:
    """A drop is counted by a ``Drop`` member (or a value a parser returned as one), never
    by a string: a literal would be a reason the docs do not list."""
    uses = _drop_uses()
    assert len(uses) > 30  # the scan finds the calls (it cannot pass by finding none)
    literals = [
        f"{f}:{line}"
        for f, line, arg in uses
        if isinstance(arg, ast.Constant) or isinstance(arg, ast.JoinedStr)
    ]
    assert not literals, literals


def test_every_drop_the_code_names_is_documented() -> None:
    """Every ``Drop.X`` the code names is a member with a docstring, listed with it in the
    generated docs/events.md."""
    names = set()
    for path in sorted(TUNNEL.rglob("*.py")):
        names |= set(re.findall(r"\bDrop\.([A-Z][A-Z0-9_]*)\b", path.read_text(encoding="utf-8")))
    counted = {
        arg.attr
        for _, _, arg in _drop_uses()
        if isinstance(arg, ast.Attribute) and isinstance(arg.value, ast.Name)
        and arg.value.id == "Drop"
    }  # fmt: skip
    assert counted <= names and len(counted) > 10
    docs = member_docs(ast.parse(Path(drops_module.__file__).read_text("utf-8")), "Drop")
    text = DOC.read_text(encoding="utf-8")
    for name in sorted(names):
        member = Drop[name]  # KeyError: the code names a drop that does not exist
        assert docs.get(name), f"Drop.{name} has no docstring"
        assert f"- `{member}`: {docs[name]}\n" in text, f"docs/events.md does not list {member}"


def test_count_drop_refuses_a_string() -> None:
    """``count_drop`` takes a ``Drop`` only; the counters stay keyed by its string value
    (metrics and tests read them so)."""
    report = Reporter(node_id="n", wall_offset=0.0, now=0.0)
    report.count_drop(Drop.NO_ROUTE)
    assert report.drops == {"no_route": 1}
    with pytest.raises(AttributeError):
        report.count_drop("no_route")  # type: ignore[arg-type]
    assert report.drops == {"no_route": 1}
