"""Our module against facts read from Slicer's own sources (no Slicer needed).

Some mistakes only show in the real Slicer application: a ``.ui`` widget class that no designer
plugin registers (QUiLoader silently creates its base class instead), a ``slicer.util`` function or
keyword that a supported Slicer version lacks, a ``slicer.X`` name that does not exist, a
PyTorchUtils method that the PyTorch extension does not have. The facts are in
``ImbalanceSeg/Testing/Data/slicer_api.json``, extracted from the Slicer/CTK/Qt/SlicerPyTorch git
sources (versions and commits in its ``sources``) by ``Testing/Scripts/extract_slicer_api.py``;
rerun that script to check against a new Slicer version.

The walkers find uses anywhere under ``ImbalanceSeg/`` (module file, ``ImbalanceSegSlicer/``, ...),
so they keep working when code moves. ``ImbalanceSeg/Testing/Python/test_ui.py`` checks the classes
the widget code expects per widget name; this file checks what Slicer can actually provide.
"""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "ImbalanceSeg"
API_FILE = MODULE / "Testing" / "Data" / "slicer_api.json"


# --------------------------------------------------------------------------- inputs
@lru_cache(maxsize=None)
def api() -> dict:
    return json.loads(API_FILE.read_text())


def versions(repo: str = "Slicer") -> str:
    return ", ".join(f"{label} ({info['sha'][:10]})" for label, info in api()["sources"][repo].items())


def _skip(path: Path) -> bool:
    rel = path.relative_to(MODULE).parts
    return "Testing" in rel or "__pycache__" in rel


def python_files() -> List[Path]:
    return sorted(p for p in MODULE.rglob("*.py") if not _skip(p))


def ui_files() -> List[Path]:
    return sorted(p for p in MODULE.rglob("*.ui") if not _skip(p))


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def line_of(path: Path, pattern: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if re.search(pattern, line):
            return i
    return 0


# --------------------------------------------------------------------------- AST walker
class Use(NamedTuple):
    dotted: str          # e.g. "slicer.util.tryWithErrorDisplay", "PyTorchUtils.PyTorchUtilsLogic().installTorch"
    path: Path
    line: int
    call: Optional[ast.Call]  # the call, when the use is called
    in_with: bool        # used as a ``with`` context manager


ROOTS = ("slicer", "PyTorchUtils")


class Resolver(ast.NodeVisitor):
    """Resolves names and attribute chains to dotted names rooted at an imported module in ROOTS,
    through imports (with aliases), ``from X import Y`` and simple instance assignments
    (``logic = PyTorchUtils.PyTorchUtilsLogic()``; ``self.logic = ...``)."""

    def __init__(self, path: Path, tree: ast.AST):
        self.path = path
        self.aliases: Dict[str, str] = {}
        self.instances: Dict[str, str] = {}
        self.uses: List[Use] = []
        self.imports: List[Tuple[str, str, int]] = []  # (module, name, line) for ``from module import name``
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] in ROOTS:
                        if a.asname:
                            self.aliases[a.asname] = a.name
                        else:
                            self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]
                        self.imports.append((a.name, "", node.lineno))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                    and node.module.split(".")[0] in ROOTS:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                    self.imports.append((node.module, a.name, node.lineno))
        for _ in range(2):  # instances assigned from other instances
            for node in ast.walk(tree):
                if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Call):
                    value = self.resolve(node.value)
                    if value:
                        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                        for t in targets:
                            key = self._key(t)
                            if key:
                                self.instances[key] = value
        self.with_items = {id(item.context_expr) for node in ast.walk(tree) if isinstance(node, (ast.With, ast.AsyncWith))
                           for item in node.items}
        self.visit(tree)

    @staticmethod
    def _key(node) -> Optional[str]:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return "self." + node.attr
        return None

    def resolve(self, node) -> Optional[str]:
        key = self._key(node)
        if key in self.instances:
            return self.instances[key]
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self.resolve(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            base = self.resolve(node.func)
            return f"{base}()" if base else None
        return None

    def visit_Attribute(self, node: ast.Attribute):
        dotted = self.resolve(node)
        if dotted:
            self.uses.append(Use(dotted, self.path, node.lineno, None, False))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call):
        dotted = self.resolve(node.func)
        if dotted:
            self.uses.append(Use(dotted, self.path, node.lineno, node, id(node) in self.with_items))
        self.generic_visit(node)

    def visit_Name(self, node: ast.Name):
        if node.id in self.aliases and "." in self.aliases[node.id] and self._key(node) not in self.instances:
            self.uses.append(Use(self.aliases[node.id], self.path, node.lineno, None, False))


