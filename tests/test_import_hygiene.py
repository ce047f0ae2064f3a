"""Layering is checked, not hoped for (STYLE.md; DESIGN §2).

* ``tunnel.core`` is sans-I/O: importing it and every module in it loads no socket,
  asyncio, threading, selectors, pyroute2, pytun, UI module or ``tunnel.io``.
* ``tunnel`` never loads the UI (textual, rich, jvpn_tui), whatever module is imported.
* No file under ``tunnel/`` even names the UI in an import statement, and no file under
  ``tunnel/core/`` names an I/O module or the clock (``time``).
* The layout by program (DESIGN §2, issue 15): the core knows no program and no driver;
  ``io/`` holds drivers only; ``client`` and ``gateway`` never import each other;
  ``impair`` imports nothing else of ``tunnel``; ``jvpn_tui`` never reaches into
  ``tunnel.core`` or ``tunnel.io`` (it goes through ``tunnel.api``); no import cycles.

The runtime checks import in a fresh interpreter (``sys.executable -c``) one module at a
time, so a failure names the first module that pulled the forbidden one in, with the
import chain. Modules are discovered with ``pkgutil``, so a new module is covered without
editing this file. The detectors are themselves tested against synthetic offenders.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TUNNEL_DIR = REPO_ROOT / "tunnel"

UI_MODULES = ("textual", "rich", "jvpn_tui")
"""The engine never loads these (DESIGN §2: tunnel never imports the UI)."""

CORE_FORBIDDEN_AT_RUNTIME = (
    "socket",
    "asyncio",
    "threading",
    "selectors",
    "pyroute2",
    "pytun",
    "tunnel.io",
    *UI_MODULES,
)
"""Loaded by nothing that ``import tunnel.core.<anything>`` pulls in, directly or not."""

CORE_FORBIDDEN_IN_SOURCE = (*CORE_FORBIDDEN_AT_RUNTIME, "time")
"""Never named in an import statement under tunnel/core/. ``time`` is checked only in the
source: the interpreter itself loads it at start-up, so sys.modules cannot tell."""

# Runs in a fresh interpreter. Imports each module of the given packages one at a time
# (depth first, pkgutil order) and records which forbidden modules each one loaded first,
# with the chain of modules that were executing when the forbidden one was imported.
_PROBE = r"""
import importlib, importlib.abc, json, pkgutil, sys

cfg = json.loads(sys.argv[1])
sys.path[:0] = cfg["path"]
forbidden = cfg["forbidden"]

def match(name):
    for f in forbidden:
        if name == f or name.startswith(f + "."):
            return f
    return None

chains = {}
_SKIP = ("__main__", "importlib", "importlib._bootstrap", "importlib._bootstrap_external")

class Recorder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        f = match(fullname)
        if f is not None and f not in chains:
            chain, frame = [], sys._getframe(1)
            while frame is not None:
                name = frame.f_globals.get("__name__", "?")
                if name not in _SKIP and (not chain or chain[-1] != name):
                    chain.append(name)
                frame = frame.f_back
            chains[f] = list(reversed(chain)) + [fullname]
        return None

def loaded():
    return {f for f in map(match, list(sys.modules)) if f is not None}

out = {"baseline": sorted(loaded()), "visited": [], "offenders": {}, "errors": {}}
sys.meta_path.insert(0, Recorder())

def visit(name):
    before = loaded()
    try:
        module = importlib.import_module(name)
    except BaseException as exc:
        out["errors"][name] = f"{type(exc).__name__}: {exc}"
        return
    out["visited"].append(name)
    new = loaded() - before
    if new:
        out["offenders"][name] = {f: chains.get(f, [name, f]) for f in sorted(new)}
    for info in pkgutil.iter_modules(getattr(module, "__path__", None) or [], name + "."):
        if not info.name.endswith(".__main__"):
            visit(info.name)

