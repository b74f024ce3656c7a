"""A stand-in for the parts of the 3D Slicer application that the module file's widget uses, so
the widget's own code (setup, signal handlers, timer ticks, scene close) runs under pytest on a
real ``slicer-core`` scene.

What it reproduces, from Slicer's source (versions and paths in ../Data/slicer_api.json):

* ``slicer.util.loadUI`` builds only the widget classes Slicer registers a designer plugin for;
  any other class in a .ui silently becomes a plain QWidget, which has none of the class's
  methods (``designer_widgets``).
* PythonQt calls the handlers of one signal in the order they were connected, so a handler the
  widget connects in ``setup`` runs before the parameter node's own binding (connected later by
  ``connectGui``) has stored the new value.
* ``slicer.util.tryWithErrorDisplay`` shows the error and re-raises it (Base/Python/slicer/util.py).
* ``ScriptedLoadableModuleLogic.getParameterNode`` keeps one ``vtkMRMLScriptedModuleNode`` per
  module in the scene; closing the scene removes it and every other node.

The widgets are small Python objects with the members the module uses (properties, methods and
signals of the Qt/CTK/MRML classes); calling a member a class does not have raises
AttributeError, as it would inside Slicer. It is not a Qt: nothing is drawn.
"""

import contextlib
import json
import sys
import types
import typing
import unittest
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[2]
API = json.loads((MODULE_DIR / "Testing" / "Data" / "slicer_api.json").read_text())
DESIGNER_CLASSES = set(API["designer_widgets"]["classes"])
#: What Qt would print on the console (a .ui connection to a slot the widget does not have).
WARNINGS = []


def _accepted(handler, offered):
    """How many of a signal's arguments PythonQt passes: as many as the callable accepts."""
    import inspect
    try:
        params = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return offered
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return offered
    return min(offered, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params))


# --- widgets --------------------------------------------------------------------------------

class QWidget:
    """What loadUI makes of a class without a designer plugin: none of that class's members."""

    def __init__(self, className, name):
        self.className, self.objectName = className, name
        self.enabled, self.visible, self.toolTip = True, True, ""
        self.parameterName = None  # the SlicerParameterName property
        self._handlers, self._blocked = {}, False

    def connect(self, signal, handler):
        self._handlers.setdefault(signal, []).append(handler)

    def disconnect(self, signal, handler):
        self._handlers.get(signal, []).remove(handler)

    def emit(self, signal, *args):
        if not self._blocked:
            for handler in list(self._handlers.get(signal, [])):
                handler(*args[:_accepted(handler, len(args))])

    def blockSignals(self, block):
        old, self._blocked = self._blocked, bool(block)
        return old

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False


class _Valued(QWidget):
    """A widget with one value property whose change emits ``_signal``."""

    _signal, _initial = "", None

    def __init__(self, className, name):
        super().__init__(className, name)
        self._value = self._initial

    def _set(self, value):
        if value != self._value:
            self._value = value
            self.emit(self._signal, value)


class QLabel(QWidget):
    text = ""


class QPushButton(QWidget):
    def click(self):
        if self.enabled:
            self.emit("clicked(bool)", False)


class QProgressBar(QWidget):
    value = 0


class QTextBrowser(QWidget):
    html = ""

    def setHtml(self, text):
        self.html = text

    def setPlainText(self, text):
        self.html = text


class ctkCollapsibleButton(QWidget):
    collapsed = False


class QComboBox(QWidget):
    def __init__(self, className, name):
        super().__init__(className, name)
        self.items, self._index = [], -1

    def _setIndex(self, index):
        if index != self._index:
            self._index = index
            self.emit("currentIndexChanged(int)", index)

    currentIndex = property(lambda self: self._index, _setIndex)
    count = property(lambda self: len(self.items))
    def _setText(self, text):  # Qt 5: WRITE setCurrentText selects the matching item (not editable)
        index = self.findText(text)
        if index >= 0:
            self._setIndex(index)

    currentText = property(lambda self: self.items[self._index][0] if self._index >= 0 else "", _setText)
    currentData = property(lambda self: self.items[self._index][1] if self._index >= 0 else None)

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self._index < 0:
            self._setIndex(0)

    def addItems(self, texts):
        for text in texts:
            self.addItem(text)

    def clear(self):
        self.items = []
        self._setIndex(-1)

    def findText(self, text):
        return next((i for i, (t, _) in enumerate(self.items) if t == text), -1)

    def findData(self, data):
        return next((i for i, (_, d) in enumerate(self.items) if d == data), -1)


class qMRMLWidget(QWidget):
    def __init__(self, className, name):
        super().__init__(className, name)
        self.scene, self.children = None, {}

    def setMRMLScene(self, scene):
        self.scene = scene
        self.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)


