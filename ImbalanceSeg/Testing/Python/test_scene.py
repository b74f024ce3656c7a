import os
import urllib.parse
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import SimpleITK as sitk
from moduletest_helpers import COUNT_A, COUNT_B, ORIGIN, SPACING, SIZE, oblique_direction
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from ImbalanceSegSlicer import scene as S


def test_synthetic_counts_are_known(synthetic):
    assert int((synthetic["label_array"] == 1).sum()) == COUNT_A
    assert int((synthetic["label_array"] == 2).sum()) == COUNT_B


# ---------------------------------------------------------------- geometry
def test_volume_geometry_round_trip_is_exact(scene, synthetic):
    image = synthetic["image"]
    node = S.volume_node_from_sitk(scene, image, "CT")
    assert node.GetScene() is scene and node.GetName() == "CT"
    assert node.GetImageData().GetDimensions() == SIZE
    # RAS in the node: first two components of origin/direction rows flipped.
    assert node.GetSpacing() == SPACING
    assert node.GetOrigin() == (-ORIGIN[0], -ORIGIN[1], ORIGIN[2])
    m = vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    d = np.array(oblique_direction()).reshape(3, 3)
    for r in range(3):
        for c in range(3):
            expected = -d[r, c] if r < 2 else d[r, c]
            assert m.GetElement(r, c) == expected

    back = S.sitk_from_volume_node(node)
    assert back.GetSize() == image.GetSize()
    assert back.GetSpacing() == image.GetSpacing()
    assert back.GetOrigin() == image.GetOrigin()
    assert back.GetDirection() == image.GetDirection()
    assert back.GetPixelID() == image.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), synthetic["intensity"])


def test_voxel_positions_agree_between_itk_and_mrml(scene, synthetic):
    image = synthetic["image"]
    node = S.volume_node_from_sitk(scene, image, "CT")
    ijk_to_ras = vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    for ijk in [(0, 0, 0), (39, 0, 0), (5, 29, 19), (17, 3, 11)]:
        lps = image.TransformIndexToPhysicalPoint(ijk)
        ras = ijk_to_ras.MultiplyPoint(list(ijk) + [1.0])[:3]
        np.testing.assert_allclose(ras, (-lps[0], -lps[1], lps[2]), atol=1e-9)


def test_scalar_volume_gets_grey_display(scene, synthetic):
    node = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    display = node.GetDisplayNode()
    assert display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeGrey"
    assert scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None
    assert display.GetWindow() > 0


def test_labelmap_volume_node_class(scene, synthetic):
    node = S.volume_node_from_sitk(scene, synthetic["label"], "labels", "vtkMRMLLabelMapVolumeNode")
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert node.GetDisplayNode() is not None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(S.sitk_from_volume_node(node)), synthetic["label_array"])


# ---------------------------------------------------------------- segmentation
def _make_segmentation(scene, synthetic):
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    seg = S.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"], "Prediction")
    return volume, seg


def test_segmentation_segments_match_classes(scene, synthetic):
    volume, seg = _make_segmentation(scene, synthetic)
    segmentation = seg.GetSegmentation()
    assert seg.GetName() == "Prediction"
    assert segmentation.GetNumberOfSegments() == 3
    ids = [segmentation.GetNthSegmentID(i) for i in range(3)]
    assert ids == ["Sphere A", "Sphere B", "Absent"]
    for cls, seg_id in zip(synthetic["classes"], ids):
        segment = segmentation.GetSegment(seg_id)
        assert segment.GetName() == cls["name"]
        assert segment.GetColor() == pytest.approx(cls["color"])
        assert segment.GetLabelValue() == cls["value"]
    assert segmentation.GetSourceRepresentationName() == "Binary labelmap"
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == volume.GetID()
    display = seg.GetDisplayNode()
    assert display.GetVisibility2DFill() and display.GetVisibility2DOutline()


