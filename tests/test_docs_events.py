"""docs/events.md is generated from tunnel/core/events.py and must not go stale."""

from __future__ import annotations

from pathlib import Path

from tunnel.core.drops import Drop
from tunnel.core.events import EventType, Reason
from tunnel.docgen import main, render_events

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
