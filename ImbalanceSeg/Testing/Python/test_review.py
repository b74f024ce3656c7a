"""Reviewing a result in the scene: least-confident regions, per-class thresholds, comparison
with a reference, subject hierarchy and terminology. The network's output is replaced by designed
probabilities so every expected number can be computed independently."""

import copy
import json

import numpy as np
import pytest
import SimpleITK as sitk

import imbalanceseglib.inference as inference
from imbalanceseglib.estimation import estimator_from_card

from ImbalanceSeg import PERFORMANCE_KEYS, ImbalanceSegLogic
from ImbalanceSegSlicer import review
from ImbalanceSegSlicer import scene as sc
from moduletest_helpers import SIZE, SPACING, SPHERE_A, SPHERE_B, _sphere_mask
from test_logic import MODEL_CLASSES, _bundle

BLOB = dict(center=(30, 15, 3), radius_mm=6.0)  # an area where the model hesitates about Sphere A


def _distance_mm(center):
    zz, yy, xx = np.mgrid[0:SIZE[2], 0:SIZE[1], 0:SIZE[0]]
    return np.sqrt(((xx - center[0]) * SPACING[0]) ** 2 + ((yy - center[1]) * SPACING[1]) ** 2
                   + ((zz - center[2]) * SPACING[2]) ** 2)


def designed_probabilities():
    """Sphere A: certain inside 5 mm, falling linearly to 0 at 7 mm. A blob where p(A) = 0.45.
    Sphere B: p(B) = 0.35 inside its sphere (never the most probable class: "possibly missed")."""
    p_a = np.clip((7.0 - _distance_mm(SPHERE_A["center"])) / 2.0, 0.0, 1.0)
    p_a[_distance_mm(BLOB["center"]) < BLOB["radius_mm"]] = 0.45
    p_b = np.where(_sphere_mask(**SPHERE_B), 0.35, 0.0)
    probs = np.stack([1.0 - p_a - p_b, p_a, p_b]).astype(np.float32)
    assert probs.min() >= 0
    return probs


@pytest.fixture
def designed(monkeypatch, scene, synthetic):
    probs = designed_probabilities()
    names = [c["name"] for c in MODEL_CLASSES]

    def fake_predict(image, bundle, device="cpu", progress=None, **kw):
        estimator = estimator_from_card(None, 3)
        perf = estimator.estimate(np.log(np.clip(probs, 1e-7, 1.0)), names)
        voxel_ml = float(np.prod(image.GetSpacing())) / 1000.0
        for row in perf.classes:
            row["predicted_ml"] = row["predicted_voxels"] * voxel_ml
            row["expected_ml"] = row["expected_voxels"] * voxel_ml
        return inference.Prediction(probabilities=probs.copy(), labels=np.argmax(probs, 0).astype(np.uint8),
                                    uncertainty=inference.normalised_entropy(probs), reference=image,
                                    class_names=names, performance=perf, estimator=estimator)

    monkeypatch.setattr(inference, "predict", fake_predict)
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    result = logic.process(volume, _bundle())
    return dict(scene=scene, volume=volume, logic=logic, result=result, probs=probs, synthetic=synthetic)


def _perf_row(table_node, name):
    t = table_node.GetTable()
    for r in range(t.GetNumberOfRows()):
        if t.GetValueByName(r, "Segment").ToString() == name:
            return {k: t.GetValueByName(r, k).ToString() for k in PERFORMANCE_KEYS}
    raise KeyError(name)