def test_segment_voxel_counts_exact_and_empty_class_kept(scene, synthetic):
    _, seg = _make_segmentation(scene, synthetic)
    assert S.segment_voxel_counts(seg) == {"Sphere A": COUNT_A, "Sphere B": COUNT_B, "Absent": 0}


def test_segment_ids_and_color_scale(scene, synthetic):
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    classes = [
        dict(value=2, name="B", color=(0, 255, 0), id="cls_b"),
        dict(value=1, name="A", color=(255, 0, 0), id="cls_a"),
    ]
    # An unlisted label value (7) is dropped instead of leaking into a segment.
    arr = synthetic["label_array"].copy()
    arr[0, 0, :5] = 7
    label = sitk.GetImageFromArray(arr)
    label.CopyInformation(synthetic["label"])
    seg = S.segmentation_from_labelmap(scene, label, volume, classes, "S")
    assert S.segment_voxel_counts(seg) == {"cls_b": COUNT_B, "cls_a": COUNT_A}
    assert seg.GetSegmentation().GetSegment("cls_a").GetColor() == pytest.approx((1.0, 0.0, 0.0))


def test_background_class_is_skipped(scene, synthetic):
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    classes = [dict(value=0, name="Background", color=(0, 0, 0))] + synthetic["classes"]
    seg = S.segmentation_from_labelmap(scene, synthetic["label"], volume, classes, "WithBackground")
    assert S.segment_voxel_counts(seg) == {"Sphere A": COUNT_A, "Sphere B": COUNT_B, "Absent": 0}


def test_segmentation_rejects_bad_classes(scene, synthetic):
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "CT")
    with pytest.raises(ValueError):
        S.segmentation_from_labelmap(scene, synthetic["label"], volume, [dict(value=0, name="bg", color=(0, 0, 0))], "x")
    with pytest.raises(ValueError):
        S.segmentation_from_labelmap(scene, synthetic["label"], volume, [dict(value=-1, name="neg", color=(0, 0, 0))], "x")
    with pytest.raises(ValueError):
        S.segmentation_from_labelmap(
            scene,
            synthetic["label"],
            volume,
            [dict(value=1, name="a", color=(0, 0, 0)), dict(value=1, name="b", color=(0, 0, 0))],
            "x",
        )


# ---------------------------------------------------------------- probability maps
def test_probability_volume_colormap_and_window(scene, synthetic):
    node = S.add_probability_volume(scene, synthetic["prob"], "P(Sphere A)")
    display = node.GetDisplayNode()
    color = display.GetColorNode()
    assert color.GetName() == "Inferno" and color.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx((0.0, 0.0, 0.016), abs=0.02)  # inferno(0): near black
    color.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx((0.988, 0.998, 0.645), abs=0.02)  # inferno(1): pale yellow
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(1.0)
    assert sitk.GetArrayFromImage(S.sitk_from_volume_node(node)).dtype == np.float32

    unc = S.add_probability_volume(scene, synthetic["prob"], "Uncertainty", colormap="Viridis")
    vcolor = unc.GetDisplayNode().GetColorNode()
    assert vcolor.GetName() == "Viridis"
    vcolor.GetColor(0, rgba)
    assert rgba[:3] == pytest.approx((0.267, 0.005, 0.329), abs=0.02)
    # The colour table is shared, not duplicated.
    again = S.add_probability_volume(scene, synthetic["prob"], "P2")
    assert again.GetDisplayNode().GetColorNodeID() == color.GetID()


# ---------------------------------------------------------------- tables
COLUMNS = [
    dict(name="Segment", type="string", description="Segment name"),
    dict(name="Volume", type="double", unit="mm3", description="Segment volume"),
    dict(name="Voxels", type="int", unit="voxels", description="Number of voxels"),
]


