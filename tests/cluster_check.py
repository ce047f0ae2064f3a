"""The cluster fault checker: merges what every node did with what the store committed.

Independent of the tunnel code (it reads files only), so it judges any node program that
writes the same three kinds of record into one directory:

- ``wire.jsonl``: every datagram the nodes sent, as the wire collector received them (in
  arrival order, which on one UDP socket on loopback is the order they were sent):
  ``n`` node, ``p`` pid, ``q`` the sender's sequence number, ``s`` session, ``e`` owner
  epoch, ``k`` key id, ``c`` counter, ``t`` the sender's ``CLOCK_MONOTONIC`` when its
  fence allowed the send, ``rx`` the collector's ``CLOCK_MONOTONIC`` at arrival.
- ``node-*.jsonl``: the nodes' journals (:mod:`cluster_node`): store-write ``attempt`` and
  ``result`` lines (op, sid, ``ver``, the counter block ``lo``/``hi``, ``outcome``).
- ``history.jsonl``: every write of every session entry in the store, in revision order
  (``rev``, ``sid``, ``ver``, ``state``, ``node``, ``epoch``, ``key``, ``next``), read
  back from the store after the run.

Checks (each violation is listed; the counts are printed either way):

1. **Ownership intervals never overlap.** A node's interval for a session at one owner
   epoch runs from its first to its last fence-allowed send (``t``). Per session, sorted
   by start, each interval ends before the next begins, and owner epochs only grow.
   The *arrival* order is checked too: a (node, epoch) whose datagrams arrive again after
   another owner's is an interleaving on the wire. One whose sender was paused between
   its fence check and its send (arrival more than ``PAUSE_SLACK`` after ``t``: a
   SIGSTOP landed in that window, or it was not scheduled) is counted apart as
   ``late_after_pause``; any other is a violation.
2. **No state version committed twice or lost.** In the store's history each session's
   versions never go back, and one is written again only as a refresh (same owner, owner
   epoch and state: a gateway reserving a counter block between two transitions); every
   write a node reported ``ok`` is in the history with that node as owner; every write in
   the history was attempted by the node it names.

Layer 2 (:func:`check_gateways`) runs checks 1 to 3 over real gateways: their
SESSION_OWNER_* events for the intervals, the store's history, the client's wire record.
3. **No (key, counter) used twice**, and every counter sent lies in a block the store
   committed to that very node at that very owner epoch.

``python tests/cluster_check.py DIR`` prints the report; exit status 1 on a violation.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PAUSE_SLACK = 0.25
"""Seconds between a sender's fence check and the datagram's arrival beyond which the
sender was paused in between (the fence margin's assumption that this time is small
did not hold); on loopback the two are microseconds apart otherwise."""

Doc = dict[str, Any]


@dataclass
class Report:
    """What the checker found."""

    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def violation(self, kind: str, text: str) -> None:
        self.counts[f"violations: {kind}"] += 1
        if len(self.violations) < 50:
            self.violations.append(f"{kind}: {text}")

    def table(self) -> str:
        width = max((len(k) for k in self.counts), default=10)
        lines = [f"{k:<{width}}  {v:>9}" for k, v in sorted(self.counts.items())]
        verdict = "OK: no violation" if self.ok else f"FAILED: {len(self.violations)} listed"
        return "\n".join([*lines, verdict, *self.violations])


def read_jsonl(path: Path) -> Iterator[Doc]:
    """The JSON lines of ``path`` (none when it does not exist yet)."""
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue  # a line cut by kill -9 mid-write


def check_dir(directory: Path) -> Report:
    wire = list(read_jsonl(directory / "wire.jsonl"))
    history = list(read_jsonl(directory / "history.jsonl"))
    journal = [d for p in sorted(directory.glob("node-*.jsonl")) for d in read_jsonl(p)]
    return check(wire, journal, history)


def check(wire: list[Doc], journal: list[Doc], history: list[Doc]) -> Report:
    report = Report()
    report.counts["datagrams"] = len(wire)
    report.counts["history writes"] = len(history)
    check_intervals(report, wire)
    check_versions(report, journal, history)
    check_counters(report, wire, history)
    return report


# -- 1. ownership intervals ---------------------------------------------------------------------


Spans = dict[str, dict[tuple[str, int], list[float]]]
"""session -> (node, owner epoch) -> [first, last] fence-checked send (monotonic s)."""


def check_intervals(report: Report, wire: list[Doc]) -> None:
    spans: Spans = defaultdict(dict)
    for d in wire:
        span = spans[d["s"]].setdefault((d["n"], d["e"]), [d["t"], d["t"]])
        span[0], span[1] = min(span[0], d["t"]), max(span[1], d["t"])
    check_spans(report, spans)
    check_arrival_order(report, wire)


def check_spans(report: Report, spans: Spans) -> None:
    """Per session, sorted by start: each interval ends before the next one begins, and
    the owner epoch only grows."""
    for sid, by_owner in spans.items():
        ordered = sorted(by_owner.items(), key=lambda kv: kv[1][0])
        report.counts["ownership intervals"] += len(ordered)
        for (prev, (_, end)), (cur, (start, _)) in itertools.pairwise(ordered):
            if start <= end:
                text = f"{sid[:8]} {prev} until {end:.4f}, {cur} from {start:.4f}"
                report.violation("overlapping ownership", text)
            if cur[1] < prev[1]:
                report.violation("owner epoch went back", f"{sid[:8]} {prev} then {cur}")


def check_arrival_order(report: Report, wire: list[Doc]) -> None:
    last: dict[str, tuple[str, int]] = {}
    done: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for d in wire:
        sid, owner = d["s"], (d["n"], d["e"])
        prev = last.get(sid)
        if prev == owner:
            continue
        if owner in done[sid]:
            if d["rx"] - d["t"] > PAUSE_SLACK:
                report.counts["late_after_pause"] += 1  # the current owner stays current
                continue
            report.violation("interleaved on the wire",
                             f"{sid[:8]} {owner} after {prev} at rx {d['rx']:.4f}")  # fmt: skip
        if prev is not None:
            done[sid].add(prev)
        last[sid] = owner


# -- 2. state versions --------------------------------------------------------------------------


def check_history(report: Report, history: list[Doc]) -> set[tuple[str, int, str]]:
    """Each session's versions never go back, and a version is written again only as a
    refresh (the same owner, owner epoch and state: a gateway's new counter block between
    two transitions); returns the (sid, version, owner node) of every write."""
    last: dict[str, Doc] = {}
    committed: set[tuple[str, int, str]] = set()
    for h in history:
        sid, ver = h["sid"], h["ver"]
        prev = last.get(sid)
        if prev is not None and ver == prev["ver"] and same_owner_and_state(prev, h):
            report.counts["refreshes (same version, same owner)"] += 1
        elif prev is not None and ver <= prev["ver"]:
            report.violation("state version committed twice or went back",
                             f"{sid[:8]} v{ver} after v{prev['ver']} (rev {h['rev']})")  # fmt: skip
        last[sid] = h
        committed.add((sid, ver, h["node"]))
    report.counts["sessions"] = len(last)
    report.counts["transfers (owner epoch + 1)"] = count_transfers(history)
    return committed


def same_owner_and_state(a: Doc, b: Doc) -> bool:
    return all(a.get(k) == b.get(k) for k in ("node", "epoch", "state"))


def check_versions(report: Report, journal: list[Doc], history: list[Doc]) -> None:
    committed = check_history(report, history)
    attempts = {(d["sid"], d["ver"], d["node"]) for d in journal if d["e"] == "attempt"}
    outcomes = Counter(f"{d['op']} {d['outcome']}" for d in journal if d["e"] == "result")
    for k, v in outcomes.items():
        report.counts[f"store writes: {k}"] = v
    report.counts["node starts"] = sum(1 for d in journal if d["e"] == "start")
    for d in journal:
        if d["e"] == "result" and d["outcome"] == "ok":
            if (d["sid"], d["ver"], d["node"]) not in committed:
                text = f"{d['sid'][:8]} v{d['ver']} by {d['node']} not in the store"
                report.violation("state version lost", text)
    for key in committed:
        if key not in attempts:
            report.violation("write nobody attempted", f"{key[0][:8]} v{key[1]} by {key[2]}")


def count_transfers(history: Iterable[Doc]) -> int:
    epoch: dict[str, int] = {}
    moves = 0
    for h in history:
        if h["sid"] in epoch and h["epoch"] > epoch[h["sid"]]:
            moves += 1
        epoch[h["sid"]] = h["epoch"]
    return moves


# -- 3. (key, counter) --------------------------------------------------------------------------


def committed_blocks(history: list[Doc]) -> dict[tuple[str, int, str], list[tuple[int, int]]]:
    """(sid, epoch, node) -> the counter blocks the store committed to that owner."""
    blocks: dict[tuple[str, int, str], list[tuple[int, int]]] = defaultdict(list)
    reserved: dict[str, int] = {}
    for h in history:
        lo = reserved.get(h["sid"], 0)
        if h["next"] > lo:
            blocks[(h["sid"], h["epoch"], h["node"])].append((lo, h["next"]))
        reserved[h["sid"]] = max(lo, h["next"])
    return blocks


def check_counters(report: Report, wire: list[Doc], history: list[Doc]) -> None:
    seen: set[tuple[str, int]] = set()
    blocks = committed_blocks(history)
    for d in wire:
        pair = (d["k"], d["c"])
        if pair in seen:
            report.violation("nonce reuse", f"key {d['k']} counter {d['c']} by {d['n']}")
        seen.add(pair)
        owned = blocks.get((d["s"], d["e"], d["n"]), [])
        if not any(lo <= d["c"] < hi for lo, hi in owned):
            report.violation("counter outside a committed block",
                             f"{d['s'][:8]} {d['n']} epoch {d['e']} counter {d['c']}")  # fmt: skip
    report.counts["(key, counter) pairs"] = len(seen)
    gaps = 0
    last: dict[int, int] = {}
    for d in wire:
        if d["p"] in last and d["q"] > last[d["p"]] + 1:
            gaps += d["q"] - last[d["p"]] - 1
        last[d["p"]] = max(d["q"], last.get(d["p"], 0))
    report.counts["datagrams lost before the collector"] = gaps


# -- layer 2: real gateways ---------------------------------------------------------------------

ENDED = ("SESSION_OWNER_RELEASED", "SESSION_OWNER_TRANSFERRED")


def check_gateways(
    events: list[Doc], history: list[Doc], wire_repeats: Iterable[Any] = ()
) -> Report:
    """The same checks over ``jvpn-gateway`` cluster nodes: ``events`` are their JSONL
    sinks' lines (all nodes); an ownership interval is what an old owner reports when it
    ends (RELEASED, or TRANSFERRED on the old owner: ``node_id``, ``owner_epoch``,
    ``first_forward_mono`` .. ``last_forward_mono``, ``forwarded``); every
    SESSION_OWNER_ACQUIRED must be a write in the store's ``history`` by that node at that
    epoch; ``wire_repeats`` are the (direction, key phase, counter) the client saw twice."""
    report = Report()
    spans: Spans = defaultdict(dict)
    kinds = Counter(e.get("event_type") for e in events)
    for kind in sorted(k for k in kinds if str(k).startswith("SESSION_OWNER_")):
        report.counts[f"events: {kind}"] = kinds[kind]
    for e in events:
        if e.get("event_type") in ENDED and e.get("first_forward_mono") is not None:
            key = (e["node_id"], e["owner_epoch"])
            spans[e["session_id"]][key] = [e["first_forward_mono"], e["last_forward_mono"]]
            report.counts["packets forwarded in closed intervals"] += e["forwarded"]
    add_open_intervals(spans, events)
    check_spans(report, spans)
    report.counts["history writes"] = len(history)
    check_history(report, history)
    owners = {(h["sid"], h["epoch"], h["node"]) for h in history}
    for e in events:
        if e.get("event_type") == "SESSION_OWNER_ACQUIRED":
            if (e["session_id"], e["owner_epoch"], e["node_id"]) not in owners:
                text = f"{e['session_id'][:8]} epoch {e['owner_epoch']} by {e['node_id']}"
                report.violation("acquisition not in the store", text)
    repeats = list(wire_repeats)
    report.counts["(direction, key phase, counter) seen twice"] = len(repeats)
    for r in repeats[:10]:
        report.violation("nonce reuse", str(r))
    return report


def add_open_intervals(spans: Spans, events: list[Doc]) -> None:
    """The newest owner of each session that has not ended its interval owns it from its
    acquisition on (to +inf): every older interval must end before that. (An older owner
    killed -9 reports no end: its interval is unknown and left out.)"""
    newest: dict[str, Doc] = {}
    for e in events:
        if e.get("event_type") != "SESSION_OWNER_ACQUIRED":
            continue
        seen = newest.get(e["session_id"])
        if seen is None or e["owner_epoch"] > seen["owner_epoch"]:
            newest[e["session_id"]] = e
    for sid, e in newest.items():
        key = (e["node_id"], e["owner_epoch"])
        if key not in spans[sid]:
            spans[sid][key] = [e["mono"], math.inf]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: cluster_check.py DIR", file=sys.stderr)
        return 2
    report = check_dir(Path(argv[0]))
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
