"""Generate docs/events.md from the code, so the event vocabulary has one source.

``python -m tunnel.docgen events > docs/events.md`` rewrites it; ``tests/test_docs_events.py``
fails when the committed file differs from what this prints. Field descriptions are the
attribute docstrings in ``tunnel/core/events.py``; reason groups are the ``# comment``
lines above each group of ``Reason`` members; the headless ``ENGINE_STOPPED`` line is
``tunnel.client.headless.ENGINE_STOPPED_FIELDS``; exit codes are the programs' ``EXIT_*``
constants with their docstrings, the client's reason table
(``tunnel.client.engine.exit_code_table``) and the gateway's ``EXIT_STATUS``.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

from tunnel import keygen
from tunnel.cli import exits as cli_exits
from tunnel.client import engine, headless
from tunnel.core import drops, events
from tunnel.gateway import main as gateway_main
from tunnel.impair import main as impair_main
from tunnel.observability.pipeline import PIPELINE_EVENT_FIELDS

EVENTS_SOURCE = Path(events.__file__)
DROPS_SOURCE = Path(drops.__file__)


def member_docs(tree: ast.Module, class_name: str) -> dict[str, str]:
    """Enum member -> its docstring (the string right after ``NAME = value``) in the class
    ``class_name`` of ``tree``; the first paragraph, on one line."""
    docs: dict[str, str] = {}
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for stmt, nxt in itertools.pairwise(node.body):
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.targets[0].id] = " ".join(nxt.value.value.split())
    return docs


def constant_docs(module: ModuleType, prefix: str = "EXIT_") -> dict[str, str]:
    """Module constant -> its docstring (the string right after ``NAME = value`` or
    ``NAME: T = value`` at module level), for the names starting with ``prefix``."""
    tree = ast.parse(Path(str(module.__file__)).read_text(encoding="utf-8"))
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(tree.body):
        target: ast.expr | None = stmt.target if isinstance(stmt, ast.AnnAssign) else None
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
        if (
            isinstance(target, ast.Name)
            and target.id.startswith(prefix)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[target.id] = " ".join(nxt.value.value.split())
    return docs


def _attribute_docs(tree: ast.Module) -> dict[str, dict[str, str]]:
    """class name -> {attribute -> docstring} for ``name: T`` followed by a string."""
    out: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs: dict[str, str] = {}
        body = node.body
        for stmt, nxt in itertools.pairwise(body):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
        out[node.name] = docs
    return out


def _reason_groups(source: str) -> dict[str, str]:
    """Reason member name -> the group comment above it."""
    groups: dict[str, str] = {}
    in_reason = False
    group = ""
    for line in source.splitlines():
        if line.startswith("class Reason("):
            in_reason = True
            continue
        if in_reason and line and not line.startswith(" "):
            break
        if not in_reason:
            continue
        stripped = line.strip()
        if stripped.startswith("#"):
            group = stripped.lstrip("# ").strip()
        elif m := re.match(r"([A-Z_0-9]+) = ", stripped):
            groups[m.group(1)] = group
    return groups


def _type_name(annotation: object) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = str(text).replace("tuple[tuple[str, int], ...]", "list of [name, count]")
    return text.replace("|", "or")


def _event_classes() -> Iterator[type[events.Event]]:
    for _, obj in inspect.getmembers(events, inspect.isclass):
        if issubclass(obj, events.Event) and obj is not events.Event:
            yield obj


def render_events() -> str:
    source = EVENTS_SOURCE.read_text(encoding="utf-8")
    tree = ast.parse(source)
    docs = _attribute_docs(tree)
    class_docs = {
        node.name: " ".join((ast.get_docstring(node) or "").split())
        for node in tree.body
        if isinstance(node, ast.ClassDef)
    }
    base_fields = [f.name for f in dataclasses.fields(events.Event)]
    lines = [
        "# Events, reason codes, drop reasons and exit codes",
        "",
        "<!-- Generated by `python -m tunnel.docgen events > docs/events.md`; do not edit.",
        "     tests/test_docs_events.py fails when this file is stale. -->",
        "",
        "One vocabulary for the TUI, the JSONL trace, the syslog/SIEM sink and the tests",
        "(`tunnel/core/events.py`). Every event is one JSON object per line with",
        "`event_type` plus the fields below. Reason codes are lowercase snake case. No event",
        "carries key material, payload bytes or proofs.",
        "",
        "## Fields every event carries",
        "",
        "| field | meaning |",
        "| --- | --- |",
    ]
    for name in base_fields:
        lines.append(f"| `{name}` | {docs['Event'].get(name, '')} |")
    lines += ["", "## Event types", ""]
    by_type = {cls.event_type: cls for cls in _event_classes()}
    for event_type in events.EventType:
        cls = by_type.get(event_type)
        lines.append(f"### {event_type}")
        lines.append("")
        if cls is None:
            lines += _pipeline_event_lines(event_type)
            continue
        doc = class_docs.get(cls.__name__, "")
        if doc:
            lines += [" ".join(doc.split()), ""]
        own = [f for f in dataclasses.fields(cls) if f.name not in base_fields]
        if not own:
            continue
        lines += ["| field | type | meaning |", "| --- | --- | --- |"]
        for f in own:
            meaning = docs.get(cls.__name__, {}).get(f.name, "")
            lines.append(f"| `{f.name}` | {_type_name(f.type)} | {meaning.replace('|', '/')} |")
        lines.append("")
    lines += _engine_stopped_lines()
    groups = _reason_groups(source)
    lines += [
        "## Reason codes",
        "",
        "The wire carries a reason as its index (`wire`); members are only ever appended.",
        "",
        "| wire | reason | group |",
        "| --- | --- | --- |",
    ]
    for code, reason in enumerate(events.WIRE_REASONS):
        lines.append(f"| {code} | `{reason}` | {groups.get(reason.name, '')} |")
    lines += _drop_lines()
    lines += _exit_code_lines()
    return "\n".join(lines) + "\n"


def _pipeline_event_lines(event_type: str) -> list[str]:
    """EVENT_LOSS, SINK_HEALTH: written by the event pipeline, not the core."""
    what = {
        "EVENT_LOSS": "a sink (or the ring) lost events.",
        "SINK_HEALTH": "a sink's state changed (`tunnel/observability/pipeline.py`, *Draining*).",
    }
    lines = [
        "Emitted by the observability pipeline (`tunnel/observability`), not the core:",
        f"{what.get(event_type, '')} It goes to the other sinks and, on the client, to the",
        "UI channel: `--headless` prints it on stdout as it happens, the TUI notifies.",
        "It carries no `session_id`, `node_id`, `policy_version` or `state_version`.",
        "",
        "| field | meaning |",
        "| --- | --- |",
    ]
    for name, meaning in PIPELINE_EVENT_FIELDS[event_type].items():
        lines.append(f"| `{name}` | {meaning.replace('``', '`')} |")
    return [*lines, ""]


def _engine_stopped_lines() -> list[str]:
    """The last line of ``jvpn-tui --headless``: not a core event, written by the program."""
    lines = [
        "### ENGINE_STOPPED",
        "",
        "Written by `jvpn-tui --headless` (`tunnel/client/headless.py`), not the core: the",
        "last line, once the engine has stopped. It carries no `ts_ms`, `node_id`,",
        "`policy_version` or `state_version`; the fields after `exit_code` are present when",
        "the engine got as far as publishing a snapshot.",
        "",
        "| field | meaning |",
        "| --- | --- |",
    ]
    for name, meaning in headless.ENGINE_STOPPED_FIELDS.items():
        lines.append(f"| `{name}` | {meaning.replace('``', '`')} |")
    return [*lines, ""]


def _constant_rows(module: ModuleType) -> list[tuple[int | str, str]]:
    """(value, docstring) of the ``EXIT_*`` constants of a program module, by value."""
    return sorted((getattr(module, name), doc) for name, doc in constant_docs(module).items())


def _exit_table(rows: Sequence[tuple[int | str, str]]) -> list[str]:
    body = (f"| {code} | {meaning.replace('``', '`')} |" for code, meaning in rows)
    return ["| exit | meaning |", "| --- | --- |", *body, ""]


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _client_exit_lines() -> list[str]:
    """jvpn-tui: the general codes, then one row per final reason (10 + wire index)."""
    docs = {**constant_docs(engine), **constant_docs(headless)}
    base = engine.EXIT_REASON_BASE
    general: list[tuple[int | str, str]] = [
        (engine.EXIT_OK, docs["EXIT_OK"]),
        (engine.EXIT_UNKNOWN_REASON, docs["EXIT_UNKNOWN_REASON"]),
        (headless.EXIT_CONFIG_ERROR, docs["EXIT_CONFIG_ERROR"]),
        (engine.EXIT_ENGINE_ERROR, docs["EXIT_ENGINE_ERROR"]),
        (f"{base} + n", _sentence(docs["EXIT_REASON_BASE"].removeprefix("Plus n: "))),
    ]
    table = engine.exit_code_table()
    used = {code for _, code in table}
    unused = [
        f"{base + wire} (`{reason}`, reason {wire}, exits {engine.exit_code_for(str(reason))})"
        for wire, reason in enumerate(events.WIRE_REASONS)
        if base + wire not in used
    ]
    lines = [
        "### jvpn-tui (the client, with the UI or `--headless`)",
        "",
        "`tunnel.client.engine.exit_code_for(final_reason)`; `--headless` also prints it as",
        "`exit_code` in the `ENGINE_STOPPED` line.",
        "",
        *_exit_table(general),
        "| exit | final reason |",
        "| --- | --- |",
        *(f"| {code} | `{reason}` |" for reason, code in table),
        "",
    ]
    if unused:
        lines += [f"Not used: {', '.join(unused)}.", ""]
    return lines


def _exit_code_lines() -> list[str]:
    """Every program's exit codes, each from the program's own constants."""
    return [
        "",
        "## Exit codes",
        "",
        "Every program ends with one of these; a failure is also one line on stderr.",
        "",
        *_client_exit_lines(),
        "### jvpn-gateway",
        "",
        *_exit_table(gateway_main.EXIT_STATUS),
        "### jvpn (status, watch and commands; docs/control.md)",
        "",
        *_exit_table(_constant_rows(cli_exits)),
        "### jvpn-keygen",
        "",
        *_exit_table(_constant_rows(keygen)),
        "### jvpn-impair",
        "",
        *_exit_table(_constant_rows(impair_main))[:-1],
    ]


def _drop_lines() -> list[str]:
    """The drop reasons, each with the first paragraph of its docstring (drops.py)."""
    drop_docs = member_docs(ast.parse(DROPS_SOURCE.read_text(encoding="utf-8")), "Drop")
    return [
        "",
        "## Drop reasons",
        "",
        "A datagram discarded before it could change anything is counted under one of",
        "these (DROP_SUMMARY events and the gateway's metrics):",
        "",
        *(f"- `{d}`: {drop_docs.get(d.name, '')}" for d in drops.Drop),
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args != ["events"]:
        print("usage: python -m tunnel.docgen events > docs/events.md", file=sys.stderr)
        return 2
    sys.stdout.write(render_events())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
