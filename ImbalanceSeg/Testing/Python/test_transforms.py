"""Results of a run on an input under a transform sit where the input is displayed (issue #17,
defect 10): they follow the input's parent transform, linear or not; the review's regions are
given in world coordinates; a reference under another transform is refused before inference."""

import math

import numpy as np
import pytest
import vtk

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from test_logic import _bundle

SHIFT = (50.0, -20.0, 10.0)


def _linear_transform(scene, shift=SHIFT, name="Shift"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    for i, v in enumerate(shift):
        m.SetElement(i, 3, v)
    node.SetMatrixTransformToParent(m)
    return node


def _world_bounds(node):
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)  # includes the parent transforms (world coordinates)
    return np.array(bounds)


def _local_bounds(node):
    bounds = [0.0] * 6
    node.GetBounds(bounds)  # the node's own frame
    return np.array(bounds)


def test_results_follow_the_inputs_linear_transform(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    transform = _linear_transform(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    result = ImbalanceSegLogic(scene).process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]))
    shown = _world_bounds(volume)
    np.testing.assert_allclose(shown - _local_bounds(volume), np.repeat(SHIFT, 2), atol=1e-6)
    for node in [result.segmentationNode, *result.probabilityNodes, result.uncertaintyNode]:
        assert node.GetParentTransformNode() is not None, node.GetName()
        assert node.GetParentTransformNode().GetID() == transform.GetID(), node.GetName()
    for node in [*result.probabilityNodes, result.uncertaintyNode]:
        np.testing.assert_allclose(_world_bounds(node), shown, atol=1e-4, err_msg=node.GetName())
    # The constant model puts every voxel in Sphere A: its segment covers the input as displayed.
    seg_bounds = [0.0] * 6
    result.segmentationNode.GetRASBounds(seg_bounds)
    np.testing.assert_allclose(seg_bounds, shown, atol=1.0)


def test_results_follow_a_nonlinear_transform_and_regions_are_in_world_coordinates(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    # A thin-plate spline warp that moves the whole field of view by SHIFT (and bends nothing):
    # source and target landmarks differ by SHIFT everywhere.
    source = vtk.vtkPoints()
    target = vtk.vtkPoints()
    b = _local_bounds(volume)
    for x in (b[0] - 50, b[1] + 50):
        for y in (b[2] - 50, b[3] + 50):
            for z in (b[4] - 50, b[5] + 50):
                source.InsertNextPoint(x, y, z)
                target.InsertNextPoint(x + SHIFT[0], y + SHIFT[1], z + SHIFT[2])
    tps = vtk.vtkThinPlateSplineTransform()
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", "Warp")
    node.SetAndObserveTransformToParent(tps)
    volume.SetAndObserveTransformNodeID(node.GetID())
    logic = ImbalanceSegLogic(scene)
    result = logic.process(volume, _bundle(seed=3))
    assert result.uncertaintyNode.GetParentTransformNode().GetID() == node.GetID()
    seg = result.segmentationNode
    name = logic.resultClassNames(seg)[0]
    regions = logic.leastConfidentRegions(seg, name, count=2)
    assert regions, "the random model should leave doubtful regions"
    prob = logic.probabilityNodeForClass(seg, name)
    from ImbalanceSegSlicer import review
    for r in regions:
        local = review.index_to_ras(prob, r["index_zyx"])
        np.testing.assert_allclose(np.array(r["ras"]) - np.array(local), SHIFT, atol=1e-3)


def test_reference_under_another_transform_is_refused_before_inference(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    reference = sc.segmentation_from_labelmap(scene, synthetic["label"], volume,
                                              [{"value": 1, "name": "Sphere A", "color": [1, 0, 0]},
                                               {"value": 2, "name": "Sphere B", "color": [0, 1, 0]}], "Reference")
    volume.SetAndObserveTransformNodeID(_linear_transform(scene).GetID())
    before = scene.GetNumberOfNodes()
    logic = ImbalanceSegLogic(scene)
    calls = []

    class Spy:
        network = property(lambda self: calls.append("network"))

    with pytest.raises(ValueError, match=r"'Reference' is under no transform but volume 'Input' is under "
                                         r"transform 'Shift'"):
        logic.process(volume, Spy(), reference)
    assert calls == [] and scene.GetNumberOfNodes() == before
    # Under the same transform as the input, the reference is compared as usual.
    reference.SetAndObserveTransformNodeID(volume.GetParentTransformNode().GetID())
    result = logic.process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]), reference)
    assert [r["Reference voxel count"] for r in result.rows] == [
        int((synthetic["label_array"] == k).sum()) for k in (1, 2)]


def test_reference_that_is_a_volume_is_refused_with_its_type(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    with pytest.raises(ValueError, match=r"the reference 'Input' is a vtkMRMLScalarVolumeNode, not a segmentation"):
        ImbalanceSegLogic(scene).process(volume, _bundle(), volume)


def test_reference_matching_no_class_is_refused_before_inference_naming_its_segments(scene, synthetic):
    """Issue #24 item 6: a reference whose segment names match no class gave an empty Dice column
    silently; it is refused before inference, naming its segments and the model's classes."""
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    reference = sc.segmentation_from_labelmap(scene, synthetic["label"], volume,
                                              [{"value": 1, "name": "Liver", "color": [1, 0, 0]},
                                               {"value": 2, "name": "Spleen", "color": [0, 1, 0]}], "Abdomen")
    logic = ImbalanceSegLogic(scene)
    before = scene.GetNumberOfNodes()
    bundle = _bundle()
    ran = []
    original = bundle.network.forward
    bundle.network.forward = lambda *a: ran.append(1) or original(*a)
    with pytest.raises(ValueError, match=r"no segment of the reference 'Abdomen' \('Liver', 'Spleen'\) is named "
                                         r"like a class of the model \(Sphere A, Sphere B\)"):
        logic.process(volume, bundle, reference)
    assert ran == [] and scene.GetNumberOfNodes() == before
    assert logic.checkReference(volume, reference, ["Background", "sphere_a", "Liver"]) == ["Liver"]


def test_background_job_checks_the_reference_before_starting_its_process(scene, synthetic, tmp_path):
    from imbalanceseglib.bundle import save_bundle
    from ImbalanceSegSlicer.jobs import CREATED, SegmentationJob
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    bundle = _bundle()
    path = save_bundle(tmp_path / "m.imbseg", bundle.card, bundle.network)
    logic = ImbalanceSegLogic(scene)
    wrong = sc.segmentation_from_labelmap(scene, synthetic["label"], volume,
                                          [{"value": 1, "name": "Liver", "color": [1, 0, 0]}], "Abdomen")
    for reference, message in ((wrong, "no segment of the reference 'Abdomen'"),
                               (volume, "is a vtkMRMLScalarVolumeNode, not a segmentation")):
        job = SegmentationJob(logic, volume, path, reference)
        with pytest.raises(ValueError, match=message):
            job.start()
        assert job.state == CREATED and job.pid is None
