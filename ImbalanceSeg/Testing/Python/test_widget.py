"""The module file's widget, run on a stand-in of the Slicer application (fake_slicer_app.py)
over a real slicer-core scene: the failures that only Slicer would show (issue #17).

* The panel opens, lists the models and shows the model card with torch, MONAI and safetensors
  made unimportable (right after an Extension Manager install), and offers to install them.
* The Review section reads the result the user just selected, not the parameter node's previous
  value (PythonQt calls a signal's handlers in connection order).
* Closing the scene while training runs: the next progress tick draws the plot in the new scene
  and completion is still reported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MODULE_DIR = HERE.parents[1]
ROOT = MODULE_DIR.parent

BLOCKER = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = ("torch", "monai", "safetensors")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked (not installed yet)")
            return None

    sys.meta_path.insert(0, Blocker())
""")


def _run_without_torch(body: str) -> dict:
    """Run ``body`` in a fresh Python with torch, MONAI and safetensors unimportable and the fake
    Slicer application installed; ``body`` stores what to check in ``out``."""
    script = BLOCKER + textwrap.dedent(f"""
        import importlib.util, json
        sys.path[:0] = [{str(HERE)!r}, {str(MODULE_DIR)!r}, {str(ROOT / "ImbalanceSegLib" / "src")!r}]
        _find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else _find_spec(name, *a)
        import fake_slicer_app
        from ImbalanceSegSlicer import scene as sc
        app = fake_slicer_app.install(sc.create_scene())
        out = {{}}
    """) + textwrap.dedent(body) + textwrap.dedent("""
        out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("RESULT" + json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(MODULE_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_panel_opens_lists_models_and_shows_the_card_without_torch_monai_safetensors():
    out = _run_without_torch("""
        import ImbalanceSeg
        widget = ImbalanceSeg.ImbalanceSegWidget()
        widget.setup()
        ui = widget.ui
        out["models"] = [d for _, d in ui.modelSelector.items]
        out["devices"] = [t for t, _ in ui.deviceSelector.items]
        out["methods"] = [t for t, _ in ui.methodSelector.items]
        out["card"] = ui.modelCardBrowser.html
        out["run"] = {k: getattr(widget._parameterNode.run, k) for k in ("model", "device", "method")}
        out["missing"] = ImbalanceSeg.missingDependencies()
        # Apply: the user is asked before anything is installed; declining leaves everything as it was.
        app.confirm = False
        import slicer, SimpleITK
        volume = sc.volume_node_from_sitk(slicer.mrmlScene, SimpleITK.Image(8, 8, 8, SimpleITK.sitkFloat32), "V")
        widget._parameterNode.inputVolume = volume
        ui.applyButton.click()
        out["asked"] = [e for e in app.errors if e.startswith("[confirm]")]
        out["job"] = widget._job is not None
        out["pip"] = app.pipInstalls
    """)
    assert out["imported"] == [], "torch, MONAI or safetensors were imported"
    # The model trained on real patients is offered first, then the other bundled models by name.
    assert [Path(p).name for p in out["models"]] == ["demo_hippocampus.imbseg", "demo_brain.imbseg"]
    assert out["devices"] == ["cpu"]
    from imbalanceseglib.training import METHOD_PRESETS
    assert out["methods"] == list(METHOD_PRESETS)
    assert "Anterior hippocampus" in out["card"] and "Posterior hippocampus" in out["card"]
    assert "cannot be used" not in out["card"]
    assert out["run"] == {"model": out["models"][0], "device": "cpu", "method": "dice_ce"}
    assert "torch (not installed" in out["missing"] and "monai (not installed" in out["missing"]
    assert len(out["asked"]) == 1 and "torch (not installed; needs >= 2.1)" in out["asked"][0]
    assert out["job"] is False and out["pip"] == []


def test_accepted_install_goes_through_pytorch_utils_and_pip_and_refreshes_the_lists():
    out = _run_without_torch("""
        import ImbalanceSeg, types
        from ImbalanceSegSlicer import dependencies
        calls = []
        sys.modules["PyTorchUtils"] = types.SimpleNamespace(PyTorchUtilsLogic=lambda: types.SimpleNamespace(
            installTorch=lambda **kw: calls.append(("installTorch", kw))))
        widget = ImbalanceSeg.ImbalanceSegWidget()
        widget.setup()
        refreshed = []
        original = widget.logic.panelChoices
        widget.logic.panelChoices = lambda *a: refreshed.append(1) or original(*a)
        try:
            import slicer
            with slicer.util.tryWithErrorDisplay("could not start"):
                widget._ensureDependencies()
        except RuntimeError as exc:  # the stand-in installers install nothing: named in the error
            out["error"] = str(exc)
        out["calls"] = calls
        out["pip"] = app.pipInstalls
        out["shown"] = [e for e in app.errors if not e.startswith("[confirm]")]
        out["refreshed"] = len(refreshed)
    """)
    assert out["calls"] == [["installTorch", {"askConfirmation": False, "torchVersionRequirement": ">=2.1"}]]
    assert out["pip"] == [["monai>=1.3", "safetensors>=0.4"]] or out["pip"] == [["monai>=1.3", "safetensors>=0.4",
                                                                                 "scipy>=1.10"]]
    assert "still missing or too old: torch (not installed" in out["error"]
    assert "PyTorch Utils" in out["error"]
    assert len(out["shown"]) == 1 and out["shown"][0].startswith("could not start")  # inside the error display
    assert out["refreshed"] == 0  # nothing to refresh: the install failed


def test_testing_mode_installs_nothing_and_names_what_is_missing():
    out = _run_without_torch("""
        import ImbalanceSeg
        app.testing = True
        widget = ImbalanceSeg.ImbalanceSegWidget()
        widget.setup()
        try:
            widget._ensureDependencies()
        except RuntimeError as exc:
            out["error"] = str(exc)
        out["asked"] = [e for e in app.errors if e.startswith("[confirm]")]
        test = ImbalanceSeg.ImbalanceSegTest()
        import unittest
        result = unittest.TestResult()
        unittest.TestSuite([ImbalanceSeg.ImbalanceSegTest("test_demo_segmentation")]).run(result)
        out["skipped"] = [reason for _, reason in result.skipped]
        out["errors"] = len(result.errors) + len(result.failures)
    """)
    assert "testing mode" in out["error"] and "torch (not installed" in out["error"]
    assert out["asked"] == []
    assert out["errors"] == 0 and len(out["skipped"]) == 1 and "torch (not installed" in out["skipped"][0]


# --- in-process: the widget with the real library ----------------------------------------------

@pytest.fixture
def slicer_app():
    import fake_slicer_app
    from ImbalanceSegSlicer import scene as sc
    app = fake_slicer_app.install(sc.create_scene())
    app.widgets = []
    try:
        yield app
    finally:
        for widget in app.widgets:  # as Slicer does when the module is unloaded: observers go
            widget.cleanup()
        fake_slicer_app.uninstall(app)


def _widget():
    import ImbalanceSeg
    import slicer
    widget = ImbalanceSeg.ImbalanceSegWidget()
    widget.setup()
    slicer.app.widgets.append(widget)
    return widget


def _two_results(app, synthetic):
    import math
    import slicer
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSeg import ImbalanceSegLogic
    from test_logic import _bundle
    volume = sc.volume_node_from_sitk(slicer.mrmlScene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(slicer.mrmlScene)
    first = logic.process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]), baseName="First")
    second = logic.process(volume, _bundle(seed=4), baseName="Second")
    return first.segmentationNode, second.segmentationNode


def test_review_reads_the_result_the_user_just_selected(slicer_app, synthetic):
    widget = _widget()
    first, second = _two_results(slicer_app, synthetic)
    ui = widget.ui
    ui.resultSelector.setCurrentNode(first)
    assert widget._parameterNode.resultSegmentation.GetID() == first.GetID()
    ui.resultSelector.setCurrentNode(second)  # the widget's handler runs before the binding's
    assert widget._parameterNode.resultSegmentation.GetID() == second.GetID()
    shown = slicer_app.viewerLayers[-1]["foreground"]
    assert shown is widget.logic.probabilityNodeForClass(second, ui.classSelector.currentData)
    assert ui.performanceTableView.table.GetID() == widget.logic.performanceTableOf(second).GetID()
    ui.thresholdSlider.value = 0.3
    thresholds = widget.logic.classThresholds(second)
    assert thresholds == {ui.classSelector.currentData: 0.3}
    assert widget.logic.classThresholds(first) == {}


class _FakeTrainingJob:
    """A training job's observable state (jobs.TrainingJob is tested on its own)."""

    def __init__(self):
        from ImbalanceSegSlicer.jobs import RUNNING
        self.state, self.phase, self.iteration, self.total, self.error = RUNNING, "train", 0, 10, None
        self.history, self.bundlePath, self.warnings = [], None, []

    fraction = property(lambda self: self.iteration / self.total)

    def poll(self):
        return self.state

    def cancel(self):
        pass


def test_closing_the_scene_during_training_keeps_the_plot_and_reports_completion(slicer_app, tmp_path):
    import slicer
    from ImbalanceSegSlicer.jobs import DONE
    widget = _widget()
    job = _FakeTrainingJob()
    widget._trainJob, widget._trainClasses = job, ["A", "B"]
    widget._timer.start()
    job.iteration = 2
    job.history += [{"iteration": 1, "loss": 1.0}, {"iteration": 2, "loss": 0.8},
                    {"iteration": 2, "val": {"A": 0.5, "B": None}}]
    widget._timer.fire()
    first_view = widget.ui.trainingPlotWidget.viewNode
    assert first_view is not None and first_view.GetScene() is slicer.mrmlScene
    chart = slicer.mrmlScene.GetNodeByID(first_view.GetPlotChartNodeID())
    assert chart.GetNumberOfPlotSeriesNodes() == 3  # loss, val Dice A, val Dice B

    scene = slicer.mrmlScene
    scene.InvokeEvent(scene.StartCloseEvent)
    scene.Clear(False)
    scene.InvokeEvent(scene.EndCloseEvent)
    assert widget.ui.trainingPlotWidget.viewNode is None

    job.iteration = 3
    job.history.append({"iteration": 3, "loss": 0.7})
    widget._timer.fire()
    view = widget.ui.trainingPlotWidget.viewNode
    assert view is not None and view.GetScene() is scene and view.GetID() and scene.GetNodeByID(view.GetID())
    chart = scene.GetNodeByID(view.GetPlotChartNodeID())
    table = chart.GetNodeReference("ImbalanceSegTrainingTable")
    assert table.GetTable().GetNumberOfRows() == 3  # iterations 1, 2, 3
    assert widget.ui.trainStatusLabel.text == "Iteration 3/10, loss 0.7000"

    bundle = tmp_path / "m.imbseg"
    bundle.write_bytes(b"")
    job.state, job.bundlePath = DONE, bundle
    job.warnings = [{"event": "warning", "kind": "never_learned", "classes": ["B"],
                     "message": "[train] never learned: B (validation Dice 0.000 at iteration 10). Try: more iterations."}]
    widget._timer.fire()
    assert widget._trainJob is None and not widget._timer.active
    # the status says which class was never learned, under the model written
    assert widget.ui.trainStatusLabel.text == (f"Model written: {bundle} (selected in the model list).\n"
                                               "Never learned: B (validation Dice 0.000 at iteration 10). "
                                               "Try: more iterations.")


def test_run_settings_go_to_the_parameter_node_and_are_remembered(slicer_app):
    import fake_slicer_app
    widget = _widget()
    ui, pn = widget.ui, widget._parameterNode
    ui.methodSelector.currentIndex = ui.methodSelector.findText("cps")
    ui.outputFolderSelector.currentPath = "/data/models"
    assert (pn.run.method, pn.run.outputFolder) == ("cps", "/data/models")
    store = fake_slicer_app.QSettings.store
    assert store["ImbalanceSeg/TrainingMethod"] == "cps"
    assert store["ImbalanceSeg/TrainingOutputFolder"] == "/data/models"
    assert store["ImbalanceSeg/Model"].endswith("demo_hippocampus.imbseg")
    # A new scene starts from the remembered settings.
    import slicer
    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.StartCloseEvent)
    slicer.mrmlScene.Clear(False)
    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.EndCloseEvent)
    pn = widget._parameterNode
    assert (pn.run.method, pn.run.outputFolder) == ("cps", "/data/models")
    assert ui.methodSelector.currentText == "cps"


