"""The code's shape: short functions, and no two modules that import each other.

Two checks over every ``.py`` file of the repository outside ``tests/`` (issue 20):

- no function or method is longer than :data:`MAX_FUNCTION_LINES` lines (``def`` line to last
  line, decorators not counted): a longer one is cut into named steps that read top-down;
- no import cycle among the project's modules, counting imports at module level *and* inside
  functions (an import moved into a function hides a loop from Python, not from the reader).

Modules are named as Python would import them: files under a folder with ``__init__.py`` by
their dotted package path (``trainer.heads``), scripts in a plain folder by their file name
(``bench/scale_data.py`` is ``scale_data``: the script's folder is on ``sys.path`` when it runs).
``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one (a submodule
reaching a sibling through its package does not depend on the package's ``__init__``), else to
``pkg`` itself. Each check has a self-test on a small synthetic tree so that it can fail.
"""

from __future__ import annotations

import ast
import functools
import os
import pathlib
from collections.abc import Iterable, Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80
# Not the project's code: tests, the virtual environment, run outputs, packaging leftovers.
SKIPPED_DIRS = {"tests", ".venv", "venv", "runs", "build", "dist", ".git", "__pycache__",
                ".pytest_cache"}


def python_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Every ``.py`` file under ``root`` outside :data:`SKIPPED_DIRS` and ``*.egg-info``."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [name for name in dirs
                   if name not in SKIPPED_DIRS and not name.endswith(".egg-info")]
        found += [pathlib.Path(folder) / name for name in names if name.endswith(".py")]
    return sorted(found)


def _parse(path: pathlib.Path) -> ast.Module:
    return _parse_source(path.read_text(encoding="utf-8"), str(path))


@functools.lru_cache(maxsize=None)
def _parse_source(text: str, filename: str) -> ast.Module:
    """Parsed once per text for both checks (the trees are only read)."""
    return ast.parse(text, filename=filename)


# ---------------------------------------------------------------------------------------------
# Function length.