@lru_cache(maxsize=None)
def parsed() -> Tuple[Tuple[Path, ast.AST], ...]:
    return tuple((p, ast.parse(p.read_text(), filename=str(p))) for p in python_files())


@lru_cache(maxsize=None)
def resolvers() -> Tuple[Resolver, ...]:
    return tuple(Resolver(p, tree) for p, tree in parsed())


def uses(prefix: str) -> Iterator[Use]:
    seen = set()
    for r in resolvers():
        for u in r.uses:
            if (u.dotted == prefix or u.dotted.startswith(prefix + ".")) and (u.dotted, u.line, u.call is None) not in seen:
                seen.add((u.dotted, u.line, u.call is None))
                yield u
        for module, name, line in r.imports:  # ``from slicer.util import X`` is a use of slicer.util.X
            dotted = f"{module}.{name}" if name else module
            if dotted.startswith(prefix + ".") and (dotted, line, True) not in seen:
                seen.add((dotted, line, True))
                yield Use(dotted, r.path, line, None, False)


def where(u: Use) -> str:
    return f"{rel(u.path)}:{u.line}"


def check_call(call: ast.Call, sig: dict, skip_self: bool) -> List[str]:
    """Problems of ``call`` against a recorded signature (keyword names, positional count)."""
    params = sig["args"][1:] if skip_self and sig["args"][:1] == ["self"] else sig["args"]
    problems = []
    if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
        return problems  # *args / **kwargs: not checkable
    if len(call.args) > len(params) and not sig["varargs"]:
        problems.append(f"{len(call.args)} positional arguments, it takes {len(params)} ({', '.join(params)})")
    for k in call.keywords:
        if k.arg not in params and k.arg not in sig["kwonly"] and not sig["varkw"]:
            problems.append(f"keyword {k.arg!r} is not a parameter ({', '.join(params + sig['kwonly'])})")
    return problems


def signatures_by_version(entry: dict) -> Dict[str, dict]:
    return {label: entry["all"] for label in api()["sources"]["Slicer"]} if "all" in entry else entry


# --------------------------------------------------------------------------- .ui
@lru_cache(maxsize=None)
def ui_roots() -> Tuple[Tuple[Path, ET.Element], ...]:
    return tuple((p, ET.parse(p).getroot()) for p in ui_files())


def ui_widget_classes() -> Dict[str, str]:
    return {w.get("name"): w.get("class") for _, root in ui_roots() for w in root.iter("widget")}


# =========================================================================== a. .ui widget classes
def test_ui_files_exist():
    assert ui_files(), f"no .ui file under {rel(MODULE)}"


def test_every_ui_class_can_be_created_by_slicer_loadUI():
    dw = api()["designer_widgets"]
    known = set(dw["classes"])
    layouts = set(dw["qt"]["layouts"])
    src = (f"Slicer {versions()} designer plugins ({', '.join(dw['from']['Slicer'][:2])}), CTK "
           f"{', '.join(dw['from']['CTK'])} at the revisions Slicer builds, Qt Designer's {dw['from']['Qt'][0]}")
    problems = []
    for path, root in ui_roots():
        extends = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
        for w in root.iter("widget"):
            cls = w.get("class")
            if cls in known:
                continue
            only = dw["differences"].get(cls)
            why = (f"registered only in Slicer {', '.join(only)}" if only else
                   "no designer plugin registers it and Qt Designer does not provide it")
            line = line_of(path, 'name="' + re.escape(w.get("name", "")) + '"')
            problems.append(f"{rel(path)}:{line}: widget "
                            f"{w.get('name')!r} has class {cls}: {why}; slicer.util.loadUI (QUiLoader) would "
                            f"create its <extends> base class {extends.get(cls) or '(none: no widget at all)'} "
                            f"instead, and {cls} methods/slots would be missing")
        for lay in root.iter("layout"):
            if lay.get("class") not in layouts:
                problems.append(f"{rel(path)}: layout {lay.get('name')!r} has class {lay.get('class')}, not a Qt "
                                f"Designer layout ({', '.join(sorted(layouts))})")
    assert not problems, "\n".join(dict.fromkeys(problems)) + f"\n(checked against {src})"


