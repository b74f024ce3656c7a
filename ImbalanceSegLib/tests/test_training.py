import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.inference import predict
from imbalanceseglib.metrics import dice_per_class
from imbalanceseglib.training import PatchSampler, TrainConfig, prepare_case, train

from libtest_helpers import sphere_case, train_killed_at


def test_training_lowers_loss_and_writes_a_complete_card(tmp_path, tiny_config, tiny_cases):
    logs = []
    path = train(tiny_config, tiny_cases[:2], tiny_cases[2:], tmp_path, log=logs.append)
    card = load_bundle(path).card
    losses = [h["loss"] for h in card["training"]["history"] if "loss" in h]
    assert losses[-1] < losses[0]
    fractions = card["training"]["class_voxel_fractions"]
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert 0 < fractions["Bead"] < fractions["Ball"] < fractions["Background"]
    assert set(card["validation"]["per_class"]) == {"Ball", "Bead"}
    assert card["training"]["config"]["iterations"] == 40


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, tiny_config, tiny_cases):
    full = train(tiny_config, tiny_cases, [], tmp_path / "full")
    cfg_half = TrainConfig.from_dict({**tiny_config.to_dict()})
    # Kill the run at iteration 30: the last checkpoint on disk is from iteration 20, so
    # iterations 21-30 are lost and must be redone identically after the resume.
    interrupted = tmp_path / "resumed"

    ck = train_killed_at(train, 30, cfg_half, tiny_cases, [], interrupted)
    assert ck["iteration"] == 20
    resumed = train(cfg_half, tiny_cases, [], interrupted, log=lambda m: None)
    a = load_bundle(full).network.state_dict()
    b = load_bundle(resumed).network.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_refuses_a_different_config(tmp_path, tiny_config, tiny_cases):
    train(tiny_config, tiny_cases, [], tmp_path)
    other = TrainConfig.from_dict({**tiny_config.to_dict(), "learning_rate": 0.5})
    with pytest.raises(ValueError, match="different config"):
        train(other, tiny_cases, [], tmp_path)


def test_trained_model_finds_the_ball(tmp_path, tiny_config, tiny_cases):
    cfg = TrainConfig.from_dict({**tiny_config.to_dict(), "iterations": 120})
    path = train(cfg, tiny_cases, [], tmp_path)
    img, lab = sphere_case(42)
    pred = predict(sitk.GetImageFromArray(img), load_bundle(path))
    assert dice_per_class(pred.labels, lab, 3)[1] > 0.85


def test_sampler_centres_on_rare_classes(tiny_cases):
    sampler = PatchSampler(tiny_cases, [8, 8, 8], foreground_fraction=1.0)
    rng = np.random.default_rng(0)
    chosen = [sampler.sample(rng)[2] for _ in range(400)]
    # Classes are drawn uniformly among those present, whatever their size.
    assert 0.4 < chosen.count(2) / len(chosen) < 0.6
    img, lab, c, name = sampler.sample(rng)
    assert img.shape == lab.shape == (8, 8, 8)


def test_sampler_pads_a_small_volume_with_zeros_as_inference_does():
    from imbalanceseglib.training_data import make_case
    rng = np.random.default_rng(3)
    image = rng.uniform(-2.0, 3.0, size=(4, 5, 6)).astype(np.float32)
    image[0, 0, 0] = -2.5  # the case minimum
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1:3, 2:4, 2:5] = 1
    case = make_case(image, labels, "small")
    for pad, fill in ((0.0, 0.0), (None, -2.5)):  # zeros (default), or the case minimum (the old sampler)
        sampler = PatchSampler([case], [8, 8, 8], foreground_fraction=0.5)
        sampler.pad_value = pad
        for _ in range(20):
            img, lab, _, _ = sampler.sample(np.random.default_rng(int(rng.integers(1 << 30))))
            # the patch holds one box of the volume (all of it, or cut where the patch starts inside
            # it), and the fill everywhere else
            box = tuple(slice(int(a.min()), int(a.max()) + 1) for a in np.nonzero(img != fill))
            size = tuple(b.stop - b.start for b in box)
            shown = [(z, y, x) for z in range(5 - size[0]) for y in range(6 - size[1]) for x in range(7 - size[2])
                     if np.array_equal(img[box], image[z:z + size[0], y:y + size[1], x:x + size[2]])]
            assert len(shown) == 1 and min(size) >= 2
            z, y, x = shown[0]
            assert np.array_equal(lab[box], labels[z:z + size[0], y:y + size[1], x:x + size[2]])
            outside = np.ones((8, 8, 8), bool)
            outside[box] = False
            assert outside.any() and np.all(img[outside] == fill) and np.all(lab[outside] == 0)
    assert PatchSampler.pad_value == 0.0


def test_prepare_case_checks_geometry_and_labels(tiny_config):
    img, lab = sphere_case(0)
    im = sitk.GetImageFromArray(img)
    lb = sitk.GetImageFromArray(lab)
    lb.SetSpacing((1.0, 1.0, 2.0))
    # The message says how they differ (issue #24 item 7), not only that they do.
    with pytest.raises(ValueError, match=r"case7: label map is not on the grid of its image: spacing \(1, 1, 1\) "
                                         r"vs \(1, 1, 2\) mm"):
        prepare_case(im, lb, tiny_config, "case7")
    lab2 = lab.copy()
    lab2[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        prepare_case(im, sitk.GetImageFromArray(lab2), tiny_config, "case7")


def test_config_validation_names_the_field(tiny_config):
    with pytest.raises(ValueError, match="unknown training config fields: \\['lr'\\]"):
        TrainConfig.from_dict({**tiny_config.to_dict(), "lr": 1})
    with pytest.raises(ValueError, match="divisible by 2"):
        TrainConfig.from_dict({**tiny_config.to_dict(), "patch_size": [33, 32, 32]})
