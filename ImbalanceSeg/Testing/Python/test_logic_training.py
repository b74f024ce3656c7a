"""Training from scene nodes (labelled pairs and unlabelled volumes) with the module Logic."""

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.training import TrainConfig

from ImbalanceSeg import ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc

CLASSES = [{"value": 0, "name": "Background", "color": [0, 0, 0]},
           {"value": 1, "name": "Sphere A", "color": [1.0, 0.0, 0.0]},
           {"value": 2, "name": "Sphere B", "color": [0.0, 1.0, 0.0]}]


def _config(method):
    return TrainConfig.from_dict(dict(
        name="scene_model", classes=CLASSES, target_spacing=[1.0, 1.0, 2.5], patch_size=[16, 16, 8],
        features=[4, 8], iterations=4, batch_size=1, learning_rate=1e-2, val_every=1000, checkpoint_every=4,
        log_every=2, normalization={"scheme": "percentile_zscore"}, seed=1, method=method))


def _scene_inputs(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "T1")
    segmentation = sc.segmentation_from_labelmap(scene, synthetic["label"], volume, synthetic["classes"][:2], "T1 labels")
    unlabelled = sc.volume_node_from_sitk(scene, synthetic["image"], "T1 unlabelled")
    return volume, segmentation, unlabelled


def test_scene_cases_match_the_label_map_and_leave_the_scene_alone(scene, synthetic):
    volume, segmentation, unlabelled = _scene_inputs(scene, synthetic)
    n_nodes = scene.GetNumberOfNodes()
    before = sc.segment_voxel_counts(segmentation)
    config = _config("dice_ce")
    cases, unl = ImbalanceSegLogic(scene).trainingCasesFromScene(config, [(volume, segmentation)], [unlabelled])
    # the label map read from the segmentation, preprocessed like the file would be, has the same class counts
    from imbalanceseglib.training import prepare_case
    direct = prepare_case(synthetic["image"], synthetic["label"], config, "direct")
    np.testing.assert_array_equal(np.bincount(cases[0].labels.ravel(), minlength=3),
                                  np.bincount(direct.labels.ravel(), minlength=3))
    np.testing.assert_allclose(cases[0].image, direct.image, atol=1e-5)
    assert len(unl) == 1 and unl[0].class_voxels == {} and unl[0].image.shape == cases[0].image.shape
    assert scene.GetNumberOfNodes() == n_nodes and sc.segment_voxel_counts(segmentation) == before


def test_double_mix_trains_from_scene_nodes(scene, synthetic, tmp_path):
    volume, segmentation, unlabelled = _scene_inputs(scene, synthetic)
    n_nodes = scene.GetNumberOfNodes()
    path = ImbalanceSegLogic(scene).trainFromScene(_config("double_mix"), [(volume, segmentation)], tmp_path,
                                                   unlabeledVolumeNodes=[unlabelled], log=lambda m: None)
    card = load_bundle(path).card
    assert card["network"]["arch"] == "UNet3DEnsemble"
    assert card["training"]["train_cases"] == 1 and card["training"]["semi_supervised"]["unlabelled_cases"] == 1
    assert card["training"]["class_voxel_fractions"]["Sphere B"] > 0
    assert scene.GetNumberOfNodes() == n_nodes


def test_scene_training_refuses_unusable_inputs(scene, synthetic, tmp_path):
    volume, segmentation, unlabelled = _scene_inputs(scene, synthetic)
    other = sc.segmentation_from_labelmap(scene, synthetic["label"], volume,
                                          [{"value": 1, "name": "Liver", "color": [1, 0, 0]},
                                           {"value": 2, "name": "Spleen", "color": [0, 1, 0]}], "Unrelated")
    logic = ImbalanceSegLogic(scene)
    with pytest.raises(ValueError, match="no segment named like a class"):
        logic.trainFromScene(_config("dice_ce"), [(volume, other)], tmp_path, log=lambda m: None)
    with pytest.raises(ValueError, match="needs unlabelled images"):
        logic.trainFromScene(_config("cps"), [(volume, segmentation)], tmp_path, log=lambda m: None)
    with pytest.raises(ValueError, match="supervised"):
        logic.trainFromScene(_config("dice_ce"), [(volume, segmentation)], tmp_path,
                             unlabeledVolumeNodes=[unlabelled], log=lambda m: None)
    assert not list(tmp_path.glob("*.imbseg"))


# --------------------------------------------------------------------------- data folders (issue #20)