# =========================================================================== b. slicer.util
def test_slicer_util_names_exist_in_every_supported_slicer():
    su = api()["slicer_util"]
    names = set(su["names"])
    problems = []
    for u in uses("slicer.util"):
        parts = u.dotted.split(".")
        if len(parts) < 3:
            continue
        name = parts[2].rstrip("()")
        if name not in names:
            only = su["differences"].get(name)
            problems.append(f"{where(u)}: slicer.util.{name} is not defined in {su['from']} of "
                            + (f"every supported Slicer (only in {', '.join(only)})" if only else f"Slicer {versions()}"))
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_slicer_util_calls_match_the_signatures():
    su = api()["slicer_util"]
    problems = []
    for u in uses("slicer.util"):
        parts = u.dotted.split(".")
        if u.call is None or len(parts) != 3 or parts[2] not in su["signatures"]:
            continue
        for label, sig in signatures_by_version(su["signatures"][parts[2]]).items():
            for p in check_call(u.call, sig, skip_self=False):
                problems.append(f"{where(u)}: slicer.util.{parts[2]}(): {p} in Slicer {label} ({su['from']})")
            if u.in_with and "contextmanager" not in sig["decorators"]:
                problems.append(f"{where(u)}: `with slicer.util.{parts[2]}(...)` but it is not a context manager "
                                f"in Slicer {label} ({su['from']})")
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== c. slicer.X
def _slicer_names() -> Dict[str, str]:
    """first-level name -> what it is, for names present in every supported Slicer version."""
    m = api()["slicer_module_attributes"]
    names = {n: "runtime attribute" for n in m["runtime"]}
    names.update({n: "submodule" for n in m["submodules"]})
    names.update({n: "class" for n in m["classes"]})
    return names


def _submodule_names(module: str) -> Optional[List[str]]:
    m = api()["slicer_module_attributes"]
    return {"ScriptedLoadableModule": m["ScriptedLoadableModule"],  # slicer.util: test b
            "parameterNodeWrapper": m["parameterNodeWrapper"]}.get(module)


def test_slicer_attributes_exist_in_every_supported_slicer():
    m = api()["slicer_module_attributes"]
    known = _slicer_names()
    problems = []
    for u in uses("slicer"):
        parts = [p.rstrip("()") for p in u.dotted.split(".")]
        if len(parts) < 2:
            continue
        name = parts[1]
        if name not in known:
            only = m["submodule_differences"].get(name) or m["runtime_differences"].get(name)
            problems.append(
                f"{where(u)}: slicer.{name} " + (f"exists only in Slicer {', '.join(only)}" if only else
                                                 f"is not a slicer attribute, submodule or wrapped class in Slicer "
                                                 f"{versions()}") +
                f" (checked: {m['from']['submodules']}, slicerqt.py/__init__.py runtime attributes, class headers "
                f"{', '.join(m['from']['classes'][:3])}, ...)")
            continue
        members = _submodule_names(name)
        if members is not None and len(parts) >= 3 and parts[2] not in members:
            problems.append(f"{where(u)}: slicer.{name}.{parts[2]} is not defined by slicer.{name} in every "
                            f"supported Slicer ({m['from'].get(name, 'Base/Python/slicer/' + name + '.py')})")
    assert not problems, "\n".join(dict.fromkeys(problems))


def _string_constants() -> Iterator[Tuple[str, Path, int]]:
    for path, tree in parsed():
        fstring_parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in fstring_parts:
                yield node.value, path, node.lineno
    for path, root in ui_roots():
        for prop in root.iter("property"):
            if prop.get("name") == "nodeTypes":
                for s in prop.iter("string"):
                    yield s.text or "", path, line_of(path, re.escape(s.text or "~"))


def test_mrml_class_names_and_node_ids_in_strings_exist():
    """Class names passed as strings (AddNewNodeByClass, GetNodesByClass, nodeTypes in .ui) and
    built-in node IDs (colour tables) must exist in every supported Slicer."""
    classes = set(api()["slicer_module_attributes"]["classes"])
    colors = api()["color_nodes"]
    ids = set(colors["builtin_ids"])
    problems = []
    for text, path, line in _string_constants():
        if not re.fullmatch(r"(vtkMRML|vtkSlicer|qMRML|qSlicer)[A-Za-z0-9_.\-]+", text):
            continue
        if text in classes or text in ids:
            continue
        problems.append(f"{rel(path)}:{line}: {text!r} is neither a class of Slicer {versions()} "
                        f"(headers {', '.join(api()['slicer_module_attributes']['from']['classes'][:3])}, ...) "
                        f"nor a built-in node ID ({', '.join(colors['from'][:3])})")
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== d. PyTorchUtils
def test_pytorchutils_calls_exist_in_the_pytorch_extension():
    pt = api()["pytorch_utils"]
    src = f"fepegar/SlicerPyTorch {pt['from']} @ {pt['sha'][:10]}"
    problems = []
    for u in uses("PyTorchUtils"):
        parts = u.dotted.split(".")
        if len(parts) < 2:
            continue
        top = parts[1].rstrip("()")
        if top not in pt["module_names"]:
            problems.append(f"{where(u)}: PyTorchUtils.{top} is not defined in {src}")
            continue
        if len(parts) < 3 or top not in pt["classes"]:
            continue
        member = parts[2].rstrip("()")
        info = pt["classes"][top].get(member)
        if info is None:
            problems.append(f"{where(u)}: PyTorchUtils.{top}.{member} is not a member of {top} in {src} "
                            f"(members: {', '.join(n for n in pt['classes'][top] if not n.startswith('_'))})")
            continue
        if u.call is not None and len(parts) == 3 and info["kind"] != "property":
            instance = parts[1].endswith("()")
            for p in check_call(u.call, info, skip_self=instance or info["kind"] == "method"):
                problems.append(f"{where(u)}: {top}.{member}(): {p} ({src})")
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== e. self.ui.NAME
def _ui_object_names() -> Dict[str, Path]:
    names = {}
    for path, root in ui_roots():
        for tag in ("widget", "layout", "action", "actiongroup"):
            for el in root.iter(tag):
                if el.get("name"):
                    names[el.get("name")] = path
    return names


