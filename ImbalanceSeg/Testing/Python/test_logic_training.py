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