def _write_nnunet(root, synthetic, values=(3, 7), modality="MRI"):
    """An nnU-Net v2 raw folder of the synthetic case with label values 1, 2 recoded as ``values``."""
    import json
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    lab = sitk.GetArrayFromImage(synthetic["label"])
    recoded = np.zeros_like(lab)
    recoded[lab == 1], recoded[lab == 2] = values
    label = sitk.GetImageFromArray(recoded)
    label.CopyInformation(synthetic["label"])
    sitk.WriteImage(synthetic["image"], str(root / "imagesTr" / "case_000_0000.nii.gz"))
    sitk.WriteImage(label, str(root / "labelsTr" / "case_000.nii.gz"))
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": modality}, "labels": {"background": 0, "Sphere A": values[0], "Sphere B": values[1]},
        "file_ending": ".nii.gz", "numTraining": 1}))
    return root


def test_panel_config_from_an_nnunet_folder_with_non_consecutive_labels(scene, synthetic, tmp_path):
    folder = _write_nnunet(tmp_path / "Dataset007", synthetic)
    config = ImbalanceSegLogic(scene).trainingConfigFromFolder(folder, "dice_ce", iterations=4, name="nn")
    assert [(c["name"], c["value"], c["label_value"]) for c in config.classes] == [
        ("background", 0, 0), ("Sphere A", 1, 3), ("Sphere B", 2, 7)]
    assert config.modality == "MRI"  # from dataset.json
    assert config.target_spacing == pytest.approx(list(synthetic["image"].GetSpacing()))


def test_panel_config_from_an_msd_folder_and_a_mapping_classes_json(scene, synthetic, tmp_path):
    import json
    logic = ImbalanceSegLogic(scene)
    msd = tmp_path / "Task04"
    for sub in ("imagesTr", "labelsTr"):
        (msd / sub).mkdir(parents=True)
    sitk.WriteImage(synthetic["image"], str(msd / "imagesTr" / "s1.nii.gz"))
    sitk.WriteImage(synthetic["label"], str(msd / "labelsTr" / "s1.nii.gz"))
    (msd / "dataset.json").write_text(json.dumps({
        "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Sphere A", "2": "Sphere B"},
        "training": [{"image": "./imagesTr/s1.nii.gz", "label": "./labelsTr/s1.nii.gz"}], "test": []}))
    config = logic.trainingConfigFromFolder(msd)
    assert [c["name"] for c in config.classes] == ["background", "Sphere A", "Sphere B"]
    assert config.modality == "MRI" and "label_value" not in config.classes[1]
    plain = tmp_path / "plain"
    for sub in ("images", "labels"):
        (plain / sub).mkdir(parents=True)
    sitk.WriteImage(synthetic["image"], str(plain / "images" / "c.nrrd"))
    sitk.WriteImage(synthetic["label"], str(plain / "labels" / "c.nrrd"))
    (plain / "classes.json").write_text(json.dumps({"0": "background", "1": "Sphere A", "2": "Sphere B"}))
    config = logic.trainingConfigFromFolder(plain, modality="MR T2")
    assert [c["name"] for c in config.classes] == ["background", "Sphere A", "Sphere B"]
    assert config.modality == "MR T2"
    assert logic.trainingConfigFromFolder(plain).modality == ""  # never silently assumed
    # a value the classes do not list is caught before training, naming the case and file
    (plain / "classes.json").write_text(json.dumps({"0": "background", "1": "Sphere A"}))
    with pytest.raises(ValueError, match=r"case 'c' \(.*c.nrrd\): label values \[2\]"):
        logic.trainingConfigFromFolder(plain)


def test_training_job_on_an_nnunet_folder_keeps_the_label_values(scene, synthetic, tmp_path):
    from ImbalanceSegSlicer.jobs import TrainingJob
    folder = _write_nnunet(tmp_path / "Dataset008", synthetic, values=(2, 5))
    logic = ImbalanceSegLogic(scene)
    config = logic.trainingConfigFromFolder(folder, "dice_ce", iterations=3, name="nn_model")
    config.features, config.patch_size, config.batch_size = [4, 8], [16, 16, 8], 1
    path = TrainingJob(logic, config, [], tmp_path / "out", dataFolder=folder, threads=1).start().wait(timeout=600)
    card = load_bundle(path).card
    assert [c.get("label_value") for c in card["classes"]] == [0, 2, 5]
    assert card["training"]["train_cases"] == 1 and card["preprocessing"]["modality"] == "MRI"
