"""The main job end to end: the bundled demo model on the demo case, through the module Logic.

Asserts what a user gets: files that reload in a fresh scene with the card's
segment names and colours, probability maps that sum to one, the class table,
snapshots, and per-class Dice that reproduces what the model card recorded when
the model was trained. The main demo is the hippocampus model (200 real training
patients) on a held-out patient; the whole-head brain example runs through the same
scenario at the end.
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
NODE = PATHS["node_name"]
SPLIT = Path(PATHS["model"]).with_name("demo_hippocampus.split.json")


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert demo.main(["--output", str(out)]) == 0
    return out


def test_demo_writes_everything_a_user_opens(demo_output):
    card = read_card(PATHS["model"])
    names = [c["name"] for c in card["classes"]]
    expected = [f"{NODE}.mrml", f"{NODE}_segmentation.seg.nrrd", f"{NODE}_uncertainty.nrrd",
                f"{NODE}_class_table.tsv", f"{NODE}_performance_estimate.tsv", f"{NODE}_axial.png",
                f"{NODE}_coronal.png", f"{NODE}_sagittal.png"]
    expected += [f"{NODE}_probability_{sc.safe_file_name(n)}.nrrd" for n in names]
    for f in expected:
        assert (demo_output / f).is_file(), f
    assert not list(demo_output.glob(".*tmp*")), "temporary files left behind"
    for view in ("axial", "coronal", "sagittal"):
        assert sitk.ReadImage(str(demo_output / f"{NODE}_{view}.png")).GetSize() == (512, 512)


def test_saved_scene_reloads_with_named_coloured_segments(demo_output):
    card = read_card(PATHS["model"])
    scene = sc.load_scene(str(demo_output / f"{NODE}.mrml"))
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
                  if scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode").GetName() == NODE)
    assert volume.GetImageData().GetDimensions() == sitk.ReadImage(str(PATHS["volume"])).GetSize()


def test_probability_maps_sum_to_one_and_match_the_segmentation(demo_output):
    card = read_card(PATHS["model"])
    probs = np.stack([sitk.GetArrayFromImage(sitk.ReadImage(str(
        demo_output / f"{NODE}_probability_{sc.safe_file_name(c['name'])}.nrrd"))) for c in card["classes"]])
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(demo_output / f"{NODE}_uncertainty.nrrd")))
    assert 0.0 <= unc.min() and unc.max() <= 1.0 + 1e-6
    # Uncertainty is highest where the top two classes are close.
    top2 = np.sort(probs, axis=0)[-2:]
    close = (top2[1] - top2[0]) < 0.1
    assert unc[close].mean() > 3 * unc[~close].mean()


def test_class_table_and_dice_reproduce_the_model_card(demo_output):
    card = read_card(PATHS["model"])
    with open(demo_output / f"{NODE}_class_table.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["Segment"] for r in rows] == [c["name"] for c in card["classes"][1:]]
    recorded = card["demo_case"]["per_class"]
    voxel_ml = float(np.prod(sitk.ReadImage(str(PATHS["volume"])).GetSpacing())) / 1000.0
    for r in rows:
        dice = float(r["Dice"])
        assert dice == pytest.approx(recorded[r["Segment"]]["dice"], abs=0.02), r["Segment"]
        assert int(r["Reference voxel count"]) == recorded[r["Segment"]]["reference_voxels"]
        # The .tsv keeps 6 significant digits (Slicer table storage).
        assert float(r["Volume"]) == pytest.approx(int(r["Voxel count"]) * voxel_ml, rel=1e-5)
    # A held-out patient: every class is found and segmented well.
    assert all(float(r["Dice"]) > 0.7 and int(r["Voxel count"]) > 0 for r in rows)


def test_card_records_training_provenance_and_held_out_patients():
    card = read_card(PATHS["model"])
    fractions = card["training"]["class_voxel_fractions"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert card["training_data"]["kind"] == "dataset"
    assert set(card["validation"]["per_class"]) == {c["name"] for c in card["classes"][1:]}
    split = json.loads(SPLIT.read_text())
    assert not (set(split["train"]) & set(split["test"])) and not (set(split["val"]) & set(split["test"]))
    assert not set(split["train"]) & set(split["val"])
    assert card["training"]["train_cases"] == len(split["train"]) and card["training"]["val_cases"] == len(split["val"])
    held_out = card["held_out"]
    names = [c["name"] for c in card["classes"][1:]]
    # Every held-out patient, each class once; the demo case is one of them.
    assert sorted((r["case"], r["class"]) for r in held_out["per_case"]) == sorted(
        (c, n) for c in split["test"] for n in names)
    assert card["demo_case"]["case"] in split["test"]
    for name in names:  # the summary is the mean of the per-patient rows
        dice = [r["dice"] for r in held_out["per_case"] if r["class"] == name]
        assert held_out["per_class"][name]["dice"]["mean"] == pytest.approx(float(np.mean(dice)), abs=1e-4)
        assert held_out["per_class"][name]["dice"]["mean"] > 0.7


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
    assert result["volume"].GetName() == NODE
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(PATHS["labels"])))
    classes = json.loads(Path(PATHS["classes"]).read_text())
    assert sc.segment_voxel_counts(result["reference"]) == {c["name"]: int((labels == c["value"]).sum())
                                                           for c in classes if c["value"] > 0}


def test_the_review_scenario_slicers_test_runner_uses(scene):
    """ImbalanceSegTest.test_review: least confident region, threshold trade-off, compare."""
    from ImbalanceSegSlicer.scenarios import run_review_scenario
    r = run_review_scenario(scene)
    cls = r["class"]
    assert cls == "Posterior hippocampus"  # the rarer class in the training data
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


def test_the_whole_head_example_through_the_same_scenarios(scene):
    """The brain demo (a whole head, amygdala 0.04 % of the voxels): segment and review."""
    from ImbalanceSegSlicer.scenarios import run_demo_scenario, run_review_scenario

    result = run_demo_scenario(scene, case="brain")
    assert result["volume"].GetName() == "DemoBrainT1"
    assert result["bundle"].card["training_data"]["kind"] == "synthetic_cohort"
    assert sc.segment_voxel_counts(result["reference"])["Amygdala"] == 444
    for name, dice in result["dice"].items():
        assert dice > result["min_dice"][name] > 0.5, name
    r = run_review_scenario(scene, result)
    assert r["class"] == "Amygdala"
    assert r["counts_lowered"]["Amygdala"] > r["counts_before"]["Amygdala"]
    assert r["counts_restored"] == r["counts_before"]
