"""Structure is checked, not hoped for (issue 15; STYLE.md "Composition, not mixins").

* **Components own their state.** Code assigns attributes only on ``self`` (or ``cls``), or
  on a plain *record* (a dataclass, NamedTuple or ``__slots__`` class without behaviour
  methods). Writing an attribute of another component — ``self.paths[1].validated = True``,
  ``s.binding = None`` from outside ``s``'s class — fails here: call a method of the owner.
  The owner's type is read from annotations (``self.x: T``, ``x: T`` parameters,
  ``x = T(...)``, iteration over annotated containers); a write whose target type cannot be
  told fails too, so the answer is always "annotate it", never a guess.
* **No mixins, no borrowed state.** No class named ``*Mixin``; no ``if TYPE_CHECKING:``
  block under ``tunnel/core`` declares anything but imports.
* **Small functions.** radon's cyclomatic complexity of every function and method under
  ``tunnel/`` is at most ``MAX_COMPLEXITY``.

The checkers are themselves tested against synthetic offenders at the bottom of the file.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TUNNEL_DIR = REPO_ROOT / "tunnel"

MAX_COMPLEXITY = 15
"""Issue 15: no function in tunnel/ above radon cc 15."""

EXTERNAL_WRITES: dict[str, str] = {
    "tunnel/core/handshake.py": (
        "restores noiseprotocol's own HandshakeState/SymmetricState objects from a"
        " snapshot (the library has no API for it); not a component of ours"
    ),
}
"""Files allowed to write attributes of third-party objects, with the reason."""


# -- the model of classes ----------------------------------------------------------------


def _type_name(node: ast.expr | None) -> tuple[str | None, str | None]:
    """(type, element type) named by an annotation: ``T | None`` -> T; ``dict[K, V]`` ->
    (dict, V); ``list[T]``/``deque[T]``/``set[T]`` -> (list, T); else the last dotted name."""
    if node is None:
        return None, None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            node = ast.parse(node.value, mode="eval").body
        except SyntaxError:
            return None, None
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        for side in (node.left, node.right):
            if not (isinstance(side, ast.Constant) and side.value is None):
                return _type_name(side)
        return None, None
    if isinstance(node, ast.Subscript):
        outer, _ = _type_name(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Optional":
            return _type_name(args[0])
        elem, _ = _type_name(args[-1])
        return outer, elem
    if isinstance(node, ast.Name):
        return node.id, None
    if isinstance(node, ast.Attribute):
        return node.attr, None
    return None, None


@dataclass
class ClassInfo:
    name: str
    path: str
    record: bool
    attrs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)


def _is_record(cls: ast.ClassDef) -> bool:
    decorated = any(
        (isinstance(d, ast.Name) and d.id == "dataclass")
        or (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "dataclass")
        for d in cls.decorator_list
    )
    named_tuple = any(getattr(b, "id", None) == "NamedTuple" for b in cls.bases)
    slots = any(
        isinstance(s, ast.Assign) and any(getattr(t, "id", None) == "__slots__" for t in s.targets)
        for s in cls.body
    )
    methods = [
        f
        for f in cls.body
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        and not (f.name.startswith("__") and f.name.endswith("__"))
        and not any(getattr(d, "id", None) == "property" for d in f.decorator_list)
    ]
    return (decorated or named_tuple or slots) and not methods


def _self_attr(node: ast.expr) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id in ("self", "cls")
    ):
        return node.attr
    return None


def _collect(paths: list[Path]) -> dict[str, ClassInfo]:
    classes: dict[str, ClassInfo] = {}
    trees = {p: ast.parse(p.read_text()) for p in paths}
    for p, tree in trees.items():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            classes[cls.name] = ClassInfo(cls.name, str(p), _is_record(cls))
    for tree in trees.values():
        for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
            info = classes[cls.name]
            for stmt in cls.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    info.attrs[stmt.target.id] = _type_name(stmt.annotation)
            methods = (n for n in cls.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
            for fn in methods:
                params = {a.arg: _type_name(a.annotation) for a in _all_args(fn)}
                for node in ast.walk(fn):
                    if isinstance(node, ast.AnnAssign) and (attr := _self_attr(node.target)):
                        info.attrs[attr] = _type_name(node.annotation)
                    elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                        attr = _self_attr(node.targets[0])
                        if attr is None or attr in info.attrs:
                            continue
                        typ = _value_type(node.value, params, classes)
                        if typ[0] is not None:
                            info.attrs[attr] = typ
                if fn.name in ("__init__", "__post_init__"):
                    continue
                if any(getattr(d, "id", None) == "property" for d in fn.decorator_list):
                    info.attrs.setdefault(fn.name, _type_name(fn.returns))
    return classes


def _all_args(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.arg]:
    a = fn.args
    return [*a.posonlyargs, *a.args, *a.kwonlyargs, *([a.vararg] if a.vararg else [])]


def _value_type(
    value: ast.expr,
    env: dict[str, tuple[str | None, str | None]],
    classes: dict[str, ClassInfo],
) -> tuple[str | None, str | None]:
    if isinstance(value, ast.Call):
        func = value.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        if name in classes:
            return name, None
    if isinstance(value, ast.Name) and value.id in env:
        return env[value.id]
    return None, None


# -- the write checker -------------------------------------------------------------------


@dataclass(frozen=True)
class Write:
    path: str
    line: int
    target: str
    why: str


class _FunctionChecker:
    def __init__(self, cls: ClassInfo | None, classes: dict[str, ClassInfo], path: str) -> None:
        self.cls = cls
        self.classes = classes
        self.path = path
        self.env: dict[str, tuple[str | None, str | None]] = {}

    def type_of(self, node: ast.expr) -> tuple[str | None, str | None]:
        if isinstance(node, ast.Name):
            if node.id in ("self", "cls") and self.cls is not None:
                return self.cls.name, None
            return self.env.get(node.id, (None, None))
        if isinstance(node, ast.Attribute):
            owner, _ = self.type_of(node.value)
            info = self.classes.get(owner or "")
            if info is not None and node.attr in info.attrs:
                return info.attrs[node.attr]
            return None, None
        if isinstance(node, ast.Subscript):
            _, elem = self.type_of(node.value)
            return elem, None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("get", "pop", "setdefault"):
                _, elem = self.type_of(node.func.value)
                return elem, None
            if node.func.attr in ("values",):
                _, elem = self.type_of(node.func.value)
                return "list", elem
        return _value_type(node, self.env, self.classes)

    def bind(self, target: ast.expr, typ: tuple[str | None, str | None]) -> None:
        if isinstance(target, ast.Name) and typ[0] is not None:
            self.env[target.id] = typ

    def check(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> Iterator[Write]:
        for a in _all_args(fn):
            self.env[a.arg] = _type_name(a.annotation)
        for node in _walk_in_order(fn):
            if isinstance(node, ast.Assign):
                if len(node.targets) == 1:
                    self.bind(node.targets[0], self.type_of(node.value))
                targets = node.targets
            elif isinstance(node, ast.AnnAssign):
                self.bind(node.target, _type_name(node.annotation))
                targets = [node.target]
            elif isinstance(node, ast.AugAssign):
                targets = [node.target]
            elif isinstance(node, ast.For | ast.AsyncFor):
                _, elem = self.type_of(node.iter)
                self.bind(node.target, (elem, None))
                continue
            elif isinstance(node, ast.NamedExpr):
                self.bind(node.target, self.type_of(node.value))
                continue
            else:
                continue
            for t in targets:
                yield from self._check_target(t)

    def _check_target(self, target: ast.expr) -> Iterator[Write]:
        for sub in ast.walk(target):
            if not (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)):
                continue
            if isinstance(sub.value, ast.Name) and sub.value.id in ("self", "cls"):
                continue
            owner, _ = self.type_of(sub.value)
            text = ast.unparse(sub)
            info = self.classes.get(owner or "")
            if owner is None:
                if self.path not in EXTERNAL_WRITES:
                    yield Write(self.path, sub.lineno, text, "owner's type unknown (annotate it)")
            elif info is None or info.record:
                continue  # a third-party object or a plain record
            elif self.cls is None or info.name != self.cls.name:
                yield Write(self.path, sub.lineno, text, f"writes state owned by {info.name}")


def _walk_in_order(fn: ast.AST) -> Iterator[ast.AST]:
    """Statements and expressions of ``fn`` in source order, not entering nested defs."""
    for child in ast.iter_child_nodes(fn):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            continue
        yield child
        yield from _walk_in_order(child)


def foreign_writes(paths: list[Path], root: Path) -> list[Write]:
    classes = _collect(paths)
    out: list[Write] = []
    for p in paths:
        rel = str(p.relative_to(root))
        tree = ast.parse(p.read_text())
        for top in tree.body:
            if isinstance(top, ast.ClassDef):
                info = classes[top.name]
                for fn in top.body:
                    if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                        out.extend(_FunctionChecker(info, classes, rel).check(fn))
            elif isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef):
                out.extend(_FunctionChecker(None, classes, rel).check(top))
    return out


def _tunnel_files() -> list[Path]:
    return sorted(TUNNEL_DIR.rglob("*.py"))


def test_no_module_writes_another_components_state() -> None:
    bad = foreign_writes(_tunnel_files(), REPO_ROOT)
    assert not bad, "\n".join(f"{w.path}:{w.line}: {w.target}: {w.why}" for w in bad)


# -- mixins, borrowed state, complexity --------------------------------------------------


def test_no_mixin_classes() -> None:
    found = [
        f"{p.relative_to(REPO_ROOT)}:{n.lineno}: class {n.name}"
        for p in _tunnel_files()
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ClassDef) and n.name.endswith("Mixin")
    ]
    assert not found, found


def borrowed_state_blocks(source: str) -> list[int]:
    """Lines of ``if TYPE_CHECKING:`` blocks that declare anything but imports."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Name)
            and node.test.id == "TYPE_CHECKING"
            and any(not isinstance(s, ast.Import | ast.ImportFrom) for s in node.body)
        ):
            lines.append(node.lineno)
    return lines


