"""Context label learning, CoLab (issue #23 item 1): a task generator splits the background into
context classes, meta-learned with the segmentation network; the bundle predicts the config's
classes (the context outputs merged into the background).

Hand-checked numbers: the targets of a four-voxel label map, the neighbourhood weights along a
line, the foreground binary cross-entropy of one voxel, and a meta-gradient of a bias-only
model worked out on paper; the meta-gradient of a tiny convolutional model against a finite
difference of the whole look-ahead objective (float64)."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from imbalanceseglib import card as card_module
from imbalanceseglib import networks
from imbalanceseglib.bundle import BundleError, load_bundle, validate_card
from imbalanceseglib.checkpoints import config_fingerprint, restore_checkpoint
from imbalanceseglib.context_labels import (ContextLabels, context_loss, context_targets, expand_class_weights,
                                            exported_network, foreground_bce, meta_gradient, neighbourhood_weights)
from imbalanceseglib.cpu_engine import cpu_engine
from imbalanceseglib.inference import predict
from imbalanceseglib.losses import build_loss
from imbalanceseglib.networks import UNet3D, build_network, merge_context_logits
from imbalanceseglib.train_config import CONTEXT_LABELS_DEFAULTS, MAX_CONTEXT_CLASSES, TrainConfig
from imbalanceseglib.training import make_case, train
from imbalanceseglib.training_engine import ENV_VAR, TrainingPath, unsupported_reason

from libtest_helpers import CLASSES, sphere_case, train_killed_at

NAMES = [c["name"] for c in CLASSES]


def _base(**changes):
    d = dict(name="x", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16])
    d.update(changes)
    return TrainConfig.from_dict(d)


def _config(tiny_config, **changes):
    d = tiny_config.to_dict()
    for key in ("loss", "mixup", "adversarial", "class_weighting", "augmentation", "semi_supervised"):
        d.pop(key)  # let the method preset fill them
    d.update(features=[4, 8, 16], patch_size=[16, 16, 16], iterations=4, checkpoint_every=4, log_every=2)
    d.update(changes)
    return TrainConfig.from_dict(d)


# --------------------------------------------------------------------------- targets


def test_targets_of_a_four_voxel_label_map_by_hand():
    labels = torch.tensor([0, 1, 2, 0]).view(1, 1, 1, 1, 4)
    gen = torch.tensor([[0.7, 0.5, 0.5, 0.2], [0.3, 0.5, 0.5, 0.8]]).view(1, 2, 1, 1, 4)  # background, context
    t = context_targets(gen, labels, 3)[0, :, 0, 0].T  # voxel by voxel: background, Ball, Bead, context
    np.testing.assert_allclose(t.numpy(), [[0.7, 0, 0, 0.3], [0, 1, 0, 0], [0, 0, 1, 0], [0.2, 0, 0, 0.8]], atol=1e-7)
    w = torch.tensor([0.5, 1.0, 1.0, 0.0]).view(1, 1, 1, 1, 4)  # half generated, ..., plain background
    t = context_targets(gen, labels, 3, w)[0, :, 0, 0].T
    np.testing.assert_allclose(t.numpy(), [[0.85, 0, 0, 0.15], [0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]], atol=1e-7)
    # two context classes: channels 3 and 4 follow the generator's channels 1 and 2
    gen3 = torch.tensor([0.5, 0.2, 0.3]).view(1, 3, 1, 1, 1)
    assert context_targets(gen3, torch.zeros(1, 1, 1, 1, 1, dtype=torch.long), 2)[0, :, 0, 0, 0].tolist() == \
        pytest.approx([0.5, 0.0, 0.2, 0.3])
    # differentiable in the generator's output
    g = gen.clone().requires_grad_(True)
    context_targets(g, labels, 3)[:, 3].sum().backward()
    assert g.grad[0, :, 0, 0].T.tolist() == [[0, 1], [0, 0], [0, 0], [0, 1]]
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        context_targets(gen, labels + 1, 3)


def test_neighbourhood_weights_along_a_line_by_hand():
    labels = torch.zeros(2, 1, 1, 1, 6, dtype=torch.long)
    labels[0, 0, 0, 0, 0] = 1  # the second patch has no foreground
    w = neighbourhood_weights(labels, (1.0, 1.0, 2.0), near_mm=4.0, falloff_mm=2.0)
    # distances 0, 2, 4, 6, 8, 10 mm: within 4 mm all generated, then exp(-(d - 4) / 2)
    assert w[0, 0, 0, 0].tolist() == pytest.approx([1, 1, 1, math.exp(-1), math.exp(-2), math.exp(-3)])
    assert w[1].abs().sum() == 0
    assert neighbourhood_weights(labels, (1.0, 1.0, 2.0), None, 2.0) is None
    # anisotropic: 3 mm slices, the foreground two slices away is 6 mm off
    lab = torch.zeros(1, 1, 3, 1, 1, dtype=torch.long)
    lab[0, 0, 0] = 2
    assert neighbourhood_weights(lab, (3.0, 1.0, 1.0), 0.0, 3.0)[0, 0, :, 0, 0].tolist() == pytest.approx(
        [1, math.exp(-1), math.exp(-2)])


def test_class_weights_and_the_loss_give_context_classes_the_backgrounds_part():
    assert expand_class_weights(torch.tensor([0.1, 2.0, 3.0]), 2).tolist() == pytest.approx([0.1, 2, 3, 0.1, 0.1])
    assert expand_class_weights(None, 2) is None
    loss = context_loss({"name": "asym_focal", "gamma": 2.0, "class_weights": [0.5, 1.0, 2.0]}, NAMES, ["Bead"], 2)
    assert loss.rare.tolist() == [False, False, True, False, False]  # no context class is rare
    assert loss.static_weights.tolist() == [0.5, 1.0, 2.0, 0.5, 0.5]
    plain = context_loss({"name": "dice_ce"}, NAMES, ["Bead"], 1)
    logits = torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    target = torch.softmax(torch.randn(2, 4, 4, 4, 4, generator=torch.Generator().manual_seed(1)), 1)
    assert float(plain(logits, target)) == pytest.approx(float(build_loss({"name": "dice_ce"})(logits, target)))


# --------------------------------------------------------------------------- the merged network


def test_merged_probabilities_are_the_sum_of_background_and_context_probabilities():
    z = torch.randn(2, 5, 3, 3, 3, generator=torch.Generator().manual_seed(0)) * 4
    p = torch.softmax(z, 1)
    q = torch.softmax(merge_context_logits(z, 3), 1)
    torch.testing.assert_close(q[:, 0], p[:, 0] + p[:, 3] + p[:, 4])
    torch.testing.assert_close(q[:, 1:], p[:, 1:3])
    # one voxel by hand: logits (0, 1, log 2) with background 0 and context 2 -> background 1 + 2 = 3 parts of 3 + e
    m = merge_context_logits(torch.tensor([0.0, 1.0, math.log(2.0)]).view(1, 3, 1, 1, 1), 2)[0, :, 0, 0, 0]
    assert m.tolist() == pytest.approx([math.log(3.0), 1.0])
    assert merge_context_logits(z[:, :3], 3) is not None and merge_context_logits(z[:, :3], 3).shape[1] == 3


def test_the_exported_network_shares_the_trained_parameters_and_predicts_the_classes():
    torch.manual_seed(0)
    net = UNet3D(1, 5, [4, 8])  # 3 classes and 2 context classes while training
    view = exported_network(net, 3)
    assert view.out_channels == 3 and view.context_classes == 2
    assert len(list(view.parameters())) == len(list(net.parameters()))
    assert all(a is b for a, b in zip(view.parameters(), net.parameters()))
    assert list(view.state_dict()) == list(net.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        p, q = torch.softmax(net(x), 1), torch.softmax(view(x), 1)
    torch.testing.assert_close(q[:, 0], p[:, 0] + p[:, 3] + p[:, 4], rtol=0, atol=1e-6)
    torch.testing.assert_close(q[:, 1:], p[:, 1:3], rtol=0, atol=1e-6)
    # the bundle rebuilds it from its card's parameters; the CPU engine merges as the module does
    rebuilt = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8], "context_classes": 2})
    rebuilt.load_state_dict(view.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), view(x))
    engine = cpu_engine(rebuilt)
    if engine is not None:
        torch.testing.assert_close(engine(x), rebuilt(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="more than 5 outputs"):
        exported_network(net, 5)
    assert card_module._MAX_CONTEXT_CLASSES == networks.MAX_CONTEXT_CLASSES == MAX_CONTEXT_CLASSES


# --------------------------------------------------------------------------- meta objective and gradient


def test_foreground_binary_cross_entropy_of_one_voxel_by_hand():
    z = torch.tensor([0.0, math.log(2.0), 0.0, math.log(3.0)]).view(1, 4, 1, 1, 1)  # p = 1/7, 2/7, 1/7, 3/7
    # label Ball: -log(2/7) for Ball, -log(1 - 1/7) for Bead; the context (3/7) is background
    want = -math.log(2 / 7) - math.log(6 / 7)
    assert float(foreground_bce(z, torch.ones(1, 1, 1, 1, 1, dtype=torch.long), 3)) == pytest.approx(want)
    # label background: -log(5/7) - log(6/7); a sure voxel stays finite
    assert float(foreground_bce(z, torch.zeros(1, 1, 1, 1, 1, dtype=torch.long), 3)) == pytest.approx(
        -math.log(5 / 7) - math.log(6 / 7))
    # a background voxel sure to be Ball: -log(1 - p_Ball) = log(e^0 + e^200 + e^0) - log(e^0 + e^0) ~ 200 - log 2
    sure = torch.tensor([0.0, 200.0, 0.0]).view(1, 3, 1, 1, 1)
    assert float(foreground_bce(sure, torch.zeros(1, 1, 1, 1, 1, dtype=torch.long), 3)) == pytest.approx(
        200.0 - math.log(2.0))


def test_meta_gradient_of_a_bias_only_model_by_hand():
    """One background voxel, classes (background, Ball), one context class, cross-entropy,
    logits = theta (3 biases) = 0, generator probabilities g = softmax(phi) with phi = (log 3, 0)
    = (3/4, 1/4), step a = 1.  The target is (g0, 0, g1); grad L = softmax(theta) - T, so
    theta' = -(1/3 - 3/4, 1/3, 1/3 - 1/4) = (5/12, -4/12, -1/12).  The meta objective is
    -log(1 - p'_1); dJ/dT_c = a dJ/dtheta'_c = -a p'_1 p'_c / (1 - p'_1) for c = 0, 2, and
    dJ/dphi_0 = g0 g1 (dJ/dT_0 - dJ/dT_2) = -dJ/dphi_1."""
    theta = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    phi = nn.Parameter(torch.tensor([math.log(3.0), 0.0], dtype=torch.float64))
    x = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float64)
    labels = torch.zeros(1, 1, 1, 1, 1, dtype=torch.long)
    targets = context_targets(torch.softmax(phi, 0).view(1, 2, 1, 1, 1), labels, 2)
    meta = meta_gradient(lambda inp: theta.view(1, 3, 1, 1, 1).expand(inp.shape[0], 3, 1, 1, 1), [theta], x, labels,
                         targets, build_loss({"name": "ce"}), 2, step=1.0, difference=1e-7)
    e = [math.exp(5 / 12), math.exp(-4 / 12), math.exp(-1 / 12)]
    p = [v / sum(e) for v in e]  # 0.48105, 0.22721, 0.29174
    d_phi0 = 0.75 * 0.25 * (-p[1] / (1 - p[1])) * (p[0] - p[2])
    assert d_phi0 == pytest.approx(-0.010436, abs=2e-6)
    assert phi.grad.tolist() == pytest.approx([d_phi0, -d_phi0], abs=1e-8)
    assert meta == pytest.approx(-math.log(1 - p[1]))
    assert theta.grad is None and theta.detach().tolist() == [0.0, 0.0, 0.0]  # untouched, put back


class _Tiny(nn.Module):
    def __init__(self, cin, cout, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.a = nn.Conv3d(cin, 3, 1).double()
        self.b = nn.Conv3d(3, cout, 1).double()

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("loss_name,weighted", [("dice_ce", False), ("ce", True), ("asym_focal", True)])
def test_meta_gradient_of_a_tiny_model_matches_a_finite_difference_of_the_look_ahead(loss_name, weighted):
    k, c, step = 3, 2, 0.5
    net, gen = _Tiny(1, k + c, 0), _Tiny(1, c + 1, 1)
    rng = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 3, 3, 2, generator=rng, dtype=torch.float64)
    labels = torch.randint(0, k, (2, 1, 3, 3, 2), generator=rng)
    labels[0, 0, 0, 0, 0] = 0
    w = torch.rand(2, 1, 3, 3, 2, generator=rng, dtype=torch.float64)
    loss_fn = context_loss({"name": loss_name}, NAMES, ["Bead"], c)
    cw = expand_class_weights(torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64), c) if weighted else None
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]

    def objective():  # the look-ahead network's meta loss as a function of the generator's parameters
        t = context_targets(torch.softmax(gen(x), 1), labels, k, w)
        g = torch.autograd.grad(loss_fn(net(x), t, class_weights=cw), params)
        with torch.no_grad():
            for p, gi in zip(params, g):
                p.sub_(step * gi)
            j = float(foreground_bce(net(x), labels, k))
            for p, s in zip(params, before):
                p.copy_(s)
        return j

    want = []
    for p in gen.parameters():
        flat = p.data.view(-1)
        for i in range(flat.numel()):
            keep = float(flat[i])
            flat[i] = keep + 1e-6
            up = objective()
            flat[i] = keep - 1e-6
            down = objective()
            flat[i] = keep
            want.append((up - down) / 2e-6)
    want = torch.tensor(want, dtype=torch.float64)
    targets = context_targets(torch.softmax(gen(x), 1), labels, k, w)
    meta_gradient(net, params, x, labels, targets, loss_fn, k, step, cw, difference=1e-5)
    got = torch.cat([p.grad.reshape(-1) for p in gen.parameters()])
    assert float(want.abs().max()) > 1e-4  # the generator does change the look-ahead's loss
    # atol: the finite difference's own rounding, about float64 eps x |objective| / step = 2e-16 / 1e-6 per
    # evaluation (the largest entries are ~1e-3, so a wrong term would show by orders of magnitude)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8 * float(want.abs().max()) + 5e-10)
    assert all(torch.equal(p, s) for p, s in zip(params, before)) and all(p.grad is None for p in params)
    # the default difference step (the authors' 0.01 / |v|) is close too
    for p in gen.parameters():
        p.grad = None
    targets = context_targets(torch.softmax(gen(x), 1), labels, k, w)
    meta_gradient(net, params, x, labels, targets, loss_fn, k, step, cw)
    got = torch.cat([p.grad.reshape(-1) for p in gen.parameters()])
    assert float((got - want).abs().max()) <= 1e-3 * float(want.abs().max())


@pytest.mark.skipif(unsupported_reason(UNet3D(1, 2, [4, 8])) is not None,
                    reason="the CPU training path does not run on this machine")
def test_the_meta_step_runs_through_the_cpu_training_path_as_through_the_module():
    """The look-ahead swaps the parameters in place; the training path reads them at each call."""
    torch.manual_seed(0)
    net, gen = UNet3D(1, 4, [4, 8, 16]), UNet3D(1, 2, [4, 8])
    rng = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 8, 16, 8, generator=rng)
    labels = torch.randint(0, 3, (2, 1, 8, 16, 8), generator=rng)
    loss_fn = context_loss({"name": "dice_ce"}, NAMES, ["Bead"], 1)
    grads = []
    for run in (net, TrainingPath(net)):
        gen.zero_grad(set_to_none=True)
        targets = context_targets(torch.softmax(gen(x), 1), labels, 3)
        meta = meta_gradient(run, list(net.parameters()), x, labels, targets, loss_fn, 3, step=0.01)
        grads.append((meta, torch.cat([p.grad.reshape(-1) for p in gen.parameters()])))
    (meta_m, g_m), (meta_e, g_e) = grads
    assert meta_e == pytest.approx(meta_m, rel=1e-5)
    assert float((g_e - g_m).abs().max()) <= 1e-2 * float(g_m.abs().max()) and float(g_m.abs().max()) > 0


def test_a_meta_step_without_a_usable_gradient_is_skipped():
    learner = ContextLabels({**CONTEXT_LABELS_DEFAULTS, "enabled": True, "generator_features": [4, 8]}, 3,
                            (1.0, 1.0, 1.0), 10)
    net = UNet3D(1, 4, [4, 8])
    x = torch.full((1, 1, 8, 8, 8), float("nan"))
    labels = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    labels[0, 0, 4, 4, 4] = 1
    before = [p.detach().clone() for p in learner.generator.parameters()]
    assert learner.meta_step(net, list(net.parameters()), x, labels, build_loss({"name": "ce"}), 0) is None
    assert learner.skipped == 1 and learner.meta_steps == 0
    assert all(torch.equal(p, b) for p, b in zip(learner.generator.parameters(), before))


# --------------------------------------------------------------------------- settings


def test_settings_default_off_and_filled_in():
    assert _base().context_labels == {"enabled": False}
    s = _base(context_labels={"enabled": True}).context_labels_settings
    assert s == {"enabled": True, "classes": 1, "update_every": 5, "generator_features": [16, 32, 64, 128],
                 "generator_learning_rate": 3e-4, "lookahead_learning_rate": 1e-2, "near_mm": 60.0,
                 "falloff_mm": 40.0}
    small = _base(context_labels={"enabled": True, "classes": 3, "generator_features": [4, 8], "near_mm": None})
    assert small.context_labels_settings["generator_features"] == [4, 8]
    # composes with deep supervision, class weights, adversarial training, augmentation and the asymmetric losses
    _base(method="asym_adversarial", class_weighting={"method": "cdifw"}, deep_supervision={"enabled": True},
          augmentation={"default": "default", "rare": "rare"}, context_labels={"enabled": True})


@pytest.mark.parametrize("changes,message", [
    ({"context_labels": "yes"}, "context_labels must be a mapping"),
    ({"context_labels": {"enabled": 1}}, "context_labels.enabled must be true or false"),
    ({"context_labels": {"enabled": True, "n": 2}}, r"context_labels: unknown settings \['n'\]"),
    ({"context_labels": {"enabled": True, "classes": 0}}, r"context_labels.classes must be an integer in 1..16"),
    ({"context_labels": {"enabled": True, "classes": 17}}, "context_labels.classes"),
    ({"context_labels": {"enabled": True, "classes": True}}, "context_labels.classes"),
    ({"context_labels": {"enabled": True, "update_every": 0}}, "context_labels.update_every must be an integer"),
    ({"context_labels": {"enabled": True, "generator_features": [4, 8, 16, 32, 64]}},
     "context_labels.generator_features must be null"),
    ({"context_labels": {"enabled": True, "generator_features": [4]}}, "context_labels.generator_features"),
    ({"context_labels": {"enabled": True, "generator_learning_rate": 0}},
     "context_labels.generator_learning_rate must be a number > 0"),
    ({"context_labels": {"enabled": True, "lookahead_learning_rate": "0.1"}}, "context_labels.lookahead_learning_rate"),
    ({"context_labels": {"enabled": True, "falloff_mm": float("inf")}}, "context_labels.falloff_mm"),
    ({"context_labels": {"enabled": True, "near_mm": -1}}, "context_labels.near_mm must be null"),
    ({"method": "asym_mixup", "context_labels": {"enabled": True}}, "cannot be combined with asymmetric mixup"),
    ({"method": "asym_combined", "context_labels": {"enabled": True}}, "cannot be combined with asymmetric mixup"),
    ({"method": "cps", "context_labels": {"enabled": True}}, "context_labels are supervised-only"),
])
def test_bad_settings_and_combinations_are_refused_naming_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        _base(**changes)


def test_the_checkpoint_fingerprint_leaves_context_labels_out_while_they_are_off():
    off = _base()
    assert set(json.loads(config_fingerprint(off))) == \
        set(TrainConfig.__dataclass_fields__) - {"deep_supervision", "context_labels"}
    assert config_fingerprint(off) == config_fingerprint(_base(context_labels={"enabled": False, "classes": 3}))
    on = json.loads(config_fingerprint(_base(context_labels={"enabled": True})))
    assert on["context_labels"]["classes"] == 1 and on["context_labels"]["generator_features"] == [16, 32, 64, 128]
    assert config_fingerprint(_base(context_labels={"enabled": True})) == \
        config_fingerprint(_base(context_labels={"enabled": True, "classes": 1}))
    assert config_fingerprint(_base(context_labels={"enabled": True})) != \
        config_fingerprint(_base(context_labels={"enabled": True, "classes": 2}))


# --------------------------------------------------------------------------- training


def test_a_trained_bundle_predicts_the_classes_with_the_context_merged_in(tmp_path, tiny_config, tiny_cases,
                                                                         monkeypatch):
    monkeypatch.setenv(ENV_VAR, "module")  # (the training path's meta step: the test above)
    # with adversarial training (its input from the merged output) and deep supervision (heads of 4 outputs)
    cfg = _config(tiny_config, iterations=3, checkpoint_every=3, log_every=1, method="asym_adversarial",
                  rare_classes=["Bead"], deep_supervision={"enabled": True},
                  context_labels={"enabled": True, "update_every": 2, "near_mm": 8.0, "falloff_mm": 4.0})
    lines = []
    img, lab = sphere_case(42)
    val = make_case(img[4:20, 4:20, 4:20], lab[4:20, 4:20, 4:20], name="v")  # one window
    bundle = load_bundle(train(cfg, tiny_cases[:2], [val], tmp_path, log=lines.append))
    net = bundle.network
    assert type(net) is UNet3D and net.out_channels == 3 and net.context_classes == 1
    assert bundle.card["network"]["params"] == {"in_channels": 1, "out_channels": 3, "features": [4, 8, 16],
                                                "context_classes": 1}
    assert tuple(net.head.weight.shape) == (4, 4, 1, 1, 1)
    entry = bundle.card["training"]["context_labels"]
    assert entry["classes"] == 1 and entry["outputs_in_training"] == 4 and entry["meta_steps"] == 2
    assert entry["generator"]["outputs"] == 2 and len(entry["background_split"]) == 2
    assert sum(entry["background_split"]) == pytest.approx(1.0, abs=1e-3)
    assert bundle.card["training"]["config"]["context_labels"]["enabled"] is True
    assert set(bundle.card["validation"]["per_class"]) == {"Ball", "Bead"}
    assert bundle.card["training"]["deep_supervision"]["levels"] == 1
    assert any("context labels: 1 context class(es)" in line for line in lines)
    assert any("meta " in line and "background split" in line for line in lines if line.startswith("iter"))
    # the generator is in the checkpoint, not in the bundle; the bundle is the merged trained network
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert set(ck["context_labels"]) == {"generator", "optimizer", "meta_steps", "skipped", "fractions"}
    assert tuple(ck["deep_supervision"]["heads.0.weight"].shape) == (4, 8, 1, 1, 1)
    assert int(ck["context_labels"]["meta_steps"]) == 2
    assert not any(k.startswith("generator") for k in net.state_dict())
    plain = UNet3D(1, 4, [4, 8, 16])
    plain.load_state_dict(ck["model"])
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x), merge_context_logits(plain(x), 3), rtol=0, atol=1e-5)
    # the card's check of the merged network's parameter
    for bad, message in ((17, "context_classes must be an integer in"), ("1", "context_classes must be an integer"),
                         (True, "context_classes must be an integer")):
        card = json.loads(json.dumps(bundle.card))
        card["network"]["params"]["context_classes"] = bad
        with pytest.raises(BundleError, match=message):
            validate_card(card)
    card = json.loads(json.dumps(bundle.card))
    card["network"] = {"arch": "UNet3DEnsemble", "params": {**card["network"]["params"], "members": 2}}
    with pytest.raises(BundleError, match="'context_classes' is only accepted by UNet3D"):
        validate_card(card)
    pred = predict(sitk.GetImageFromArray(img[4:20, 4:20, 4:20]), bundle)
    assert pred.labels.shape == (16, 16, 16) and pred.probabilities.shape[0] == 3
    assert int(pred.labels.max()) <= 2
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-4)


def test_resume_with_context_labels_and_class_weights_matches_an_uninterrupted_run(tmp_path, tiny_config, tiny_cases,
                                                                                   monkeypatch):
    monkeypatch.setenv(ENV_VAR, "module")
    cfg = _config(tiny_config, method="cdifw", class_weighting={"method": "cdifw", "tau": 5}, iterations=4,
                  checkpoint_every=2, log_every=1, context_labels={"enabled": True, "update_every": 2})
    full = train(cfg, tiny_cases, [], tmp_path / "full", log=lambda m: None)

    ck = train_killed_at(train, 3, cfg, tiny_cases, [], tmp_path / "resumed")
    assert ck["iteration"] == 2 and int(ck["context_labels"]["meta_steps"]) == 1
    resumed = train(cfg, tiny_cases, [], tmp_path / "resumed", log=lambda m: None)
    a, b = load_bundle(full), load_bundle(resumed)
    for k, v in a.network.state_dict().items():
        torch.testing.assert_close(v, b.network.state_dict()[k], rtol=0, atol=1e-6)
    gen_a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["context_labels"]
    gen_b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["context_labels"]
    for k, v in gen_a["generator"].items():
        torch.testing.assert_close(v, gen_b["generator"][k], rtol=0, atol=1e-6)
    assert int(gen_a["meta_steps"]) == int(gen_b["meta_steps"]) == 2
    assert a.card["training"]["context_labels"] == b.card["training"]["context_labels"]
    assert tuple(a.network.head.weight.shape) == (4, 4, 1, 1, 1)  # Background, Ball, Bead and one context class
    wa = [h["class_weights"] for h in a.card["training"]["history"] if "class_weights" in h]
    wb = [h["class_weights"] for h in b.card["training"]["history"] if "class_weights" in h]
    assert wa == wb and len(wa[0]) == 3 and wa[-1] != wa[0]  # the classes' weights, from the merged output


def test_resume_refuses_a_checkpoint_of_the_other_setting_and_torchrun_is_refused(tmp_path, tiny_config, tiny_cases,
                                                                                   monkeypatch):
    monkeypatch.setenv(ENV_VAR, "module")
    base = dict(iterations=1, checkpoint_every=1, features=[4, 8])
    train(_config(tiny_config, **base), tiny_cases, [], tmp_path / "off", log=lambda m: None)
    with pytest.raises(ValueError, match="different config"):
        train(_config(tiny_config, context_labels={"enabled": True}, **base), tiny_cases, [], tmp_path / "off")
    ck = torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)
    net = UNet3D(1, 4, [4, 8])
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    learner = ContextLabels({**CONTEXT_LABELS_DEFAULTS, "enabled": True, "generator_features": [4, 8]}, 3,
                            (1.0, 1.0, 1.0), 1)
    with pytest.raises(ValueError, match="context labels off"):
        restore_checkpoint(ck, network=net, optimizer=opt, scheduler=sched, rng=np.random.default_rng(0),
                           context=learner)
    ck["context_labels"] = learner.state_dict()
    with pytest.raises(ValueError, match="context labels on"):
        restore_checkpoint(ck, network=net, optimizer=opt, scheduler=sched, rng=np.random.default_rng(0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="context labels train in one process"):
        train(_config(tiny_config, context_labels={"enabled": True}, **base), tiny_cases, [], tmp_path / "ddp")


# --------------------------------------------------------------------------- command line


def test_the_command_line_flag_and_the_config_key(tmp_path, monkeypatch):
    import imbalanceseglib.training as training
    from imbalanceseglib.cli import main
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir()
    for i in range(2):
        img, lab = sphere_case(i)
        sitk.WriteImage(sitk.GetImageFromArray(img[:16, :16, :16]), str(tmp_path / "images" / f"case{i}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(lab[:16, :16, :16]), str(tmp_path / "labels" / f"case{i}.nrrd"))
    base = dict(name="cli", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
                features=[4, 8], iterations=2, batch_size=1, val_every=1000, checkpoint_every=2, log_every=1,
                normalization={"scheme": "none"}, seed=1)

    def config_file(train_cfg):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({"data": {"kind": "folders", "images": "images", "labels": "labels"},
                                    "train": train_cfg}))
        return path

    seen = []
    monkeypatch.setattr(training, "train", lambda config, *a, **k: seen.append(config.context_labels_settings)
                        or tmp_path / "x.imbseg")
    for train_cfg, flags, want in [
            (base, [], {"enabled": False, "classes": 1}),
            (base, ["--context-labels"], {"enabled": True, "classes": 1, "update_every": 5}),
            ({**base, "context_labels": {"classes": 2, "update_every": 1}}, ["--context-labels"],
             {"enabled": True, "classes": 2, "update_every": 1}),
            ({**base, "context_labels": {"enabled": True, "near_mm": None}}, [], {"enabled": True, "near_mm": None})]:
        assert main(["train", str(config_file(train_cfg)), "--out", str(tmp_path / "out"), *flags]) == 0
        assert {k: seen[-1][k] for k in want} == want
    monkeypatch.undo()
    monkeypatch.setenv(ENV_VAR, "module")
    cfg = config_file({**base, "context_labels": {"update_every": 1}})  # a real run with the flag
    assert main(["train", str(cfg), "--out", str(tmp_path / "real"), "--context-labels"]) == 0
    card = load_bundle(tmp_path / "real" / "cli.imbseg").card
    assert card["network"]["params"]["context_classes"] == 1 and card["network"]["params"]["out_channels"] == 3
    assert card["training"]["context_labels"]["meta_steps"] == 2
