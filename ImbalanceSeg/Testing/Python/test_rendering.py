import os

import pytest
from moduletest_helpers import SPHERE_A
from moduletest_helpers import render_or_skip as _render
from vtkmodules.vtkIOImage import vtkPNGReader

from ImbalanceSegSlicer import rendering as R
from ImbalanceSegSlicer import scene as S

RED = (1.0, 0.0, 0.0)
GREEN = (0.0, 1.0, 0.0)


def _png_size(path):
    reader = vtkPNGReader()
    reader.SetFileName(path)
    reader.Update()
    dims = reader.GetOutput().GetDimensions()
    return dims[0], dims[1]


@pytest.fixture
def case(scene, synthetic):
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    seg = S.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"], "Prediction")
    return volume, seg


def test_snapshots_show_segment_outlines(scene, case, tmp_path):
    volume, seg = case
    paths = _render(scene, volume, seg, out_dir=str(tmp_path), size=(220, 180), prefix="case1_")
    assert set(paths) == {"axial", "coronal", "sagittal"}
    for name, path in paths.items():
        assert os.path.basename(path) == f"case1_{name}.png"
        assert os.path.isfile(path)
        assert _png_size(path) == (220, 180)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
    # Both spheres cross the centre axial slice: their colours must be drawn.
    assert R.count_pixels_near_color(paths["axial"], RED) > 100
    assert R.count_pixels_near_color(paths["axial"], GREEN) > 100
    # The sagittal centre plane (i = 19.5) cuts sphere A (i in 6.5..21.5)
    # but not sphere B (i in 21.75..34.25).
    assert R.count_pixels_near_color(paths["sagittal"], RED) > 0
    assert R.count_pixels_near_color(paths["sagittal"], GREEN) == 0
    # Temporary slice/composite/model nodes are removed again; only the
    # application singletons (selection, interaction, ...) stay.
    for cls in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode", "vtkMRMLModelNode", "vtkMRMLTransformNode"):
        assert scene.GetNumberOfNodesByClass(cls) == 0, cls
    _render(scene, volume, seg, out_dir=str(tmp_path), size=(32, 32), prefix="again_")
    n_nodes = scene.GetNumberOfNodes()
    _render(scene, volume, seg, out_dir=str(tmp_path), size=(32, 32), prefix="again_")
    assert scene.GetNumberOfNodes() == n_nodes
    # Display settings of the segmentation are restored.
    assert seg.GetDisplayNode().GetVisibility()


def test_snapshots_without_segmentation_have_no_segment_colour(scene, case, tmp_path):
    volume, seg = case
    paths = _render(scene, volume, None, out_dir=str(tmp_path), size=(220, 180))
    assert R.count_pixels_near_color(paths["axial"], RED) == 0
    assert R.count_pixels_near_color(paths["axial"], GREEN) == 0
    # The segmentation's own visibility is untouched afterwards.
    assert seg.GetDisplayNode().GetVisibility()


def test_snapshot_with_probability_foreground(scene, case, synthetic, tmp_path):
    volume, _ = case
    prob = S.add_probability_volume(scene, synthetic["prob"], "P(Sphere A)")
    # Centre of sphere A (probability 1 there), LPS -> RAS.
    lps = synthetic["image"].TransformIndexToPhysicalPoint(SPHERE_A["center"])
    center = (-lps[0], -lps[1], lps[2])
    plain = _render(scene, volume, None, out_dir=str(tmp_path), size=(128, 128), prefix="plain_", center_ras=center)
    overlay = _render(
        scene, volume, None, foreground_volume_node=prob, foreground_opacity=1.0,
        out_dir=str(tmp_path), size=(128, 128), prefix="prob_", orientations=("Axial",), center_ras=center,
    )
    assert set(overlay) == {"axial"}
    # inferno(1) is pale yellow: present only where the probability is high.
    assert R.count_pixels_near_color(overlay["axial"], (0.988, 0.998, 0.645), tolerance=30) > 0
    assert R.count_pixels_near_color(plain["axial"], (0.988, 0.998, 0.645), tolerance=30) == 0


def test_render_given_ras_point(scene, case, tmp_path):
    volume, seg = case
    # A point far outside the volume: nothing but background is visible.
    paths = _render(scene, volume, seg, out_dir=str(tmp_path), size=(64, 64), center_ras=(0.0, 0.0, 500.0),
                    orientations=("Axial",))
    assert R.count_pixels_near_color(paths["axial"], RED) == 0
