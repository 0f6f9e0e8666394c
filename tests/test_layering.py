"""The package's structure, read from its source with ``ast``: layers point down, no import
cycles between files (imports inside functions included), no private names across modules,
no function over 80 lines. See docs/architecture.md."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

#: top-level part of the package -> layer; a module may import its own layer or below
LAYERS = {
    "errors": 0, "registry": 0, "utils": 0, "progress": 0, "config": 0, "distributed": 0, "_version": 0,
    "data": 1, "models": 1, "losses": 1,
    "eval": 2,
    "index": 3, "search": 3, "train": 3, "synthesis": 3,
    "cli": 4, "serve": 4, "demo": 4, "__main__": 4, "": 4,  # "": the package's own __init__ (public API)
}
#: within layer 3, who may use whom (search answers queries against indexes it does not build)
PEERS_FORBIDDEN = {"index": {"search", "train", "synthesis"}, "search": {"train", "synthesis"},
                   "train": {"search", "synthesis"}}
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in (SRC / "xmodal").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (annotations only, never executed)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _resolve(name: str) -> str | None:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i])
    return None


def _imports(module: str) -> list[tuple[int, str, str | None]]:
    """(line, imported module, imported name or None) for every xmodal import in ``module``."""
    path, is_pkg = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, r, None) for a in node.names if (r := _resolve(a.name))]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not source.startswith("xmodal"):
                continue
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in MODULES:
                    out.append((node.lineno, sub, None))
                elif (r := _resolve(source)) is not None:
                    out.append((node.lineno, r, a.name))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layering_every_module_has_a_layer():
    missing = sorted({_part(m) for m in MODULES} - set(LAYERS))
    assert not missing, f"give these parts of the package a layer in tests/test_layering.py: {missing}"


def test_layering_imports_point_down():
    bad = []
    for module in MODULES:
        mine = _part(module)
        for line, target, _ in _imports(module):
            theirs = _part(target)
            if theirs == mine:
                continue
            if LAYERS[theirs] > LAYERS[mine] or theirs in PEERS_FORBIDDEN.get(mine, ()):
                bad.append(f"{MODULES[module][0].relative_to(SRC)}:{line}: {module} (layer {LAYERS[mine]}) "
                           f"imports {target} (layer {LAYERS[theirs]})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_layering_no_import_cycles_between_files():
    edges = {m: {t for _, t, _ in _imports(m) if t != m} for m in MODULES}
    assert not _cycles(edges), f"import cycles (imports inside functions count): {_cycles(edges)}"


def test_layering_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_layering_no_private_names_across_modules():
    bad = []
    for module in MODULES:
        for line, target, name in _imports(module):
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                bad.append(f"{MODULES[module][0].relative_to(SRC)}:{line}: {name} from {target}")
    assert not bad, "private names imported from other modules (make them public or move them):\n" + "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layering_no_function_over_80_lines(module):
    tree = ast.parse(MODULES[module][0].read_text(encoding="utf-8"))
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: split these functions: {long}"
