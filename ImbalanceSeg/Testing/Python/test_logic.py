"""The module Logic on a real slicer-core scene: nodes, names, colours, geometry and values."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import BundleError, ModelBundle, save_bundle
from imbalanceseglib.inference import predict
from imbalanceseglib.metrics import overlap_metrics
from imbalanceseglib.networks import build_network

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc

MODEL_CLASSES = [{"value": 0, "name": "Background", "color": [0, 0, 0]},
                 {"value": 1, "name": "Sphere A", "color": [1.0, 0.0, 0.0]},
                 {"value": 2, "name": "Sphere B", "color": [0.0, 1.0, 0.0]}]


def _bundle(bias=None, seed=0, spacing=(0.8, 0.9, 2.5)):
    torch.manual_seed(seed)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]})
    if bias is not None:  # all weights zero: the output is exactly the head bias everywhere
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            net.head.bias.copy_(torch.tensor(bias))
    card = {"name": "test", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                     "features": [4, 8]}},
            "classes": MODEL_CLASSES,
            "preprocessing": {"target_spacing": list(spacing), "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "percentile_zscore"}}}
    return ModelBundle(card=card, network=net.eval())


def _array(node):
    return sitk.GetArrayFromImage(sc.sitk_from_volume_node(node))


def _node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_constant_model_gives_known_probabilities_table_and_segments(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    # softmax([0, log 2, 0]) = [1/4, 1/2, 1/4] at every voxel
    result = logic.process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]))
    n_vox = 40 * 30 * 20
    for node, expected in zip(result.probabilityNodes, [0.25, 0.5, 0.25]):
        np.testing.assert_allclose(_array(node), expected, atol=1e-6)
    h = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)) / math.log(3)
    np.testing.assert_allclose(_array(result.uncertaintyNode), h, atol=1e-6)
    counts = sc.segment_voxel_counts(result.segmentationNode)
    assert counts == {"Sphere A": n_vox, "Sphere B": 0}
    row_a, row_b = result.rows
    assert row_a["Voxel count"] == n_vox
    assert row_a["Volume"] == pytest.approx(n_vox * 0.8 * 0.9 * 2.5 / 1000.0)
    assert row_a["Mean probability"] == pytest.approx(0.5, abs=1e-6)
    assert row_b["Voxel count"] == 0 and row_b["Mean probability"] is None
    table = result.tableNode.GetTable()
    assert table.GetNumberOfRows() == 2
    assert table.GetValueByName(0, "Volume").ToDouble() == pytest.approx(43.2)


def test_segments_named_coloured_and_on_the_input_geometry(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    result = ImbalanceSegLogic(scene).process(volume, _bundle(seed=1))
    seg = result.segmentationNode.GetSegmentation()
    names = [seg.GetSegment(seg.GetNthSegmentID(i)).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == ["Sphere A", "Sphere B"]
    assert seg.GetSegment("Sphere B").GetColor() == pytest.approx((0.0, 1.0, 0.0))
    geometry = result.segmentationNode.GetNodeReferenceID("referenceImageGeometryRef")
    assert geometry == volume.GetID()
    for node in [*result.probabilityNodes, result.uncertaintyNode]:
        assert node.GetSpacing() == pytest.approx(volume.GetSpacing())
        assert node.GetOrigin() == pytest.approx(volume.GetOrigin())
        m1, m2 = [__import__("vtk").vtkMatrix4x4() for _ in range(2)]
        node.GetIJKToRASMatrix(m1)
        volume.GetIJKToRASMatrix(m2)
        assert [m1.GetElement(r, c) for r in range(4) for c in range(4)] == pytest.approx(
            [m2.GetElement(r, c) for r in range(4) for c in range(4)])


def test_logic_output_equals_library_output_voxel_for_voxel(scene, synthetic):
    """The node <-> image conversions lose nothing: same values as calling the library directly."""
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    bundle = _bundle(seed=2)
    result = ImbalanceSegLogic(scene).process(volume, bundle)
    direct = predict(synthetic["image"], bundle)
    for c, node in enumerate(result.probabilityNodes):
        np.testing.assert_allclose(_array(node), direct.probabilities[c], atol=1e-6)
    counts = sc.segment_voxel_counts(result.segmentationNode)
    assert counts["Sphere A"] == int((direct.labels == 1).sum())
    assert counts["Sphere B"] == int((direct.labels == 2).sum())


def test_reference_comparison_matches_metrics(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    reference = sc.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"][:2], "Ref")
    bundle = _bundle(seed=3)
    result = ImbalanceSegLogic(scene).process(volume, bundle, reference)
    direct = predict(synthetic["image"], bundle)
    expected = overlap_metrics(direct.labels, synthetic["label_array"], 3)
    for c, row in enumerate(result.rows, start=1):
        assert row["Reference voxel count"] == expected[c]["reference_voxels"]
        assert row["Dice"] == pytest.approx(expected[c]["dice"])
    assert result.rows[0]["Reference voxel count"] == synthetic["counts"]["Sphere A"]
    assert result.rows[1]["Reference voxel count"] == synthetic["counts"]["Sphere B"]


def test_comparison_never_changes_the_reference_segmentation(scene, synthetic):
    """Regression: Slicer's labelmap export altered oblique source segmentations on every call."""
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    reference = sc.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"][:2], "Ref")
    before = sc.segment_voxel_counts(reference)
    logic = ImbalanceSegLogic(scene)
    for seed in (5, 6):
        result = logic.process(volume, _bundle(seed=seed), reference)
        assert [r["Reference voxel count"] for r in result.rows] == [before["Sphere A"], before["Sphere B"]]
    assert sc.segment_voxel_counts(reference) == before == {"Sphere A": 499, "Sphere B": 277}


