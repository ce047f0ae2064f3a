"""docs/state-machine.md is generated from tunnel/core/session.py and must not go stale."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tunnel.core.session import (
    EDGE_MEANING,
    REGENERATE,
    STATE_MEANING,
    TRANSITIONS,
    State,
    Trigger,
    render_doc,
)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "state-machine.md"


def test_committed_doc_matches_the_generated_one() -> None:
    committed = DOC.read_text(encoding="utf-8") if DOC.exists() else "<missing>"
    assert committed == render_doc(), (
        f"docs/state-machine.md is stale; regenerate it with:\n    {REGENERATE}"
    )


def test_regenerate_command_prints_exactly_the_doc() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tunnel.core.session"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == render_doc()
    assert out.stderr == ""


def test_doc_says_it_is_generated_and_how_to_regenerate() -> None:
    head = DOC.read_text(encoding="utf-8").splitlines()[:3]
    assert "GENERATED" in head[0]
    assert REGENERATE in head[1]


def test_every_state_appears_in_states_table_and_diagram() -> None:
    text = DOC.read_text(encoding="utf-8")
    diagram = text.split("```mermaid", 1)[1].split("```", 1)[0]
    for st in State:
        assert re.search(rf"^\| {st} \| ", text, re.M), st
        assert re.search(rf"\b{st}\b", diagram), st
    assert set(STATE_MEANING) == set(State)


def test_every_transition_appears_as_table_row_and_diagram_edge() -> None:
    text = DOC.read_text(encoding="utf-8")
    diagram = text.split("```mermaid", 1)[1].split("```", 1)[0]
    for (src, trig), (edge, dst) in TRANSITIONS.items():
        assert f"| {edge} | {src} | `{trig}` | {dst} |" in text, (edge, src, trig)
        assert f"    {src} --> {dst}: {edge} {trig}\n" in diagram, (edge, src, trig)
    assert "| T15 | TERMINATED | any | (none) |" in text
    assert set(EDGE_MEANING) == {edge for edge, _ in TRANSITIONS.values()}


def test_diagram_has_no_edge_the_table_lacks() -> None:
    diagram = DOC.read_text(encoding="utf-8").split("```mermaid", 1)[1].split("```", 1)[0]
    edges = re.findall(r"^    (\w+) --> (\w+): (\w+) (\w+)$", diagram, re.M)
    assert edges
    table = {(str(s), str(d), e, str(t)) for (s, t), (e, d) in TRANSITIONS.items()}
    assert set(edges) == table
    assert len(edges) == len(TRANSITIONS)


def test_priority_section_lists_every_trigger() -> None:
    section = DOC.read_text(encoding="utf-8").split("## Trigger priority", 1)[1]
    for trig in Trigger:
        assert f"`{trig}`" in section, trig
    first = section.index("session_lifetime_exceeded")
    assert first < section.index("ownership_conflict") < section.index("transport_ttl_exceeded")


def test_docs_index_links_the_state_machine_doc() -> None:
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    row = next(line for line in index.splitlines() if "state-machine.md" in line)
    assert "[state-machine.md](state-machine.md)" in row
    assert row.rstrip().endswith("| present |")