def test_table_node_columns(scene):
    table = S.table_node_from_rows(scene, "Stats", COLUMNS, [["Sphere A", 123.5, COUNT_A], ["Absent", None, 0]])
    t = table.GetTable()
    assert table.GetNumberOfColumns() == 3 and table.GetNumberOfRows() == 2
    assert table.GetColumnUnitLabel("Volume") == "mm3"
    assert table.GetColumnUnitLabel("Voxels") == "voxels"
    assert table.GetColumnDescription("Segment") == "Segment name"
    assert table.GetColumnTitle("Volume") == "Volume"
    assert t.GetColumnByName("Volume").GetClassName() == "vtkDoubleArray"
    assert t.GetColumnByName("Voxels").GetClassName() == "vtkIntArray"
    assert t.GetColumnByName("Segment").GetValue(0) == "Sphere A"
    assert t.GetColumnByName("Volume").GetValue(0) == 123.5
    assert np.isnan(t.GetColumnByName("Volume").GetValue(1))
    assert t.GetColumnByName("Voxels").GetValue(0) == COUNT_A
    with pytest.raises(ValueError):
        S.table_node_from_rows(scene, "bad", COLUMNS, [["only one"]])


# ---------------------------------------------------------------- saving
def test_save_node_is_atomic_and_points_to_final_file(scene, synthetic, tmp_path):
    volume, seg = _make_segmentation(scene, synthetic)
    out = tmp_path / "case"
    p = S.save_node(scene, seg, out / "prediction.seg.nrrd")
    assert os.path.isfile(p) and p == str(out / "prediction.seg.nrrd")
    assert seg.GetStorageNode().GetFileName() == p
    assert seg.GetStorageNode().IsA("vtkMRMLSegmentationStorageNode")
    table = S.table_node_from_rows(scene, "Stats", COLUMNS, [["Sphere A", 1.0, 2]])
    S.save_node(scene, table, out / "stats.tsv")
    S.save_node(scene, volume, out / "ct.nrrd")
    assert sorted(os.listdir(out)) == ["ct.nrrd", "prediction.seg.nrrd", "stats.schema.tsv", "stats.tsv"]
    assert table.GetStorageNode().GetSchemaFileName() == str(out / "stats.schema.tsv")
    # A temporary name keeps the compound extension the storage node needs.
    assert seg.GetStorageNode().GetSupportedFileExtension(str(out / ".tmp-1234-x.seg.nrrd")) == ".seg.nrrd"


def test_save_scene_and_reload(scene, synthetic, tmp_path):
    volume, seg = _make_segmentation(scene, synthetic)
    prob = S.add_probability_volume(scene, synthetic["prob"], "P(Sphere A)")
    table = S.table_node_from_rows(scene, "Stats", COLUMNS, [["Sphere A", 1.0, COUNT_A], ["Sphere B", 2.0, COUNT_B]])
    out = tmp_path / "case"
    S.save_node(scene, volume, out / "ct.nrrd")
    S.save_node(scene, seg, out / "prediction.seg.nrrd")
    S.save_node(scene, table, out / "stats.tsv")
    mrml = S.save_scene(scene, out / "case.mrml")  # prob + colour table saved by save_scene

    files = sorted(os.listdir(out))
    assert "case.mrml" in files and "P(Sphere_A).nrrd" in files
    assert not [f for f in files if f.startswith(".tmp")]
    # All storage nodes reference their files relative to the scene folder.
    root = ET.parse(mrml).getroot()
    file_names = [e.get("fileName") for e in root.iter() if e.get("fileName")]
    assert "ct.nrrd" in file_names and "prediction.seg.nrrd" in file_names and "stats.tsv" in file_names
    assert all(not os.path.isabs(f) for f in file_names)
    for f in file_names:
        assert (out / urllib.parse.unquote(f)).is_file(), f

    loaded = S.load_scene(mrml)
    ct2 = loaded.GetFirstNodeByName("ct") or loaded.GetFirstNodeByName("CT")
    assert ct2 is not None and ct2.GetImageData().GetDimensions() == SIZE
    img2 = S.sitk_from_volume_node(ct2)
    np.testing.assert_allclose(img2.GetSpacing(), SPACING, atol=1e-9)
    np.testing.assert_allclose(img2.GetOrigin(), ORIGIN, atol=1e-9)
    np.testing.assert_allclose(img2.GetDirection(), oblique_direction(), atol=1e-9)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img2), synthetic["intensity"])

    seg2 = loaded.GetFirstNodeByClass("vtkMRMLSegmentationNode")
    segmentation2 = seg2.GetSegmentation()
    names = [segmentation2.GetNthSegment(i).GetName() for i in range(segmentation2.GetNumberOfSegments())]
    assert names == ["Sphere A", "Sphere B", "Absent"]
    assert S.segment_voxel_counts(seg2) == {"Sphere A": COUNT_A, "Sphere B": COUNT_B, "Absent": 0}
    assert segmentation2.GetSegment("Sphere B").GetColor() == pytest.approx((0.0, 1.0, 0.0))

    table2 = loaded.GetFirstNodeByClass("vtkMRMLTableNode")
    assert table2.GetColumnUnitLabel("Volume") == "mm3"
    assert table2.GetTable().GetColumnByName("Voxels").GetValue(1) == COUNT_B

    prob2 = loaded.GetFirstNodeByName("P(Sphere A)")
    assert prob2.GetDisplayNode().GetColorNode().GetName() == "Inferno"
    assert prob2.GetDisplayNode().GetWindowLevelMax() == pytest.approx(1.0)


