"""Training from Slicer in a background process: live history for the plot, bundle at the end,
cancel, and the plot nodes."""

import math
import stat
import sys
import textwrap

import numpy as np
import pytest

from imbalanceseglib.bundle import load_bundle

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.jobs import CANCELLED, DONE, FAILED, JobError, TrainingJob
from test_logic_training import _config, _scene_inputs


def _node_ids(scene):
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def _fake_python(tmp_path, body):
    """An executable that the job starts instead of Python: the job's argv (``-u -m module
    command ...``) reaches ``body`` as ``argv``."""
    script = tmp_path / "fake_python"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nargv = sys.argv[1:]\n" + textwrap.dedent(body))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


# A trainer and calibrator that report through events only: their human log lines say nothing
# a log parser would recognise, and they come interleaved with stray output.
_EVENT_ONLY_TRAINER = """
def emit(**event):
    print(json.dumps(event), flush=True)

def arg(name):
    return argv[argv.index(name) + 1]

command = argv[3]
assert "--events" in argv, argv
if command == "train":
    from pathlib import Path
    out = Path(arg("--out"))
    print("some library chatter that is not an event", flush=True)
    print(json.dumps({"not": "an event"}), flush=True)
    emit(event="log", message="Schritt 2 von 4: Verlust 0,81")
    emit(event="progress", stage="prepare data", fraction=1.0)
    emit(event="iteration", iteration=2, total=4, loss=0.8123)
    emit(event="validation", iteration=2, dice={"Sphere A": 0.5, "Sphere B": None})
    emit(event="artifact", kind="checkpoint", path=str(out / "checkpoint.pt"))
    emit(event="iteration", iteration=4, total=4, loss=0.5)
    emit(event="validation", iteration=4, dice={"Sphere A": 0.75, "Sphere B": 0.25})
    emit(event="something_newer", detail=1)
    (out / "fake.imbseg").write_bytes(b"bundle")
    emit(event="artifact", kind="bundle", path=str(out / "fake.imbseg"))
    emit(event="log", message="fertig")
    emit(event="done")
elif command == "calibrate":
    emit(event="progress", stage="logits", fraction=1.0)
    open(arg("--out"), "wb").write(b"calibrated")
    emit(event="artifact", kind="bundle", path=arg("--out"))
    emit(event="done")
"""


def test_training_job_follows_events_not_log_lines(scene, synthetic, tmp_path):
    """Regression (#17): history, iteration, validation Dice and the bundle come from the event
    stream, whatever the human log says."""
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    config = _config("dice_ce")
    python = _fake_python(tmp_path, _EVENT_ONLY_TRAINER)
    job = TrainingJob(logic, config, [(volume, segmentation)], tmp_path / "out",
                      validationPairs=[(volume, segmentation)], python=python, threads=1).start()
    path = job.wait(timeout=120)
    assert job.state == DONE, job.error
    assert job.history == [{"iteration": 2, "loss": pytest.approx(0.8123)},
                           {"iteration": 2, "val": {"Sphere A": 0.5, "Sphere B": None}},
                           {"iteration": 4, "loss": 0.5},
                           {"iteration": 4, "val": {"Sphere A": 0.75, "Sphere B": 0.25}}]
    assert (job.iteration, job.total, job.fraction) == (4, 4, 1.0)
    assert job.trainedBundlePath == tmp_path / "out" / "fake.imbseg"
    assert job.checkpointPath == tmp_path / "out" / "checkpoint.pt"
    # calibrated afterwards, and its bundle event is the result
    assert job.phase == "calibrate" and path == tmp_path / "out" / "fake_calibrated.imbseg" and path.is_file()
    assert (job.progressStage, job.progressFraction) == ("logits", 1.0)
    # log events and lines that are not events end up in the log, nothing else does
    assert job.log == ["some library chatter that is not an event", '{"not": "an event"}',
                       "Schritt 2 von 4: Verlust 0,81", "fertig"]


def test_training_job_reports_the_error_event(scene, synthetic, tmp_path):
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    python = _fake_python(tmp_path, """
        print(json.dumps({"event": "iteration", "iteration": 2, "total": 4, "loss": 1.0}), flush=True)
        print(json.dumps({"event": "error", "type": "FloatingPointError", "message": "loss became nan"}), flush=True)
        sys.exit(2)
        """)
    job = TrainingJob(ImbalanceSegLogic(scene), _config("dice_ce"), [(volume, segmentation)], tmp_path / "out",
                      python=python, threads=1).start()
    with pytest.raises(JobError, match="training stopped \\(train\\): FloatingPointError: loss became nan"):
        job.wait(timeout=120)
    assert job.state == FAILED and job.history == [{"iteration": 2, "loss": 1.0}] and job.bundlePath is None


# The real command line and trainer, with every human log line reworded on its way out (plain
# lines and the messages of log events alike; other events pass unchanged): the job must not care.
_REWORDED_CLI = """
class Reworded:
    def __init__(self, inner):
        self.inner, self.pending = inner, ""

    def write(self, text):
        self.pending += text
        while "\\n" in self.pending:
            line, self.pending = self.pending.split("\\n", 1)
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                if event["event"] == "log":
                    event["message"] = "~ " + event["message"][::-1]
                line = json.dumps(event)
            elif line:
                line = "~ " + line[::-1]
            self.inner.write(line + "\\n")
        return len(text)

    def flush(self):
        self.inner.flush()

sys.stdout = Reworded(sys.stdout)
from imbalanceseglib.cli import main
assert argv[:3] == ["-u", "-m", "imbalanceseglib.cli"], argv
sys.exit(main(argv[3:]))
"""


