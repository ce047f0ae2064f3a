#!/usr/bin/env python3
"""Run a Python module with a memory probe thread: what ``bench/soak.py --trace-objects`` uses.

    python bench/soak_probe.py OUT EVERY BASELINE FRAMES -m MODULE [ARGS...]

Runs MODULE as ``__main__`` (``sys.argv`` = MODULE ARGS) with a daemon thread that every
EVERY seconds appends to the file OUT one JSON line: ``t`` (seconds since start),
``blocks`` (``sys.getallocatedblocks()``: pymalloc blocks in use), ``objects``
(``len(gc.get_objects())``), ``types`` (the 15 object types whose count changed most
since the baseline, taken at BASELINE seconds) and pymalloc's own accounting from
``sys._debugmallocstats()``: ``arenas`` (allocated now), ``arenas_max`` (high-water
mark), ``used`` (bytes in allocated blocks), ``free_blocks`` (bytes in free blocks of
pools in use), ``free_pools`` (pools in an arena that hold nothing), ``classes`` (block
size -> [pools, blocks in use]), ``tuple_freelist`` and ``tuple_freelist_bytes`` (tuples
CPython keeps for reuse: allocated as far as pymalloc knows; only a full collection empties
them). With FRAMES > 0
tracemalloc runs too (that many frames): ``traced`` (current bytes) and ``top``, the 15
tracebacks whose size and count grew most since the baseline snapshot (size and count deltas, the
three innermost frames); it costs CPU and memory (it roughly doubles the client's), so use
it to find what grows, not for the RSS table of record.
"""

from __future__ import annotations

import gc
import json
import os
import re
import runpy
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

MALLOC_FIELDS = {
    "arenas": r"# arenas allocated current\s*=\s*([\d,]+)",
    "arenas_max": r"# arenas highwater mark\s*=\s*([\d,]+)",
    "used": r"# bytes in allocated blocks\s*=\s*([\d,]+)",
    "free_blocks": r"# bytes in available blocks\s*=\s*([\d,]+)",
    "free_pools": r"(\d+) unused pools \*",
}


def malloc_stats() -> dict[str, Any]:
    """pymalloc's totals: ``sys._debugmallocstats()`` writes them to fd 2, read back here."""
    with tempfile.TemporaryFile("w+") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read()
    out: dict[str, Any] = {
        "classes": {  # block size -> [pools, blocks in use]
            int(m.group(1)): [int(m.group(2)), int(m.group(3))]
            for m in re.finditer(r"^\s+\d+\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+$", text, re.M)
        }
    }
    tuples = re.findall(r"(\d+) free (\d+)-sized PyTupleObjects \* (\d+) bytes", text)
    out["tuple_freelists"] = {int(size): int(n) for n, size, _ in tuples if int(n)}
    out["tuple_freelist"] = sum(int(n) for n, _, _ in tuples)
    out["tuple_freelist_bytes"] = sum(int(n) * int(b) for n, _, b in tuples)
    for key, pattern in MALLOC_FIELDS.items():
        found = re.search(pattern, text)
        out[key] = int(found.group(1).replace(",", "")) if found else -1
    return out


LEAVES = bool(os.environ.get("SOAK_PROBE_LEAVES"))


def type_counts() -> Counter[str]:
    return Counter(type(o).__qualname__ for o in gc.get_objects())


def leaf_values(*skip: object) -> Counter[str]:
    """Objects gc does not track (str, bytes, int, float; and dicts and tuples holding only
    those), reached from tracked containers, counted by type, length and first characters
    together with the type of the container that holds them: ``types`` cannot see them.
    The probe's own containers (``skip``, and this function's) are left out."""
    seen: set[int] = set()
    out: Counter[str] = Counter()
    mine = {id(seen), id(out), *(id(o) for o in skip)}
    mine.add(id(mine))
    stack = [(o, type(o).__qualname__) for o in gc.get_objects() if id(o) not in mine]
    while stack:
        holder, holder_type = stack.pop()
        for ref in gc.get_referents(holder):
            if id(ref) in seen or gc.is_tracked(ref):
                continue
            seen.add(id(ref))
            kind = type(ref)
            if kind in (dict, tuple):
                stack.append((ref, f"{holder_type}>{kind.__name__}"))
            elif kind in (str, bytes):
                out[f"{holder_type}: {kind.__name__}[{len(ref) // 16 * 16}+] {ref[:20]!r}"] += 1
            else:
                out[f"{holder_type}: {kind.__name__}"] += 1
    return out


def top_growth(base: tracemalloc.Snapshot, limit: int = 15) -> list[dict[str, Any]]:
    snap = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, __file__, all_frames=True),
        ]
    )
    grew = [s for s in snap.compare_to(base, "traceback") if s.count_diff > 0 and s.size_diff > 0]
    grew.sort(key=lambda s: -s.size_diff)  # what accumulates, not what came and went
    rows = []
    for stat in grew[:limit]:
        frames = [f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in stat.traceback[-3:]]
        rows.append({"size": stat.size_diff, "count": stat.count_diff, "where": frames})
    return rows


def probe(out: str, every: float, baseline_at: float) -> None:
    start = time.monotonic()
    base_types: Counter[str] | None = None
    base_leaves: Counter[str] | None = None
    base_snap: tracemalloc.Snapshot | None = None
    while True:
        time.sleep(every)
        t = time.monotonic() - start
        found = gc.collect() if os.environ.get("SOAK_PROBE_COLLECT") else -1
        garbage = Counter(type(o).__qualname__ for o in gc.garbage)
        gc.garbage.clear()
        counts = type_counts()
        line: dict[str, Any] = {
            "t": round(t),
            "blocks": sys.getallocatedblocks(),
            "objects": sum(counts.values()),
            "collected": found,
            "full_gcs": gc.get_stats()[2]["collections"],
            "full_gc_freed": gc.get_stats()[2]["collected"],
            "garbage": garbage.most_common(12),
            **malloc_stats(),
        }
        tracing = tracemalloc.is_tracing()
        leaves = leaf_values(counts, base_types, base_leaves) if LEAVES else Counter()
        if base_types is None and t >= baseline_at:
            base_types, base_leaves = counts, leaves
            base_snap = tracemalloc.take_snapshot() if tracing else None
        if base_types is not None:
            diff = counts.copy()
            diff.subtract(base_types)
            line["types"] = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:15]
            assert base_leaves is not None
            grown = leaves.copy()
            grown.subtract(base_leaves)
            line["leaves"] = sorted(grown.items(), key=lambda kv: -kv[1])[:15]
        if tracing:
            line["traced"] = tracemalloc.get_traced_memory()[0]
        if base_snap is not None:
            line["top"] = top_growth(base_snap)
        with open(out, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def main() -> None:
    out, every, baseline_at, frames, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit(__doc__)
    if os.environ.get("SOAK_PROBE_COLLECT") == "saveall":
        gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector frees, by type, in "garbage"
    if int(frames) > 0:
        tracemalloc.start(int(frames))
    threading.Thread(
        target=probe, args=(out, float(every), float(baseline_at)), daemon=True
    ).start()
    sys.argv = [module, *rest]
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # this checkout's tunnel/, as -m
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
