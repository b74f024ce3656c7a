"""Annotate next (issue #23 item 3, suggestive annotation) through the module Logic on real
slicer-core scenes: which volumes count as unlabelled, the ranking (the library's, on the same
images), the "Annotate next" table, user nodes left alone, errors that name the problem, and the
bundled demo model on the demo patient."""

import math

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib.suggestive import STRATEGIES, rank_for_annotation

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.annotation import AnnotationPool
from ImbalanceSegSlicer.scenarios import load_demo_case, repository_paths
from ImbalanceSegSlicer.tables import ANNOTATE_NEXT_ATTRIBUTE, ANNOTATE_NEXT_COLUMNS

from test_logic import _bundle


def _variant(image, seed):
    """The synthetic image with its own noise (a different scan of the same kind)."""
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    out = sitk.GetImageFromArray(arr + np.random.default_rng(seed).normal(0, 40.0, arr.shape).astype(np.float32))
    out.CopyInformation(image)
    return out


def _labelled(scene, synthetic, volume, name, empty=False):
    label = synthetic["label"] if not empty else sitk.Image(synthetic["label"].GetSize(), sitk.sitkUInt8)
    if empty:
        label.CopyInformation(synthetic["label"])
    return sc.segmentation_from_labelmap(scene, label, volume, synthetic["classes"], name)


def _ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _table_rows(node):
    t = node.GetTable()
    return [{t.GetColumnName(c): t.GetValue(r, c).ToString() for c in range(t.GetNumberOfColumns())}
            for r in range(t.GetNumberOfRows())]


def test_strategies_are_the_librarys():
    assert [s for s, _ in ImbalanceSegLogic.annotationStrategies()] == list(STRATEGIES)


def test_which_volumes_are_unlabelled(scene, synthetic):
    logic = ImbalanceSegLogic(scene)
    labelled = sc.volume_node_from_sitk(scene, synthetic["image"], "Labelled")
    _labelled(scene, synthetic, labelled, "Labelled segmentation")
    empty = sc.volume_node_from_sitk(scene, _variant(synthetic["image"], 1), "Empty segments only")
    _labelled(scene, synthetic, empty, "Nothing drawn yet", empty=True)
    plain = sc.volume_node_from_sitk(scene, _variant(synthetic["image"], 2), "Plain")
    sc.volume_node_from_sitk(scene, synthetic["label"], "Label map", "vtkMRMLLabelMapVolumeNode")
    flat = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(1, 12, 12)).astype(np.float32))
    sc.volume_node_from_sitk(scene, flat, "One slice")
    # A result of Apply on "Plain": its maps are not scans, and its segmentation (the model's
    # prediction) does not make "Plain" labelled.
    result = logic.process(plain, _bundle(seed=1))
    # a segmentation without a source volume labels nothing
    sc.segmentation_from_labelmap(scene, synthetic["label"], None, synthetic["classes"], "Loose segmentation")
    pool = logic.annotationPool()
    assert isinstance(pool, AnnotationPool)
    assert [v.GetName() for v in pool.unlabelled] == ["Empty segments only", "Plain"]
    assert [v.GetName() for v in pool.labelledNodes] == ["Labelled"]
    assert pool.labelled == {labelled.GetID(): ["Labelled segmentation"]}
    assert pool.skipped == {"Label map": "a label map volume", "One slice": "12x12x1 voxels: not a 3-D volume"}
    maps = {n.GetID() for n in result.probabilityNodes + [result.uncertaintyNode]}
    assert maps.isdisjoint(v.GetID() for v in pool.unlabelled + pool.labelledNodes)
    # drawing into the empty segmentation makes that volume labelled
    seg = next(scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))
               if scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode").GetName() == "Nothing drawn yet")
    scene.RemoveNode(seg)
    _labelled(scene, synthetic, empty, "Drawn")
    assert [v.GetName() for v in logic.annotationPool().unlabelled] == ["Plain"]


