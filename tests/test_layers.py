"""The package's import structure, read from the source (ast), so a wrong arrow fails here and not at runtime.

* no objective module imports another objective module (they share ``objectives/shared/`` and ``base``);
* no import cycle between the package's modules (lazy imports inside functions count too);
* lower layers do not import upper ones: ``config``, ``llm/``, ``decoding/`` and ``data/`` import neither
  ``objectives/`` nor ``models/``, and ``objectives/`` does not import ``models/``.

``python tests/test_layers.py`` prints the counts.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "nemo_ctcllm"
LOWER = ("nemo_ctcllm.config", "nemo_ctcllm.llm", "nemo_ctcllm.decoding", "nemo_ctcllm.data")
UPPER = ("nemo_ctcllm.objectives", "nemo_ctcllm.models")


def module_files() -> Dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports (``from a.b import c`` counts as a.b.c when c is a module)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> Dict[str, Set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def objective_modules(graph) -> Set[str]:
    """Modules in objectives/ that define objectives: not the package, ``base`` or ``shared``."""
    return {
        m
        for m in graph
        if m.count(".") == 2 and under(m, "nemo_ctcllm.objectives") and m.rsplit(".", 1)[1] not in ("base", "shared")
    }


def cycles(graph) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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


def objective_to_objective(graph) -> List[Tuple[str, str]]:
    objs = objective_modules(graph)
    shared = {m for m in graph if under(m, "nemo_ctcllm.objectives.shared")}
    return sorted((a, b) for a in objs | shared for b in graph[a] if b in objs)


def upward(graph) -> List[Tuple[str, str]]:
    bad = [
        (a, b)
        for a in graph
        for b in graph[a]
        if any(under(a, low) for low in LOWER) and any(under(b, up) for up in UPPER)
    ]
    bad += [
        (a, b) for a in graph for b in graph[a] if under(a, "nemo_ctcllm.objectives") and under(b, "nemo_ctcllm.models")
    ]
    return sorted(bad)


def test_the_graph_sees_the_package():
    """The walk finds the modules and their imports (so the checks below can fail)."""
    graph = import_graph()
    assert len(objective_modules(graph)) >= 10
    assert "nemo_ctcllm.objectives.base" in graph["nemo_ctcllm.objectives.ctc"]
    assert "nemo_ctcllm.config" in graph["nemo_ctcllm.objectives.base"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_objectives_do_not_import_objectives():
    assert objective_to_objective(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_lower_layers_do_not_import_upper_ones():
    assert upward(import_graph()) == []


if __name__ == "__main__":
    g = import_graph()
    print(f"modules: {len(g)}, import edges: {sum(map(len, g.values()))}")
    print(f"import cycles: {len(cycles(g))} {cycles(g)}")
    print(f"imports from a lower layer up: {len(upward(g))} {upward(g)}")
    print(f"objective -> objective imports: {len(objective_to_objective(g))} {objective_to_objective(g)}")
