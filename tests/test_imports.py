"""Data flows one way through the package: no module imports one that imports it back.

The graph is read from the source with ``ast`` (nothing is imported): an edge ``a -> b``
for every ``import b`` / ``from b import x`` in ``a`` (``b.x`` when ``x`` is a module).
"""

import ast
from pathlib import Path

import dgm_eit

SOURCE = Path(dgm_eit.__file__).parent


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imports(name: str, path: Path, modules: dict, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def _graph(top_level_only: bool) -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules, top_level_only) for name, path in modules.items()}


def test_module_level_imports_have_no_cycle():
    graph = _graph(top_level_only=True)
    assert "dgm_eit.results" in graph and graph["dgm_eit.experiments"]   # the walk found the package
    assert _cycles(graph) == []


def test_no_import_inside_a_function_closes_a_cycle():
    # an import moved into a function to dodge a cycle still is one
    assert _cycles(_graph(top_level_only=False)) == []


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_results_and_report_never_reach_back_to_the_runner():
    graph = _graph(top_level_only=False)
    assert "dgm_eit.experiments" not in _reachable(graph, "dgm_eit.report")
    assert not _reachable(graph, "dgm_eit.results") & {"dgm_eit.experiments", "dgm_eit.report", "dgm_eit.train"}


LOWER_LAYERS = ("dgm_eit.data", "dgm_eit.recon", "dgm_eit.physics", "dgm_eit.models", "dgm_eit.stages",
                "dgm_eit.simulators")


def test_the_lower_layers_know_no_study():
    # a study hands its simulator to the pipeline through dgm_eit.simulators; following any
    # import of the data, reconstruction, physics or model layers, or of the stages, never
    # leads into a study's package
    graph = _graph(top_level_only=False)
    lower = [m for m in graph if m.startswith(LOWER_LAYERS)]
    assert {"dgm_eit.data.simulate", "dgm_eit.recon.tuning", "dgm_eit.stages", "dgm_eit.models.posterior"} <= set(lower)
    assert any(m.startswith("dgm_eit.ktc.") for m in graph)
    climbs = {m: sorted(d for d in _reachable(graph, m) if d == "dgm_eit.ktc" or d.startswith("dgm_eit.ktc."))
              for m in lower}
    assert {m: d for m, d in climbs.items() if d} == {}
