"""The package's import graph: no circle anywhere in fastglow/ (library, app/ and testing/), and the kernel layer
imports nothing from above it (fastglow/kernels/ may import only its own files, torch, triton and the standard
library)."""

import ast
from pathlib import Path

import fastglow

ROOT = Path(fastglow.__file__).parent


def _module_name(path: Path) -> str:
    parts = ("fastglow",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules) -> set[str]:
    """Every fastglow module ``path`` imports, at module level or inside a function (lazy imports count);
    ``from package import name`` imports the module package.name where there is one, else the package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            named = {f"{target}.{a.name}" for a in node.names}
            found |= (named & modules) or {target}
    return {m for m in found if m == "fastglow" or m.startswith("fastglow.")}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in _imports(path, set(files)) if m in files and m != name}
            for name, path in files.items()}


def _cycle(graph):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_fastglow():
    """Anywhere in fastglow/: the library, the app (`fastglow` command) and testing/ (lazy imports count)."""
    graph = _graph()
    assert len(graph) > 40
    assert {"fastglow.backends.triton", "fastglow.app.loop", "fastglow.testing.workloads"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_circle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_from_above_them():
    for name, deps in _graph().items():
        if name.startswith("fastglow.kernels"):
            outside = {d for d in deps if not d.startswith("fastglow.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"
