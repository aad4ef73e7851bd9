"""The package's shape: imports flow one way (core <- domain packages <- stages <- run <- entry points), with no
cycle inside dpq -- not even one hidden by an import deferred into a function -- and a new stage kind is one
module of ``dpq.stages`` plus its YAML."""

from __future__ import annotations

import ast
from pathlib import Path

import dpq

SRC = Path(dpq.__file__).resolve().parent

# Layer of each top-level part of dpq: a module may import only from its own layer or lower ones.
LAYERS = {
    "core": 0,
    "data": 1,
    "models": 1,
    "distill": 1,
    "prune": 1,
    "quant": 1,
    "cost": 1,
    "latency_process": 1,
    "metrics": 1,
    "loggers": 1,
    "pareto": 1,
    "export": 1,
    "predictions": 1,
    "stages": 2,
    "run": 3,
    "train": 4,
    "checkpoints": 4,
    "stage_cache": 4,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (imports for annotations only never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for b in node.body for n in ast.walk(b))
    return (n for n in ast.walk(tree) if id(n) not in skip)


def dpq_imports(path: Path) -> set[str]:
    """Every dpq module ``path`` imports at run time, wherever the statement is (top level or in a function)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dpq")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "dpq":
                continue
            for a in node.names:  # "from dpq.run import records" imports the module dpq.run.records
                sub = f"{mod}.{a.name}"
                found.add(
                    sub
                    if (SRC.parent / Path(*sub.split("."))).with_suffix(".py").exists()
                    or (SRC.parent / Path(*sub.split(".")) / "__init__.py").exists()
                    else mod
                )
    return found - {this}


def graph() -> dict[str, set[str]]:
    mods = {module_name(p): p for p in SRC.rglob("*.py")}
    edges = {}
    for name, path in mods.items():
        deps = set()
        for dep in dpq_imports(path):
            while dep not in mods and "." in dep:
                dep = dep.rpartition(".")[0]
            if dep in mods and dep != name:
                deps.add(dep)
                # importing a submodule runs its packages' __init__ first
                parent = dep.rpartition(".")[0]
                while parent and parent != "dpq" and not name.startswith(parent + ".") and parent != name:
                    deps.add(parent)
                    parent = parent.rpartition(".")[0]
        edges[name] = deps
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def test_no_import_cycle_inside_dpq():
    found = cycles(graph())
    assert not found, f"import cycles (deferred imports count too): {found}"


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_imports_flow_from_core_up_to_the_entry_points():
    edges = graph()
    unknown = sorted({m.split(".")[1] for m in edges if "." in m} - set(LAYERS) - {"__main__"})
    assert not unknown, f"give these parts of dpq a layer in LAYERS: {unknown}"
    upward = [
        (m, d)
        for m, deps in edges.items()
        for d in deps
        if layer(m) is not None and layer(d) is not None and layer(d) > layer(m)
    ]
    assert not upward, (
        f"imports against the layering (core <- domain <- stages <- run <- entry points): {sorted(upward)}"
    )
