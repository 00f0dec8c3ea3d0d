"""The import graph of formats/, interop/ and trainer/ stays one-way, acyclic and free of private reach-ins.

Read from the source with ``ast`` (nothing is imported or executed), so the test is fast and sees imports inside
function bodies too: a lazy import still ties two modules together, and a cycle of lazy imports is still a cycle.

Three kinds of violation are reported, each as one stable string:
- ``cycle: a, b, ...``  modules that reach each other through imports (one strongly connected component);
- ``private: importer -> module._name``  a name starting with ``_`` taken from another module (by
  ``from m import _x`` or by ``m._x`` on an imported module); private submodules of one's own package are fine;
- ``layer: importer -> imported``  an arrow against ``trainer -> interop -> formats`` with the CLI on top:
  formats imports only the standard library, numpy, torch, safetensors and itself; interop imports trainer only
  inside function bodies of ``interop/cli/*``; nothing below the CLI imports ``interop.cli``.

``KNOWN_VIOLATIONS`` lists today's remaining ones with a reason. The test fails on a violation not listed AND on a
listed one that no longer occurs, so the list can only shrink: delete an entry when you fix it.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "interop", "trainer")
FORMATS_MAY_IMPORT = frozenset(sys.stdlib_module_names) | {"formats", "numpy", "torch", "safetensors"}

KNOWN_VIOLATIONS: dict[str, str] = {}


# ----------------------------------------------------------------------------------------------- the scanner


@dataclass(frozen=True)
class ImportEdge:
    """One import statement's target as seen from the importing module."""

    importer: str
    imported: str  # a project module, or the top-level name of a third-party/stdlib module
    in_function: bool
    line: int