def test_user_nodes_untouched_and_failure_leaves_scene_as_before(scene, synthetic, tmp_path):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    before_array = _array(volume).copy()
    before_ids = _node_ids(scene)
    logic = ImbalanceSegLogic(scene)

    def fail_late(stage, fraction):
        if stage == "results" and fraction == 0.0:
            raise RuntimeError("cancelled by user")
    with pytest.raises(RuntimeError, match="cancelled"):
        logic.process(volume, _bundle(seed=4), progress=fail_late)
    assert _node_ids(scene) == before_ids

    bad = _bundle(seed=4)
    bad.card["network"]["params"]["in_channels"] = 2
    with pytest.raises(BundleError, match="2 input channels"):
        logic.process(volume, bad)
    assert _node_ids(scene) == before_ids

    result = logic.process(volume, _bundle(seed=4))
    np.testing.assert_array_equal(_array(volume), before_array)
    assert volume.GetName() == "Input"
    assert all(n.GetID() not in before_ids for n in result.nodes())


def test_bad_inputs_are_refused_with_a_clear_message(scene, synthetic, tmp_path):
    logic = ImbalanceSegLogic(scene)
    with pytest.raises(ValueError, match="scalar input volume"):
        logic.process(None, _bundle())
    damaged = tmp_path / "damaged.imbseg"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    with pytest.raises(BundleError, match="damaged.imbseg"):
        logic.process(volume, damaged)


def test_model_listing_and_cache(tmp_path):
    b = _bundle()
    p = save_bundle(tmp_path / "mine.imbseg", b.card, b.network)
    models = ImbalanceSegLogic.availableModels([tmp_path])
    assert p in models
    logic = ImbalanceSegLogic.__new__(ImbalanceSegLogic)
    logic._bundles = {}
    assert logic.loadModel(p) is logic.loadModel(p)


