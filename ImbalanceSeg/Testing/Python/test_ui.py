"""The panel's .ui file against the widget code: every widget the code uses exists with the class
the code relies on, every parameter-node field is bound to a widget of a fitting class, and every
custom widget class is declared. (The widget itself needs the Slicer application.)"""

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

MODULE = Path(__file__).resolve().parents[2]
UI_FILE = MODULE / "Resources" / "UI" / "ImbalanceSeg.ui"
SOURCE = MODULE / "ImbalanceSeg.py"

#: The class each widget must have, for what the code does with it.
EXPECTED = {
    "inputSelector": "qMRMLNodeComboBox",              # bound to a node parameter
    "referenceSelector": "qMRMLNodeComboBox",
    "resultSelector": "qMRMLNodeComboBox",             # currentNodeChanged(vtkMRMLNode*)
    "modelSelector": "QComboBox",                      # addItem(text, data), currentData, findData
    "classSelector": "QComboBox",
    "deviceSelector": "QComboBox",
    "methodSelector": "QComboBox",
    "modelCardBrowser": "QTextBrowser",                # setHtml
    "addModelFolderButton": "QPushButton",
    "applyButton": "QPushButton",
    "cancelButton": "QPushButton",
    "showConfidenceButton": "QPushButton",
    "showUncertaintyButton": "QPushButton",
    "nextRegionButton": "QPushButton",
    "resetThresholdButton": "QPushButton",
    "compareButton": "QPushButton",
    "trainButton": "QPushButton",
    "cancelTrainButton": "QPushButton",
    "flagThresholdSlider": "ctkSliderWidget",
    "thresholdSlider": "ctkSliderWidget",              # valueChanged(double), value
    "overlayOpacitySlider": "ctkSliderWidget",
    "progressBar": "QProgressBar",
    "trainProgressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "reviewLabel": "QLabel",
    "trainStatusLabel": "QLabel",
    "performanceTableView": "qMRMLTableView",          # setMRMLTableNode
    "trainingPlotWidget": "qMRMLPlotWidget",           # setMRMLPlotViewNode (qMRMLPlotView has no designer plugin)
    "trainingSegmentationsSelector": "qMRMLCheckableNodeComboBox",  # checkedNodes()
    "validationSegmentationsSelector": "qMRMLCheckableNodeComboBox",
    "unlabeledVolumesSelector": "qMRMLCheckableNodeComboBox",
    "outputFolderSelector": "ctkPathLineEdit",         # currentPath
    "trainingFolderSelector": "ctkPathLineEdit",
    "reviewCollapsibleButton": "ctkCollapsibleButton",  # collapsed
    "iterationsSpinBox": "QSpinBox",
    "modelNameLineEdit": "QLineEdit",
    "resumeCheckBox": "QCheckBox",
    "deepSupervisionCheckBox": "QCheckBox",            # bound to deepSupervision
    "contextLabelsCheckBox": "QCheckBox",              # bound to contextLabels
    "checkStabilityCheckBox": "QCheckBox",
    # Annotate next (suggestive annotation)
    "annotateCountSpinBox": "QSpinBox",                # bound to annotateCount
    "annotateStrategySelector": "QComboBox",           # addItem(text, data), currentData
    "suggestButton": "QPushButton",
    "annotateStatusLabel": "QLabel",
    "annotateTableView": "qMRMLTableView",             # setMRMLTableNode
}

#: Widget class a parameter of each annotated type binds to (parameterNodeWrapper connectors).
BINDING = {"vtkMRMLScalarVolumeNode": "qMRMLNodeComboBox", "vtkMRMLSegmentationNode": "qMRMLNodeComboBox",
           "float": "ctkSliderWidget", "int": "QSpinBox", "str": "QLineEdit", "bool": "QCheckBox"}


def _widgets():
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): w for w in root.iter("widget")}, root


#: Parameter-node fields that are parameter packs, written by the widget (not bound in the .ui).
PACKS = {"run": "ImbalanceSegRunSettings"}