for root in cfg["roots"]:
    visit(root)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class ProbeResult:
    baseline: list[str]
    """Forbidden modules already loaded before anything was imported."""
    visited: list[str]
    """Modules imported, in order."""
    offenders: dict[str, dict[str, list[str]]]
    """module -> {forbidden module it loaded first -> import chain}."""
    errors: dict[str, str]
    """module -> the exception its import raised."""


def probe(roots: list[str], forbidden: tuple[str, ...], path: list[str]) -> ProbeResult:
    """Import ``roots`` and everything below them in a fresh interpreter; report leaks."""
    config = {"roots": roots, "forbidden": list(forbidden), "path": path}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(config)],
        cwd=path[0],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"import probe crashed:\n{proc.stderr}"
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    return ProbeResult(**data)


def describe(result: ProbeResult) -> str:
    """One line per problem, naming the module at fault and how it got there."""
    lines = [f"interpreter start-up already loaded {m}" for m in result.baseline]
    lines += [f"{mod} failed to import: {err}" for mod, err in result.errors.items()]
    for mod, loaded in result.offenders.items():
        for forbidden, chain in loaded.items():
            lines.append(f"{mod} loads {forbidden} (via {' -> '.join(chain)})")
    return "\n".join(lines)


def assert_clean(result: ProbeResult, what: str) -> None:
    problems = describe(result)
    assert not problems, f"{what}:\n{problems}"


def python_modules(package_dir: Path, root: Path) -> set[str]:
    """Dotted names of every module and package below ``package_dir`` (``root`` on sys.path)."""
    names = set()
    for file in package_dir.rglob("*.py"):
        name, _ = module_name(file, root)
        if not name.endswith("__main__") and all(p.isidentifier() for p in name.split(".")):
            names.add(name)
    return names


# -- static check -------------------------------------------------------------------------


def module_name(file: Path, root: Path) -> tuple[str, bool]:
    """Dotted module name of ``file`` under ``root`` and whether it is a package."""
    rel = file.relative_to(root).with_suffix("")
    is_package = rel.name == "__init__"
    parts = rel.parts[:-1] if is_package else rel.parts
    return ".".join(parts), is_package


