#!/usr/bin/env python3
"""Regenerate ``ImbalanceSeg/Testing/Data/slicer_api.json`` from git clones of Slicer, CTK,
SlicerPyTorch (and optionally qttools).

The JSON holds facts read from the sources of the Slicer versions we support -- which widget
classes a ``.ui`` file loaded by ``slicer.util.loadUI`` can instantiate, which names
``slicer.util`` and the other ``slicer`` submodules define, which C++ classes exist, the
built-in colour-table node IDs, the parameter-node-wrapper bindings and the PyTorchUtils API --
so that ``Testing/Python/test_slicer_api.py`` can check our module against them without Slicer.

Only git plumbing is used (``git --git-dir=D show REV:PATH`` / ``ls-tree``), so bare clones work::

    python Testing/Scripts/extract_slicer_api.py --slicer /path/Slicer.git --ctk /path/CTK.git \\
        --pytorch /path/SlicerPyTorch.git [--qttools /path/qttools.git] \\
        [--slicer-ref 5.8.1=v5.8.1 --slicer-ref 5.10.0=v5.10.0 --slicer-ref main=main]

Without ``--qttools`` the Qt Designer widget list of the existing JSON is kept.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO_ROOT / "ImbalanceSeg" / "Testing" / "Data" / "slicer_api.json"
DEFAULT_SLICER_REFS = ["5.8.1=v5.8.1", "5.10.0=v5.10.0", "main=main"]
DEFAULT_QT_REFS = ["5.15=v5.15.2", "6.8=v6.8.0"]  # Slicer builds with Qt 5.15; main also with Qt >= 6.8

# Where the designer plugins live (Qt Designer / QUiLoader find widgets only through these).
SLICER_PLUGIN_GLOBS = ["*/DesignerPlugins/*Plugin.cxx", "*/DesignerPlugins/*Plugin.cpp"]
# CTK libraries Slicer enables (SuperBuild/External_CTK.cmake: CTK_LIB_Widgets,
# Visualization/VTK/Widgets, DICOM/Widgets, Scripting/Python/Widgets).
CTK_PLUGIN_DIRS = ["Libs/Widgets/Plugins", "Libs/Visualization/VTK/Widgets/Plugins",
                   "Libs/DICOM/Widgets/Plugins", "Libs/Scripting/Python/Widgets/Plugins"]
QT_WIDGETS_TABLE = "src/designer/src/lib/uilib/widgets.table"
QT_FORMBUILDER_EXTRA = "src/designer/src/lib/uilib/formbuilderextra.cpp"
QT_FORMBUILDER = "src/designer/src/lib/uilib/formbuilder.cpp"

# Headers whose classes are wrapped into the ``slicer`` namespace (kits loaded by slicer/__init__.py).
CLASS_HEADER_GLOBS = [
    "Libs/MRML/Core/*.h", "Libs/MRML/Logic/*.h", "Libs/MRML/DisplayableManager/*.h",
    "Libs/MRML/Widgets/*.h", "Libs/vtkSegmentationCore/*.h", "Libs/vtkITK/*.h", "Libs/vtkTeem/*.h",
    "Base/Logic/*.h", "Base/QTCore/*.h", "Base/QTGUI/*.h", "Base/QTCLI/*.h",
    "Modules/Loadable/*/MRML/*.h", "Modules/Loadable/*/Logic/*.h", "Modules/Loadable/*/MRMLDM/*.h",
    "Modules/Loadable/*/VTKWidgets/*.h", "Modules/Loadable/*/Widgets/*.h",
]
CLASS_DEF = re.compile(r"^\s*class\s+(?:\w+_EXPORT\s+)?((?:vtk|q)[A-Z]\w*)\s*(?::\s*public\s+([\w:]+)|\{|$)",
                       re.M)

UTIL = "Base/Python/slicer/util.py"
SLM = "Base/Python/slicer/ScriptedLoadableModule.py"
PACKAGING = "Base/Python/slicer/packaging.py"
PNW_DIR = "Base/Python/slicer/parameterNodeWrapper"
SLICER_PKG = "Base/Python/slicer"
COLOR_FILES = "Base/Logic/Resources/ColorFiles"
COLOR_TABLE_NODE = "Libs/MRML/Core/vtkMRMLColorTableNode.cxx"
COLOR_LOGIC = "Libs/MRML/Logic/vtkMRMLColorLogic.cxx"
COLOR_LOGIC_H = "Libs/MRML/Logic/vtkMRMLColorLogic.h"
PYTORCH_UTILS = "PyTorchUtils/PyTorchUtils.py"


# --------------------------------------------------------------------------- git access
class Git:
    def __init__(self, git_dir: str):
        self.git_dir = str(git_dir)
        self._trees: Dict[str, List[str]] = {}

    def _run(self, *args: str, check: bool = True) -> Optional[str]:
        proc = subprocess.run(["git", "--git-dir", self.git_dir, *args], capture_output=True, text=True)
        if proc.returncode != 0:
            if check:
                raise RuntimeError(f"git {' '.join(args)} failed in {self.git_dir}: {proc.stderr.strip()}")
            return None
        return proc.stdout

    def sha(self, ref: str) -> Optional[str]:
        out = self._run("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}", check=False)
        return out.strip() if out else None

    def date(self, ref: str) -> str:
        return self._run("log", "-1", "--format=%cI", ref).strip()

    def show(self, ref: str, path: str) -> Optional[str]:
        return self._run("show", f"{ref}:{path}", check=False)

    def files(self, ref: str) -> List[str]:
        if ref not in self._trees:
            self._trees[ref] = self._run("ls-tree", "-r", "--name-only", ref).splitlines()
        return self._trees[ref]

    def glob(self, ref: str, pattern: str) -> List[str]:
        return sorted(f for f in self.files(ref) if fnmatch.fnmatchcase(f, pattern))


# --------------------------------------------------------------------------- helpers
def intersect(per_version: Dict[str, Iterable[str]]) -> List[str]:
    sets = [set(v) for v in per_version.values() if v is not None]
    return sorted(set.intersection(*sets)) if sets else []


def differences(per_version: Dict[str, Iterable[str]]) -> Dict[str, List[str]]:
    """name -> versions that have it, for names not in every version."""
    versions = list(per_version)
    union = set().union(*(set(v or ()) for v in per_version.values()))
    out = {}
    for name in sorted(union):
        have = [ver for ver in versions if per_version[ver] is not None and name in per_version[ver]]
        if len(have) != len(versions):
            out[name] = have
    return out


def function_signature(fn: ast.FunctionDef) -> dict:
    a = fn.args
    positional = [x.arg for x in a.posonlyargs + a.args]
    return {"args": positional, "required": len(positional) - len(a.defaults),
            "kwonly": [x.arg for x in a.kwonlyargs],
            "kwonly_required": [x.arg for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is None],
            "varargs": a.vararg is not None, "varkw": a.kwarg is not None,
            "decorators": [ast.unparse(d) for d in fn.decorator_list]}


def top_level_names(source: str, imports: bool = True) -> Dict[str, Optional[dict]]:
    """Names a module defines at top level (def/class/assignment/import), also inside top-level
    if/try blocks; functions map to their signature, everything else to None."""
    names: Dict[str, Optional[dict]] = {}

    def visit(stmts):
        for node in stmts:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names[node.name] = function_signature(node)
            elif isinstance(node, ast.ClassDef):
                names[node.name] = None
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name):
                            names.setdefault(n.id, None)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
                names.setdefault(node.target.id, None)
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and imports:
                for alias in node.names:
                    if alias.name != "*":
                        names.setdefault((alias.asname or alias.name).split(".")[0], None)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(ast.parse(source).body)
    return names


def dunder_all(source: str) -> Optional[List[str]]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return None


def public_names(source: str) -> List[str]:
    listed = dunder_all(source)
    if listed is not None:
        return listed
    return [n for n in top_level_names(source) if not n.startswith("_")]


def strip_cxx_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def cxx_function_body(text: str, qualified: str) -> Optional[str]:
    """Body of ``qualified(...)`` (e.g. ``vtkMRMLColorTableNode::GetTypeAsString``)."""
    m = re.search(re.escape(qualified) + r"\s*\([^)]*\)\s*(?:const)?\s*\{", text)
    return braced_body(text, m.end()) if m else None


def braced_body(text: str, start: int) -> str:
    """The text from ``start`` (just after an opening brace) to its matching closing brace."""
    depth, i = 1, start
    while depth and i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        i += 1
    return text[start:i - 1]


# --------------------------------------------------------------------------- designer widgets
def plugin_classes(git: Git, ref: str, paths: List[str]) -> Dict[str, str]:
    """widget class -> plugin source path, for plugins that a plugin collection instantiates."""
    found: Dict[str, str] = {}
    by_dir: Dict[str, List[str]] = {}
    for path in paths:
        by_dir.setdefault(path.rsplit("/", 1)[0], []).append(path)
    for directory, plugin_files in by_dir.items():
        collection = "".join(strip_cxx_comments(git.show(ref, f) or "") for f in git.files(ref)
                             if f.startswith(directory + "/") and f.count("/") == directory.count("/") + 1
                             and f.endswith((".h", ".cxx", ".cpp")))
        for path in plugin_files:
            text = strip_cxx_comments(git.show(ref, path) or "")
            m = re.search(r"QString\s+(\w+)\s*::\s*name\(\)\s*const\s*\{\s*return\s+(?:QLatin1String\()?\"(\w+)\"", text)
            if not m:
                continue
            plugin_class, widget_class = m.groups()
            if re.search(r"\bnew\s+" + plugin_class + r"\b", collection):
                found[widget_class] = path
    return found


def qt_designer_widgets(git: Git, ref: str) -> Dict[str, List[str]]:
    table = git.show(ref, QT_WIDGETS_TABLE) or ""
    widgets = re.findall(r"^DECLARE_WIDGET(?:_1)?\((Q\w+)\s*,", table, re.M)
    layouts = re.findall(r"^DECLARE_LAYOUT\((Q\w+)\s*,", table, re.M)
    # the form builder's special class for lines (it creates a QFrame)
    builder = (git.show(ref, QT_FORMBUILDER_EXTRA) or "") + (git.show(ref, QT_FORMBUILDER) or "")
    m = re.search(r"lineClass\(QStringLiteral\(\"(\w+)\"\)\)", builder) or \
        re.search(r"widgetName\s*==\s*\"(\w+)\"_L1\)\s*\{\s*w\s*=\s*new\s+QFrame", builder)
    if m:
        widgets.append(m.group(1))
    return {"widgets": sorted(set(widgets)), "layouts": sorted(set(layouts))}


# --------------------------------------------------------------------------- slicer package
def slicer_submodules(files: List[str]) -> set:
    """Modules of the ``slicer`` package: ``slicer/X.py`` and ``slicer/X/__init__.py``."""
    out = set()
    for f in files:
        if not f.startswith(SLICER_PKG + "/"):
            continue
        rest = f[len(SLICER_PKG) + 1:].split("/")
        if len(rest) == 1 and rest[0].endswith(".py") and rest[0] != "__init__.py":
            out.add(rest[0][:-3])
        elif len(rest) == 2 and rest[1] == "__init__.py" and rest[0] != "tests":
            out.add(rest[0])
    return out


# --------------------------------------------------------------------------- C++ classes
def cxx_classes(git: Git, ref: str) -> Dict[str, dict]:
    """class name -> {"header": path, "base": base class} for classes defined in wrapped headers."""
    classes: Dict[str, dict] = {}
    for pattern in CLASS_HEADER_GLOBS:
        for path in git.glob(ref, pattern):
            if "/Testing/" in path:
                continue
            text = strip_cxx_comments(git.show(ref, path) or "")
            for m in CLASS_DEF.finditer(text):
                name, base = m.groups()
                if name not in classes or Path(path).stem == name:
                    classes[name] = {"header": path, "base": base.split("::")[-1] if base else None}
    return classes


def qt_class_api(text: str, cls: str) -> Optional[dict]:
    """Public slots, Q_INVOKABLE methods, properties and signals declared by ``cls`` in a header."""
    text = strip_cxx_comments(text)
    m = re.search(r"class\s+(?:\w+_EXPORT\s+)?" + cls + r"\s*:\s*public\s+([\w:]+)[^{]*\{", text)
    if not m:
        return None
    body = braced_body(text, m.end())
    api = {"base": m.group(1).split("::")[-1], "slots": set(), "invokables": set(), "properties": set(),
           "signals": set()}
    section = "private"
    for line in body.splitlines():
        s = line.strip()
        label = re.match(r"^(public|protected|private)\s*(slots|Q_SLOTS)?\s*:$", s)
        if label:
            section = label.group(1) + (" slots" if label.group(2) else "")
            continue
        if re.match(r"^(signals|Q_SIGNALS)\s*:$", s):
            section = "signals"
            continue
        prop = re.match(r"Q_PROPERTY\(\s*[\w:<>*& ]+?\s+\*?(\w+)\s+READ", s)
        if prop:
            api["properties"].add(prop.group(1))
            continue
        fn = re.search(r"(~?\w+)\s*\(", s)
        if not fn or s.startswith(("Q_OBJECT", "Q_DECLARE", "Q_DISABLE", "typedef", "friend", "#")):
            continue
        name = fn.group(1)
        if "Q_INVOKABLE" in s and section.startswith("public"):
            api["invokables"].add(re.search(r"(\w+)\s*\(", s.split("Q_INVOKABLE", 1)[1]).group(1))
        elif section == "public slots":
            api["slots"].add(name)
        elif section == "signals":
            api["signals"].add(name)
    return {k: sorted(v) if isinstance(v, set) else v for k, v in api.items()}


# --------------------------------------------------------------------------- parameter node wrapper
_TYPE_FUNCS = {"unannotatedType", "type", "isinstance", "issubclass", "splitAnnotations", "typing.get_origin"}


def _predicate_types(fn: ast.FunctionDef) -> List[str]:
    """Types a ``canRepresent``/``canSerialize`` predicate accepts, read from its comparisons."""
    types = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare):
            lhs = ast.unparse(node.left)
            if "widget" in lhs:  # type(widget) == ...: widget classes, not data types
                continue
            for comp in node.comparators:
                elts = comp.elts if isinstance(comp, (ast.Tuple, ast.List)) else [comp]
                for e in elts:
                    txt = ast.unparse(e)
                    if txt not in ("None",) and "widget" not in txt:
                        types.add(txt)
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func == "issubclass" and len(node.args) == 2:
                types.add(ast.unparse(node.args[1]))
            elif func not in _TYPE_FUNCS and func.startswith("is") and node.args and \
                    ast.unparse(node.args[0]) == "datatype":
                types.add(f"{func}()")  # e.g. isNodeOrUnionOfNodes(datatype): MRML node types
    return sorted(types)


def _predicate_widgets(fn: ast.FunctionDef) -> List[str]:
    widgets = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Compare) and "widget" in ast.unparse(node.left):
            for comp in node.comparators:
                elts = comp.elts if isinstance(comp, (ast.Tuple, ast.List)) else [comp]
                widgets.update(ast.unparse(e).split(".")[-1] for e in elts)
    return sorted(widgets)


def _classes_with(source: str, method: str) -> Dict[str, ast.FunctionDef]:
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    out[node.name] = item
    return out


def parameter_node_wrapper(git: Git, ref: str) -> dict:
    init = git.show(ref, f"{PNW_DIR}/__init__.py")
    exports = set()
    for node in ast.parse(init).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.names[0].name == "*":
                src = git.show(ref, f"{PNW_DIR}/{node.module}.py")
                exports.update(public_names(src))
            else:
                exports.update(a.asname or a.name for a in node.names)
    connectors = {}
    for cls, fn in _classes_with(git.show(ref, f"{PNW_DIR}/guiConnectors.py"), "canRepresent").items():
        widgets = _predicate_widgets(fn)
        if widgets:
            connectors[cls] = {"widgets": widgets, "types": _predicate_types(fn)}
    serializers = {}
    for cls, fn in _classes_with(git.show(ref, f"{PNW_DIR}/serializers.py"), "canSerialize").items():
        types = [t for t in _predicate_types(fn) if "type_" not in t]
        if types:
            serializers[cls] = types
    wrapper = git.show(ref, f"{PNW_DIR}/wrapper.py")
    prop = re.search(r'^SlicerParameterNamePropertyName\s*=\s*"(\w+)"', wrapper, re.M)
    util = git.show(ref, f"{PNW_DIR}/util.py") or ""
    return {"exports": sorted(exports), "connectors": connectors, "serializers": serializers,
            "property_name": prop.group(1) if prop else None,
            "annotated_supported": "Annotated" in util}


# --------------------------------------------------------------------------- colours
def color_nodes(git: Git, ref: str) -> dict:
    table_src = strip_cxx_comments(git.show(ref, COLOR_TABLE_NODE) or "")
    body = cxx_function_body(table_src, "vtkMRMLColorTableNode::GetTypeAsString") or ""
    types = [t for t in re.findall(r'return\s+"([^"]+)"', body) if t not in ("(unknown)", "User", "File")]
    logic = git.show(ref, COLOR_LOGIC) or ""
    # vtkMRMLColorLogic::GetFileColorNodeID: "vtkMRMLColorTableNode" + "File" + file name
    file_prefix = "vtkMRMLColorTableNode" + ("File" if 'std::string("File")' in logic else "")
    files = [p.rsplit("/", 1)[1] for p in git.glob(ref, f"{COLOR_FILES}/*.txt")]
    return {"table_type_ids": sorted("vtkMRMLColorTableNode" + t for t in types),
            "file_ids": {Path(f).stem: file_prefix + f for f in sorted(files)}}


# --------------------------------------------------------------------------- main
def parse_refs(items: List[str]) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in items)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slicer", required=True, help="git dir of Slicer/Slicer")
    p.add_argument("--ctk", required=True, help="git dir of commontk/CTK")
    p.add_argument("--pytorch", required=True, help="git dir of fepegar/SlicerPyTorch")
    p.add_argument("--qttools", help="git dir of qt/qttools (Qt Designer's standard widget list)")
    p.add_argument("--slicer-ref", action="append", help="LABEL=REF (default: %s)" % " ".join(DEFAULT_SLICER_REFS))
    p.add_argument("--qt-ref", action="append", help="LABEL=REF (default: %s)" % " ".join(DEFAULT_QT_REFS))
    p.add_argument("--pytorch-ref", default="HEAD")
    p.add_argument("--output", default=str(DEFAULT_OUTPUT))
    args = p.parse_args(argv)

    slicer, ctk, pytorch = Git(args.slicer), Git(args.ctk), Git(args.pytorch)
    refs = parse_refs(args.slicer_ref or DEFAULT_SLICER_REFS)
    previous = {}
    if Path(args.output).exists():
        previous = json.loads(Path(args.output).read_text())

    sources = {"Slicer": {}, "CTK": {}, "SlicerPyTorch": {}, "Qt": {}}
    for label, ref in refs.items():
        sha = slicer.sha(ref)
        if sha is None:
            raise SystemExit(f"{ref} is not in {args.slicer}")
        sources["Slicer"][label] = {"repo": "Slicer/Slicer", "ref": ref, "sha": sha, "date": slicer.date(sha)}
    shas = {label: s["sha"] for label, s in sources["Slicer"].items()}

    # CTK: the revision each Slicer version builds (SuperBuild/External_CTK.cmake)
    ctk_shas = {}
    for label, sha in shas.items():
        cmake = slicer.show(sha, "SuperBuild/External_CTK.cmake") or ""
        m = re.search(r"Slicer_\$\{proj\}_GIT_TAG\s*\n\s*\"([0-9a-f]{40})\"", cmake)
        wanted = m.group(1) if m else None
        used = wanted if wanted and ctk.sha(wanted) else ctk.sha("HEAD")
        ctk_shas[label] = used
        sources["CTK"][label] = {"repo": "commontk/CTK", "sha": used, "from": "SuperBuild/External_CTK.cmake",
                                 **({} if used == wanted else {"wanted": wanted, "note": "not in the clone; HEAD used"})}

    # ---- designer widgets
    slicer_plugins, ctk_plugins = {}, {}
    for label, sha in shas.items():
        paths = sorted({f for g in SLICER_PLUGIN_GLOBS for f in slicer.glob(sha, g)})
        slicer_plugins[label] = plugin_classes(slicer, sha, paths)
        cpaths = [f for d in CTK_PLUGIN_DIRS for f in ctk.glob(ctk_shas[label], f"{d}/*Plugin.cpp")]
        ctk_plugins[label] = plugin_classes(ctk, ctk_shas[label], cpaths)
    qt = {}
    if args.qttools:
        qtools = Git(args.qttools)
        for label, ref in parse_refs(args.qt_ref or DEFAULT_QT_REFS).items():
            sources["Qt"][label] = {"repo": "qt/qttools", "ref": ref, "sha": qtools.sha(ref)}
            qt[label] = qt_designer_widgets(qtools, ref)
        qt_widgets = intersect({k: v["widgets"] for k, v in qt.items()})
        qt_layouts = intersect({k: v["layouts"] for k, v in qt.items()})
        qt_diff = differences({k: v["widgets"] for k, v in qt.items()})
    else:
        if "designer_widgets" not in previous:
            raise SystemExit(f"--qttools is needed: {args.output} has no Qt widget list to keep")
        prev = previous["designer_widgets"]["qt"]
        sources["Qt"] = previous.get("sources", {}).get("Qt", {})
        qt_widgets, qt_layouts, qt_diff = prev["widgets"], prev["layouts"], prev.get("differences", {})

    per_version = {label: set(slicer_plugins[label]) | set(ctk_plugins[label]) | set(qt_widgets) for label in shas}
    last = list(shas)[-1]
    plugin_of = {}
    for label in shas:  # the newest version wins
        plugin_of.update({c: f"Slicer:{p}" for c, p in slicer_plugins[label].items()})
        plugin_of.update({c: f"CTK:{p}" for c, p in ctk_plugins[label].items()})
    designer = {
        "from": {"Slicer": SLICER_PLUGIN_GLOBS + ["(class = the string returned by <Plugin>::name(); the plugin "
                                                  "must be instantiated by its directory's plugin collection)"],
                 "CTK": [f"{d}/*Plugin.cpp" for d in CTK_PLUGIN_DIRS],
                 "Qt": [QT_WIDGETS_TABLE, QT_FORMBUILDER_EXTRA + ", " + QT_FORMBUILDER + " (the Line class)"]},
        "classes": intersect(per_version),
        "differences": differences(per_version),
        "plugin_of": dict(sorted(plugin_of.items())),
        "qt": {"widgets": qt_widgets, "layouts": qt_layouts, "differences": qt_diff},
    }

    # ---- C++ classes, widget APIs
    classes = {label: cxx_classes(slicer, sha) for label, sha in shas.items()}
    class_names = intersect({k: v.keys() for k, v in classes.items()})
    widget_api = {}
    interesting = [c for c in class_names if c.startswith("qMRML") and
                   (c in designer["classes"] or c in ("qMRMLPlotView", "qMRMLPlotWidget", "qMRMLTableView"))]
    for cls in interesting:
        header = classes[last][cls]["header"]
        api = qt_class_api(slicer.show(shas[last], header) or "", cls)
        if api:
            api["header"] = header
            api["designer_plugin"] = plugin_of.get(cls)
            widget_api[cls] = api
    for cls in list(widget_api):  # add the qMRML ancestors, so inherited slots resolve
        base = widget_api[cls]["base"]
        while base and base.startswith("qMRML") and base not in widget_api and base in classes[last]:
            header = classes[last][base]["header"]
            api = qt_class_api(slicer.show(shas[last], header) or "", base)
            if not api:
                break
            api["header"], api["designer_plugin"] = header, plugin_of.get(base)
            widget_api[base] = api
            base = api["base"]

    # ---- slicer.util
    util = {label: top_level_names(slicer.show(sha, UTIL)) for label, sha in shas.items()}
    util_names = intersect({k: v.keys() for k, v in util.items()})
    signatures = {}
    for name in util_names:
        sigs = {label: util[label][name] for label in shas}
        if all(s is None for s in sigs.values()):
            continue
        uniq = {json.dumps(s, sort_keys=True) for s in sigs.values()}
        signatures[name] = {"all": sigs[last]} if len(uniq) == 1 else sigs

    # ---- slicer.X
    runtime, submodules, slm, packaging, pnw = {}, {}, {}, {}, {}
    runtime_from = {}
    for label, sha in shas.items():
        names = set()
        init = slicer.show(sha, f"{SLICER_PKG}/__init__.py")
        names.update(re.findall(r'_createModule\("slicer\.(\w+)"', init))
        names.update(n for n in top_level_names(init, imports=False) if not n.startswith("_"))
        for node in ast.walk(ast.parse(init)):  # `del x` at the end of __init__.py
            if isinstance(node, ast.Delete):
                names.difference_update(t.id for t in node.targets if isinstance(t, ast.Name))
        qt_paths = [f for f in slicer.files(sha) if f.startswith("Base/Python/") and f.endswith("slicerqt.py")]
        for path in qt_paths:
            text = slicer.show(sha, path)
            names.update(re.findall(r'setattr\(slicer,\s*"(\w+)"', text))
            names.update(re.findall(r"^\s*slicer\.(\w+)\s*=", text, re.M))
        runtime_from[label] = [f"{SLICER_PKG}/__init__.py"] + qt_paths
        runtime[label] = names
        submodules[label] = sorted(slicer_submodules(slicer.files(sha)))
        slm[label] = public_names(slicer.show(sha, SLM))
        src = slicer.show(sha, PACKAGING)
        packaging[label] = None if src is None else {
            n: s for n, s in top_level_names(src).items() if not n.startswith("_") and s is not None}
        pnw[label] = parameter_node_wrapper(slicer, sha)
    module_attrs = {
        "from": {"runtime": runtime_from, "submodules": f"{SLICER_PKG}/*.py, {SLICER_PKG}/*/__init__.py",
                 "classes": CLASS_HEADER_GLOBS, "ScriptedLoadableModule": SLM,
                 "parameterNodeWrapper": f"{PNW_DIR}/__init__.py (+ __all__ of the star-imported modules)",
                 "packaging": PACKAGING},
        "runtime": intersect(runtime), "runtime_differences": differences(runtime),
        "submodules": intersect(submodules), "submodule_differences": differences(submodules),
        "classes": class_names, "class_differences_count": len(differences({k: v.keys() for k, v in classes.items()})),
        "ScriptedLoadableModule": intersect(slm),
        "parameterNodeWrapper": intersect({k: v["exports"] for k, v in pnw.items()}),
        "parameterNodeWrapper_differences": differences({k: v["exports"] for k, v in pnw.items()}),
        "packaging": {label: (None if v is None else sorted(v)) for label, v in packaging.items()},
        "packaging_signatures": {label: v for label, v in packaging.items() if v},
    }

    # ---- parameter node wrapper bindings
    bindable = {}
    for label, info in pnw.items():
        per_type = {}
        for conn in info["connectors"].values():
            for t in conn["types"]:
                per_type.setdefault(t, set()).update(conn["widgets"])
        bindable[label] = {t: sorted(w) for t, w in per_type.items()}
    all_types = set().union(*(b.keys() for b in bindable.values()))
    bindable_all = {t: intersect({label: bindable[label].get(t, []) for label in shas}) for t in sorted(all_types)}
    pnw_facts = {
        "from": [f"{PNW_DIR}/guiConnectors.py (canRepresent)", f"{PNW_DIR}/serializers.py (canSerialize)",
                 f"{PNW_DIR}/wrapper.py", f"{PNW_DIR}/util.py"],
        "property_name": {label: v["property_name"] for label, v in pnw.items()},
        "annotated_supported": {label: v["annotated_supported"] for label, v in pnw.items()},
        "bindable_in_all_versions": bindable_all,
        "connectors": {label: v["connectors"] for label, v in pnw.items()},
        "serializers": {label: v["serializers"] for label, v in pnw.items()},
        "note": "connectors compare type(widget) exactly: a widget QUiLoader created as its base class does not bind",
    }

    # ---- colours
    colors = {label: color_nodes(slicer, sha) for label, sha in shas.items()}
    color_facts = {
        "from": [COLOR_TABLE_NODE + " (GetTypeAsString)", COLOR_LOGIC + " (GetColorNodeID, GetFileColorNodeID)",
                 COLOR_FILES + "/*.txt", COLOR_LOGIC_H + " (table of IDs)"],
        "ids": {name: {label: colors[label]["file_ids"].get(name) for label in shas} for name in ("Inferno", "Viridis")},
        "names": {"Inferno": "Inferno", "Viridis": "Viridis",
                  "note": "CreateFileNode names the node after the file name without extension"},
        "builtin_ids": intersect({label: set(c["table_type_ids"]) | set(c["file_ids"].values())
                                  for label, c in colors.items()}),
    }
    header = slicer.show(shas[last], COLOR_LOGIC_H) or ""
    color_facts["documented_in_header"] = {n: (v[last] in header) for n, v in color_facts["ids"].items()}

    # ---- PyTorchUtils
    pt_sha = pytorch.sha(args.pytorch_ref)
    pt_src = pytorch.show(pt_sha, PYTORCH_UTILS)
    pt_tree = ast.parse(pt_src)
    pt_classes = {}
    for node in pt_tree.body:
        if isinstance(node, ast.ClassDef):
            members = {}
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    sig = function_signature(item)
                    kind = "property" if "property" in sig["decorators"] else \
                        "staticmethod" if "staticmethod" in sig["decorators"] else "method"
                    members[item.name] = {"kind": kind, **sig}
            pt_classes[node.name] = members
    sources["SlicerPyTorch"] = {"repo": "fepegar/SlicerPyTorch", "ref": args.pytorch_ref, "sha": pt_sha,
                                "date": pytorch.date(pt_sha)}
    pytorch_facts = {"from": PYTORCH_UTILS, "sha": pt_sha, "module_names": sorted(top_level_names(pt_src)),
                     "classes": pt_classes,
                     "slicer_util_used": sorted(set(re.findall(r"slicer\.util\.(\w+)", pt_src)))}

    # ---- table view / plot
    def plugin(cls):
        return plugin_of.get(cls)

    table_facts = {"class": "qMRMLTableView", "header": classes[last].get("qMRMLTableView", {}).get("header"),
                   "designer_plugin": plugin("qMRMLTableView"),
                   "setMRMLTableNode": "setMRMLTableNode" in widget_api.get("qMRMLTableView", {}).get("slots", []),
                   "slots": widget_api.get("qMRMLTableView", {}).get("slots", [])}
    plot_facts = {cls: {"header": classes[last].get(cls, {}).get("header"), "designer_plugin": plugin(cls),
                        "base": widget_api.get(cls, {}).get("base"),
                        "slots": widget_api.get(cls, {}).get("slots", []),
                        "invokables": widget_api.get(cls, {}).get("invokables", [])}
                  for cls in ("qMRMLPlotWidget", "qMRMLPlotView")}

    command = " ".join(["python", "Testing/Scripts/extract_slicer_api.py",
                         *(argv if argv is not None else sys.argv[1:])])
    out = {
        "_about": "Facts read from the Slicer/CTK/Qt/SlicerPyTorch sources by Testing/Scripts/extract_slicer_api.py; "
                  "checked against our module by Testing/Python/test_slicer_api.py. Regenerate, don't edit.",
        "generated_by": {"script": "Testing/Scripts/extract_slicer_api.py", "command": command},
        "sources": sources,
        "designer_widgets": designer,
        "slicer_util": {"from": UTIL, "names": util_names, "differences": differences({k: v.keys() for k, v in util.items()}),
                        "signatures": signatures},
        "slicer_module_attributes": module_attrs,
        "parameter_node_wrapper": pnw_facts,
        "color_nodes": color_facts,
        "pytorch_utils": pytorch_facts,
        "table_view": table_facts,
        "plot": plot_facts,
        "widget_api": {"from": "class headers of the newest Slicer version (public slots, Q_INVOKABLE, Q_PROPERTY)",
                       "classes": dict(sorted(widget_api.items()))},
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
