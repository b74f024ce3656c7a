"""The main job end to end: the bundled demo model on the demo case, through the module Logic.

Asserts what a user gets: files that reload in a fresh scene with the card's
segment names and colours, probability maps that sum to one, the class table,
snapshots, and per-class Dice that reproduces what the model card recorded when
the model was trained.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib.bundle import read_card

from ImbalanceSegSlicer import demo
from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.scenarios import repository_paths

PATHS = repository_paths()  # the demo model bundle is committed: a missing one is a failure


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--output", str(out)]) == 0
    return out


def test_demo_writes_everything_a_user_opens(demo_output):
    card = read_card(PATHS["model"])
    names = [c["name"] for c in card["classes"]]
    expected = ["DemoBrainT1.mrml", "DemoBrainT1_segmentation.seg.nrrd", "DemoBrainT1_uncertainty.nrrd",
                "DemoBrainT1_class_table.tsv", "DemoBrainT1_axial.png", "DemoBrainT1_coronal.png",
                "DemoBrainT1_sagittal.png"]
    expected += [f"DemoBrainT1_probability_{sc.safe_file_name(n)}.nrrd" for n in names]
    for f in expected:
        assert (demo_output / f).is_file(), f
    assert not list(demo_output.glob(".*tmp*")), "temporary files left behind"
    for view in ("axial", "coronal", "sagittal"):
        assert sitk.ReadImage(str(demo_output / f"DemoBrainT1_{view}.png")).GetSize() == (512, 512)


def test_saved_scene_reloads_with_named_coloured_segments(demo_output):
    card = read_card(PATHS["model"])
    scene = sc.load_scene(str(demo_output / "DemoBrainT1.mrml"))
    segs = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    result = next(s for s in segs if s.GetName().endswith("segmentation"))
    seg = result.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(card["classes"]) - 1
    for i, cls in enumerate(card["classes"][1:]):
        segment = seg.GetSegment(seg.GetNthSegmentID(i))
        assert segment.GetName() == cls["name"]
        assert segment.GetColor() == pytest.approx(tuple(cls["color"]), abs=1e-6)
    volume = next(scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))
                  if scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName() == "DemoBrainT1")
    assert volume.GetImageData().GetDimensions() == (90, 108, 90)


def test_probability_maps_sum_to_one_and_match_the_segmentation(demo_output):
    card = read_card(PATHS["model"])
    probs = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(
        demo_output / f"DemoBrainT1_probability_{sc.safe_file_name(c['name'])}.nrrd"))) for c in card["classes"]])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_output / "DemoBrainT1_uncertainty.nrrd")))
    assert 0.0 <= unc.min() and unc.max() <= 1.0 + 1e-6
    # Uncertainty is highest where the top two classes are close.
    top2 = np.sort(probs, axis=0)[-2:]
    close = (top2[1] - top2[0]) < 0.1
    assert unc[close].mean() > 3 * unc[~close].mean()


def test_class_table_and_dice_reproduce_the_model_card(demo_output):
    card = read_card(PATHS["model"])
    with open(demo_output / "DemoBrainT1_class_table.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["Segment"] for r in rows] == [c["name"] for c in card["classes"][1:]]
    recorded = card["demo_case"]["per_class"]
    for r in rows:
        dice = float(r["Dice"])
        assert dice == pytest.approx(recorded[r["Segment"]]["dice"], abs=0.02), r["Segment"]
        assert int(r["Reference voxel count"]) == recorded[r["Segment"]]["reference_voxels"]
        # The .tsv keeps 6 significant digits (Slicer table storage).
        assert float(r["Volume"]) == pytest.approx(int(r["Voxel count"]) * 8 / 1000.0, rel=1e-5)
    # The large classes are segmented well; every class is found.
    by_name = {r["Segment"]: float(r["Dice"]) for r in rows}
    assert by_name["Cerebral cortex"] > 0.8 and by_name["Cerebellum"] > 0.8
    assert all(int(r["Voxel count"]) > 0 for r in rows)


def test_card_records_training_provenance():
    card = read_card(PATHS["model"])
    fractions = card["training"]["class_voxel_fractions"]
    assert fractions["Amygdala"] < 0.005 and sum(fractions.values()) == pytest.approx(1.0)
    assert card["training_data"]["kind"] == "synthetic_cohort"
    assert set(card["validation"]["per_class"]) == {c["name"] for c in card["classes"][1:]}


def test_the_scenario_slicers_test_runner_uses(scene):
    """ImbalanceSegTest (Slicer's runner) calls run_demo_scenario on slicer.mrmlScene; run it here too."""
    from ImbalanceSegSlicer.scenarios import run_demo_scenario

    result = run_demo_scenario(scene)
    assert result["segment_names"] == result["class_names"][1:]
    for name, dice in result["dice"].items():
        assert dice > result["min_dice"][name] > 0.5, name
        assert result["estimated_dice"][name] == pytest.approx(dice, abs=result["estimate_tolerance"]), name
    assert result["result"].performanceTableNode.GetAttribute("ImbalanceSeg.Calibration").startswith("TS-ATC")
    # The user's input volume and reference are left as they were.
    assert result["volume"].GetName() == "DemoBrainT1"
    assert sc.segment_voxel_counts(result["reference"])["Amygdala"] == 444


def test_the_review_scenario_slicers_test_runner_uses(scene):
    """ImbalanceSegTest.test_review: least confident region, threshold trade-off, compare."""
    from ImbalanceSegSlicer.scenarios import run_review_scenario
    r = run_review_scenario(scene)
    cls = r["class"]
    assert cls == "Amygdala"
    assert len(r["regions"]) == 3 and r["regions"][0]["score"] >= r["regions"][1]["score"] > 0
    # A lower threshold grows the segment: sensitivity up, precision down (against the reference too).
    assert r["counts_lowered"][cls] > r["counts_before"][cls]
    assert r["after"][cls]["Voxel count"] == r["counts_lowered"][cls]
    # Compare on the current segments: the reference comparison moves with the threshold.
    before, after = r["before"][cls], r["after"][cls]
    assert after["Dice"] != before["Dice"]
    # The expected (label-free) trade-off: more sensitive, less precise than at argmax.
    assert r["lowered"]["sensitivity"] > r["at_argmax"]["sensitivity"]
    assert r["lowered"]["precision"] < r["at_argmax"]["precision"]
    assert r["lowered"]["voxels"] == r["counts_lowered"][cls]
    assert r["counts_restored"] == r["counts_before"]