def test_reference_distances_use_physical_spacing_and_explicit_policies(scene, synthetic):
    """Constant model: 'Sphere A' everywhere, 'Sphere B' never -> known policies and penalty."""
    from imbalanceseglib.evaluation import evaluate_images

    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    reference = sc.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"][:2], "Ref")
    result = ImbalanceSegLogic(scene).process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]), reference)
    row_a, row_b = result.rows
    assert row_a["Policy"] == "image_wide"
    assert row_b["Policy"] == "prediction_empty"
    diagonal = math.sqrt((40 * 0.8) ** 2 + (30 * 0.9) ** 2 + (20 * 2.5) ** 2)
    assert row_b["HD95"] == pytest.approx(diagonal) and row_b["ASSD"] == pytest.approx(diagonal)
    assert row_b["Dice"] == 0.0 and row_b["Surface Dice"] == 0.0
    # Independent path: evaluation on ITK images takes spacing from the images themselves.
    pred_img = sitk.GetImageFromArray((np.ones((20, 30, 40)) * 1).astype(np.uint8))
    pred_img.CopyInformation(synthetic["label"])
    expected = evaluate_images(pred_img, synthetic["label"], labels=[1, 2]).by_label()
    assert row_a["HD95"] == pytest.approx(expected[1].hd95_mm)
    assert row_a["ASSD"] == pytest.approx(expected[1].assd_mm)
    assert row_a["Dice"] == pytest.approx(2 * 499 / (499 + 40 * 30 * 20))
    table = result.tableNode.GetTable()
    assert table.GetValueByName(1, "Policy").ToString() == "prediction_empty"
    assert result.tableNode.GetColumnProperty("HD95", "unitLabel") == "mm" or \
        result.tableNode.GetColumnUnitLabel("HD95") == "mm"


def test_reference_on_another_grid_is_resampled_from_a_copy(scene, synthetic):
    """A reference segmentation whose labelmap geometry differs from the input volume (twice as fine)."""
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    fine_ref = sitk.Resample(synthetic["label"], [80, 60, 40], sitk.Transform(), sitk.sitkNearestNeighbor,
                             synthetic["label"].TransformContinuousIndexToPhysicalPoint((-0.25, -0.25, -0.25)),
                             (0.4, 0.45, 1.25), synthetic["label"].GetDirection(), 0, sitk.sitkUInt8)
    fine_volume = sc.volume_node_from_sitk(scene, sitk.Cast(fine_ref, sitk.sitkFloat32), "Fine")
    reference = sc.segmentation_from_labelmap(scene, fine_ref, fine_volume, synthetic["classes"][:2], "FineRef")
    before = sc.segment_voxel_counts(reference)
    result = ImbalanceSegLogic(scene).process(volume, _bundle(seed=8), reference)
    ref_counts = [r["Reference voxel count"] for r in result.rows]
    # Resampled back onto the input grid, the spheres keep their voxel counts within 5 %.
    assert ref_counts[0] == pytest.approx(499, rel=0.05) and ref_counts[1] == pytest.approx(277, rel=0.05)
    assert sc.segment_voxel_counts(reference) == before


def test_sample_data_source_points_at_the_shipped_demo_volume():
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from ImbalanceSeg import sampleDataSources
    from ImbalanceSegSlicer.scenarios import repository_paths
    hippocampus, brain = sampleDataSources()
    import os
    for source, case in ((hippocampus, "hippocampus"), (brain, "brain")):
        path = url2pathname(urlparse(source["uris"]).path)
        paths = repository_paths(case)
        assert os.path.samefile(path, paths["volume"])  # the volume the demo segments
        assert sitk.ReadImage(path).GetSize() == sitk.ReadImage(str(paths["volume"])).GetSize()
        assert source["loadFileType"] == "VolumeFile" and source["nodeNames"] == paths["node_name"]
        assert os.path.isfile(source["thumbnailFileName"])
    assert sitk.ReadImage(url2pathname(urlparse(brain["uris"]).path)).GetSize() == (90, 108, 90)
