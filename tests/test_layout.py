"""Static checks of the package structure described in docs/architecture.md, "Layers and layout".

Every ``.py`` file under ``gatezoo/`` is parsed with :mod:`ast` (nothing is imported), and the
explicit imports between gatezoo modules become a directed graph:

* ``import gatezoo.x.y`` and ``from gatezoo.x import y`` (``y`` may itself be a submodule, in
  which case the edge goes to ``gatezoo.x.y``), and relative imports resolved against the
  importing module's package;
* imports inside functions and classes count (they run when the code runs);
* imports under ``if TYPE_CHECKING:`` do not (they never run);
* the implicit import of parent packages (``import gatezoo.kernels.backend`` also runs
  ``gatezoo/kernels/__init__.py``) adds no edge.

The tests then check that no import goes from a lower layer to a higher one, that the graph has
no circles, and that the "Layout" list of docs/architecture.md names exactly the package's files.
"""

from __future__ import annotations

import ast
import re
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gatezoo"
ARCHITECTURE = ROOT / "docs/architecture.md"

# kernels <- blocks <- models <- eval, stats <- train: eval (metrics, search, benchmarks, plots)
# and stats (gating statistics: estimators, losses, rate experiments) never import train (data,
# the loop, checkpoints, run directories, the commands)
LAYER_RANK = {"kernels": 0, "blocks": 1, "models": 2, "eval": 3, "stats": 3, "train": 4}


# --- building the import graph ---------------------------------------------------------------


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir`` (a package's
    ``__init__.py`` is the package itself)."""
    top = package_dir.name
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir).with_suffix("")
        parts = [top, *rel.parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """All ``Import`` / ``ImportFrom`` nodes of a module, at any depth, except those that only
    run under ``if TYPE_CHECKING:``."""

    def __init__(self):
        self.nodes: list[ast.Import | ast.ImportFrom] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:  # the else branch does run
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.nodes.append(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        self.nodes.append(node)


def _known_prefix(name: str, modules) -> str | None:
    """The longest dotted prefix of ``name`` that is a module of the package, or None."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> set[str]:
    """The package modules one import statement explicitly names."""
    top = module.split(".")[0]
    targets = set()
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name == top or alias.name.startswith(top + "."):
                target = _known_prefix(alias.name, modules)
                if target is not None:
                    targets.add(target)
        return targets
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
        if not (base == top or base.startswith(top + ".")):
            return targets
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        if alias.name != "*" and submodule in modules:
            targets.add(submodule)  # ``from pkg import submodule``
        else:
            target = _known_prefix(base, modules)
            if target is not None:
                targets.add(target)
    return targets


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the set of package modules it imports explicitly."""
    files = module_files(package_dir)
    graph = {}
    for module, path in files.items():
        collector = _ImportCollector()
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges = set()
        for node in collector.nodes:
            edges |= import_targets(module, path.name == "__init__.py", node, files)
        graph[module] = edges
    return graph


# --- graph algorithms ------------------------------------------------------------------------


def strongly_connected_components(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), components in no particular order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = counter
                    counter += 1
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph.get(succ, ())))))
                    advanced = True
                    break
                if succ in on_stack:
                    low[node] = min(low[node], index[succ])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_through(graph: dict[str, set[str]], start: str, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside ``members`` (breadth-first)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph.get(node, ())):
            if succ not in members:
                continue
            if succ == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"{start} is on no cycle inside {sorted(members)}")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (``[a, b, ..., a]``) per strongly connected component that has one:
    components of two or more modules, and single modules that import themselves."""
    cycles = []
    for component in strongly_connected_components(graph):
        first = component[0]
        if len(component) > 1 or first in graph.get(first, ()):
            cycles.append(_cycle_through(graph, first, set(component)))
    return sorted(cycles)


def layer_of(module: str) -> str | None:
    """``"kernels"`` for ``gatezoo.kernels.rela.naive``; None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import from a lower layer into a higher one. The package root is
    exempt as an importer; as an import target it ranks as the highest layer it imports itself."""
    root = next(m for m in graph if "." not in m)
    root_rank = max((LAYER_RANK[layer_of(t)] for t in graph[root] if layer_of(t) in LAYER_RANK), default=0)

    def rank(module: str) -> int:
        return root_rank if module == root else LAYER_RANK[layer_of(module)]

    bad = []
    for src in sorted(graph):
        if src == root:
            continue
        for dst in sorted(graph[src]):
            if rank(dst) > rank(src):
                bad.append(f"{src} ({layer_of(src)}) -> {dst} ({layer_of(dst) or 'package root'})")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE)


# --- the helpers themselves ------------------------------------------------------------------