def test_suggest_ranks_as_the_library_fills_the_table_and_leaves_user_nodes_alone(scene, synthetic):
    logic = ImbalanceSegLogic(scene)
    bundle = _bundle(seed=3)
    images = {"Scan A": _variant(synthetic["image"], 11), "Copy of labelled": synthetic["image"]}
    flipped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(synthetic["image"])[:, ::-1]))
    flipped.CopyInformation(synthetic["image"])
    images["Scan B"] = flipped
    nodes = {name: sc.volume_node_from_sitk(scene, img, name) for name, img in images.items()}
    labelled = sc.volume_node_from_sitk(scene, synthetic["image"], "Labelled")
    user_seg = _labelled(scene, synthetic, labelled, "Labelled segmentation")
    before = _ids(scene)
    mtimes = {n.GetID(): n.GetMTime() for n in [*nodes.values(), labelled, user_seg]}
    arrays = {name: sitk.GetArrayFromImage(sc.sitk_from_volume_node(n)) for name, n in nodes.items()}
    seen = []
    out = logic.suggestAnnotations(bundle, n=2, candidatesFactor=2.0, progress=lambda s, f: seen.append(f))
    want = rank_for_annotation(bundle, images, 2, annotated={"Labelled": synthetic["image"]}, candidates_factor=2.0)
    assert [r["Volume"] for r in out.rows] == [r.name for r in want]
    assert [r["Chosen"] for r in out.rows] == ["yes", "yes", ""]
    assert [r["Rank"] for r in out.rows] == [1, 2, 3]
    for got, r in zip(out.rows, want):
        assert got["Uncertainty"] == pytest.approx(r.uncertainty, rel=1e-6)
        assert got["Representativeness gain"] == pytest.approx(r.gain, rel=1e-5, abs=1e-9)
        assert got["Why"] == r.reason and got["volumeNode"] is nodes[r.name]
        assert set(got["perClass"]) == {"Sphere A", "Sphere B"}
    # the copy of the labelled volume is covered by it: similarity 1, it adds nothing
    copy = next(r for r in out.rows if r["Volume"] == "Copy of labelled")
    assert copy["Chosen"] == "" and copy["Most like"] == "Labelled"
    assert copy["Similarity"] == pytest.approx(1.0, abs=1e-9)
    assert copy["Representativeness gain"] == pytest.approx(0.0, abs=1e-9)
    assert out.coveredBy == ["Labelled"] and out.labelled == ["Labelled"]
    assert out.chosenNodes == [nodes[r.name] for r in want if r.chosen]
    assert seen[-1] == 1.0
    assert out.summary().startswith(f"Annotate next: {want[0].name}, {want[1].name} (2 of 3 unlabelled volume(s), "
                                    "strategy suggestive; already labelled, counted as covered: Labelled).")
    # the table: one new node, the module's columns, the same values
    table = out.tableNode
    assert _ids(scene) == sorted(before + [table.GetID()])
    assert table.GetName() == "Annotate next" and table.GetAttribute(ANNOTATE_NEXT_ATTRIBUTE) == "suggestive"
    rows = _table_rows(table)
    assert list(rows[0]) == [c["name"] for c in ANNOTATE_NEXT_COLUMNS]
    assert [r["Volume"] for r in rows] == [r.name for r in want]
    assert [int(r["Rank"]) for r in rows] == [1, 2, 3]
    assert [float(r["Uncertainty"]) for r in rows] == pytest.approx([r.uncertainty for r in want], rel=1e-6)
    assert table.GetColumnDescription("Why")
    # user nodes: not modified
    assert {n.GetID(): n.GetMTime() for n in [*nodes.values(), labelled, user_seg]} == mtimes
    for name, n in nodes.items():
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sc.sitk_from_volume_node(n)), arrays[name])
    # again with another strategy: the same table, refilled; no representativeness without descriptors
    top = logic.suggestAnnotations(bundle, n=1, strategy="uncertainty")
    assert top.tableNode is table and _ids(scene) == sorted(before + [table.GetID()])
    assert table.GetAttribute(ANNOTATE_NEXT_ATTRIBUTE) == "uncertainty"
    ranked = sorted(want, key=lambda r: -r.uncertainty)
    assert [r["Volume"] for r in top.rows] == [r.name for r in ranked]
    assert all(math.isnan(float(r["Representativeness gain"])) for r in _table_rows(table))
    assert top.coveredBy == [] and "labelled, left out: Labelled" in top.summary()


def test_volume_names_that_repeat_get_their_node_id(scene, synthetic):
    logic = ImbalanceSegLogic(scene)
    a = sc.volume_node_from_sitk(scene, _variant(synthetic["image"], 1), "Scan")
    b = sc.volume_node_from_sitk(scene, _variant(synthetic["image"], 2), "Scan")
    out = logic.suggestAnnotations(_bundle(seed=2), n=1, strategy="random", seed=4, fillTable=False)
    assert out.tableNode is None
    assert sorted(r["Volume"] for r in out.rows) == sorted([f"Scan ({a.GetID()})", f"Scan ({b.GetID()})"])
    assert all(r["Uncertainty"] is None for r in out.rows)