def module_files(root: Path, packages=PACKAGES) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` under the packages (``pkg/__init__.py`` is ``pkg``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _absolute(node: ast.ImportFrom, module: str, path: Path) -> str:
    if not node.level:
        return node.module or ""
    base = _package_of(module, path).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _project_module(dotted: str, modules: dict) -> str | None:
    """The longest prefix of ``dotted`` that is a module of ours (``import a.b.c`` binds and runs ``a.b.c``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _same_package_submodule(importer: str, importer_path: Path, submodule: str) -> bool:
    """``pkg._impl`` imported from inside ``pkg`` is the package's own business."""
    package = submodule.rpartition(".")[0]
    own = _package_of(importer, importer_path)
    return own == package or own.startswith(package + ".")


class _ModuleScan(ast.NodeVisitor):
    """Imports (with whether they sit in a function body) and private attribute reach-ins of one module."""

    def __init__(self, module: str, path: Path, modules: dict):
        self.module, self.path, self.modules = module, path, modules
        self.edges: list[ImportEdge] = []
        self.private: set[str] = set()
        self.aliases: dict[str, str] = {}  # local name -> project module it is bound to
        self.depth = 0  # > 0 inside a function or lambda body
        self.type_checking = 0

    def _add(self, imported: str, line: int) -> None:
        if not self.type_checking:
            self.edges.append(ImportEdge(self.module, imported, self.depth > 0, line))

    def _function(self, node) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = ast.unparse(node.test)
        if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            self.type_checking += 1
            for child in node.body:
                self.visit(child)
            self.type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            target = _project_module(alias.name, self.modules)
            self._add(target or alias.name.split(".")[0], node.lineno)
            if target is None:
                continue
            if alias.asname:
                self.aliases[alias.asname] = target
            else:
                top = alias.name.split(".")[0]
                self.aliases[top] = top

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _absolute(node, self.module, self.path)
        source_module = _project_module(source, self.modules)
        if source_module is None:
            self._add(source.split(".")[0], node.lineno)
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in self.modules:
                self._add(submodule, node.lineno)
                self.aliases[alias.asname or alias.name] = submodule
                if _is_private(alias.name) and not _same_package_submodule(self.module, self.path, submodule):
                    self.private.add(f"private: {self.module} -> {submodule}")
            else:
                self._add(source_module, node.lineno)
                if _is_private(alias.name) and source_module != self.module:
                    self.private.add(f"private: {self.module} -> {source_module}.{alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        chain, inner = [], node
        while isinstance(inner, ast.Attribute):
            chain.append(inner.attr)
            inner = inner.value
        if isinstance(inner, ast.Name) and inner.id in self.aliases:
            module = self.aliases[inner.id]
            for attr in reversed(chain):
                if f"{module}.{attr}" in self.modules:
                    module = f"{module}.{attr}"
                    continue
                if _is_private(attr) and module != self.module:
                    self.private.add(f"private: {self.module} -> {module}.{attr}")
                break
            return  # the inner attributes of this chain were handled here
        self.generic_visit(node)


def scan(root: Path = ROOT, packages=PACKAGES) -> tuple[dict[str, Path], list[ImportEdge], set[str]]:
    """Every module, every import edge, and every private reach-in under ``root``."""
    modules = module_files(root, packages)
    edges: list[ImportEdge] = []
    private: set[str] = set()
    for module, path in modules.items():
        visitor = _ModuleScan(module, path, modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        edges += visitor.edges
        private |= visitor.private
    return modules, edges, private


def cycles(modules: dict, edges: list[ImportEdge]) -> set[str]:
    """Strongly connected components of more than one module (Tarjan, iterative), as ``cycle: a, b`` strings."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for edge in edges:
        if edge.imported in modules and edge.imported != edge.importer:
            graph[edge.importer].add(edge.imported)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[str] = set()
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.add("cycle: " + ", ".join(sorted(component)))
    return found


def layer_violations(edges: list[ImportEdge]) -> set[str]:
    """Arrows against ``trainer -> interop -> formats`` (CLI on top)."""
    found = set()
    for edge in edges:
        importer_top, imported_top = edge.importer.split(".")[0], edge.imported.split(".")[0]
        in_cli = edge.importer == "interop.cli" or edge.importer.startswith("interop.cli.")
        bad = (
            (importer_top == "formats" and imported_top not in FORMATS_MAY_IMPORT)
            or (importer_top == "interop" and imported_top == "trainer" and not (in_cli and edge.in_function))
            or (
                (edge.imported == "interop.cli" or edge.imported.startswith("interop.cli."))
                and not in_cli
                and edge.importer != "interop.__main__"
            )
        )
        if bad:
            found.add(f"layer: {edge.importer} -> {edge.imported}")
    return found


def violations(root: Path = ROOT, packages=PACKAGES) -> set[str]:
    modules, edges, private = scan(root, packages)
    return cycles(modules, edges) | private | layer_violations(edges)


# ----------------------------------------------------------------------------------------------- the tests


def test_import_graph_has_no_new_violations_and_the_known_list_is_exact():
    found = violations()
    new = sorted(found - set(KNOWN_VIOLATIONS))
    gone = sorted(set(KNOWN_VIOLATIONS) - found)
    assert not new, "import-graph violations not in KNOWN_VIOLATIONS (fix them):\n" + "\n".join(new)
    assert not gone, "KNOWN_VIOLATIONS entries that no longer occur (delete them):\n" + "\n".join(gone)


def test_every_module_is_seen():
    modules = module_files(ROOT)
    for expected in ("formats.checkpoint.hf", "interop.cli.generate_cmd", "trainer.generate", "interop"):
        assert expected in modules
    assert len(modules) > 50


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


CLEAN = {
    "formats/__init__.py": "import numpy\nfrom formats.layout import Layout\n",
    "formats/layout.py": "import dataclasses\nimport torch\n",
    "interop/__init__.py": "",
    "interop/core.py": "from formats import layout\nfrom .helpers import detail\n",
    "interop/helpers/__init__.py": "from interop.helpers import _impl\n\ndetail = _impl.detail\n",
    "interop/helpers/_impl.py": "detail = 1\n",
    "interop/cli/__init__.py": "",
    "interop/cli/train_cmd.py": "def main():\n    from trainer import loop\n    return loop\n",
    "interop/__main__.py": "from interop.cli import train_cmd\n",
    "trainer/__init__.py": "",
    "trainer/loop.py": "from interop import core\nfrom trainer.step import run\n",
    "trainer/step.py": "import interop.core as c\n\ndef run():\n    return c.public\n",
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, set()),
        # a cycle through a lazy import
        ({"trainer/step.py": "def run():\n    from trainer import loop\n"}, {"cycle: trainer.loop, trainer.step"}),
        # a three-module cycle with a relative import
        (
            {"interop/core.py": "from . import extra\n", "interop/extra.py": "import interop.more\n",
             "interop/more.py": "from interop.core import x\n"},
            {"cycle: interop.core, interop.extra, interop.more"},
        ),
        # private names: from-import, attribute on an aliased module, attribute through a package chain
        ({"trainer/step.py": "from interop.core import _hidden\n"}, {"private: trainer.step -> interop.core._hidden"}),
        ({"trainer/step.py": "import interop.core as c\nx = c._hidden\n"}, {"private: trainer.step -> interop.core._hidden"}),
        ({"trainer/step.py": "import interop.core\nx = interop.core._hidden()\n"},
         {"private: trainer.step -> interop.core._hidden"}),
        # a private submodule of another package
        ({"trainer/step.py": "from interop.helpers import _impl\n"}, {"private: trainer.step -> interop.helpers._impl"}),
        # layers: formats reaching up or into a forbidden third party, interop importing trainer at module top,
        # the CLI importing trainer at module top, the core importing the CLI
        ({"formats/layout.py": "def f():\n    from interop import core\n"}, {"layer: formats.layout -> interop.core", "cycle: formats.layout, interop.core"}),
        ({"formats/layout.py": "import transformers\n"}, {"layer: formats.layout -> transformers"}),
        ({"interop/core.py": "def f():\n    import trainer.loop\n"},
         {"layer: interop.core -> trainer.loop", "cycle: interop.core, trainer.loop, trainer.step"}),
        ({"interop/cli/train_cmd.py": "from trainer import loop\n"}, {"layer: interop.cli.train_cmd -> trainer.loop"}),
        ({"trainer/step.py": "from interop.cli import train_cmd\n"}, {"layer: trainer.step -> interop.cli.train_cmd",
          "cycle: interop.cli.train_cmd, trainer.loop, trainer.step"}),
        # TYPE_CHECKING imports are not runtime edges
        ({"trainer/step.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from trainer import loop\n"},
         set()),
    ],
)
def test_the_scanner_finds_each_kind_of_violation(tmp_path, change, expected):
    root = _tree(tmp_path, {**CLEAN, **change})
    assert violations(root) == expected