def test_save_scene_is_repeatable(scene, synthetic, tmp_path):
    volume, seg = _make_segmentation(scene, synthetic)
    mrml = S.save_scene(scene, tmp_path / "scene.mrml")
    first = sorted(os.listdir(tmp_path))
    S.save_scene(scene, mrml)
    assert sorted(os.listdir(tmp_path)) == first
    assert seg.GetStorageNode().GetFileName() == str(tmp_path / "Prediction.seg.nrrd")


def test_probability_maps_use_slicers_own_colour_tables_when_the_scene_has_them(scene, synthetic):
    """Inside Slicer the application has loaded Inferno and Viridis from its colour files (node IDs
    from Slicer's source, recorded in Testing/Data/slicer_api.json); the module uses those instead
    of adding look-alike tables of the same name. On slicer-core (no such nodes) it builds its own."""
    import json
    from pathlib import Path
    facts = json.loads((Path(__file__).resolve().parents[1] / "Data" / "slicer_api.json").read_text())
    recorded = json.dumps(facts["color_nodes"])
    builtin = {}
    for name, node_id in S.SLICER_COLOR_NODE_IDS.items():
        assert node_id in recorded, f"{node_id} is not the ID Slicer's source gives {name}"
        node = __import__('slicer').vtkMRMLColorTableNode()
        node.SetName(name)
        node.SetSingletonTag(node_id[len("vtkMRMLColorTableNode"):])  # as vtkMRMLColorLogic adds them
        node.SetTypeToGrey()
        scene.AddNode(node)
        assert node.GetID() == node_id
        builtin[name] = node
    tables_before = scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")
    prob = S.add_probability_volume(scene, synthetic["prob"], "P", colormap="Inferno")
    unc = S.add_probability_volume(scene, synthetic["prob"], "U", colormap="Viridis")
    assert prob.GetDisplayNode().GetColorNodeID() == builtin["Inferno"].GetID()
    assert unc.GetDisplayNode().GetColorNodeID() == builtin["Viridis"].GetID()
    assert scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode") == tables_before


