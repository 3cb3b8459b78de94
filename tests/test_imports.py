"""gpudoctor's imports flow one way (docs/architecture.md): no circle, no import against the layer order, no
``try: import ... except ImportError`` around gpudoctor's own modules.

The package's import graph is read from the source (ast), with imports inside functions included; imports
under ``if TYPE_CHECKING:`` are for annotations, never run, and are left out. ``from pkg import name``
counts as an import of ``pkg.name`` when that is a module, else of ``pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"gpudoctor": ROOT / "gpudoctor", "gpudoctor.analyzers": ROOT / "analyzers",
            "gpudoctor.dashboards": ROOT / "dashboards"}

# Layers, lowest first: a module may import modules of its own layer or of a lower one. The first prefix
# that matches a module names its layer (longest prefixes are listed first where they overlap).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("gpudoctor", "gpudoctor.errors", "gpudoctor.progress", "gpudoctor.annotate", "gpudoctor.crash",
              "gpudoctor.store.atomic", "gpudoctor.readers.limits")),
    ("model", ("gpudoctor.model",)),
    ("collect", ("gpudoctor.collect",)),
    ("readers", ("gpudoctor.readers", "gpudoctor.store")),
    ("analyzers", ("gpudoctor.analyzers",)),
    ("pipeline", ("gpudoctor.pipeline", "gpudoctor.parallel")),
    ("outputs", ("gpudoctor.render", "gpudoctor.gate", "gpudoctor.dashboards")),
    ("cli", ("gpudoctor.cli", "gpudoctor.__main__")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}
# Analyzers are pure functions of the trace model: of the lower layers they see only the model.
ANALYZERS_MAY_IMPORT = {"base", "model", "analyzers"}


def layer_of(module: str) -> str:
    best, best_len = "", -1
    for name, prefixes in LAYERS:
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = name, len(p)
    assert best, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return best


def modules() -> dict[str, Path]:
    out = {}
    for pkg, base in PACKAGES.items():
        for f in base.rglob("*.py"):
            parts = [p for p in f.relative_to(base).with_suffix("").parts if p != "__init__"]
            if pkg == "gpudoctor" and parts and parts[0] in ("analyzers", "dashboards"):
                continue  # symlinks some checkouts have; the real packages are listed above
            out[".".join([pkg, *parts])] = f
    return out


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _catches_import_error(node: ast.Try) -> bool:
    names = set()
    for h in node.handlers:
        for t in (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]):
            if isinstance(t, ast.Name):
                names.add(t.id)
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported gpudoctor module, line, inside a try/except ImportError) of every import in ``path``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, int, bool]] = []

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, guarded: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            in_guard = guarded or (isinstance(node, ast.Try) and child in node.body and _catches_import_error(node))
            targets: list[str] = []
            if isinstance(child, ast.Import):
                targets = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in child.names]
            for t in targets:
                if t.startswith("gpudoctor"):
                    m = resolve(t)
                    if m and m != name:
                        found.append((m, child.lineno, in_guard))
            visit(child, in_guard)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


KNOWN = modules()
EDGES = {name: imports(name, path, KNOWN) for name, path in KNOWN.items()}


def test_the_walker_sees_function_level_imports():
    """The graph is not empty and includes an import made inside a function (cli/main loads commands lazily,
    dashboards import dash lazily: both are how imports inside functions look)."""
    assert len(KNOWN) > 60
    assert "gpudoctor.model.trace" in {m for m, _, _ in EDGES["gpudoctor.readers.nsys"]}
    assert any(m == "gpudoctor.dashboards.app" for m, _, _ in EDGES["gpudoctor.cli.dashboard"])


def test_no_import_circle():
    graph = {a: sorted({m for m, _, _ in e}) for a, e in EDGES.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in graph.get(v, []):
            if state.get(w) == 1:
                cycles.append(stack[stack.index(w):] + [w])
            elif w not in state:
                dfs(w)
        stack.pop()
        state[v] = 2

    for v in sorted(graph):
        if v not in state:
            dfs(v)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_follow_the_layers():
    bad = []
    for a, edges in EDGES.items():
        la = layer_of(a)
        for m, line, _ in edges:
            lm = layer_of(m)
            if RANK[lm] > RANK[la] or (la == "analyzers" and lm not in ANALYZERS_MAY_IMPORT):
                bad.append(f"{KNOWN[a].relative_to(ROOT)}:{line}: {a} ({la}) imports {m} ({lm})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_error_guard_around_own_modules():
    bad = [f"{KNOWN[a].relative_to(ROOT)}:{line}: {m}" for a, edges in EDGES.items() for m, line, g in edges if g]
    assert not bad, "try/except ImportError around gpudoctor's own modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("module, layer", [
    ("gpudoctor.errors", "base"), ("gpudoctor.store.atomic", "base"), ("gpudoctor.readers.limits", "base"),
    ("gpudoctor.readers.boundary", "readers"), ("gpudoctor.store.rundb", "readers"),
    ("gpudoctor.model.trace", "model"), ("gpudoctor.analyzers.runner", "analyzers"),
    ("gpudoctor.parallel", "pipeline"), ("gpudoctor.gate.compare", "outputs"), ("gpudoctor.cli.main", "cli"),
])
def test_layer_of(module, layer):
    assert layer_of(module) == layer


def test_a_back_edge_is_caught(tmp_path):
    """The check fails on a real back-edge: the model importing a reader."""
    f = tmp_path / "m.py"
    f.write_text("def short():\n    from gpudoctor.readers.kineto import read\n")
    [(m, line, guarded)] = imports("gpudoctor.model.m", f, KNOWN)
    assert (m, line, guarded) == ("gpudoctor.readers.kineto", 2, False)
    assert RANK[layer_of(m)] > RANK[layer_of("gpudoctor.model.m")]
    f.write_text("try:\n    import gpudoctor.analyzers.registry\nexcept ImportError:\n    pass\n")
    assert imports("gpudoctor.pipeline", f, KNOWN) == [("gpudoctor.analyzers.registry", 2, True)]


def test_docs_list_the_same_layers():
    """docs/architecture.md's layer table names these layers in this order."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = doc[doc.index("| layer (lowest first) | modules |"):].split("\n\n")[0]
    names = [row.split("|")[1].strip() for row in table.splitlines()[2:]]
    assert names == [name for name, _ in LAYERS]