def test_threshold_moves_segment_and_reestimates_the_class(designed):
    logic, seg, probs = designed["logic"], designed["result"].segmentationNode, designed["probs"]
    perf_table = designed["result"].performanceTableNode
    argmax = np.argmax(probs, 0)
    assert sc.segment_voxel_counts(seg) == {"Sphere A": int((argmax == 1).sum()), "Sphere B": 0}
    before_b = _perf_row(perf_table, "Sphere B")
    assert before_b["State"] == "possibly missed" and before_b["Threshold"] == "argmax"

    # Lower Sphere A's threshold: the hesitant blob (p = 0.45) joins the segment.
    out = logic.setClassThreshold(seg, "Sphere A", 0.4)
    mask = probs[1] >= 0.4
    assert sc.segment_voxel_counts(seg)["Sphere A"] == int(mask.sum()) == out["voxels"]
    assert out["voxels"] > out["voxels_before"]
    tp, g, n = probs[1][mask].sum(), probs[1].sum(), mask.sum()
    assert out["dice"] == pytest.approx(2 * tp / (n + g), rel=1e-6)
    assert out["precision"] == pytest.approx(tp / n, rel=1e-6)
    assert out["sensitivity"] == pytest.approx(tp / g, rel=1e-6)
    row = _perf_row(perf_table, "Sphere A")
    assert row["Threshold"] == "0.4"
    assert float(row["Estimated Dice"]) == pytest.approx(out["dice"], rel=1e-5)
    assert logic.classThresholds(seg) == {"Sphere A": 0.4}
    assert _perf_row(perf_table, "Sphere B") == before_b  # untouched class keeps the estimator's row

    # Raise it: only the near-certain core stays; the lost voxels go back to the background.
    logic.setClassThreshold(seg, "Sphere A", 0.9)
    assert sc.segment_voxel_counts(seg)["Sphere A"] == int((probs[1] >= 0.9).sum())

    # Sphere B was possibly missed; a threshold of 0.3 recovers it exactly.
    out_b = logic.setClassThreshold(seg, "Sphere B", 0.3)
    assert sc.segment_voxel_counts(seg)["Sphere B"] == int(_sphere_mask(**SPHERE_B).sum())
    assert out_b["precision"] == pytest.approx(0.35, rel=1e-5)
    assert _perf_row(perf_table, "Sphere B")["State"] == "predicted"

    # Clearing both thresholds restores the argmax segments and the estimator's rows exactly.
    original_rows = json.loads(perf_table.GetAttribute("ImbalanceSeg.EstimatorRows"))
    logic.setClassThreshold(seg, "Sphere A", None)
    logic.setClassThreshold(seg, "Sphere B", None)
    assert sc.segment_voxel_counts(seg) == {"Sphere A": int((argmax == 1).sum()), "Sphere B": 0}
    assert logic.classThresholds(seg) == {}
    for r in original_rows:
        row = _perf_row(perf_table, r["Segment"])
        assert row["Threshold"] == "argmax"
        assert row["State"] == r["State"]
        if r["Estimated Dice"] is not None:
            assert float(row["Estimated Dice"]) == pytest.approx(r["Estimated Dice"], rel=1e-5)


def test_bad_threshold_requests_change_nothing(designed, scene):
    logic, seg = designed["logic"], designed["result"].segmentationNode
    counts = sc.segment_voxel_counts(seg)
    mtime = seg.GetMTime()
    for bad in (1.5, 0.0, -0.1, "0.3", True):
        with pytest.raises(ValueError, match="between 0 and 1"):
            logic.setClassThreshold(seg, "Sphere A", bad)
    with pytest.raises(ValueError, match="unknown class 'Kidney'.*Sphere A, Sphere B"):
        logic.setClassThreshold(seg, "Kidney", 0.3)
    other = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Manual")
    with pytest.raises(ValueError, match="'Manual' is not an ImbalanceSeg result"):
        logic.setClassThreshold(other, "Sphere A", 0.3)
    assert sc.segment_voxel_counts(seg) == counts and seg.GetMTime() == mtime
    scene.RemoveNode(designed["result"].probabilityNodes[1])
    with pytest.raises(ValueError, match="confidence maps of Sphere A were removed"):
        logic.setClassThreshold(seg, "Sphere A", 0.3)
    assert sc.segment_voxel_counts(seg) == counts


