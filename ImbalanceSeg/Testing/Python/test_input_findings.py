"""An input the model was not made for, in the module (issue #22 items 1 and 3).

The hippocampus demo model (trained on 1 mm crops around the hippocampus) given a large part of
the Colin27 head: the Logic's result says how the input differs from the training data, every
class of the performance table is "unreliable" and flagged, the status line starts with the
warnings, and the background job (worker process) hands the same findings back. A constant
volume is refused before any node is added.
"""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.jobs import SegmentationJob
from ImbalanceSegSlicer.logic import ImbalanceSegLogic
from ImbalanceSegSlicer.scenarios import repository_paths
from ImbalanceSegSlicer.tables import FINDINGS_ATTRIBUTE

HIPPOCAMPUS = repository_paths("hippocampus")
BRAIN = repository_paths("brain")


def _whole_head(scene):
    """Part of the Colin27 head (2 mm voxels): 90 x 130 x 60 mm, more than twice the training
    crops' largest extent along y (59 mm), small enough to segment in seconds."""
    from imbalanceseglib.images import read_image
    head = read_image(BRAIN["volume"])
    return sc.volume_node_from_sitk(scene, head[22:67, 20:85, 30:60], "Head")


def test_a_whole_head_given_to_the_hippocampus_model_is_marked_unreliable(scene):
    logic = ImbalanceSegLogic(scene)
    result = logic.process(_whole_head(scene), logic.loadModel(HIPPOCAMPUS["model"]))
    kinds = {f["kind"] for f in result.findings}
    assert {"intensity", "field_of_view"} <= kinds
    fov = next(f for f in result.findings if f["kind"] == "field_of_view")
    assert fov["message"].startswith("the field of view 90 x 130 x 60 mm is much larger than any training case's")
    for row in result.performanceRows:
        assert row["State"].startswith("unreliable: ") and "field of view 90 x 130 x 60 mm" in row["State"]
        assert row["Flag"] == "review"
    assert json.loads(result.performanceTableNode.GetAttribute(FINDINGS_ATTRIBUTE)) == result.findings
    summary = logic.resultSummary(result, [r["Segment"] for r in result.performanceRows if r["Flag"]])
    lines = summary.split("\n")
    assert lines[0].startswith("Caution: the intensity distribution") and lines[1].startswith("Warning: the field")
    # the intensity finding is a caution: said, but the classes are unreliable for the field of view
    assert all("intensities" not in r["State"] for r in result.performanceRows)
    assert lines[-1].endswith("Review: Anterior hippocampus, Posterior hippocampus.")
    # a threshold change recomputes the class's estimate, and keeps it unreliable
    logic.setClassThreshold(result.segmentationNode, "Anterior hippocampus", 0.3)
    t = result.performanceTableNode.GetTable()
    states = {t.GetValueByName(r, "Segment").ToString(): (t.GetValueByName(r, "State").ToString(),
                                                          t.GetValueByName(r, "Threshold").ToString())
              for r in range(t.GetNumberOfRows())}
    assert states["Anterior hippocampus"][1] == "0.3"
    assert all(state.startswith("unreliable: ") for state, _ in states.values())


def test_the_demo_patient_raises_no_warning(scene):
    from imbalanceseglib.images import read_image
    logic = ImbalanceSegLogic(scene)
    volume = sc.volume_node_from_sitk(scene, read_image(HIPPOCAMPUS["volume"]), "Patient")
    result = logic.process(volume, logic.loadModel(HIPPOCAMPUS["model"]))
    assert result.findings == []
    assert all(not r["State"].startswith("unreliable") for r in result.performanceRows)
    assert logic.resultSummary(result, []).startswith("Done (")


def test_the_background_job_hands_the_findings_back(scene):
    logic = ImbalanceSegLogic(scene)
    job = SegmentationJob(logic, _whole_head(scene), HIPPOCAMPUS["model"], threads=1).start()
    result = job.wait(timeout=600)
    assert {"intensity", "field_of_view"} <= {f["kind"] for f in result.findings}
    assert all(r["State"].startswith("unreliable: ") for r in result.performanceRows)


def test_a_constant_volume_is_refused_and_nothing_is_added(scene):
    logic = ImbalanceSegLogic(scene)
    img = sitk.GetImageFromArray(np.zeros((40, 56, 40), np.float32))
    volume = sc.volume_node_from_sitk(scene, img, "Empty")
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=r"input volume is constant \(every voxel is 0\)"):
        logic.process(volume, logic.loadModel(HIPPOCAMPUS["model"]))
    assert scene.GetNumberOfNodes() == before


def test_the_stability_check_is_one_logic_call(scene):
    from imbalanceseglib.images import read_image
    from imbalanceseglib.tta import AGREEMENT_VIEWS
    logic = ImbalanceSegLogic(scene)
    volume = sc.volume_node_from_sitk(scene, read_image(HIPPOCAMPUS["volume"]), "Patient")
    bundle = logic.loadModel(HIPPOCAMPUS["model"])
    result = logic.process(volume, bundle, agreement=AGREEMENT_VIEWS)
    plain = logic.process(volume, bundle)
    rows = json.loads(result.performanceTableNode.GetAttribute("ImbalanceSeg.EstimatorRows"))
    # the demo patient's segmentation hardly changes when shifted or re-contrasted: no class is unstable
    assert [f["kind"] for f in result.findings] == []
    assert [r["State"] for r in rows] == [r["State"] for r in plain.performanceRows] == ["predicted", "predicted"]


def test_the_logic_refuses_a_run_whose_results_would_not_fit(scene, monkeypatch):
    """The estimate covers the prediction and the result nodes; a run that would not fit is
    refused before any work, naming both figures (issue #19 item 3)."""
    from imbalanceseglib import images
    from imbalanceseglib.images import read_image
    logic = ImbalanceSegLogic(scene)
    volume = sc.volume_node_from_sitk(scene, read_image(HIPPOCAMPUS["volume"]), "Patient")
    bundle = logic.loadModel(HIPPOCAMPUS["model"])
    need = logic.estimateMemoryBytes(volume, bundle)
    from imbalanceseglib.inference import estimate_memory_bytes
    dims = volume.GetImageData().GetDimensions()
    predict_only = estimate_memory_bytes(dims, volume.GetSpacing(), [1.0, 1.0, 1.0], 3, patch_size=[40, 56, 40],
                                         features=[16, 32, 64, 128])
    assert need - predict_only == int(np.prod(dims)) * (4 * 4 + 1 + 4)  # 3 probability maps + uncertainty, labelmap, copy
    monkeypatch.setattr(images, "available_memory_bytes", lambda: need - 1)
    before = scene.GetNumberOfNodes()
    with pytest.raises(ValueError, match=r"adding its results to the scene needs about .* but only .* is available"):
        logic.process(volume, bundle)
    assert scene.GetNumberOfNodes() == before
