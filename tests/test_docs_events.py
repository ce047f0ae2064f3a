"""docs/events.md is generated from the code (events, reasons, drops, the headless
ENGINE_STOPPED line, every program's exit codes) and must not go stale."""

from __future__ import annotations

import ast
import io
import json
import re
from pathlib import Path

import pytest
from exit_codes import EXIT_CODES
from loopback_gateway import LoopbackGateway

from tunnel.client.config import ClientConfig, PathConfig
from tunnel.client.engine import ClientEngine
from tunnel.client.headless import run_headless
from tunnel.core import drops as drops_module
from tunnel.core.drops import Drop
from tunnel.core.endpoint import Reporter
from tunnel.core.events import EventType, Reason
from tunnel.core.handshake import generate_keypair
from tunnel.docgen import main, member_docs, render_events
from tunnel.io.inner import MemoryInner

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


# -- exit codes and the ENGINE_STOPPED line (issue 13: one generated place for all) ---------


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n") + len(heading) + 1
    ends = [m.start() for m in re.finditer(rf"^#{{1,{len(level)}}} ", text[start:], re.M)]
    return text[start : start + ends[0]] if ends else text[start:]


def _exit_rows(section: str) -> dict[str, str]:
    """``| exit | text |`` rows of a section: exit (as written) -> text."""
    return dict(re.findall(r"^\| (\d+(?: \+ n)?) \| (.+) \|$", section, re.M))


def test_client_exit_codes_are_documented_as_pinned() -> None:
    """Every reason has its row (10 + wire index), the pinned codes the process tests use
    read the same, and a number the table skips is named with the reason (39)."""
    section = _section(
        DOC.read_text(encoding="utf-8"), "### jvpn-tui (the client, with the UI or `--headless`)"
    )
    rows = _exit_rows(section)
    for name, code in EXIT_CODES.items():
        if name == "operator_terminated":
            assert "`operator_terminated`" in rows[str(code)]
        elif name == "engine_error":
            assert rows[str(code)].startswith("`engine_error:")
        else:
            assert rows[str(code)] == f"`{name}`"
    documented = {int(k) for k in rows if k.isdigit()}
    listed = sorted(k for k in documented if k >= 10)
    gaps = set(range(10, listed[-1])) - documented
    assert gaps == {39}, gaps  # 10 + 29, operator_terminated: a stop is exit 0
    assert "Not used: 39 (`operator_terminated`, reason 29, exits 0)." in section
    assert {"0", "1", "2", "3", "10 + n"} <= set(rows)
    assert len([k for k in listed if k >= 10]) == len(Reason) - 1


def test_every_programs_exit_codes_are_documented() -> None:
    """jvpn-gateway 0-7 (as docs/gateway.md used to list them by hand), jvpn-keygen 0/2 and
    jvpn-impair 0/1/2 each have a row in their program's section."""
    text = DOC.read_text(encoding="utf-8")
    expected = {
        "### jvpn-gateway": {str(code) for code in range(8)},
        "### jvpn-keygen": {"0", "2"},
        "### jvpn-impair": {"0", "1", "2"},
    }
    for heading, codes in expected.items():
        rows = _exit_rows(_section(text, heading))
        assert set(rows) == codes, (heading, rows)
        assert all(meaning.strip() for meaning in rows.values())
    gateway = _exit_rows(_section(text, "### jvpn-gateway"))
    assert "CAP_NET_ADMIN" in gateway["6"] and "bound" in gateway["5"]


def test_engine_stopped_line_has_exactly_the_documented_fields() -> None:
    """A real headless run's last line carries the fields docs/events.md lists, no more."""
    section = _section(DOC.read_text(encoding="utf-8"), "### ENGINE_STOPPED")
    documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
    assert {"final_reason", "exit_code", "traffic", "observability"} <= documented
    private, public = generate_keypair()
    with LoopbackGateway(public) as gw:
        paths = (PathConfig(1, "lo1", ("127.0.0.1", 0), None, gw.address),)
        cfg = ClientConfig(private_key=private, gateway_public_key=gw.public_key, paths=paths)
        out = io.StringIO()
        code = run_headless(ClientEngine(cfg, inner=MemoryInner()), duration=1.0, out=out)
    last = json.loads(out.getvalue().splitlines()[-1])
    assert last["event_type"] == "ENGINE_STOPPED" and code == last["exit_code"] == 0
    assert set(last) - {"event_type"} == documented