def _class_fields(class_name):
    """Annotated fields of a class in the module file: name -> (annotation, default source)."""
    tree = ast.parse(SOURCE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {stmt.target.id: (ast.unparse(stmt.annotation), stmt.value)
                    for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError(f"{class_name} not found in {SOURCE.name}")


def _parameter_fields():
    tree = ast.parse(SOURCE.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ImbalanceSegParameterNode":
            fields = {}
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign):
                    ann = stmt.annotation
                    if isinstance(ann, ast.Subscript):  # Annotated[float, WithinRange(...)]
                        ann = ann.slice.elts[0]
                    fields[stmt.target.id] = ast.unparse(ann)
            return fields
    raise AssertionError("ImbalanceSegParameterNode not found")


def test_every_widget_the_code_uses_exists_with_the_expected_class():
    widgets, _ = _widgets()
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", SOURCE.read_text()))
    assert used, "the widget code uses no ui members?"
    assert used <= set(EXPECTED), f"add the expected class of {sorted(used - set(EXPECTED))} to this test"
    for name in sorted(used):
        assert name in widgets, f"{name} is used by the code but missing from {UI_FILE.name}"
        assert widgets[name].get("class") == EXPECTED[name], \
            f"{name} is a {widgets[name].get('class')}, the code needs a {EXPECTED[name]}"


def test_parameter_node_fields_are_bound_to_fitting_widgets():
    widgets, _ = _widgets()
    bound = {}
    for name, w in widgets.items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = w
    fields = {k: v for k, v in _parameter_fields().items() if k not in PACKS}
    assert set(fields) - {"resultSegmentation"} <= set(bound) | {"resultSegmentation"}
    assert set(bound) <= set(fields), f"widgets bound to unknown parameters: {sorted(set(bound) - set(fields))}"
    for field, w in bound.items():
        assert w.get("class") == BINDING[fields[field]], (field, w.get("class"))
        assert w.get("name") in EXPECTED, w.get("name")


def test_node_selectors_accept_the_right_node_types():
    widgets, _ = _widgets()
    want = {"inputSelector": "vtkMRMLScalarVolumeNode", "referenceSelector": "vtkMRMLSegmentationNode",
            "resultSelector": "vtkMRMLSegmentationNode", "trainingSegmentationsSelector": "vtkMRMLSegmentationNode",
            "validationSegmentationsSelector": "vtkMRMLSegmentationNode",
            "unlabeledVolumesSelector": "vtkMRMLScalarVolumeNode"}
    for name, node_type in want.items():
        props = {p.get("name"): p for p in widgets[name].findall("property")}
        assert [s.text for s in props["nodeTypes"].iter("string")] == [node_type], name


def test_custom_widgets_are_declared_and_mrml_widgets_get_the_scene():
    widgets, root = _widgets()
    declared = {c.find("class").text for c in root.iter("customwidget")}
    qt_classes = {"QComboBox", "QPushButton", "QLabel", "QProgressBar", "QTextBrowser", "QSpinBox", "QLineEdit",
                  "QCheckBox"}
    for w in widgets.values():
        assert w.get("class") in declared | qt_classes, w.get("class")
    receivers = {c.find("receiver").text for c in root.iter("connection")
                 if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    for name, w in widgets.items():
        if w.get("class").startswith("qMRML") and name != "ImbalanceSeg":
            assert name in receivers, f"{name} does not get the scene"


def test_run_settings_pack_declares_the_remembered_settings_with_the_same_defaults():
    """Every run setting lives in one typed pack of the parameter node, and the application
    settings remember exactly those fields (ImbalanceSegSlicer.settings)."""
    from ImbalanceSegSlicer.settings import RUN_SETTINGS_DEFAULTS, SETTINGS_KEYS
    assert _parameter_fields()["run"] == PACKS["run"]
    pack = _class_fields(PACKS["run"])
    assert {k: ast.literal_eval(v) for k, (_, v) in pack.items()} == RUN_SETTINGS_DEFAULTS
    assert {k: a for k, (a, _) in pack.items()} == {k: "str" for k in RUN_SETTINGS_DEFAULTS}
    assert set(SETTINGS_KEYS) == set(RUN_SETTINGS_DEFAULTS)
    assert len(set(SETTINGS_KEYS.values())) == len(SETTINGS_KEYS)


def test_the_unlabelled_volumes_tooltip_names_exactly_the_semi_supervised_methods():
    from imbalanceseglib.presets import semi_supervised_method_names
    widgets, _ = _widgets()
    props = {p.get("name"): p for p in widgets["unlabeledVolumesSelector"].findall("property")}
    tip = props["toolTip"].find("string").text
    named = re.search(r"\(([^)]*)\)", tip).group(1).split(", ")
    assert named == semi_supervised_method_names(), tip