def test_least_confident_region_is_the_hesitant_blob_and_views_jump_there(designed, scene):
    logic, seg, volume = designed["logic"], designed["result"].segmentationNode, designed["volume"]
    regions = logic.leastConfidentRegions(seg, "Sphere A", count=2)
    assert len(regions) == 2
    first, second = regions
    assert first["score"] > second["score"] > 0
    blob_ras = review.index_to_ras(volume, tuple(reversed(BLOB["center"])))
    assert np.linalg.norm(np.subtract(first["ras"], blob_ras)) <= 3.0  # within about a voxel
    assert first["mean_probability"] == pytest.approx(0.45, abs=1e-6)
    assert first["doubtful_voxels"] > 0
    # The second region lies on the border of Sphere A (p between 0.2 and 0.8 there).
    a_ras = review.index_to_ras(volume, tuple(reversed(SPHERE_A["center"])))
    assert 3.0 <= np.linalg.norm(np.subtract(second["ras"], a_ras)) <= 10.0
    # A class the model never considers gives no region; an unknown class a clear error.
    assert logic.leastConfidentRegions(seg, "Sphere B")[0]["mean_probability"] == pytest.approx(0.35, abs=1e-6)
    with pytest.raises(ValueError, match="unknown class"):
        logic.leastConfidentRegions(seg, "Background")

    red = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    logic.jumpToRegion(first)
    m = red.GetSliceToRAS()
    np.testing.assert_allclose([m.GetElement(i, 3) for i in range(3)], first["ras"], atol=1e-6)


def test_review_regions_pure_function():
    p = np.zeros((10, 20, 20), np.float32)
    assert review.review_regions(p, (1, 1, 1)) == []
    p[5, 10, 10] = 0.5
    p[2:4, 2:5, 2:5] = 0.6
    regions = review.review_regions(p, (1.0, 1.0, 1.0), count=5, radius_mm=2.0)
    assert regions[0]["index_zyx"][0] in (2, 3) and len(regions) == 2
    with pytest.raises(ValueError, match="3D"):
        review.review_regions(np.zeros((4, 4)), (1, 1))


def test_thresholded_labels_rules():
    probs = np.array([[0.5, 0.3, 0.2, 0.1], [0.3, 0.4, 0.3, 0.2], [0.2, 0.3, 0.5, 0.7]], np.float32)[:, None, None, :]
    np.testing.assert_array_equal(review.thresholded_labels(probs, {}).ravel(), [0, 1, 2, 2])
    np.testing.assert_array_equal(review.thresholded_labels(probs, {1: 0.3}).ravel(), [1, 1, 1, 2])
    # Raising class 2's threshold: its weaker voxel goes to the most probable other class.
    np.testing.assert_array_equal(review.thresholded_labels(probs, {2: 0.6}).ravel(), [0, 1, 1, 2])
    # Both thresholded: the class with the smaller expected volume (class 1) wins overlaps.
    np.testing.assert_array_equal(review.thresholded_labels(probs, {1: 0.3, 2: 0.3}).ravel(), [1, 1, 1, 2])
    with pytest.raises(ValueError, match="foreground classes 1..2"):
        review.thresholded_labels(probs, {0: 0.3})


def test_compare_uses_current_segments_after_a_threshold_change(designed, scene):
    logic, seg = designed["logic"], designed["result"].segmentationNode
    syn, probs, volume = designed["synthetic"], designed["probs"], designed["volume"]
    ref = sc.segmentation_from_labelmap(scene, syn["label"], volume,
                                        [dict(c) for c in MODEL_CLASSES[1:]], "Reference")
    ref_labels = syn["label_array"]
    rows = logic.compareWithReference(seg, ref)
    a, b = np.argmax(probs, 0) == 1, ref_labels == 1
    assert rows[0]["Dice"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()), rel=1e-6)
    assert rows[1]["Dice"] == pytest.approx(0.0) and rows[1]["Policy"] == "prediction_empty"
    logic.setClassThreshold(seg, "Sphere B", 0.3)
    rows = logic.compareWithReference(seg, ref)
    assert rows[1]["Dice"] == pytest.approx(1.0)
    table = designed["result"].tableNode
    assert table.GetTable().GetValueByName(1, "Dice").ToDouble() == pytest.approx(1.0)
    assert table.GetAttribute("ImbalanceSeg.Reference") == "Reference"
    with pytest.raises(ValueError, match="another segmentation"):
        logic.compareWithReference(seg, seg)
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Unrelated")
    empty.GetSegmentation().AddEmptySegment("Liver", "Liver")
    with pytest.raises(ValueError, match="'Unrelated' has no segment named like a class"):
        logic.compareWithReference(seg, empty)


