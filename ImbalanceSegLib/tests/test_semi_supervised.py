"""Semi-supervised cross pseudo supervision with Double-Mix pseudo-labels (issue #7)."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.inference import predict
from imbalanceseglib.networks import UNet3D, UNet3DEnsemble, build_network
from imbalanceseglib.semi_supervised import (cps_loss, double_mix, ema_update, mix_loss, mix_through_mask,
                                             sample_mix_classes, sigmoid_rampup)
from imbalanceseglib.train_config import semi_supervised_settings as settings
from imbalanceseglib.training import TrainConfig, make_case, prepare_unlabeled_case, train

from libtest_helpers import sphere_case, train_killed_at


def _cfg(tiny_config, **changes):
    d = tiny_config.to_dict()
    for key in ("loss", "mixup", "adversarial", "class_weighting", "augmentation", "semi_supervised"):
        d.pop(key)
    d.update(iterations=12, checkpoint_every=4, log_every=2, patch_size=[16, 16, 16])
    d.update(changes)
    return TrainConfig.from_dict(d)


# --------------------------------------------------------------------------- mixing


def test_mix_keeps_image_and_label_aligned_and_follows_the_mask():
    g = torch.Generator().manual_seed(0)
    x_l = torch.full((1, 1, 4, 4, 4), 10.0)
    y_l = torch.ones((1, 1, 4, 4, 4), dtype=torch.long)
    x_u = torch.full((1, 1, 4, 4, 4), -5.0)
    q_u = torch.zeros((1, 1, 4, 4, 4), dtype=torch.long)
    q_u[..., :2, :, :] = 2  # pseudo-label: class 2 in the first two slices, background elsewhere
    # weight only on class 2: the draw from the unlabelled patch must be class 2 alone
    w = torch.tensor([0.0, 0.0, 1.0])
    mx, my = double_mix(x_l, y_l, x_u, q_u, w, g)
    assert mx.shape == (2, 1, 4, 4, 4) and my.shape == (2, 1, 4, 4, 4)
    # first mix: the unlabelled patch's class-2 voxels pasted onto the labelled patch
    assert torch.equal(mx[0, 0, :2], torch.full((2, 4, 4), -5.0)) and torch.equal(my[0, 0, :2], torch.full((2, 4, 4), 2))
    assert torch.equal(mx[0, 0, 2:], torch.full((2, 4, 4), 10.0)) and torch.equal(my[0, 0, 2:], torch.ones(2, 4, 4, dtype=torch.long))
    # second mix: the labelled patch holds only class 1 (weight 0 -> uniform over the present classes),
    # so the whole labelled patch is pasted onto the unlabelled one
    assert torch.equal(mx[1], x_l[0]) and torch.equal(my[1], y_l[0])
    # on every voxel of every mix, the intensity comes from the same source as the label
    for k in range(2):
        from_l = mx[k] == 10.0
        assert torch.equal(my[k][from_l], y_l[0][from_l]) and torch.equal(my[k][~from_l], q_u[0][~from_l])


def test_mix_through_mask_is_a_hard_selection():
    m = torch.tensor([True, False, True])
    x, y = mix_through_mask(m, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 1, 1]),
                            torch.tensor([7.0, 8.0, 9.0]), torch.tensor([0, 0, 0]))
    assert x.tolist() == [1.0, 8.0, 3.0] and y.tolist() == [1, 0, 1]


def test_double_mix_refuses_mismatched_shapes():
    g = torch.Generator().manual_seed(0)
    a = torch.zeros((2, 1, 4, 4, 4))
    with pytest.raises(ValueError, match="matching shapes"):
        double_mix(a, a.long(), torch.zeros((1, 1, 4, 4, 4)), a.long(), None, g)


def test_class_sampling_follows_the_weights():
    g = torch.Generator().manual_seed(1)
    label = torch.tensor([0, 0, 1, 2, 3])  # classes 0..3 present; class 4 has weight but is absent
    w = torch.tensor([1.0, 0.0, 3.0, 6.0, 100.0])
    counts = np.zeros(5)
    n = 20000
    for _ in range(n):
        chosen = sample_mix_classes(label, w, g, draws=1)
        assert chosen.numel() == 1
        counts[int(chosen)] += 1
    assert counts[1] == 0 and counts[4] == 0  # zero weight never, absent class never
    np.testing.assert_allclose(counts[[0, 2, 3]] / n, [0.1, 0.3, 0.6], atol=0.015)
    # default draws: as many as classes present, distinct classes returned sorted
    out = sample_mix_classes(label, w, g)
    assert torch.equal(out, torch.unique(out)) and set(out.tolist()) <= {0, 2, 3}
    # no weights, or all zero on the present classes: uniform
    uniform = np.zeros(4)
    for _ in range(8000):
        uniform[int(sample_mix_classes(label, torch.tensor([0.0, 0, 0, 0, 5]), g, draws=1))] += 1
    np.testing.assert_allclose(uniform / 8000, [0.25] * 4, atol=0.02)


# --------------------------------------------------------------------------- EMA, ramp-up, CPS loss


def test_ema_update_rule():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    s0 = student.weight.detach().clone()
    assert ema_update(teacher, student, 0.99, step=0) == 0.0  # first update copies the student
    torch.testing.assert_close(teacher.weight, s0)
    with torch.no_grad():
        student.weight.add_(1.0)
    a = ema_update(teacher, student, 0.99, step=3)  # min(1 - 1/4, 0.99) = 0.75
    assert a == 0.75
    torch.testing.assert_close(teacher.weight, 0.75 * s0 + 0.25 * (s0 + 1.0))
    assert ema_update(teacher, student, 0.99, step=10 ** 6) == 0.99  # the decay caps it later
    assert not teacher.weight.requires_grad or teacher.weight.grad is None


def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0
    assert sigmoid_rampup(3, 0) == 1.0


def test_cps_loss_is_weighted_ce_against_the_other_argmax_without_gradient_into_it():
    logits = torch.tensor([[[2.0, 0.0]], [[0.0, 1.0]]]).reshape(1, 2, 1, 2).requires_grad_()   # 2 classes, 2 voxels
    other = torch.tensor([[[0.0, 0.0]], [[1.0, -1.0]]]).reshape(1, 2, 1, 2).requires_grad_()  # argmax: 1, 0
    loss = cps_loss(logits, other, torch.tensor([1.0, 3.0]))
    lp = torch.log_softmax(logits.detach(), 1)[0, :, 0]
    expected = (-3.0 * lp[1, 0] - 1.0 * lp[0, 1]) / 2  # voxel 0 target 1 (weight 3), voxel 1 target 0 (weight 1)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and other.grad is None


def test_mix_loss_learns_from_the_mixed_labels_or_from_the_networks_own_argmax():
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1)
    x = torch.randn(2, 1, 2, 3, 3)
    labels = torch.randint(0, 3, (2, 1, 2, 3, 3))
    other = (labels + 1) % 3

    def ce(out, y, class_weights=None):  # a stand-in loss: weighted CE against integer labels
        return F.cross_entropy(out, y[:, 0], weight=class_weights)

    w = torch.tensor([0.5, 1.0, 2.0])
    _f = lambda t: float(t.detach())  # noqa: E731
    # mixed labels: the loss against those labels, so other labels give another loss
    assert _f(mix_loss(net, x, labels, ce, w)) == pytest.approx(_f(ce(net(x), labels, w)), rel=1e-6)
    assert _f(mix_loss(net, x, other, ce, w)) != pytest.approx(_f(mix_loss(net, x, labels, ce, w)))
    # own prediction: the labels given are not used; the target is the network's argmax, without gradient
    own = net(x).detach().argmax(1, keepdim=True)
    for y in (labels, other):
        loss = mix_loss(net, x, y, ce, w, target="own_prediction")
        assert _f(loss) == pytest.approx(_f(ce(net(x), own, w)), rel=1e-6)
    net.zero_grad()
    mix_loss(net, x, labels, ce, w, target="own_prediction").backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="own_prediction"):
        mix_loss(net, x, labels, ce, w, target="teacher")


def test_settings_are_validated():
    assert settings({"method": "cps"})["unsup_weight"] == 0.1
    assert settings({"method": "double_mix"})["mix_target"] == "mixed_labels"
    with pytest.raises(ValueError, match="mix_target"):
        settings({"method": "double_mix", "mix_target": "teacher"})
    with pytest.raises(ValueError, match="semi_supervised.method"):
        settings({"method": "fixmatch"})
    with pytest.raises(ValueError, match="unknown settings"):
        settings({"method": "cps", "unsup_wieght": 1})
    with pytest.raises(ValueError, match="ema_decay"):
        settings({"method": "double_mix", "ema_decay": 1.5})


def test_config_refuses_conflicting_or_bad_semi_supervised_settings(tiny_config):
    with pytest.raises(ValueError, match="weights_a"):
        _cfg(tiny_config, method="cps", semi_supervised={"method": "cps", "weights_a": {"method": "magic"}})
    with pytest.raises(ValueError, match="class_weighting"):
        _cfg(tiny_config, method="double_mix", class_weighting={"method": "disw"})
    with pytest.raises(ValueError, match="supervised-only"):
        _cfg(tiny_config, method="double_mix", mixup={"probability": 1.0})


# --------------------------------------------------------------------------- training


def _unlabelled(n=3):
    return [make_case(sphere_case(100 + s)[0], np.zeros((32, 32, 32), np.uint8), name=f"u{s}") for s in range(n)]


def test_two_network_training_step_lowers_the_loss_on_a_tiny_case(tmp_path, tiny_config, tiny_cases):
    # plain CPS (no class weights), so the supervised loss of one iteration is comparable with another's
    cfg = _cfg(tiny_config, method="cps", iterations=60, log_every=10, checkpoint_every=60)
    path = train(cfg, tiny_cases[:2], tiny_cases[2:], tmp_path, log=lambda m: None, unlabeled_cases=_unlabelled())
    card = load_bundle(path).card
    hist = [h for h in card["training"]["history"] if "loss" in h]
    assert hist[-1]["sup"] < 0.6 * hist[0]["sup"], [h["sup"] for h in hist]
    assert hist[-1]["unsup_weight"] > hist[0]["unsup_weight"] and all(h["mix"] == 0.0 for h in hist)
    assert card["validation"]["per_class"]["Ball"]["dice"] > 0.5, card["validation"]


def test_double_mix_training_writes_a_dual_bundle_predicting_the_mean(tmp_path, tiny_config, tiny_cases):
    cfg = _cfg(tiny_config, method="double_mix", iterations=12, log_every=2, checkpoint_every=12,
               semi_supervised={"method": "double_mix", "weights_a": {"method": "cdifw", "tau": 5},
                                "weights_b": {"method": "disw"}, "mix_start": 0.5})
    bundle = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path, log=lambda m: None, unlabeled_cases=_unlabelled()))
    card = bundle.card
    assert card["network"]["arch"] == "UNet3DEnsemble" and card["network"]["params"]["members"] == 2
    ss = card["training"]["semi_supervised"]
    assert ss["method"] == "double_mix" and ss["unlabelled_cases"] == 3 and card["training"]["train_cases"] == 2
    assert ss["weights_a"] == {"method": "cdifw", "tau": 5} and ss["weights_b"] == {"method": "disw"}
    hist = [h for h in card["training"]["history"] if "loss" in h]
    assert [h["mix"] > 0 for h in hist] == [False, False, False, True, True, True]  # mixing from iteration 6
    assert hist[-1]["class_weights_a"] != hist[0]["class_weights_a"]  # CDifW followed training
    assert hist[-1]["class_weights_b"] != hist[0]["class_weights_b"]  # DisW followed B's pseudo-labels
    # the two students differ (different initialisation) and the bundle predicts the mean of their logits
    a, b = bundle.network.members
    assert not torch.equal(a.head.weight, b.head.weight)
    x = torch.from_numpy(tiny_cases[0].image[None, None, :16, :16, :16].copy())
    with torch.no_grad():
        torch.testing.assert_close(bundle.network(x), (a(x) + b(x)) / 2)


def test_double_mix_can_learn_from_its_own_prediction_on_the_mixed_patches(tmp_path, tiny_config, tiny_cases):
    # the same run with each mix target: identical until mixing starts, then the mix terms differ
    hists = {}
    for target in ("mixed_labels", "own_prediction"):
        cfg = _cfg(tiny_config, method="double_mix", iterations=8, log_every=2, checkpoint_every=8,
                   semi_supervised={"method": "double_mix", "weights_a": {"method": "cdifw"},
                                    "weights_b": {"method": "disw"}, "mix_start": 0.5, "mix_target": target})
        card = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path / target, log=lambda m: None,
                                 unlabeled_cases=_unlabelled())).card
        assert card["training"]["semi_supervised"]["mix_target"] == target
        hists[target] = [h for h in card["training"]["history"] if "loss" in h]
    a, b = hists["mixed_labels"], hists["own_prediction"]
    assert [h["mix"] > 0 for h in b] == [False, False, True, True]
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)  # no mixing yet: the same step
    assert a[2]["mix"] != pytest.approx(b[2]["mix"], rel=1e-3)


def test_cps_weighted_floor_keeps_every_weight_at_least_one(tmp_path, tiny_config, tiny_cases):
    # the same run with the DHC weights and with the floored preset: the background's weight falls below 1
    # without the floor (DisW gives the most frequent class 0) and stays at 1 with it
    hists = {}
    for method in ("cps_weighted", "cps_weighted_floor"):
        cfg = _cfg(tiny_config, method=method, iterations=6, log_every=2, checkpoint_every=6)
        card = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path / method, log=lambda m: None,
                                 unlabeled_cases=_unlabelled())).card
        ss = card["training"]["semi_supervised"]
        assert [ss[k].get("min_weight", 0.0) for k in ("weights_a", "weights_b")] == [float(method.endswith("floor"))] * 2
        hists[method] = [h for h in card["training"]["history"] if "loss" in h]
    low = min(min(h["class_weights_a"] + h["class_weights_b"]) for h in hists["cps_weighted"])
    assert low < 0.5, hists["cps_weighted"]
    for h in hists["cps_weighted_floor"]:
        assert min(h["class_weights_a"] + h["class_weights_b"]) >= 1.0 - 1e-6, h
        assert max(h["class_weights_b"]) > 1.0  # the rarer classes still weigh more


def test_resume_gives_the_same_dual_model(tmp_path, tiny_config, tiny_cases):
    cfg = _cfg(tiny_config, method="double_mix", iterations=12, checkpoint_every=4,
               semi_supervised={"method": "double_mix", "weights_a": {"method": "cdifw", "tau": 5},
                                "weights_b": {"method": "disw"}, "mix_start": 0.0})
    unl = _unlabelled(2)
    full = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path / "full", log=lambda m: None, unlabeled_cases=unl))

    train_killed_at(train, 10, cfg, tiny_cases[:2], [], tmp_path / "cut", unlabeled_cases=unl)
    resumed = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path / "cut", log=lambda m: None, unlabeled_cases=unl))
    for k, v in full.network.state_dict().items():
        torch.testing.assert_close(v, resumed.network.state_dict()[k], rtol=0, atol=1e-6)


def test_semi_supervised_needs_unlabelled_data_and_supervised_refuses_it(tmp_path, tiny_config, tiny_cases):
    with pytest.raises(ValueError, match="needs unlabelled images"):
        train(_cfg(tiny_config, method="cps"), tiny_cases, [], tmp_path / "a", log=lambda m: None)
    with pytest.raises(ValueError, match="supervised"):
        train(_cfg(tiny_config, method="dice_ce"), tiny_cases, [], tmp_path / "b", log=lambda m: None,
              unlabeled_cases=_unlabelled(1))


def test_prepare_unlabeled_case_matches_the_labelled_preprocessing(tiny_config):
    img, lab = sphere_case(7)
    sitk_img = sitk.GetImageFromArray(img)
    from imbalanceseglib.training import prepare_case
    u = prepare_unlabeled_case(sitk_img, tiny_config, "u")
    l = prepare_case(sitk_img, sitk.GetImageFromArray(lab), tiny_config, "l")
    np.testing.assert_array_equal(u.image, l.image)
    assert u.class_voxels == {} and not u.labels.any()


# --------------------------------------------------------------------------- bundle


def test_dual_bundle_round_trip_and_prediction(tmp_path, tiny_config, tiny_cases):
    cfg = _cfg(tiny_config, method="cps", iterations=4, checkpoint_every=4)
    path = train(cfg, tiny_cases[:1], [], tmp_path, log=lambda m: None, unlabeled_cases=_unlabelled(1))
    b1, b2 = load_bundle(path), load_bundle(path)
    for k, v in b1.network.state_dict().items():
        assert k.startswith("members.0.") or k.startswith("members.1.")
        assert torch.equal(v, b2.network.state_dict()[k])
    img = sitk.GetImageFromArray(tiny_cases[0].image)
    pred = predict(img, b1)
    assert pred.probabilities.shape[0] == 3
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)


def test_ensemble_network_parameters_are_checked():
    net = build_network("UNet3DEnsemble", {"in_channels": 1, "out_channels": 3, "features": [4, 8], "members": 3})
    assert isinstance(net, UNet3DEnsemble) and len(net.members) == 3 and isinstance(net.members[0], UNet3D)
    for bad in (1, 9, True, 2.0):
        with pytest.raises(ValueError):
            build_network("UNet3DEnsemble", {"out_channels": 3, "features": [4, 8], "members": bad})


# --------------------------------------------------------------------------- command line


def test_cli_trains_a_semi_supervised_model_from_folders(tmp_path, capsys):
    from imbalanceseglib.cli import main
    from libtest_helpers import CLASSES
    for sub in ("images", "labels", "unlabelled"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        img, lab = sphere_case(i)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "images" / f"case{i}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "labels" / f"case{i}.nrrd"))
    for i in range(3):
        sitk.WriteImage(sitk.GetImageFromArray(sphere_case(50 + i)[0]), str(tmp_path / "unlabelled" / f"u{i}.nii.gz"))
    train_cfg = dict(name="semi", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
                     features=[4, 8], iterations=4, batch_size=2, learning_rate=1e-2, val_every=1000,
                     checkpoint_every=4, log_every=2, normalization={"scheme": "none"}, seed=5, method="double_mix")
    cfg = {"data": {"kind": "folders", "images": "images", "labels": "labels", "unlabeled_images": "unlabelled"},
           "train": train_cfg}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "config.json"), "--out", str(tmp_path / "out")]) == 0
    assert "2 training, 0 validation and 3 unlabelled cases" in capsys.readouterr().out
    card = load_bundle(tmp_path / "out" / "semi.imbseg").card
    assert card["training"]["semi_supervised"]["unlabelled_cases"] == 3
    assert card["network"]["arch"] == "UNet3DEnsemble"
    # a supervised method given unlabelled images is refused, naming the problem; nothing is written
    cfg["train"] = {**train_cfg, "method": "dice_ce", "name": "sup"}
    cfg["data"].pop("unlabeled_images")
    (tmp_path / "config2.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "config2.json"), "--out", str(tmp_path / "out2"),
                 "--unlabeled", str(tmp_path / "unlabelled")]) == 2
    assert "supervised" in capsys.readouterr().err
    assert not (tmp_path / "out2" / "sup.imbseg").exists()