class qMRMLNodeComboBox(QWidget):
    def __init__(self, className, name):
        super().__init__(className, name)
        self.scene, self._node = None, None

    def setMRMLScene(self, scene):
        self.scene = scene
        if self._node is not None and self._node.GetScene() is not scene:
            self.setCurrentNode(None)

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self._node = node
            self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def currentNodeID(self):
        return self._node.GetID() if self._node is not None else ""


class qMRMLCheckableNodeComboBox(qMRMLNodeComboBox):
    checked = ()

    def checkedNodes(self):
        return list(self.checked)


class ctkSliderWidget(_Valued):
    _signal, _initial = "valueChanged(double)", 0.0
    value = property(lambda self: self._value, lambda self, v: self._set(float(v)))


class QSpinBox(_Valued):
    _signal, _initial = "valueChanged(int)", 0
    value = property(lambda self: self._value, lambda self, v: self._set(int(v)))


class QLineEdit(_Valued):
    _signal, _initial = "textChanged(QString)", ""
    text = property(lambda self: self._value, lambda self, v: self._set(str(v)))


class QCheckBox(_Valued):
    _signal, _initial = "toggled(bool)", False
    checked = property(lambda self: self._value, lambda self, v: self._set(bool(v)))


class ctkPathLineEdit(_Valued):
    _signal, _initial = "currentPathChanged(QString)", ""
    currentPath = property(lambda self: self._value, lambda self, v: self._set(str(v)))


class qMRMLTableView(QWidget):
    table = None

    def setMRMLScene(self, scene):
        self.scene = scene

    def setMRMLTableNode(self, node):
        self.table = node


class qMRMLPlotWidget(QWidget):
    viewNode = None

    def setMRMLScene(self, scene):
        self.scene = scene

    def setMRMLPlotViewNode(self, node):
        self.viewNode = node


WIDGET_CLASSES = {c.__name__: c for c in (
    QLabel, QPushButton, QProgressBar, QTextBrowser, ctkCollapsibleButton, QComboBox, qMRMLWidget,
    qMRMLNodeComboBox, qMRMLCheckableNodeComboBox, ctkSliderWidget, QSpinBox, QLineEdit, QCheckBox,
    ctkPathLineEdit, qMRMLTableView, qMRMLPlotWidget)}


def loadUI(path):
    """The root widget of a .ui file; ``root.children`` maps object names to widgets."""
    tree = ET.parse(path).getroot()
    widgets = {}
    for element in tree.iter("widget"):
        cls = element.get("class")
        if cls in DESIGNER_CLASSES and cls in WIDGET_CLASSES:
            widget = WIDGET_CLASSES[cls](cls, element.get("name"))
        elif cls in DESIGNER_CLASSES:
            raise NotImplementedError(f"the fake application has no {cls} yet: add it to fake_slicer_app.py")
        else:
            widget = QWidget(cls, element.get("name"))  # no designer plugin: a plain QWidget
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                widget.parameterName = prop.find("string").text
        widgets[widget.objectName] = widget
    root = widgets[tree.find("widget").get("name")]
    root.children = widgets
    for c in tree.iter("connection"):  # e.g. mrmlSceneChanged(vtkMRMLScene*) -> setMRMLScene
        receiver = widgets[c.find("receiver").text]
        slot = c.find("slot").text.split("(")[0]
        if not hasattr(receiver, slot):  # Qt only warns: "QObject::connect: No such slot"
            WARNINGS.append(f"QObject::connect: No such slot {receiver.className}::{c.find('slot').text}")
            continue
        widgets[c.find("sender").text].connect(c.find("signal").text, getattr(receiver, slot))
    return root


def childWidgetVariables(root):
    return types.SimpleNamespace(**root.children)


# --- application ----------------------------------------------------------------------------

class QSettings:
    store = {}

    def value(self, key, default=None):
        return self.store.get(key, default)

    def setValue(self, key, value):
        self.store[key] = value


class QTimer:
    def __init__(self):
        self.interval, self.active, self._handlers = 0, False, []

    def setInterval(self, ms):
        self.interval = ms

    def connect(self, signal, handler):
        assert signal == "timeout()", signal
        self._handlers.append(handler)

    def start(self):
        self.active = True

    def stop(self):
        self.active = False

    def fire(self):
        """One timeout, as the event loop would deliver it while the timer runs."""
        if self.active:
            for handler in list(self._handlers):
                handler()