def _functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    """``(qualified name, node)`` of every function and method, nested ones included."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            name = f"{prefix}{node.name}"
            if not isinstance(node, ast.ClassDef):
                yield name, node
            yield from _functions(node, f"{name}.")
        else:
            yield from _functions(node, prefix)


def long_functions(root: pathlib.Path, limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``"path:function:length"`` of each function longer than ``limit`` lines, by path."""
    found = []
    for path in python_files(root):
        for name, node in _functions(_parse(path)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                found.append(f"{path.relative_to(root)}:{name}:{length}")
    return found


# ---------------------------------------------------------------------------------------------
# Import graph.


def _module_name(root: pathlib.Path, path: pathlib.Path) -> tuple[str, bool]:
    """``(dotted module name, is_package)`` of ``path`` as Python would import it."""
    is_package = path.name == "__init__.py"
    parts = [] if is_package else [path.stem]
    folder = path.parent
    while folder != root and (folder / "__init__.py").exists():
        parts.insert(0, folder.name)
        folder = folder.parent
    if is_package and not parts:  # an __init__.py in a plain folder: not importable as such
        parts = [path.parent.name]
    return ".".join(parts), is_package


def _imported_names(tree: ast.Module, module: str, is_package: bool,
                    known: set[str]) -> Iterator[tuple[str, int]]:
    """``(project module, line)`` of each import in ``tree``, at any depth."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _known(alias.name, known, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute_base(node, package)
            if base is None:
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}" if base else alias.name
                if submodule in known:  # `from pkg import sibling`: the sibling, not pkg
                    yield submodule, node.lineno
                else:
                    yield from _known(base, known, node.lineno)


def _absolute_base(node: ast.ImportFrom, package: str) -> str | None:
    """The absolute module a ``from ... import`` reads from (None: above the top package)."""
    if not node.level:
        return node.module or ""
    parts = package.split(".") if package else []
    if node.level - 1 > len(parts):
        return None
    parts = parts[:len(parts) - (node.level - 1)]
    if node.module:
        parts.append(node.module)
    return ".".join(parts)


def _known(name: str, known: set[str], line: int) -> Iterator[tuple[str, int]]:
    """The deepest project module that ``name`` (dotted) names, if any."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in known:
            yield candidate, line
            return


def import_graph(root: pathlib.Path) -> dict[str, dict[str, str]]:
    """``{module: {imported project module: "path:line" of the first such import}}``."""
    modules = {}
    for path in python_files(root):
        name, is_package = _module_name(root, path)
        modules[name] = (path, is_package)
    known = set(modules)
    graph: dict[str, dict[str, str]] = {}
    for name, (path, is_package) in sorted(modules.items()):
        edges = graph.setdefault(name, {})
        for target, line in _imported_names(_parse(path), name, is_package, known):
            if target != name:
                edges.setdefault(target, f"{path.relative_to(root)}:{line}")
    return graph


def strongly_connected(graph: dict[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node, each sorted, in order."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def import_cycles(root: pathlib.Path) -> list[str]:
    """One line per cycle: its modules and the imports that close it (``a -> b (path:line)``)."""
    graph = import_graph(root)
    lines = []
    for component in strongly_connected(graph):
        members = set(component)
        edges = [f"{source} -> {target} ({where})" for source in component
                 for target, where in sorted(graph[source].items()) if target in members]
        lines.append(f"{', '.join(component)}: {'; '.join(edges)}")
    return lines


# ---------------------------------------------------------------------------------------------
# The repository.


def test_no_function_is_longer_than_the_limit():
    found = long_functions(ROOT)
    assert not found, (f"functions longer than {MAX_FUNCTION_LINES} lines (cut them into named "
                       "steps):\n" + "\n".join(found))


def test_no_two_modules_import_each_other():
    graph = import_graph(ROOT)
    # The walk sees the project (guards against a walk that finds nothing and passes).
    assert {"trainer.model", "beam_pipelines.cli", "tfrecords_schema", "bench_scale"} <= set(graph)
    assert "trainer.layers" in graph["trainer.model"]
    cycles = import_cycles(ROOT)
    assert not cycles, ("modules that import each other (move the shared piece below both):\n"
                        + "\n".join(cycles))


# ---------------------------------------------------------------------------------------------
# Self-tests on synthetic trees: each check finds what it is meant to find.


def _write(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _function(name: str, lines: int, indent: str = "") -> str:
    """A function of exactly ``lines`` lines."""
    body = [f"{indent}    x = {number}" for number in range(lines - 2)]
    return "\n".join([f"{indent}def {name}():", *body, f"{indent}    return x"]) + "\n"


def test_long_functions_finds_a_long_function_and_method(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/mod.py": _function("fits", 80) + _function("too_long", 90)
        + "class Thing:\n" + _function("method", 81, indent="    "),
        "bench/script.py": "async " + _function("slow", 85),
        "tests/test_x.py": _function("ignored_test", 200),
        ".venv/lib/site.py": _function("ignored_venv", 200),
        "runs/out.py": _function("ignored_run", 200),
        "pkg.egg-info/x.py": _function("ignored_egg", 200),
    })
    assert long_functions(tmp_path) == [
        "bench/script.py:slow:85", "pkg/mod.py:too_long:90", "pkg/mod.py:Thing.method:81"]


def test_import_cycles_finds_a_three_module_loop_through_a_function(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "from . import c\n",
        "pkg/c.py": "import os\n\ndef late():\n    import pkg.a\n    return pkg.a\n",
        "pkg/d.py": "from pkg.a import something\n",  # imports into the loop: not part of it
    })
    assert import_graph(tmp_path)["pkg.c"] == {"pkg.a": "pkg/c.py:4"}
    assert strongly_connected(import_graph(tmp_path)) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert import_cycles(tmp_path) == [
        "pkg.a, pkg.b, pkg.c: pkg.a -> pkg.b (pkg/a.py:1); pkg.b -> pkg.c (pkg/b.py:1); "
        "pkg.c -> pkg.a (pkg/c.py:4)"]
    # Without the import inside the function there is no loop.
    (tmp_path / "pkg/c.py").write_text("import os\n")
    assert import_cycles(tmp_path) == []


def test_import_graph_resolves_packages_siblings_relative_imports_and_scripts(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from pkg import a\nVALUE = 1\n",
        "pkg/a.py": "from pkg import b\n",  # the sibling, not the package
        "pkg/b.py": "from .sub import deep as renamed\nfrom ..outside import nothing\n",
        "pkg/sub/__init__.py": "from .. import b\n",
        "pkg/sub/deep.py": "from ..a import name\nimport numpy\n",
        "bench/script.py": "import helper\nfrom pkg.sub.deep import f\n",
        "bench/helper.py": "def g():\n    from pkg import VALUE\n",
    })
    graph = import_graph(tmp_path)
    assert graph == {
        "pkg": {"pkg.a": "pkg/__init__.py:1"},
        "pkg.a": {"pkg.b": "pkg/a.py:1"},
        "pkg.b": {"pkg.sub.deep": "pkg/b.py:1"},
        "pkg.sub": {"pkg.b": "pkg/sub/__init__.py:1"},
        "pkg.sub.deep": {"pkg.a": "pkg/sub/deep.py:1"},
        "script": {"helper": "bench/script.py:1", "pkg.sub.deep": "bench/script.py:2"},
        "helper": {"pkg": "bench/helper.py:2"},
    }
    assert import_cycles(tmp_path) == [
        "pkg.a, pkg.b, pkg.sub.deep: pkg.a -> pkg.b (pkg/a.py:1); "
        "pkg.b -> pkg.sub.deep (pkg/b.py:1); pkg.sub.deep -> pkg.a (pkg/sub/deep.py:1)"]
    # A submodule that reads an attribute of its own package's __init__, which imports it back:
    # a real loop.
    (tmp_path / "pkg/sub/deep.py").write_text("from pkg import VALUE\n")
    assert import_cycles(tmp_path) == [
        "pkg, pkg.a, pkg.b, pkg.sub.deep: pkg -> pkg.a (pkg/__init__.py:1); "
        "pkg.a -> pkg.b (pkg/a.py:1); pkg.b -> pkg.sub.deep (pkg/b.py:1); "
        "pkg.sub.deep -> pkg (pkg/sub/deep.py:1)"]