def imported_names(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``source``, relative ones resolved.

    Covers ``import x``, ``from x import y`` (both ``x`` and ``x.y``, since ``y`` may be a
    submodule), relative imports, and ``importlib.import_module("x")``/``__import__("x")``
    with a literal name.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    dynamic = ("__import__", "import_module")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package[: len(package) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if node.module:
                found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id in dynamic)
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def static_violations(
    source: str, module: str, is_package: bool, forbidden: tuple[str, ...]
) -> list[tuple[int, str]]:
    """(line, imported name) for each import in ``source`` of a forbidden module."""
    return sorted(
        {
            (line, name)
            for line, name in imported_names(source, module, is_package)
            if any(name == f or name.startswith(f + ".") for f in forbidden)
        }
    )


def scan_tree() -> list[str]:
    problems = []
    for file in sorted(TUNNEL_DIR.rglob("*.py")):
        module, is_package = module_name(file, REPO_ROOT)
        in_core = module == "tunnel.core" or module.startswith("tunnel.core.")
        forbidden = CORE_FORBIDDEN_IN_SOURCE if in_core else UI_MODULES
        source = file.read_text(encoding="utf-8")
        for line, name in static_violations(source, module, is_package, forbidden):
            rel = file.relative_to(REPO_ROOT)
            problems.append(f"{rel}:{line}: {module} imports {name}")
    return problems


# -- the checks on the real tree ------------------------------------------------------------


def test_core_imports_no_io_threads_or_ui() -> None:
    result = probe(["tunnel.core"], CORE_FORBIDDEN_AT_RUNTIME, [str(REPO_ROOT)])
    assert_clean(result, "tunnel.core must stay sans-I/O (STYLE: protocol core)")
    missed = python_modules(TUNNEL_DIR / "core", REPO_ROOT) - set(result.visited)
    assert not missed, f"not reached by package discovery (missing __init__.py?): {sorted(missed)}"


def test_tunnel_never_loads_the_ui() -> None:
    result = probe(["tunnel"], UI_MODULES, [str(REPO_ROOT)])
    assert_clean(result, "the engine (tunnel) must never load textual, rich or jvpn_tui")
    missed = python_modules(TUNNEL_DIR, REPO_ROOT) - set(result.visited)
    assert not missed, f"not reached by package discovery (missing __init__.py?): {sorted(missed)}"


def test_no_source_under_tunnel_names_a_forbidden_module() -> None:
    problems = scan_tree()
    assert not problems, "forbidden imports in tunnel/:\n" + "\n".join(problems)


# -- the detectors can fail ---------------------------------------------------------------


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    files = {
        "fakevpn/__init__.py": "",
        "fakevpn/core/__init__.py": "",
        "fakevpn/core/clean.py": "import struct\n",
        "fakevpn/core/leaky.py": "import socket\n",
        "fakevpn/core/via_helper.py": "from fakevpn import helper\n",
        "fakevpn/core/broken.py": "import fakevpn_no_such_module\n",
        "fakevpn/core/sub/__init__.py": "",
        "fakevpn/core/sub/deep.py": "import asyncio\n",
        "fakevpn/helper.py": "import fake_ui.widgets\n",
        "fake_ui/__init__.py": "",
        "fake_ui/widgets.py": "",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


def test_runtime_detector_names_the_offending_module(fake_tree: Path) -> None:
    forbidden = (*CORE_FORBIDDEN_AT_RUNTIME, "fake_ui")
    result = probe(["fakevpn.core"], forbidden, [str(fake_tree)])

    assert result.baseline == []
    assert "socket" in result.offenders["fakevpn.core.leaky"]
    assert result.offenders["fakevpn.core.leaky"]["socket"][0] == "fakevpn.core.leaky"
    assert "asyncio" in result.offenders["fakevpn.core.sub.deep"]  # found by recursion
    assert "fakevpn.core.clean" not in result.offenders
    # an indirect import is blamed on the core module, with the chain that led there
    chain = result.offenders["fakevpn.core.via_helper"]["fake_ui"]
    assert chain == ["fakevpn.core.via_helper", "fakevpn.helper", "fake_ui"]
    assert "fakevpn.core.broken" in result.errors
    assert python_modules(fake_tree / "fakevpn" / "core", fake_tree) == {
        "fakevpn.core",
        "fakevpn.core.clean",
        "fakevpn.core.leaky",
        "fakevpn.core.via_helper",
        "fakevpn.core.broken",
        "fakevpn.core.sub",
        "fakevpn.core.sub.deep",
    }

    message = describe(result)
    assert "fakevpn.core.leaky loads socket" in message
    assert "fakevpn.core.broken failed to import" in message
    with pytest.raises(AssertionError, match=r"fakevpn\.core\.leaky"):
        assert_clean(result, "synthetic")


def test_static_detector_catches_every_import_form() -> None:
    source = textwrap.dedent(
        """
        import json
        import textual.app
        from rich import console
        from .. import io
        from ..io.udp import UdpDriver
        from . import wire
        import time
        import importlib
        mod = importlib.import_module("jvpn_tui.app")
        """
    )
    found = static_violations(source, "tunnel.core.client", False, CORE_FORBIDDEN_IN_SOURCE)
    assert [line for line, _ in found] == [3, 4, 4, 5, 6, 6, 8, 10]
    names = {name for _, name in found}
    assert {"textual.app", "rich", "tunnel.io", "tunnel.io.udp", "time", "jvpn_tui.app"} <= names
    assert not any(name.startswith("tunnel.core") for name in names)

    # the same relative import from a package __init__ resolves one level lower
    init_found = static_violations("from .io import x\n", "tunnel", True, ("tunnel.io",))
    assert init_found == [(1, "tunnel.io"), (1, "tunnel.io.x")]


# -- the layout by program (issue 15; DESIGN §2) -------------------------------------------

LAYOUT_RULES: dict[str, tuple[str, ...]] = {
    "tunnel.core": (
        "tunnel.io", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair",
        "tunnel.api", "tunnel.observability", "tunnel.ownership",
    ),
    "tunnel.io": ("tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair", "tunnel.api"),
    "tunnel.observability": (
        "tunnel.io", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair",
        "tunnel.api",
    ),
    "tunnel.ownership": (
        "tunnel.io", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair",
        "tunnel.api",
    ),
    "tunnel.client": ("tunnel.gateway", "tunnel.impair"),
    "tunnel.gateway": ("tunnel.client", "tunnel.demo", "tunnel.impair", "tunnel.api"),
    "tunnel.impair": ("tunnel.",),
    "tunnel.api": ("tunnel.io", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair"),
    "tunnel.cli": (
        "tunnel.core", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair",
    ),
}  # fmt: skip
"""package -> what it never imports. The core is sans-I/O and knows no program; io/ holds
drivers only; the client and the gateway never import each other; the relay tool imports
nothing else of tunnel; the engine <-> UI contract names no program; the ``jvpn`` command
talks to programs only through their control socket (tunnel.control, tunnel.api)."""

UI_NEVER_IMPORTS = ("tunnel.core", "tunnel.io", "tunnel.gateway", "tunnel.impair")
"""jvpn_tui talks to the engine through tunnel.api (and starts it through tunnel.client /
tunnel.demo); it never reaches into the protocol core or the drivers."""

CLIENT_MAY_IMPORT_DEMO = {"tunnel.client.headless"}
"""The one place the client program chooses the demo (``--demo``); the engine itself never does."""


def _owner(module: str, rules: dict[str, tuple[str, ...]]) -> str | None:
    for package in rules:
        if module == package or module.startswith(package + "."):
            return package
    return None


def _imports_of(file: Path, root: Path) -> tuple[str, list[tuple[int, str]]]:
    module, is_package = module_name(file, root)
    return module, imported_names(file.read_text(encoding="utf-8"), module, is_package)


def layout_violations(root: Path, rules: dict[str, tuple[str, ...]]) -> list[str]:
    problems = []
    for file in sorted((root / "tunnel").rglob("*.py")):
        module, names = _imports_of(file, root)
        package = _owner(module, rules)
        if package is None:
            continue
        forbidden = rules[package]
        if package == "tunnel.client" and module not in CLIENT_MAY_IMPORT_DEMO:
            forbidden = (*forbidden, "tunnel.demo")
        for line, name in names:
            if any(
                name == f or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden
            ):
                if not (package == "tunnel.impair" and name.startswith("tunnel.impair")):
                    problems.append(f"{file.relative_to(root)}:{line}: {module} imports {name}")
    return sorted(set(problems))


def test_layout_rules_hold() -> None:
    problems = layout_violations(REPO_ROOT, LAYOUT_RULES)
    assert not problems, "layout rules broken:\n" + "\n".join(problems)


def test_the_ui_reaches_the_engine_only_through_the_contract() -> None:
    problems = []
    for file in sorted((REPO_ROOT / "jvpn_tui").rglob("*.py")):
        module, names = _imports_of(file, REPO_ROOT)
        for line, name in names:
            if any(name == f or name.startswith(f + ".") for f in UI_NEVER_IMPORTS):
                problems.append(f"{file.relative_to(REPO_ROOT)}:{line}: {module} imports {name}")
    assert not problems, "\n".join(sorted(set(problems)))


UI_CONTROL_MODULES = ("tunnel.control.remote", "tunnel.control.protocol")
"""The modules of tunnel.control the UI may import (``jvpn-tui --attach``: the remote engine
and the protocol's names); they reach the engine only through tunnel.api."""

UI_CONTROL_MAY_IMPORT = ("tunnel.api", *UI_CONTROL_MODULES)
"""What of tunnel those modules may import (and the ``tunnel.control`` package itself)."""


def _within(name: str, modules: tuple[str, ...]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def test_the_attached_ui_reaches_a_client_only_through_the_contract_and_the_protocol() -> None:
    problems = []
    for file in sorted((REPO_ROOT / "jvpn_tui").rglob("*.py")):
        module, names = _imports_of(file, REPO_ROOT)
        for line, name in names:
            if _within(name, ("tunnel.control",)) and not _within(name, UI_CONTROL_MODULES):
                problems.append(f"{file.relative_to(REPO_ROOT)}:{line}: {module} imports {name}")
    for ui_module in UI_CONTROL_MODULES:
        file = REPO_ROOT / (ui_module.replace(".", "/") + ".py")
        module, names = _imports_of(file, REPO_ROOT)
        for line, name in names:
            allowed = name == "tunnel.control" or _within(name, UI_CONTROL_MAY_IMPORT)
            if _within(name, ("tunnel",)) and not allowed:
                problems.append(f"{file.relative_to(REPO_ROOT)}:{line}: {module} imports {name}")
    assert not problems, "\n".join(sorted(set(problems)))
    forbidden = ("tunnel.io", "tunnel.client", "tunnel.gateway", "tunnel.demo", "tunnel.impair")
    result = probe(list(UI_CONTROL_MODULES), (*forbidden, *UI_MODULES), [str(REPO_ROOT)])
    assert_clean(result, "what the attached UI imports must stay off the programs and drivers")


def import_graph(root: Path, top: str = "tunnel") -> dict[str, set[str]]:
    """module -> modules of ``top`` it imports (any import statement, TYPE_CHECKING-only
    imports excluded: they never execute). ``from pkg import name`` counts as an import of
    ``pkg.name`` when that is a module, else of ``pkg``."""
    files = {module_name(f, root)[0]: f for f in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, file in files.items():
        is_package = file.name == "__init__.py"
        tree = ast.parse(file.read_text(encoding="utf-8"))
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for stmt in node.body
            for n in ast.walk(stmt)
        }
        edges = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = imported_names(ast.unparse(node), module, is_package)
            if isinstance(node, ast.ImportFrom):
                # ``from pkg import sub`` imports the submodule; ``from pkg import name``, pkg
                base = names[0][1] if node.module else names[0][1].rpartition(".")[0]
                subs = [n for _, n in names if n in files and n != base]
                names = [(0, n) for n in subs] or [(0, base)]
            for _, name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    edges.add(name)
        graph[module] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_in_tunnel() -> None:
    found = cycles(import_graph(REPO_ROOT))
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_layout_and_cycle_detectors_can_fail(tmp_path: Path) -> None:
    files = {
        "tunnel/__init__.py": "",
        "tunnel/client/__init__.py": "",
        "tunnel/client/engine.py": "from tunnel.gateway.runtime import X\n",
        "tunnel/gateway/__init__.py": "",
        "tunnel/gateway/runtime.py": "from tunnel.gateway import thread\n",
        "tunnel/gateway/thread.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from tunnel.client import engine\n"
            "import tunnel.gateway.runtime\n"
        ),
        "tunnel/impair/__init__.py": "",
        "tunnel/impair/relay.py": "from tunnel.impair import net\nfrom tunnel.core import wire\n",
        "tunnel/impair/net.py": "",
    }
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    problems = layout_violations(tmp_path, LAYOUT_RULES)
    assert problems == [
        "tunnel/client/engine.py:1: tunnel.client.engine imports tunnel.gateway.runtime",
        "tunnel/client/engine.py:1: tunnel.client.engine imports tunnel.gateway.runtime.X",
        "tunnel/gateway/thread.py:3: tunnel.gateway.thread imports tunnel.client",
        "tunnel/gateway/thread.py:3: tunnel.gateway.thread imports tunnel.client.engine",
        "tunnel/impair/relay.py:2: tunnel.impair.relay imports tunnel.core",
        "tunnel/impair/relay.py:2: tunnel.impair.relay imports tunnel.core.wire",
    ]
    assert cycles(import_graph(tmp_path)) == [["tunnel.gateway.runtime", "tunnel.gateway.thread"]]