class App:
    """``slicer.app`` and what the test controls of the user's answers."""

    def __init__(self):
        self.testing = False
        self.confirm = True
        self.errors, self.layouts, self.pipInstalls, self.viewerLayers = [], [], [], []
        self.defaultScenePath = "/tmp/ImbalanceSegScenes"
        self.nextDirectory = ""

    def testingEnabled(self):
        return self.testing

    def connect(self, signal, handler):
        pass

    def processEvents(self):
        pass

    def setOverrideCursor(self, cursor):
        pass

    def restoreOverrideCursor(self):
        pass

    def layoutManager(self):
        app = self
        return types.SimpleNamespace(setLayout=app.layouts.append, sliceWidget=lambda name: None)

    def applicationLogic(self):
        selection = types.SimpleNamespace(SetActiveTableID=lambda node_id: None)
        return types.SimpleNamespace(GetSelectionNode=lambda: selection, PropagateTableSelection=lambda: None)


# --- parameter node wrapper ------------------------------------------------------------------

class WithinRange:
    def __init__(self, lo, hi):
        self.lo, self.hi = lo, hi


def parameterPack(cls):
    cls._isParameterPack = True
    return cls


def _fields(cls):
    hints = typing.get_type_hints(cls, include_extras=True)
    out = {}
    for name, hint in hints.items():
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        out[name] = (base, cls.__dict__.get(name))
    return out


def _to_text(value):
    return json.dumps(value)


class _PackView:
    """A parameter pack read and written through to the node (``pn.run.device = "cuda"``)."""

    def __init__(self, wrapper, prefix, cls):
        object.__setattr__(self, "_wrapper", wrapper)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_fields", _fields(cls))

    def __getattr__(self, name):
        if name not in self._fields:
            raise AttributeError(name)
        return self._wrapper._get(f"{self._prefix}.{name}", *self._fields[name])

    def __setattr__(self, name, value):
        if name not in self._fields:
            raise AttributeError(f"parameter pack has no member {name!r}")
        self._wrapper._set(f"{self._prefix}.{name}", self._fields[name][0], value)


def parameterNodeWrapper(cls):
    fields = _fields(cls)

    class Wrapper:
        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            object.__setattr__(self, "_bindings", {})
            for name, (kind, default) in fields.items():
                if getattr(kind, "_isParameterPack", False):
                    for sub, (subkind, subdefault) in _fields(kind).items():
                        if not node.GetParameter(f"{name}.{sub}"):
                            node.SetParameter(f"{name}.{sub}", _to_text(subdefault))
                elif kind in (str, int, float, bool) and not node.GetParameter(name):
                    node.SetParameter(name, _to_text(default))

        def _get(self, name, kind, default=None):
            if getattr(kind, "_isParameterPack", False):
                return _PackView(self, name, kind)
            if isinstance(kind, type) and kind.__name__.startswith("vtkMRML"):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return kind(json.loads(text)) if text else default

        def _set(self, name, kind, value):
            if isinstance(kind, type) and kind.__name__.startswith("vtkMRML"):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, _to_text(kind(value)))
            for widget in self._bindings.get(name, []):
                _show(widget, value)

        def __getattr__(self, name):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            return self._get(name, *fields[name])

        def __setattr__(self, name, value):
            if name not in fields:
                raise AttributeError(f"{cls.__name__} has no parameter {name!r}")
            self._set(name, fields[name][0], value)

        # Forwarded to the node, as Slicer's wrapper does (parameterNodeWrapper/wrapper.py).
        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def StartModify(self):
            return self.parameterNode.StartModify()

        def EndModify(self, wasModified):
            return self.parameterNode.EndModify(wasModified)

        def Modified(self):
            self.parameterNode.Modified()

        def connectGui(self, ui):
            tag = []
            for widget in vars(ui).values():
                name = widget.parameterName
                if not name:
                    continue
                if name not in fields:
                    raise ValueError(f"{widget.objectName} is bound to unknown parameter {name!r}")
                signal = _SIGNALS.get(type(widget))
                if signal is None:
                    raise TypeError(f"parameter {name!r} cannot be bound to a {widget.className}")
                _show(widget, getattr(self, name))

                def handler(*args, _widget=widget, _name=name):
                    self._set(_name, fields[_name][0], _value(_widget))
                widget.connect(signal, handler)
                self._bindings.setdefault(name, []).append(widget)
                tag.append((widget, signal, handler))
            return tag

        def disconnectGui(self, tag):
            for widget, signal, handler in tag or ():
                widget.disconnect(signal, handler)
                self._bindings.get(widget.parameterName, []).remove(widget)

    Wrapper.__name__ = cls.__name__
    return Wrapper


_SIGNALS = {qMRMLNodeComboBox: "currentNodeChanged(vtkMRMLNode*)", ctkSliderWidget: "valueChanged(double)",
            QSpinBox: "valueChanged(int)", QLineEdit: "textChanged(QString)", QCheckBox: "toggled(bool)"}


