"""Snapshot annotations (issue #24, item 8): a legend of the classes, the overlay's colour bar
with its range, and orientation letters at the view edges.

The letters are checked twice: against what Slicer's own slice views show with its default
presets (patient right on screen left: axial R|L, A over P; coronal R|L, S over I; sagittal
A|P, S over I; vtkMRMLSliceNode::GetAxial/Coronal/SagittalSliceToRASMatrix), and against the
rendered anatomy itself: a marker placed right, anterior and superior of the centre must be
drawn on the side of the view whose letter names that direction, for axis-aligned, oblique and
flipped volumes alike.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from moduletest_helpers import oblique_direction
from moduletest_helpers import render_or_skip as _render
from vtkmodules.util import numpy_support
from vtkmodules.vtkIOImage import vtkPNGReader

from ImbalanceSegSlicer import rendering as R
from ImbalanceSegSlicer import scene as S

RED, GREEN, BLUE = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)
INFERNO_TOP = (0.988, 0.998, 0.645)  # the colour of probability 1 in the Inferno table
CLASSES = [dict(value=1, name="Marker RAS", color=RED), dict(value=2, name="Other LPI", color=GREEN),
           dict(value=3, name="Absent", color=BLUE)]  # never in the label map: only in the legend
EXPECTED_LETTERS = {"axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
                    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
                    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"}}
# The view's screen axes (right, up) as RAS letters, for where the marker must be drawn.
SCREEN_AXES = {"axial": ("R", "A"), "coronal": ("R", "S"), "sagittal": ("A", "S")}
FLIPPED = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # array x runs towards R, z towards I


def _png(path):
    reader = vtkPNGReader()
    reader.SetFileName(path)
    reader.Update()
    img = reader.GetOutput()
    w, h, _ = img.GetDimensions()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars()).reshape(h, w, -1)[:, :, :3]
    return arr[::-1].astype(int)  # rows top first, as the PNG is viewed


def _near(arr, rgb, tolerance=40):
    return np.abs(arr - np.array(rgb) * 255.0).max(axis=2) <= tolerance


def _box(mask, box):
    x0, y0, x1, y1 = box
    return mask[y0:y1 + 1, x0:x1 + 1]


def _case(scene, direction):
    """A 40x30x20 mm volume; the marker 8 mm right, 6 mm anterior and 5 mm superior of the
    centre (RAS), the other class as far left, posterior and inferior; a probability blob of
    the marker."""
    size = (40, 30, 20)
    image = sitk.Image(size, sitk.sitkInt16)
    image.SetDirection(direction)
    centre_index = [(n - 1) / 2.0 for n in size]
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(centre_index))  # LPS
    image.SetOrigin(tuple(np.array(image.GetOrigin()) - centre))  # the centre at (0, 0, 0)
    k, j, i = np.mgrid[0:size[2], 0:size[1], 0:size[0]]
    d = np.array(direction).reshape(3, 3)
    pts = np.stack([i, j, k], -1).astype(float) @ d.T + np.array(image.GetOrigin())  # LPS
    marker_lps = np.array([-8.0, -6.0, 5.0])  # R, A, S of the centre
    other_lps = -marker_lps
    dm = np.linalg.norm(pts - marker_lps, axis=-1)
    do = np.linalg.norm(pts - other_lps, axis=-1)
    label = np.zeros(size[::-1], np.uint8)
    label[dm < 3.5] = 1
    label[do < 3.5] = 2
    intensity = (100 + 20 * np.sin(i / 3.0)).astype(np.int16)
    img = sitk.GetImageFromArray(intensity)
    img.CopyInformation(image)
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(image)
    prob = sitk.GetImageFromArray(np.clip(1.0 - dm / 7.0, 0.0, 1.0).astype(np.float32))
    prob.CopyInformation(image)
    volume = S.volume_node_from_sitk(scene, img, "Volume")
    seg = S.segmentation_from_labelmap(scene, lab, volume, [dict(c) for c in CLASSES], "Prediction")
    prob_node = S.add_probability_volume(scene, prob, "P(Marker RAS)")
    marker_ras = (-marker_lps[0], -marker_lps[1], marker_lps[2])
    return volume, seg, prob_node, marker_ras


@pytest.mark.parametrize("direction", [(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), oblique_direction(), FLIPPED],
                         ids=["axis-aligned", "oblique", "flipped"])
def test_orientation_letters_are_slicers_and_agree_with_the_drawn_anatomy(scene, tmp_path, direction):
    volume, seg, _, marker_ras = _case(scene, direction)
    drawn = {}
    paths = _render(scene, volume, seg, out_dir=str(tmp_path), size=(200, 160), center_ras=marker_ras,
                    orientation_markers=True, annotations=drawn)
    for view, path in paths.items():
        actors = drawn[view]["letter_actors"]
        assert {edge: a.GetInput() for edge, a in actors.items()} == EXPECTED_LETTERS[view], view
        assert drawn[view]["letters"] == EXPECTED_LETTERS[view]
        arr = _png(path)
        h, w = arr.shape[:2]
        # The letters are drawn: light pixels at the middle of each edge.
        light = (arr.min(axis=2) > 200)
        assert light[h // 2 - 12:h // 2 + 12, :20].any() and light[h // 2 - 12:h // 2 + 12, -20:].any(), view
        assert light[:20, w // 2 - 12:w // 2 + 12].any() and light[-20:, w // 2 - 12:w // 2 + 12].any(), view
        # The marker (right, anterior, superior of the centre) lies towards the letters of those directions.
        ys, xs = np.nonzero(_near(arr, RED))
        assert len(xs) > 20, view
        right_letter, up_letter = SCREEN_AXES[view]
        x_side = "left" if xs.mean() < w / 2 else "right"
        y_side = "top" if ys.mean() < h / 2 else "bottom"
        assert drawn[view]["letters"][x_side] == right_letter, (view, x_side)
        assert drawn[view]["letters"][y_side] == up_letter, (view, y_side)


def test_orientation_letters_of_slicers_presets():
    import slicer
    from vtkmodules.vtkCommonMath import vtkMatrix3x3

    for view, getter in (("axial", slicer.vtkMRMLSliceNode.GetAxialSliceToRASMatrix),
                         ("coronal", slicer.vtkMRMLSliceNode.GetCoronalSliceToRASMatrix),
                         ("sagittal", slicer.vtkMRMLSliceNode.GetSagittalSliceToRASMatrix)):
        m = vtkMatrix3x3()
        getter(m, True)  # patient right is screen left: Slicer's default
        rows = [[m.GetElement(r, c) for c in range(3)] for r in range(3)]
        assert R.orientation_letters(rows) == EXPECTED_LETTERS[view], view
    # An oblique slice gets the letter of the closest axis.
    assert R.direction_letter((0.3, -0.9, 0.2)) == "P"
    assert R.direction_letter((-0.7, 0.6, 0.1)) == "L"


def test_legend_shows_every_class_colour_and_name_in_the_legend_area(scene, tmp_path):
    volume, seg, prob, marker_ras = _case(scene, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    drawn = {}
    paths = _render(scene, volume, seg, prob, foreground_opacity=0.5, out_dir=str(tmp_path), size=(256, 200),
                    center_ras=marker_ras, legend=True, orientation_markers=True, annotations=drawn,
                    overlay_title="P(Marker RAS)")
    for view, path in paths.items():
        arr = _png(path)
        legend = drawn[view]["legend"]
        assert [e["name"] for e in legend] == [c["name"] for c in CLASSES]
        for entry, cls in zip(legend, CLASSES):
            assert entry["color"] == pytest.approx(cls["color"])
            swatch = _box(_near(arr, cls["color"], tolerance=10), entry["box"])
            assert swatch.mean() > 0.8, (view, cls["name"], swatch.mean())
        # The absent class is nowhere in the slice: its colour is in the legend only.
        blue = _near(arr, BLUE, tolerance=10)
        assert blue.sum() == _box(blue, drawn[view]["legend_box"]).sum() > 0, view
        # The legend's names are drawn: light text pixels beside the swatches, inside the legend box.
        x0, y0, x1, y1 = drawn[view]["legend_box"]
        sx1 = legend[0]["box"][2]
        assert (arr[y0:y1 + 1, sx1 + 2:x1 + 1].min(axis=2) > 200).sum() > 20, view


def test_colour_bar_shows_the_overlay_colours_and_range(scene, tmp_path):
    volume, seg, prob, marker_ras = _case(scene, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    drawn, plain = {}, {}
    paths = _render(scene, volume, seg, prob, out_dir=str(tmp_path), size=(256, 200), center_ras=marker_ras,
                    orientations=("Axial",), legend=True, annotations=drawn, overlay_title="P(Marker RAS)",
                    prefix="overlay_")
    bar = drawn["axial"]["colour_bar"]
    assert bar["range"] == pytest.approx((0.0, 1.0))  # the probability map's window
    assert bar["actor"].GetLookupTable().GetRange() == pytest.approx((0.0, 1.0))
    assert bar["title"] == bar["title_actor"].GetInput() == "P(Marker RAS)"
    assert bar["actor"].GetNumberOfLabels() == 3  # 0, 0.5, 1
    arr = _png(paths["axial"])
    top = _near(arr, INFERNO_TOP, tolerance=30)
    assert _box(top, bar["box"]).sum() > 10  # the bar's top colour: probability 1
    # Without an overlay there is no colour bar, and no bar colours.
    paths = _render(scene, volume, seg, None, out_dir=str(tmp_path), size=(256, 200), center_ras=marker_ras,
                    orientations=("Axial",), legend=True, annotations=plain, prefix="plain_")
    assert "colour_bar" not in plain["axial"]
    assert _near(_png(paths["axial"]), INFERNO_TOP, tolerance=30).sum() == 0


def test_annotations_are_off_unless_asked_for(scene, tmp_path):
    volume, seg, prob, marker_ras = _case(scene, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    drawn = {}
    paths = _render(scene, volume, seg, prob, out_dir=str(tmp_path), size=(128, 100), center_ras=marker_ras,
                    annotations=drawn)
    assert drawn == {}
    for path in paths.values():
        assert _near(_png(path), BLUE, tolerance=10).sum() == 0  # no legend entry for the absent class
