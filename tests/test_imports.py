"""No import cycle among the project's modules (the scripts, common/, rewards/, shapes/, benchmark/): dependencies point
one way (DESIGN.md), so any module can be read, copied or imported without the ones that import it.

The graph is read from the source with `ast`, counting every import in a file, at module level or inside a function
(a lazy import is still a dependency: `common.models` importing `shapes.model` inside `load_pipeline` was a cycle with
`shapes.model` importing `common.models`). An edge goes to the module an import names: `from pkg import mod` to
`pkg.mod` when that is a module, `from pkg import name` to `pkg`, `from .mod import name` to `pkg.mod`; the parent
package that Python initialises first is not counted (every submodule importing a sibling would be a cycle through
its package's `__init__`). `importlib.import_module` with a computed name (the reward registry) is not an edge.
"""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = ("common", "rewards", "shapes", "benchmark")


def project_modules(root: Path) -> dict[str, Path]:
    modules = {path.stem: path for path in root.glob("*.py")}
    for package in PACKAGES:
        for path in (root / package).glob("*.py"):
            modules[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that the file `path` (module `name`) imports anywhere in it."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]

    def resolve(target: str) -> str | None:
        # benchmark/'s scripts also import a sibling by its bare name (their folder is on sys.path)
        for candidate in (target, f"{package}.{target}" if package else ""):
            if candidate in modules:
                return candidate
        return None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {resolve(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from .x import y`
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                found.add(resolve(f"{base}.{alias.name}") or resolve(base))
    return found - {None, name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None: a depth-first search that meets a module on its own stack."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_reader_sees_lazy_relative_and_sibling_imports(tmp_path):
    """The reader on a synthetic project: each kind of import gives its edge, and a cycle is found."""
    files = {
        "script.py": "import common\n",
        "common/__init__.py": "from .models import load\nfrom . import prompts\n",
        "common/models.py": "def load():\n    from shapes.model import build\n",
        "common/prompts.py": "import os\nfrom common import models\n",
        "shapes/__init__.py": "",
        "shapes/model.py": "from common.models import load\n",
        "benchmark/__init__.py": "",
        "benchmark/a.py": "from b import x\n",  # a sibling by its bare name
        "benchmark/b.py": "",
        "rewards/__init__.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    graph = import_graph(tmp_path)
    assert graph["script"] == {"common"}
    assert graph["common"] == {"common.models", "common.prompts"}
    assert graph["common.models"] == {"shapes.model"}  # inside a function
    assert graph["common.prompts"] == {"common.models"}
    assert graph["benchmark.a"] == {"benchmark.b"}
    assert find_cycle(graph) == ["common.models", "shapes.model", "common.models"]
    (tmp_path / "shapes/model.py").write_text("")
    assert find_cycle(import_graph(tmp_path)) is None


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert {"ddpo_sf", "common.models", "rewards", "shapes.data", "benchmark.compare"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