def test_background_training_with_a_reworded_log(scene, synthetic, tmp_path):
    """Regression (#17): the trainer's events drive the job; rewording its log changes nothing."""
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    config = _config("dice_ce")
    config.iterations, config.val_every = 4, 2
    python = _fake_python(tmp_path, _REWORDED_CLI)
    job = TrainingJob(logic, config, [(volume, segmentation)], tmp_path / "out",
                      validationPairs=[(volume, segmentation)], python=python, threads=1).start()
    path = job.wait(timeout=600)
    assert job.state == DONE and path.name == "scene_model_calibrated.imbseg" and path.is_file()
    assert job.trainedBundlePath == tmp_path / "out" / "scene_model.imbseg"
    assert [e["iteration"] for e in job.history if "loss" in e] == [2, 4]
    vals = [e for e in job.history if "val" in e]
    assert [e["iteration"] for e in vals] == [2, 4] and set(vals[0]["val"]) == {"Sphere A", "Sphere B"}
    assert job.log and all(line.startswith("~ ") for line in job.log)  # the reworded human log
    card = load_bundle(job.trainedBundlePath).card
    np.testing.assert_allclose([e["loss"] for e in job.history if "loss" in e],
                               [e["loss"] for e in card["training"]["history"] if "loss" in e], rtol=1e-12)
    assert [e["val"] for e in vals] == [
        {k: v["dice"] for k, v in e["val"].items()} for e in card["training"]["history"] if "val" in e]


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


def test_the_deep_supervision_checkbox_reaches_the_config_from_both_logic_calls(scene, synthetic, tmp_path):
    """The panel's "Deep supervision" checkbox (``deepSupervision`` of the parameter node) is passed
    to either Logic call, which sets ``deep_supervision`` in the config the training job sends."""
    import json
    from imbalanceseglib.train_config import TrainConfig
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    pairs = [(volume, segmentation)]
    off = logic.trainingConfigFromScene(pairs, "cdifw", iterations=500, name="spheres")
    assert off.deep_supervision == {"enabled": False} and not off.deep_supervision_settings["enabled"]
    on = logic.trainingConfigFromScene(pairs, "cdifw", iterations=500, name="spheres", deepSupervision=True)
    assert on.deep_supervision == {"enabled": True} and on.class_weighting["method"] == "cdifw"
    # the panel's network (features 16, 32, 64, 128): auxiliary outputs at 1/2 and 1/4 resolution
    assert on.deep_supervision_settings == {"enabled": True, "levels": 2, "weights": "halving"}
    sent = TrainConfig.from_dict(json.loads(json.dumps(on.to_dict())))  # as the job's config.json
    assert sent.deep_supervision_settings == on.deep_supervision_settings
    folder = _data_folder(tmp_path, synthetic)
    assert logic.trainingConfigFromFolder(folder, "dice_ce", 4, "f", deepSupervision=True).deep_supervision == {
        "enabled": True}
    assert logic.trainingConfigFromFolder(folder, "dice_ce", 4, "f").deep_supervision == {"enabled": False}


def test_the_context_labels_checkbox_reaches_the_config_from_both_logic_calls(scene, synthetic, tmp_path):
    """The panel's "Context labels" checkbox (``contextLabels`` of the parameter node) is passed to
    either Logic call, which sets ``context_labels`` in the config the training job sends; a method
    it cannot go with is refused there, naming why."""
    import json
    from imbalanceseglib.train_config import TrainConfig
    volume, segmentation, _ = _scene_inputs(scene, synthetic)
    logic = ImbalanceSegLogic(scene)
    pairs = [(volume, segmentation)]
    off = logic.trainingConfigFromScene(pairs, "cdifw", iterations=500, name="spheres")
    assert off.context_labels == {"enabled": False} and not off.context_labels_settings["enabled"]
    on = logic.trainingConfigFromScene(pairs, "cdifw", iterations=500, name="spheres", contextLabels=True,
                                       deepSupervision=True)
    assert on.context_labels == {"enabled": True} and on.deep_supervision == {"enabled": True}
    # one context class, a generator as wide as the panel's network, a meta step every 5 iterations
    settings = on.context_labels_settings
    assert (settings["classes"], settings["update_every"], settings["generator_features"]) == (1, 5, [16, 32, 64, 128])
    sent = TrainConfig.from_dict(json.loads(json.dumps(on.to_dict())))  # as the job's config.json
    assert sent.context_labels_settings == settings
    with pytest.raises(ValueError, match="context_labels cannot be combined with asymmetric mixup"):
        logic.trainingConfigFromScene(pairs, "asym_mixup", iterations=500, name="spheres", contextLabels=True)
    with pytest.raises(ValueError, match="context_labels are supervised-only"):
        logic.trainingConfigFromScene(pairs, "double_mix", iterations=500, name="spheres", contextLabels=True)
    folder = _data_folder(tmp_path, synthetic)
    assert logic.trainingConfigFromFolder(folder, "dice_ce", 4, "f", contextLabels=True).context_labels == {
        "enabled": True}
    assert logic.trainingConfigFromFolder(folder, "dice_ce", 4, "f").context_labels == {"enabled": False}


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