def _value(widget):
    if isinstance(widget, qMRMLNodeComboBox):
        return widget.currentNode()
    return {ctkSliderWidget: "value", QSpinBox: "value", QLineEdit: "text", QCheckBox: "checked"}.get(
        type(widget)) and getattr(widget, {ctkSliderWidget: "value", QSpinBox: "value", QLineEdit: "text",
                                           QCheckBox: "checked"}[type(widget)])


def _show(widget, value):
    if isinstance(widget, qMRMLNodeComboBox):
        widget.setCurrentNode(value)
    elif isinstance(widget, (ctkSliderWidget, QSpinBox)):
        widget.value = value
    elif isinstance(widget, QLineEdit):
        widget.text = value
    elif isinstance(widget, QCheckBox):
        widget.checked = value


# --- installing the stand-ins -----------------------------------------------------------------

class Layout:
    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)


def install(scene):
    """Make ``qt``, ``ctk``, ``slicer.app``, ``slicer.mrmlScene``, ``slicer.util``'s GUI functions,
    ``slicer.ScriptedLoadableModule`` and ``slicer.parameterNodeWrapper`` importable; returns the
    App. Call :func:`uninstall` afterwards (the ``slicer_app`` fixture does both)."""
    import slicer
    import slicer.util as util
    app = App()
    qt = types.ModuleType("qt")
    qt.QSettings, qt.QTimer = QSettings, QTimer
    qt.QFileDialog = types.SimpleNamespace(getExistingDirectory=lambda *a: app.nextDirectory)
    qt.Qt = types.SimpleNamespace(WaitCursor=3)
    ctk = types.ModuleType("ctk")

    @contextlib.contextmanager
    def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
        try:
            yield
        except Exception as exc:
            if show and not app.testingEnabled():
                app.errors.append(f"{message}\n\n{exc}" if message is not None else str(exc))
            raise

    @contextlib.contextmanager
    def WaitCursor():
        yield

    def confirmOkCancelDisplay(text, windowTitle=None, parent=None, **kwargs):
        app.errors.append(f"[confirm] {text}")
        return app.confirm

    def setSliceViewerLayers(background="keep-current", foreground="keep-current", label="keep-current",
                             foregroundOpacity=None, labelOpacity=None, fit=False, rotateToVolumePlane=False):
        app.viewerLayers.append({"background": background, "foreground": foreground,
                                 "foregroundOpacity": foregroundOpacity})

    gui = {"loadUI": loadUI, "childWidgetVariables": childWidgetVariables, "tryWithErrorDisplay": tryWithErrorDisplay,
           "errorDisplay": lambda text, *a, **k: app.errors.append(text), "WaitCursor": WaitCursor,
           "confirmOkCancelDisplay": confirmOkCancelDisplay, "setSliceViewerLayers": setSliceViewerLayers,
           "mainWindow": lambda: None, "pip_install": lambda requirements: app.pipInstalls.append(requirements)}
    saved = {name: getattr(util, name, None) for name in gui}
    for name, fn in gui.items():
        setattr(util, name, fn)

    slm = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            name = type(self).__name__
            self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name

        def getParameterNode(self):
            s = slicer.mrmlScene
            for i in range(s.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
                node = s.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
                if node.GetAttribute("ModuleName") == self.moduleName:
                    return node
            node = s.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
            node.SetAttribute("ModuleName", self.moduleName)
            return node

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or types.SimpleNamespace(isEntered=True)
            self.layout = Layout()

        def setup(self):
            pass

        def resourcePath(self, relative):
            return str(MODULE_DIR / "Resources" / relative)

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            app.errors.append(f"[display] {message}")

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper, pnw.parameterPack, pnw.WithinRange = parameterNodeWrapper, parameterPack, WithinRange

    saved_modules = {k: sys.modules.get(k) for k in ("qt", "ctk", "slicer.ScriptedLoadableModule",
                                                      "slicer.parameterNodeWrapper", "ImbalanceSeg",
                                                      "ImbalanceSegSlicer.logic")}
    sys.modules.update({"qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": slm,
                        "slicer.parameterNodeWrapper": pnw})
    for name in ("ImbalanceSeg", "ImbalanceSegSlicer.logic"):  # imported again, now "inside Slicer"
        sys.modules.pop(name, None)
    slicer.app, slicer.mrmlScene = app, scene
    slicer.ScriptedLoadableModule, slicer.parameterNodeWrapper = slm, pnw
    QSettings.store = {}
    app._restore = (saved, saved_modules)
    return app


def uninstall(app):
    import slicer
    import slicer.util as util
    saved, saved_modules = app._restore
    for name, fn in saved.items():
        if fn is None:
            delattr(util, name)
        else:
            setattr(util, name, fn)
    for name, module in saved_modules.items():
        if module is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = module
    for name in ("app", "mrmlScene", "ScriptedLoadableModule", "parameterNodeWrapper"):
        if name in vars(slicer):
            delattr(slicer, name)