def test_results_sit_in_a_folder_beside_the_input(designed, scene):
    import slicer
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    result, volume = designed["result"], designed["volume"]
    folder = sh.GetItemParent(sh.GetItemByDataNode(result.segmentationNode))
    assert sh.GetItemName(folder) == "Input ImbalanceSeg"
    assert sh.GetItemParent(folder) == sh.GetItemParent(sh.GetItemByDataNode(volume))
    children = []
    ids = [sh.GetItemDataNode(i).GetID() for i in _children(sh, folder)]
    children = sorted(ids)
    assert children == sorted(n.GetID() for n in result.nodes())


def _children(sh, item):
    import vtk
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def test_review_survives_saving_and_loading_the_scene(designed, tmp_path):
    logic, seg = designed["logic"], designed["result"].segmentationNode
    logic.setClassThreshold(seg, "Sphere A", 0.4)
    path = sc.save_scene(designed["scene"], str(tmp_path / "review.mrml"))
    loaded = sc.load_scene(path)
    seg2 = loaded.GetFirstNodeByName(seg.GetName())
    logic2 = ImbalanceSegLogic(loaded)
    assert logic2.resultClassNames(seg2) == ["Sphere A", "Sphere B"]
    assert logic2.classThresholds(seg2) == {"Sphere A": 0.4}
    out = logic2.setClassThreshold(seg2, "Sphere A", None)
    assert out["voxels"] == int((np.argmax(designed["probs"], 0) == 1).sum())


def test_terminology_from_the_model_card(monkeypatch, scene, synthetic):
    import slicer
    bundle = _bundle()
    bundle.card["classes"] = copy.deepcopy(bundle.card["classes"])
    bundle.card["classes"][1]["terminology"] = {"category": ["SCT", "123037004", "Anatomical Structure"],
                                                "type": ["SCT", "4958002", "Amygdala"]}
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    result = ImbalanceSegLogic(scene).process(volume, bundle)
    segmentation = result.segmentationNode.GetSegmentation()
    entry = slicer.vtkSlicerTerminologyEntry()
    text = segmentation.GetSegment("Sphere A").GetTerminology()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(text, entry)
    assert entry.GetTypeObject().GetCodeValue() == "4958002"
    assert entry.GetCategoryObject().GetCodeMeaning() == "Anatomical Structure"
    assert not segmentation.GetSegment("Sphere B").HasTerminology() or \
        "4958002" not in segmentation.GetSegment("Sphere B").GetTerminology()


def test_bundle_refuses_malformed_terminology(tmp_path):
    from imbalanceseglib.bundle import BundleError, validate_card
    card = copy.deepcopy(_bundle().card)
    card["classes"][1]["terminology"] = {"type": ["SCT", "4958002", "Amygdala"]}
    with pytest.raises(BundleError, match="terminology needs 'category'"):
        validate_card(card)
    card["classes"][1]["terminology"] = {"category": ["SCT", "1"], "type": ["SCT", "4958002", "Amygdala"]}
    with pytest.raises(BundleError, match="'category' must be \\[coding scheme"):
        validate_card(card)
    card["classes"][1]["terminology"] = {"category": ["SCT", "1", "A~B"], "type": ["SCT", "2", "B"]}
    with pytest.raises(BundleError, match="must not contain"):
        validate_card(card)


def test_failure_after_placing_results_leaves_scene_and_hierarchy_as_before(designed, scene):
    import slicer
    import vtk
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    before_nodes = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    before_items = items.GetNumberOfIds()

    def fail_at_the_end(stage, fraction):
        if stage == "results" and fraction == 1.0:
            raise RuntimeError("cancelled by user")
    with pytest.raises(RuntimeError, match="cancelled"):
        designed["logic"].process(designed["volume"], _bundle(), progress=fail_at_the_end)
    after = sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))
    assert after == before_nodes, (set(after) - set(before_nodes), set(before_nodes) - set(after))
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    assert items.GetNumberOfIds() == before_items