def test_errors_name_the_problem_and_change_nothing(scene, synthetic):
    logic = ImbalanceSegLogic(scene)
    bundle = _bundle(seed=0)
    labelled = sc.volume_node_from_sitk(scene, synthetic["image"], "Labelled")
    _labelled(scene, synthetic, labelled, "Labelled segmentation")
    label_map = sc.volume_node_from_sitk(scene, synthetic["label"], "Label map", "vtkMRMLLabelMapVolumeNode")
    before = _ids(scene)
    with pytest.raises(ValueError, match=r"no unlabelled volume to rank \(labelled: Labelled\) "
                                         r"\(not scans: Label map\)"):
        logic.suggestAnnotations(bundle, n=1)
    scan = sc.volume_node_from_sitk(scene, _variant(synthetic["image"], 3), "Scan")
    before = _ids(scene)
    with pytest.raises(ValueError, match=r"choose between 1 and the 1 unlabelled volume\(s\), got 2"):
        logic.suggestAnnotations(bundle, n=2)
    with pytest.raises(ValueError, match="got 0"):
        logic.suggestAnnotations(bundle, n=0)
    with pytest.raises(ValueError, match="unknown strategy 'coreset'"):
        logic.suggestAnnotations(bundle, n=1, strategy="coreset")
    with pytest.raises(ValueError, match="volume 'Label map' cannot be ranked: a label map volume"):
        logic.suggestAnnotations(bundle, n=1, volumeNodes=[scan, label_map])
    with pytest.raises(ValueError, match="Scan are both in the pool and labelled"):
        logic.suggestAnnotations(bundle, n=1, volumeNodes=[scan], labelledVolumeNodes=[scan])
    other = sc.create_scene()
    stranger = sc.volume_node_from_sitk(other, synthetic["image"], "Elsewhere")
    with pytest.raises(ValueError, match="volume 'Elsewhere' is not in this logic's scene"):
        logic.suggestAnnotations(bundle, n=1, volumeNodes=[stranger])
    with pytest.raises(ValueError, match="tableNode must be a table node of this logic's scene"):
        logic.suggestAnnotations(bundle, n=1, tableNode=scan)
    assert _ids(scene) == before  # no table made on any failure
    # explicit pool and labelled volumes: a labelled volume may be ranked when the user says so
    out = logic.suggestAnnotations(bundle, n=1, strategy="uncertainty", volumeNodes=[labelled, scan],
                                   labelledVolumeNodes=[], fillTable=False)
    assert sorted(r["Volume"] for r in out.rows) == ["Labelled", "Scan"] and out.labelled == []


def test_demo_model_on_the_demo_patient(scene):
    """The bundled hippocampus model; the demo patient is labelled (its reference segmentation).
    An exact copy of it is covered by it (similarity 1, adds nothing) and the model is surer of it
    than of the same patient mirrored left-right, which it has not seen labelled: that one is chosen."""
    logic = ImbalanceSegLogic(scene)
    volume, _ = load_demo_case(scene)
    image = sc.sitk_from_volume_node(volume)
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(image)[:, :, ::-1]))
    mirrored.CopyInformation(image)
    sc.volume_node_from_sitk(scene, image, "Copy")
    sc.volume_node_from_sitk(scene, mirrored, "Mirrored")
    out = logic.suggestAnnotations(repository_paths()["model"], n=1, candidatesFactor=2.0)
    by_name = {r["Volume"]: r for r in out.rows}
    assert out.coveredBy == [volume.GetName()]
    assert [r["Volume"] for r in out.rows] == ["Mirrored", "Copy"] and by_name["Mirrored"]["Chosen"] == "yes"
    assert by_name["Copy"]["Most like"] == volume.GetName()
    assert by_name["Copy"]["Similarity"] == pytest.approx(1.0, abs=1e-9)
    assert by_name["Copy"]["Representativeness gain"] == pytest.approx(0.0, abs=1e-9)
    assert by_name["Mirrored"]["Uncertainty"] > by_name["Copy"]["Uncertainty"] + 0.1
    assert set(by_name["Copy"]["perClass"]) == {"Anterior hippocampus", "Posterior hippocampus"}