def test_find_cycles_on_synthetic_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) == []  # diamond, no cycle
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"a"}, "b": set()}) == [["a", "a"]]  # a self-import is a cycle
    two = find_cycles({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"e"}, "e": {"c"}})
    assert two == [["a", "b", "a"], ["c", "d", "e", "c"]]
    # a long chain does not hit the recursion limit
    chain = {str(i): {str(i + 1)} for i in range(5000)}
    chain["5000"] = {"0"}
    (cycle,) = find_cycles(chain)
    assert len(cycle) == 5002 and cycle[0] == cycle[-1]


def test_import_graph_on_a_synthetic_package(tmp_path):
    pkg = tmp_path / "gatezoo"
    files = {
        "__init__.py": "from . import blocks\n",
        "kernels/__init__.py": "from .ops import op\n",
        "kernels/ops.py": (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from gatezoo.models import Model\n"  # never runs: no edge
            "def op():\n"
            "    from ..blocks import Layer\n"  # runs on call: an upward edge
            "    return Layer\n"
        ),
        "blocks/__init__.py": "from gatezoo.kernels import ops\nfrom gatezoo.kernels import op\n",
        "blocks/layer.py": "import gatezoo.kernels.ops\nfrom . import layer\n",
        "models/__init__.py": "from ..blocks.layer import x\n",
        "train/__init__.py": "",
        "train/loop.py": "from gatezoo.models import Model\nfrom gatezoo import blocks\nimport os\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    g = import_graph(pkg)
    assert g == {
        "gatezoo": {"gatezoo.blocks"},
        "gatezoo.kernels": {"gatezoo.kernels.ops"},
        "gatezoo.kernels.ops": {"gatezoo.blocks"},
        "gatezoo.blocks": {"gatezoo.kernels.ops", "gatezoo.kernels"},
        "gatezoo.blocks.layer": {"gatezoo.kernels.ops", "gatezoo.blocks.layer"},
        "gatezoo.models": {"gatezoo.blocks.layer"},
        "gatezoo.train": set(),
        "gatezoo.train.loop": {"gatezoo.models", "gatezoo.blocks"},
    }
    assert upward_edges(g) == ["gatezoo.kernels.ops (kernels) -> gatezoo.blocks (blocks)"]
    assert find_cycles(g) == [
        ["gatezoo.blocks", "gatezoo.kernels.ops", "gatezoo.blocks"],
        ["gatezoo.blocks.layer", "gatezoo.blocks.layer"],
    ]


# --- the package -----------------------------------------------------------------------------


def test_graph_is_not_trivial(graph):
    edges = sum(len(targets) for targets in graph.values())
    assert edges > 20, f"only {edges} import edges found between gatezoo modules; is the parser broken?"
    assert "gatezoo.kernels" in graph and "gatezoo.blocks" in graph


def test_every_module_is_in_a_layer(graph):
    stray = [m for m in graph if "." in m and layer_of(m) not in LAYER_RANK]
    assert not stray, f"modules outside the layers {sorted(LAYER_RANK)}: {stray}"


def test_imports_only_go_down_the_layers(graph):
    bad = upward_edges(graph)
    assert not bad, (
        "imports from a lower layer into a higher one (kernels <- blocks <- models <- eval <- train; "
        "docs/architecture.md, 'Layers and layout'):\n  " + "\n  ".join(bad)
    )


def test_no_import_circles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles inside gatezoo:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def _layout_section(text: str) -> str:
    match = re.search(r"^### Layout[ \t]*\n(.*?)(?=^#{1,3} |\Z)", text, flags=re.M | re.S)
    assert match, "docs/architecture.md has no '### Layout' section"
    return match.group(1)


def layout_paths(text: str) -> set[str]:
    """The ``.py`` paths named in backticks in the Layout section, relative to ``gatezoo/``."""
    names = set()
    for token in re.findall(r"`([^`\s]+\.py)`", _layout_section(text)):
        token = token.removeprefix("./")
        names.add(token.removeprefix("gatezoo/"))
    return names


def test_layout_helper_on_synthetic_text():
    text = (
        "## Layers and layout\n\nintro `gatezoo/ignored.py`\n\n### Layout\n\n"
        "- `gatezoo/__init__.py`: root\n- `kernels/backend.py`: resolution; not `a b.py`\n\n"
        "## Backend dispatch\n\n`gatezoo/later.py`\n"
    )
    assert layout_paths(text) == {"__init__.py", "kernels/backend.py"}


def test_layout_section_lists_every_module():
    listed = layout_paths(ARCHITECTURE.read_text(encoding="utf-8"))
    actual = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")}
    missing = sorted(actual - listed)
    stale = sorted(listed - actual)
    assert not missing and not stale, (
        "docs/architecture.md '### Layout' must name every module of the package and nothing else:\n"
        f"  not listed: {['gatezoo/' + m for m in missing]}\n"
        f"  listed but no such file: {['gatezoo/' + m for m in stale]}"
    )
