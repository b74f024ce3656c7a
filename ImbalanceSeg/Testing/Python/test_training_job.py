"""Training from Slicer in a background process: live history for the plot, bundle at the end,
cancel, and the plot nodes."""

import math

import numpy as np
import pytest

from imbalanceseglib.bundle import load_bundle

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.jobs import CANCELLED, DONE, JobError, TrainingJob, parse_training_line
from test_logic_training import _config, _scene_inputs


def _node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def test_parse_training_lines():
    assert parse_training_line("iter      4/600  loss 0.8123  1.20 it/s  eta 8.2 min") == \
        {"iteration": 4, "total": 600, "loss": pytest.approx(0.8123)}
    assert parse_training_line("iter     10/10  loss 0.5000 (sup 0.4, cps 0.1 x 0.5)  2 it/s  eta 0.0 min")["loss"] == 0.5
    assert parse_training_line("  val dice: Cerebral cortex=0.912  Amygdala=absent") == \
        {"val": {"Cerebral cortex": pytest.approx(0.912), "Amygdala": None}}
    assert parse_training_line("  val dice (mean of the two networks): A=0.100")["val"] == {"A": pytest.approx(0.1)}
    assert parse_training_line("[train] bundle written: /x/y.imbseg") == {"bundle": "/x/y.imbseg"}
    assert parse_training_line("[calibrate] wrote /x/y_calibrated.imbseg") == {"bundle": "/x/y_calibrated.imbseg"}
    assert parse_training_line("[train] preparing data (folders)") is None


def test_background_training_reports_history_and_writes_a_bundle(scene, synthetic, tmp_path):
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    pairs = logic.trainingPairsFromSegmentations([segmentation])
    assert pairs == [(volume, segmentation)]
    before = _node_ids(scene)
    config = _config("dice_ce")
    config.iterations, config.val_every = 4, 2
    job = TrainingJob(logic, config, pairs, tmp_path / "out", validationPairs=pairs, threads=1).start()
    path = job.wait(timeout=600)
    assert job.state == DONE and path.is_file() and job.fraction == 1.0
    assert _node_ids(scene) == before  # training never changes the scene
    losses = [e for e in job.history if "loss" in e]
    vals = [e for e in job.history if "val" in e]
    assert [e["iteration"] for e in losses] == [2, 4] and all(math.isfinite(e["loss"]) for e in losses)
    assert [e["iteration"] for e in vals] == [2, 4] and set(vals[0]["val"]) == {"Sphere A", "Sphere B"}
    # With validation pairs the trained model is calibrated on them: the calibrated bundle is the result.
    assert job.phase == "calibrate" and path.name == "scene_model_calibrated.imbseg"
    assert job.trainedBundlePath.is_file() and job.trainedBundlePath != path
    card = load_bundle(path).card
    assert card["calibration"]["method"] == "ts-atc" and card["calibration"]["fitted_on"]["cases"] == 1
    # The history the job parsed is the one the trainer recorded in the card.
    card_losses = [e["loss"] for e in card["training"]["history"] if "loss" in e]
    np.testing.assert_allclose([e["loss"] for e in losses], card_losses, atol=1e-4)
    assert card["training"]["train_cases"] == 1

    chart = logic.updateTrainingPlot(job.history, ["Sphere A", "Sphere B"])
    assert chart.GetNumberOfPlotSeriesNodes() == 3
    table = chart.GetNodeReference("ImbalanceSegTrainingTable").GetTable()
    assert table.GetNumberOfRows() == 2
    assert table.GetValueByName(1, "loss").ToDouble() == pytest.approx(losses[1]["loss"])
    dice_b = vals[1]["val"]["Sphere B"]
    got = table.GetValueByName(1, "val Dice Sphere B").ToDouble()
    assert (math.isnan(got) if dice_b is None else got == pytest.approx(dice_b))
    # Updating with more history adds rows, not series.
    more = job.history + [{"iteration": 6, "loss": 0.1}]
    assert logic.updateTrainingPlot(more, ["Sphere A", "Sphere B"], chart) is chart
    assert chart.GetNumberOfPlotSeriesNodes() == 3 and table.GetNumberOfRows() == 3


