"""The library's modules form a layered package (issue #18): every module imports, the
imports between them (read from the source files with ``ast``, function-level imports
included) have no cycle, and no module imports another module's ``_private`` names."""

import ast
import importlib
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

import imbalanceseglib

PACKAGE = Path(imbalanceseglib.__file__).resolve().parent
ROOT_NAME = "imbalanceseglib"


def _module_files() -> Dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (subpackages included)."""
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join([ROOT_NAME] + parts)] = path
    return files


MODULES = _module_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> Optional[str]:
    """The absolute name ``from <...> import`` refers to, as seen from ``module``."""
    if node.level == 0:
        return node.module
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> List[Tuple[str, Optional[str], int]]:
    """(imported module of the package, name imported from it or None, line) for each import."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text(), str(MODULES[module]))):
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names if a.name in MODULES]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            if target not in MODULES:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in MODULES:  # ``from . import training``: the submodule itself
                    found.append((sub, None, node.lineno))
                else:
                    found.append((target, alias.name, node.lineno))
    return found


def _graph() -> Dict[str, Set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def _find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_every_module_imports():
    assert len(MODULES) > 20
    for name in MODULES:
        importlib.import_module(name)


def test_the_package_import_graph_has_no_cycle():
    graph = _graph()
    assert graph[f"{ROOT_NAME}.training"] >= {f"{ROOT_NAME}.training_loop", f"{ROOT_NAME}.semi_supervised"}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{MODULES[m].relative_to(PACKAGE)}:{line} imports {name} from {target}"
           for m in MODULES for target, name, line in _imports(m)
           if name is not None and name.startswith("_") and not (name.startswith("__") and name.endswith("__"))]
    assert not bad, "\n".join(bad)


def test_the_checks_see_cycles_and_private_imports():
    """The helpers above are not vacuous: a made-up cycle is found, and the semi-supervised
    trainer, which imported the supervised trainer's private checkpoint functions, no longer does."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
    semi = _imports(f"{ROOT_NAME}.semi_supervised")
    assert all(t != f"{ROOT_NAME}.training" for t, _, _ in semi)
    assert any(t == f"{ROOT_NAME}.training_loop" and n == "TrainingLoop" for t, n, _ in semi)