def test_without_slicers_tables_one_table_per_colormap_is_built_and_reused(scene, synthetic):
    a = S.add_probability_volume(scene, synthetic["prob"], "A", colormap="Inferno")
    b = S.add_probability_volume(scene, synthetic["prob"], "B", colormap="Inferno")
    ours = a.GetDisplayNode().GetColorNode()
    assert ours.GetID() != S.SLICER_COLOR_NODE_IDS["Inferno"]
    assert b.GetDisplayNode().GetColorNodeID() == ours.GetID()
    assert ours.GetNumberOfColors() == 256 and ours.GetName() == "Inferno"


AWKWARD_NAMES = ["Lens & iris", "<optic> nerve", 'the "left" eye', "l'hippocampe", "海马体 (左)", "Gyrus 100% & <b>"]


def test_scene_with_awkward_class_names_saves_as_wellformed_xml_and_loads_back(scene, tmp_path):
    """Issue #24 item 4: names with &, <, quotes and non-Latin letters (the card schema allows
    them) are escaped wherever they reach the .mrml file; the scene loads back with every name."""
    import json
    arr = np.zeros((10, 12, 14), np.uint8)
    for k in range(len(AWKWARD_NAMES)):
        arr[1 + k, 2:5, 3:6] = k + 1
    labels = sitk.GetImageFromArray(arr)
    volume = S.volume_node_from_sitk(scene, sitk.GetImageFromArray(arr.astype(np.int16)), "T1 & <T2>")
    classes = [{"value": k + 1, "name": n, "color": [0.1 * k, 0.5, 0.2]} for k, n in enumerate(AWKWARD_NAMES)]
    seg = S.segmentation_from_labelmap(scene, labels, volume, classes, 'Result & "final" <v2>')
    seg.SetAttribute("ImbalanceSeg.Classes", json.dumps([{"name": n} for n in AWKWARD_NAMES], ensure_ascii=False))
    S.table_node_from_rows(scene, "Table & <x>", [{"name": "Segment", "type": "string",
                                                   "description": "name & <desc> \"q\""}],
                           [[n] for n in AWKWARD_NAMES])
    path = S.save_scene(scene, str(tmp_path / "scene.mrml"))
    ET.parse(path)  # well-formed XML
    loaded = S.load_scene(path)
    segs = [loaded.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(loaded.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert [s.GetName() for s in segs] == ['Result & "final" <v2>']
    segmentation = segs[0].GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    assert names == AWKWARD_NAMES
    assert json.loads(segs[0].GetAttribute("ImbalanceSeg.Classes")) == [{"name": n} for n in AWKWARD_NAMES]
    counts = S.segment_voxel_counts(segs[0])  # keyed by segment ID
    by_name = {segmentation.GetSegment(i).GetName(): n for i, n in counts.items()}
    assert by_name == {n: 9 for n in AWKWARD_NAMES}
    assert loaded.GetFirstNodeByName("T1 & <T2>") is not None
    table = loaded.GetFirstNodeByName("Table & <x>")
    cells = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    # Known limitation of Slicer's table storage (TSV read back by VTK's delimited text reader):
    # a cell with double quotes inside comes back mangled ('the "left" eye' -> 'left eye').
    # Every other name survives.
    assert [c for c, n in zip(cells, AWKWARD_NAMES) if '"' not in n] == [n for n in AWKWARD_NAMES if '"' not in n]


def test_plain_names_stay_segment_ids_and_unsafe_ones_get_a_safe_id():
    assert S.segment_id_for("Sphere A", 1) == "Sphere A"
    assert S.segment_id_for("Lens & iris", 3) == "Segment_3"
    assert S.segment_id_for("海马体", 2) == "海马体"


def test_segments_keep_their_names_and_colours_as_set_not_auto_generated(scene, synthetic):
    """Issue #24 item 8: Slicer replaces auto-generated names/colours (e.g. from terminology);
    the model card's names and colours are the user's, so they are marked as set."""
    volume = S.volume_node_from_sitk(scene, synthetic["image"], "Input")
    seg = S.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"], "Result")
    segmentation = seg.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetSegment(segmentation.GetNthSegmentID(i))
        assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated(), segment.GetName()