def test_training_cancel_and_refusals(scene, synthetic, tmp_path):
    volume, segmentation, unlabelled = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    config = _config("dice_ce")
    config.iterations = 100000
    job = TrainingJob(logic, config, [(volume, segmentation)], tmp_path / "out", threads=1).start()
    assert job.cancel() == CANCELLED
    with pytest.raises(JobError, match="cancelled"):
        job.wait()
    assert job._tmp is None
    with pytest.raises(ValueError, match="at least one"):
        TrainingJob(logic, _config("dice_ce"), [], tmp_path).start()
    with pytest.raises(ValueError, match="supervised; choose cps"):
        TrainingJob(logic, _config("dice_ce"), [(volume, segmentation)], tmp_path,
                    unlabeledVolumeNodes=[unlabelled]).start()
    bare = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Loose")
    with pytest.raises(ValueError, match="'Loose' has no source volume"):
        logic.trainingPairsFromSegmentations([bare])


def test_training_config_from_scene_pairs(scene, synthetic):
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    config = logic.trainingConfigFromScene([(volume, segmentation)], "cdifw", iterations=500, name="spheres")
    assert [c["name"] for c in config.classes] == ["Background", "Sphere A", "Sphere B"]
    assert config.classes[1]["color"] == [1.0, 0.0, 0.0]
    assert config.target_spacing == pytest.approx(list(volume.GetSpacing()))
    # 40 x 30 x 20 voxels of 0.8 x 0.9 x 2.5 mm: patches fit the volume, multiples of 16 voxels
    assert config.patch_size == [32, 16, 16]
    assert config.class_weighting["method"] == "cdifw" and config.iterations == 500 and config.val_every == 50
    assert "cps" in logic.trainingMethods() and "asym_focal" in logic.trainingMethods()
    with pytest.raises(ValueError, match="plain file name"):
        logic.trainingConfigFromScene([(volume, segmentation)], name="../x")
    with pytest.raises(ValueError, match="unknown training method 'magic'"):
        logic.trainingConfigFromScene([(volume, segmentation)], "magic")
    segmentation.GetSegmentation().AddEmptySegment("dup", "Sphere A")
    with pytest.raises(ValueError, match="two segments are named 'Sphere A'"):
        logic.trainingConfigFromScene([(volume, segmentation)])


def _data_folder(tmp_path, synthetic, classes_json=None):
    import json
    import SimpleITK as sitk
    folder = tmp_path / "data"
    for sub in ("images", "labels", "val_images", "val_labels"):
        (folder / sub).mkdir(parents=True)
    for sub in ("", "val_"):
        sitk.WriteImage(synthetic["image"], str(folder / f"{sub}images" / "case0.nrrd"))
        sitk.WriteImage(synthetic["label"], str(folder / f"{sub}labels" / "case0.nrrd"))
    (folder / "classes.json").write_text(json.dumps(classes_json if classes_json is not None else [
        {"value": 1, "name": "Sphere A", "color": [1, 0, 0]}, {"value": 2, "name": "Sphere B", "color": [0, 1, 0]}]))
    return folder


def test_training_from_a_data_folder(scene, synthetic, tmp_path):
    folder = _data_folder(tmp_path, synthetic)
    logic = ImbalanceSegLogic(scene)
    config = logic.trainingConfigFromFolder(folder, "dice_ce", iterations=4, name="folder_model")
    assert [c["name"] for c in config.classes] == ["Background", "Sphere A", "Sphere B"]
    assert config.target_spacing == pytest.approx([0.8, 0.9, 2.5])
    config.features, config.patch_size, config.batch_size = [4, 8], [16, 16, 8], 1
    before = _node_ids(scene)
    job = TrainingJob(logic, config, [], tmp_path / "out", dataFolder=folder, threads=1).start()
    path = job.wait(timeout=600)
    assert path.name == "folder_model_calibrated.imbseg"  # val_images/ present: calibrated on them
    card = load_bundle(path).card
    assert card["training"]["train_cases"] == 1 and card["calibration"]["fitted_on"]["cases"] == 1
    assert _node_ids(scene) == before

    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    with pytest.raises(ValueError, match="not both"):
        TrainingJob(logic, config, [(volume, segmentation)], tmp_path, dataFolder=folder).start()
    with pytest.raises(FileNotFoundError, match="has no 'images' folder"):
        TrainingJob(logic, config, [], tmp_path, dataFolder=tmp_path / "nowhere").start()


def test_data_folder_class_list_is_checked(tmp_path, synthetic, scene):
    logic = ImbalanceSegLogic(scene)
    folder = _data_folder(tmp_path, synthetic, [{"value": 1, "name": "A"}, {"value": 3, "name": "C"}])
    with pytest.raises(ValueError, match="without gaps"):
        logic.trainingConfigFromFolder(folder)
    (folder / "classes.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        logic.trainingConfigFromFolder(folder)
    (folder / "classes.json").unlink()
    with pytest.raises(FileNotFoundError, match="needs classes.json"):
        logic.trainingConfigFromFolder(folder)