def _ui_attribute_uses() -> Iterator[Tuple[str, Path, int]]:
    """NAME in ``<x>.ui.NAME``, ``getattr(<x>.ui, "NAME")`` and ``v.NAME`` where
    ``v = slicer.util.childWidgetVariables(...)``, in every module file."""
    for path, tree in parsed():
        ui_vars = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) and isinstance(n.value, ast.Call)
                   and ast.unparse(n.value.func).endswith("childWidgetVariables")
                   for t in n.targets if isinstance(t, ast.Name)}

        def is_ui(node) -> bool:
            return (isinstance(node, ast.Attribute) and node.attr == "ui") or \
                (isinstance(node, ast.Name) and node.id in ui_vars)

        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and is_ui(node.value):
                yield node.attr, path, node.lineno
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in (
                    "getattr", "hasattr", "setattr") and node.args and is_ui(node.args[0]) and len(node.args) > 1 \
                    and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str):
                yield node.args[1].value, path, node.lineno


def test_every_ui_member_used_anywhere_is_an_object_in_a_ui_file():
    names = _ui_object_names()
    problems = [f"{rel(path)}:{line}: ui.{name} is used but no .ui file under {rel(MODULE)} has an object "
                f"named {name!r} (slicer.util.childWidgetVariables only provides named children)"
                for name, path, line in _ui_attribute_uses() if name not in names]
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== f. parameter node bindings
class Field(NamedTuple):
    owner: str
    name: str
    key: str     # type key as in parameter_node_wrapper (e.g. "float", "pathlib.Path", "isNodeOrUnionOfNodes()")
    path: Path
    line: int


@lru_cache(maxsize=None)
def _parameter_classes() -> Dict[str, Tuple[str, Tuple[Field, ...]]]:
    """class name -> (decorator, fields) for classes decorated with parameterNodeWrapper/parameterPack."""
    out = {}
    for path, tree in parsed():
        enums = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                 and any("Enum" in ast.unparse(b) for b in n.bases)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.ClassDef):
                continue
            kinds = [ast.unparse(d).split("(")[0].split(".")[-1] for d in node.decorator_list]
            kind = next((k for k in kinds if k in ("parameterNodeWrapper", "parameterPack")), None)
            if kind:
                out[node.name] = (kind, tuple(
                    Field(node.name, st.target.id, _type_key(st.annotation, enums), path, st.lineno)
                    for st in node.body if isinstance(st, ast.AnnAssign) and isinstance(st.target, ast.Name)))
    return out


def _parameter_fields() -> Iterator[Field]:
    for _, fields in _parameter_classes().values():
        yield from fields


def _bindable_parameters() -> Dict[str, Field]:
    """Parameter names a widget can be bound to: wrapper fields, and ``field.sub`` for parameterPack fields."""
    classes = _parameter_classes()

    def expand(prefix: str, f: Field, depth=0):
        pack = classes.get(f.key)
        if pack and pack[0] == "parameterPack" and depth < 10:
            for sub in pack[1]:
                yield from expand(f"{prefix}.{sub.name}", sub, depth + 1)
        else:
            yield prefix, f

    out = {}
    for kind, fields in classes.values():
        if kind == "parameterNodeWrapper":
            for f in fields:
                out.update(expand(f.name, f))
    return out