def test_apply_passes_the_stability_check_box_to_the_job(slicer_app, synthetic, monkeypatch):
    import slicer
    from ImbalanceSegSlicer import jobs
    from ImbalanceSegSlicer import scene as sc
    made = []

    class Recorder:
        def __init__(self, logic, volume, model, reference, **kwargs):
            made.append(kwargs)
            self.fraction, self.stage = 0.0, ""

        def start(self):
            return self

        def cancel(self):
            pass

    monkeypatch.setattr(jobs, "SegmentationJob", Recorder)
    widget = _widget()
    widget._parameterNode.inputVolume = sc.volume_node_from_sitk(slicer.mrmlScene, synthetic["image"], "Input")
    assert widget._parameterNode.checkStability is False
    widget.onApply()
    widget.onCancel()
    widget.ui.checkStabilityCheckBox.checked = True  # the user ticks the box
    assert widget._parameterNode.checkStability is True
    widget.onApply()
    widget.onCancel()
    assert [m["agreement"] for m in made] == [None, "default"]


def test_annotate_next_ranks_the_unlabelled_volumes_and_shows_the_table(slicer_app, synthetic, tmp_path):
    import slicer
    import numpy as np
    import SimpleITK as sitk
    from imbalanceseglib.bundle import save_bundle
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.tables import ANNOTATE_NEXT_ATTRIBUTE
    from test_logic import _bundle
    widget = _widget()
    ui, pn = widget.ui, widget._parameterNode
    assert [d for _, d in ui.annotateStrategySelector.items] == ["suggestive", "uncertainty", "random"]
    assert ui.annotateStrategySelector.currentData == "suggestive" and pn.annotateCount == 5
    # nothing to rank yet: the error is shown, nothing is added
    with pytest.raises(ValueError, match="no unlabelled volume"):
        ui.suggestButton.click()
    assert slicer_app.errors[-1].startswith("Cannot suggest volumes to annotate.")
    bundle = _bundle(seed=5)
    model = save_bundle(tmp_path / "tiny.imbseg", bundle.card, bundle.network)
    pn.run.model = str(model)
    for seed in (1, 2, 3):
        arr = sitk.GetArrayFromImage(synthetic["image"]).astype(np.float32)
        image = sitk.GetImageFromArray(arr + np.random.default_rng(seed).normal(0, 40, arr.shape).astype(np.float32))
        image.CopyInformation(synthetic["image"])
        sc.volume_node_from_sitk(slicer.mrmlScene, image, f"Scan {seed}")
    ui.annotateCountSpinBox.value = 2                          # the user sets the count...
    assert pn.annotateCount == 2
    ui.annotateStrategySelector.currentIndex = ui.annotateStrategySelector.findData("uncertainty")  # ...and strategy
    ui.suggestButton.click()
    table = ui.annotateTableView.table
    assert table is not None and table.GetAttribute(ANNOTATE_NEXT_ATTRIBUTE) == "uncertainty"
    t = table.GetTable()
    assert t.GetNumberOfRows() == 3
    chosen = [t.GetValueByName(r, "Volume").ToString() for r in range(3) if t.GetValueByName(r, "Chosen").ToString()]
    assert len(chosen) == 2
    assert ui.annotateStatusLabel.text.startswith(f"Annotate next: {', '.join(chosen)} (2 of 3 unlabelled volume(s), "
                                                  "strategy uncertainty).")
    u = [t.GetValueByName(r, "Uncertainty").ToDouble() for r in range(3)]
    assert u[0] >= u[1] >= u[2]  # most uncertain first
