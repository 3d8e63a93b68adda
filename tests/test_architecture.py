"""Architecture rules, checked on the source with `ast` (nothing is imported):

1. No import cycles between modules of `service`, counting every import: top level, inside functions and
   under `if TYPE_CHECKING:` (a cycle hidden from the interpreter is still a cycle for a reader).
2. No cycles between service's top-level parts (`service.api`, `service.runtime`, `service.store`, ...):
   the layers form a hierarchy.
3. Only the HTTP edge (`service/api/`, and `service/distributed/`, whose Ray ingress is an HTTP app) may
   import fastapi or starlette; the runtime, engine and store never know about HTTP.

Import resolution: `from pkg import name` is an import of the module `pkg.name` when that module exists,
else of `pkg` (its `__init__`); `import a.b.c` is an import of `a.b.c`; relative imports are resolved
against the importing module's package.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "service"
HTTP_FRAMEWORKS = ("fastapi", "starlette")
HTTP_EDGE = ("service.api", "service.distributed")

Graph = dict[str, set[str]]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def _sources() -> dict[str, Path]:
    """Module name -> file, for every module under service/."""
    return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


def _is_package(name: str) -> bool:
    path = _sources().get(name)
    return path is None or path.name == "__init__.py"  # a folder without __init__ is a namespace package


def _resolve_from(module: str, node: ast.ImportFrom) -> str:
    """The absolute module named by `from <node.module> import ...` inside `module`."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str) -> Iterable[str]:
    """Every absolute module name `module` imports (internal and external), anywhere in its body."""
    tree = ast.parse(_sources()[module].read_text(), filename=str(_sources()[module]))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(module, node)
            for alias in node.names:
                yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in _known() else base


@cache
def _known() -> set[str]:
    """Modules and packages (including namespace packages, i.e. folders without __init__) under service/."""
    names = set(_sources())
    for name in list(names):
        parts = name.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return names


@cache
def module_graph() -> Graph:
    """Module -> the internal modules it imports."""
    graph: Graph = {}
    for module in _sources():
        targets = set()
        for name in _imports(module):
            parts = name.split(".")
            # `import service.runtime.errors` names the module itself; keep the longest known prefix.
            for i in range(len(parts), 0, -1):
                if ".".join(parts[:i]) in _known():
                    targets.add(".".join(parts[:i]))
                    break
        targets.discard(module)
        graph[module] = targets
    return graph


def top_level(module: str) -> str:
    """`service.runtime.plan` -> `service.runtime`; `service.store` -> `service.store`."""
    return ".".join(module.split(".")[:2])


def package_graph() -> Graph:
    """The module graph collapsed to service's top-level subpackages and modules."""
    graph: Graph = {}
    for module, targets in module_graph().items():
        node = top_level(module)
        graph.setdefault(node, set()).update(top_level(t) for t in targets if top_level(t) != node)
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """Within each strongly connected component of more than one node, a shortest cycle through each of its
    nodes (so every tangled module shows up), deduplicated and sorted; each cycle is closed: [a, ..., a]."""
    found: set[tuple[str, ...]] = set()
    for component in _strongly_connected(graph):
        if len(component) > 1:
            for node in component:
                cycle = _shortest_cycle(graph, component, node)[:-1]
                turn = cycle.index(min(cycle))  # one rotation per cycle, starting at its smallest name
                found.add(tuple(cycle[turn:] + cycle[:turn]))
    return sorted([*cycle, cycle[0]] for cycle in found)


def _strongly_connected(graph: Graph) -> list[set[str]]:
    """Tarjan's algorithm, iterative (no recursion limit on deep graphs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_cycle(graph: Graph, component: set[str], start: str) -> list[str]:
    """A shortest cycle through `start` (breadth-first back to it), closed: [start, ..., start]."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph.get(node, set()) & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def _describe(found: list[list[str]]) -> str:
    return "\n".join(" -> ".join(cycle) for cycle in found)


def _top_levels() -> list[str]:
    return sorted({top_level(m) for m in _sources() if m != PACKAGE})


@pytest.mark.parametrize("part", _top_levels())
def test_no_module_cycle_touches(part: str) -> None:
    """No import cycle runs through a module of this part of service (one test per part, so a report says
    which layers are tangled)."""
    touching = [c for c in cycles(module_graph()) if any(top_level(m) == part for m in c)]
    assert not touching, f"import cycles through {part}:\n{_describe(touching)}"


def test_top_level_parts_form_a_hierarchy() -> None:
    found = cycles(package_graph())
    assert not found, f"cycles between service's top-level parts:\n{_describe(found)}"


def test_only_the_http_edge_imports_http_frameworks() -> None:
    offenders = sorted(
        f"{module} imports {name}"
        for module in _sources()
        if not any(module == edge or module.startswith(edge + ".") for edge in HTTP_EDGE)
        for name in set(_imports(module))
        if name.split(".")[0] in HTTP_FRAMEWORKS
    )
    assert not offenders, "only service/api and service/distributed may import fastapi/starlette:\n" + "\n".join(
        offenders
    )


def test_the_checker_sees_hidden_and_relative_imports() -> None:
    """The rules above are only as good as the graph: spot-check resolution on modules we know."""
    graph = module_graph()
    assert "service.runtime.errors" in graph["service.runtime"]  # `from .errors import ...` in an __init__
    assert "service.engine.kv_cache" in graph["service.engine.scheduler"]  # `from . import kv_cache`
    assert "service.runtime" in graph["service.engine.engine"]  # `from ..runtime import ...`: the __init__
    assert "service.runtime.model_index" in graph["service.runtime.adapter_types.base"]  # under TYPE_CHECKING
    assert "service.api.app" in graph["service.cli"]  # inside a function
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