def _type_key(ann: ast.AST, enums) -> str:
    if isinstance(ann, ast.Subscript) and ast.unparse(ann.value).split(".")[-1] == "Annotated":
        ann = ann.slice.elts[0] if isinstance(ann.slice, ast.Tuple) else ann.slice
    text = ast.unparse(ann)
    if isinstance(ann, ast.Subscript) and ast.unparse(ann.value).split(".")[-1] in ("Optional", "Union"):
        inner = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
        if all(ast.unparse(i).split(".")[-1].startswith("vtkMRML") or ast.unparse(i) == "None" for i in inner):
            return "isNodeOrUnionOfNodes()"
    last = text.split(".")[-1]
    if last.startswith("vtkMRML"):
        return "isNodeOrUnionOfNodes()"
    if last in ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"):
        return "pathlib." + last
    if last in enums:
        return "enum.Enum"
    return text


def test_parameter_bindings_in_ui_can_be_made_by_every_supported_slicer():
    pnw = api()["parameter_node_wrapper"]
    bindable = pnw["bindable_in_all_versions"]
    prop_names = set(pnw["property_name"].values())
    assert len(prop_names) == 1, f"the binding property differs between versions: {pnw['property_name']}"
    prop_name = prop_names.pop()
    fields = _bindable_parameters()
    problems = []
    for path, root in ui_roots():
        for w in root.iter("widget"):
            for prop in w.findall("property"):
                if prop.get("name") != prop_name:
                    continue
                field = prop.findtext("string")
                if field not in fields:
                    continue  # unknown parameters: test_ui.py
                cls, key, fpath, fline = fields[field].owner, fields[field].key, fields[field].path, fields[field].line
                ok = bindable.get(key)
                if ok is None:
                    problems.append(f"{rel(fpath)}:{fline}: {cls}.{field} has type {key}, which no GUI connector "
                                    f"of every supported Slicer handles ({pnw['from'][0]})")
                elif w.get("class") not in ok:
                    problems.append(f"{rel(path)}: widget {w.get('name')!r} ({w.get('class')}) is bound to "
                                    f"{cls}.{field} ({key}), but in Slicer {versions()} only {', '.join(ok)} can "
                                    f"represent {key} ({pnw['from'][0]}; the class is compared exactly)")
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_parameter_field_types_can_be_serialized_by_every_supported_slicer():
    pnw = api()["parameter_node_wrapper"]
    problems = []
    packs = {name for name, (kind, _) in _parameter_classes().items() if kind == "parameterPack"}
    for cls, field, key, path, line in _parameter_fields():
        if key in packs:
            continue  # a parameterPack: its own fields are checked
        key = "slicer.vtkMRMLNode" if key == "isNodeOrUnionOfNodes()" else key
        key = key.split("[")[0]
        for label, serializers in pnw["serializers"].items():
            if not any(key in types for types in serializers.values()):
                problems.append(f"{rel(path)}:{line}: {cls}.{field}: no serializer for {key} in Slicer {label} "
                                f"({pnw['from'][1]})")
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== g. MRML widget slots
def test_mrml_widget_methods_called_through_ui_exist():
    """``ui.NAME.setMRML...()``/``ui.NAME.mrml...()`` on a qMRML widget: the slot must be declared
    by the widget's class (or a qMRML base class) in Slicer's header."""
    classes = api()["widget_api"]["classes"]
    widget_class = ui_widget_classes()
    problems = []
    for path, tree in parsed():
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            target = node.func.value
            if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "ui"):
                continue
            method, cls = node.func.attr, widget_class.get(target.attr)
            if cls not in classes or not method.startswith(("setMRML", "mrml")):
                continue
            chain, c = [], cls
            while c in classes:
                chain.append(c)
                if method in set(classes[c]["slots"]) | set(classes[c]["invokables"]):
                    break
                c = classes[c]["base"]
            else:
                problems.append(f"{rel(path)}:{node.lineno}: ui.{target.attr} is a {cls}, which has no slot "
                                f"{method} ({' -> '.join(classes[x]['header'] for x in chain)}, Slicer "
                                f"{list(api()['sources']['Slicer'])[-1]})")
    assert not problems, "\n".join(dict.fromkeys(problems))


# =========================================================================== the facts themselves
@pytest.mark.parametrize("section", ["designer_widgets", "slicer_util", "slicer_module_attributes",
                                     "color_nodes", "pytorch_utils", "table_view", "plot",
                                     "parameter_node_wrapper", "widget_api"])
def test_facts_file_has_its_sections(section):
    assert section in api(), f"{rel(API_FILE)} lacks {section}; regenerate it with {api()['generated_by']['script']}"
    labels = set(api()["sources"]["Slicer"])
    assert {"5.8.1", "5.10.0"} <= labels, f"{rel(API_FILE)} does not cover the supported Slicer versions: {labels}"