def test_no_type_checking_blocks_declare_borrowed_state_in_core() -> None:
    found = {
        str(p.relative_to(REPO_ROOT)): lines
        for p in sorted((TUNNEL_DIR / "core").rglob("*.py"))
        if (lines := borrowed_state_blocks(p.read_text()))
    }
    assert not found, found


def test_every_function_in_tunnel_is_at_most_complexity_15() -> None:
    radon_complexity = pytest.importorskip("radon.complexity")
    over = []
    for p in _tunnel_files():
        for block in radon_complexity.cc_visit(p.read_text()):
            items = [block, *getattr(block, "methods", [])]
            for item in items:
                if item.complexity > MAX_COMPLEXITY and not hasattr(item, "methods"):
                    over.append(f"{p.relative_to(REPO_ROOT)}:{item.lineno} {item.fullname}"
                                f" = {item.complexity}")  # fmt: skip
    assert not over, "\n".join(over)


# -- the checkers catch what they claim to catch -----------------------------------------


def _writes_in(tmp_path: Path, source: str) -> list[Write]:
    p = tmp_path / "mod.py"
    p.write_text(source)
    return foreign_writes([p], tmp_path)


def test_checker_flags_a_write_into_another_component(tmp_path: Path) -> None:
    source = """
class Path:
    def __init__(self) -> None:
        self.validated = False
    def validate(self) -> None:
        self.validated = True

class Session:
    def __init__(self) -> None:
        self.paths: dict[int, Path] = {}
        self.active = Path()
    def a(self) -> None:
        self.paths[1].validated = True
    def b(self) -> None:
        for p in self.paths.values():
            p.validated = False
    def c(self, p: Path) -> None:
        p.validated = True
    def d(self) -> None:
        self.active.validated = True
    def fine(self) -> None:
        self.paths[1].validate()
        self.active = Path()
"""
    bad = _writes_in(tmp_path, source)
    assert [w.line for w in bad] == [13, 16, 18, 20], bad
    assert all("owned by Path" in w.why for w in bad)


def test_checker_allows_records_and_flags_unknown_owners(tmp_path: Path) -> None:
    source = """
from dataclasses import dataclass

@dataclass
class Counters:
    sent: int = 0

class Runtime:
    def __init__(self) -> None:
        self.counters = Counters()
    def send(self, thing) -> None:
        self.counters.sent += 1
        thing.x = 1
"""
    bad = _writes_in(tmp_path, source)
    assert [(w.line, w.why) for w in bad] == [(13, "owner's type unknown (annotate it)")]


def test_checker_sees_borrowed_state_blocks() -> None:
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from x import Y
class A:
    if TYPE_CHECKING:  # provided by B
        def _send(self) -> None: ...
"""
    assert borrowed_state_blocks(source) == [6]
