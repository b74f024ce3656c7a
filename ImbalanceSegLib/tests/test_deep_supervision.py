"""Deep supervision (issue #23 item 2): auxiliary outputs at the coarser decoder levels with
down-weighted losses during training, the plain network at inference.

Hand-checked numbers: nnU-Net's halving weights, the class fractions of a downsampled label
map, a deep-supervised cross-entropy worked out on paper.  The CPU training path is compared with
the module at the tolerances of test_training_engine.py (1e-4 of the largest value per tensor,
leaky ReLU slope 1)."""

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from torch import nn

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.checkpoints import config_fingerprint, restore_checkpoint
from imbalanceseglib.deep_supervision import (AuxiliaryHeads, DeepSupervisionLoss, card_entry, deep_outputs,
                                              downsample_mask, downsample_target, halving_weights, output_weights)
from imbalanceseglib.inference import predict
from imbalanceseglib.losses import LOSS_NAMES, MASKABLE_LOSS_NAMES, build_loss
from imbalanceseglib.networks import UNet3D, set_activation_checkpointing
from imbalanceseglib.train_config import METHOD_PRESETS, TrainConfig
from imbalanceseglib.training import train
from imbalanceseglib.training_engine import TrainingPath, training_forward, unsupported_reason

from libtest_helpers import CLASSES, sphere_case, train_killed_at

NAMES = [c["name"] for c in CLASSES]


def _config(tiny_config, **changes):
    d = tiny_config.to_dict()
    for key in ("loss", "mixup", "adversarial", "class_weighting", "augmentation", "semi_supervised"):
        d.pop(key)  # let the method preset fill them
    d.update(features=[4, 8, 16], patch_size=[16, 16, 16], iterations=4, checkpoint_every=4, log_every=2)
    d.update(changes)
    return TrainConfig.from_dict(d)


def _rel(got, ref):
    got, ref = got.detach().double(), ref.detach().double()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- weights and settings


def test_halving_weights_by_hand():
    assert halving_weights(1) == [1.0]
    assert halving_weights(2) == pytest.approx([2 / 3, 1 / 3], abs=1e-15)
    assert halving_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7], abs=1e-15)
    assert halving_weights(4) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15], abs=1e-15)
    assert output_weights({"levels": 2, "weights": [2, 1, 1]}) == [0.5, 0.25, 0.25]
    with pytest.raises(ValueError):
        halving_weights(0)


def _base(**changes):
    d = dict(name="x", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16])
    d.update(changes)
    return TrainConfig.from_dict(d)


def test_settings_default_off_and_levels_default_to_every_coarser_decoder_level():
    assert _base().deep_supervision == {"enabled": False}
    assert _base().deep_supervision_settings == {"enabled": False, "levels": 2, "weights": "halving"}
    on = _base(deep_supervision={"enabled": True})  # the default 4-level U-Net: levels 1/2 and 1/4
    assert on.deep_supervision_settings == {"enabled": True, "levels": 2, "weights": "halving"}
    assert output_weights(on.deep_supervision_settings) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    five = _base(features=[4, 8, 16, 32, 64], patch_size=[32, 16, 16], deep_supervision={"enabled": True})
    assert output_weights(five.deep_supervision_settings) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    one = _base(deep_supervision={"enabled": True, "levels": 1, "weights": [3, 1]})
    assert output_weights(one.deep_supervision_settings) == [0.75, 0.25]
    assert card_entry(on.deep_supervision_settings)["outputs"] == [
        {"level": 0, "scale": 1.0, "weight": pytest.approx(4 / 7)},
        {"level": 1, "scale": 0.5, "weight": pytest.approx(2 / 7)},
        {"level": 2, "scale": 0.25, "weight": pytest.approx(1 / 7)}]


@pytest.mark.parametrize("entry,features,message", [
    ("yes", None, "deep_supervision must be a mapping"),
    ({"enabled": "true"}, None, "deep_supervision.enabled must be true or false"),
    ({"enabled": True, "depth": 2}, None, r"deep_supervision: unknown settings \['depth'\]"),
    ({"enabled": True, "levels": 3}, None, r"deep_supervision.levels must be null \(all\) or an integer in 1..2"),
    ({"enabled": True, "levels": 0}, None, "deep_supervision.levels"),
    ({"enabled": True, "levels": True}, None, "deep_supervision.levels"),
    ({"enabled": True, "weights": "equal"}, None, "deep_supervision.weights must be \"halving\""),
    ({"enabled": True, "weights": [1, 1]}, None, r"deep_supervision.weights as a list needs levels \+ 1 = 3"),
    ({"enabled": True, "weights": [0, 1, 1]}, None, "deep_supervision.weights as a list"),
    ({"enabled": True, "weights": [1, -1, 1]}, None, "deep_supervision.weights as a list"),
    ({"enabled": True}, [4, 8], "deep_supervision needs a U-Net with a decoder level below the full resolution"),
])
def test_bad_settings_are_refused_naming_the_key(entry, features, message):
    with pytest.raises(ValueError, match=message):
        _base(deep_supervision=entry, **({"features": features} if features else {}))


def test_the_checkpoint_fingerprint_leaves_deep_supervision_out_while_it_is_off():
    """So checkpoints written before deep supervision existed still resume; on, it enters filled in."""
    off = _base()
    # exactly the fields a checkpoint written before deep supervision existed holds
    assert set(json.loads(config_fingerprint(off))) == \
        set(TrainConfig.__dataclass_fields__) - {"deep_supervision", "context_labels"}  # (context labels: later)
    assert config_fingerprint(off) == config_fingerprint(_base(deep_supervision={"enabled": False, "levels": 1}))
    on = json.loads(config_fingerprint(_base(deep_supervision={"enabled": True})))
    assert on["deep_supervision"] == {"enabled": True, "levels": 2, "weights": "halving"}
    assert config_fingerprint(_base(deep_supervision={"enabled": True})) == \
        config_fingerprint(_base(deep_supervision={"enabled": True, "levels": 2}))  # the same run
    assert config_fingerprint(_base(deep_supervision={"enabled": True})) != \
        config_fingerprint(_base(deep_supervision={"enabled": True, "levels": 1}))


# --------------------------------------------------------------------------- targets and masks


def test_a_downsampled_label_map_keeps_a_one_voxel_structure_as_a_fraction():
    lab = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    lab[0, 0, 1, 2, 3] = 1  # in the coarse voxel (0, 1, 1) at 2x2x2
    t = downsample_target(lab, 2, (2, 2, 2))
    assert t.shape == (1, 2, 2, 2, 2)
    want = torch.zeros(1, 2, 2, 2, 2)
    want[:, 0] = 1.0
    want[0, 0, 0, 1, 1], want[0, 1, 0, 1, 1] = 7 / 8, 1 / 8
    torch.testing.assert_close(t, want, rtol=0, atol=0)
    one = downsample_target(lab, 2, (1, 1, 1))
    torch.testing.assert_close(one.flatten(), torch.tensor([63 / 64, 1 / 64]), rtol=0, atol=1e-7)
    # a soft target (after mixup) is averaged the same way; anisotropic blocks too
    soft = torch.zeros(1, 2, 2, 2, 2)
    soft[0, 0], soft[0, 1] = 0.25, 0.75
    soft[0, :, 1, 1, 1] = torch.tensor([1.0, 0.0])
    got = downsample_target(soft, 2, (1, 2, 1))
    torch.testing.assert_close(got[0, :, 0, 0, 0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(got[0, :, 0, 1, 0], torch.tensor([(0.25 * 3 + 1) / 4, 0.75 * 3 / 4]))
    with pytest.raises(ValueError, match="does not divide"):
        downsample_target(lab, 2, (3, 2, 2))


def test_a_coarse_voxel_is_kept_only_where_all_its_fine_voxels_are():
    mask = torch.ones(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[0, 0, 3, 0, 1] = False  # in the coarse voxel (1, 0, 0)
    like = torch.zeros(1, 3, 4, 4, 4)
    coarse = downsample_mask(mask, like, (2, 2, 2))
    assert coarse.dtype == torch.bool and coarse.shape == (1, 1, 2, 2, 2)
    assert (~coarse).nonzero().tolist() == [[0, 0, 1, 0, 0]]
    assert downsample_mask(mask[:, 0], like, (1, 1, 1)).tolist() == [[[[[False]]]]]  # (N, ...) masks too
    assert downsample_mask(None, like, (2, 2, 2)) is None


def test_deep_supervised_cross_entropy_worked_out_by_hand():
    """Main output 2x2x2 with zero logits against a map with one voxel of class 1: CE ln 2.
    Auxiliary output 1x1x1 with logits (0, ln 3), softmax (1/4, 3/4), against the fractions
    (7/8, 1/8): CE 7/8 ln 4 + 1/8 ln 4/3.  Weights for two outputs: 2/3, 1/3."""
    lab = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    lab[0, 0, 1, 1, 0] = 1
    main = torch.zeros(1, 2, 2, 2, 2)
    aux = torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1, 1)
    loss = DeepSupervisionLoss(build_loss({"name": "ce"}), halving_weights(2))([main, aux], lab)
    want = 2 / 3 * math.log(2) + 1 / 3 * (7 / 8 * math.log(4) + 1 / 8 * math.log(4 / 3))
    assert float(loss) == pytest.approx(want, rel=1e-6)


def _loss_case(loss_name, with_weights, with_mask, soft, seed=0):
    gen = torch.Generator().manual_seed(seed)
    outputs = [torch.randn(2, 3, *(8 // 2 ** k,) * 3, generator=gen) for k in range(3)]
    if soft:
        target = torch.softmax(3 * torch.randn(2, 3, 8, 8, 8, generator=gen), 1)
        one_hot = target
    else:
        target = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=gen)
        one_hot = F.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    weights = torch.tensor([0.2, 1.0, 3.0]) if with_weights else None
    mask = (torch.rand(2, 1, 8, 8, 8, generator=gen) > 0.05) if with_mask else None
    loss = build_loss({"name": loss_name}, NAMES, [0.9, 0.095, 0.005])  # Bead rare
    return loss, outputs, target, one_hot, weights, mask


@pytest.mark.parametrize("loss_name", LOSS_NAMES)
@pytest.mark.parametrize("soft", [False, True])
def test_the_deep_supervised_loss_is_the_weighted_sum_of_each_output_against_its_pooled_target(loss_name, soft):
    """For every loss, with the class weights and the voxel mask where the loss takes them: the
    sum of the weighted per-output losses, each against the one-hot (or soft) target averaged
    with ``avg_pool3d`` and the mask min-pooled with ``max_pool3d`` of its complement."""
    maskable = loss_name in MASKABLE_LOSS_NAMES
    loss, outputs, target, one_hot, weights, mask = _loss_case(loss_name, maskable, maskable, soft)
    w = [0.5, 0.3, 0.2]
    got = DeepSupervisionLoss(loss, w)(outputs, target, class_weights=weights, mask=mask)
    want = w[0] * loss(outputs[0], target, class_weights=weights, mask=mask)
    for k in (1, 2):
        t_k = F.avg_pool3d(one_hot, 2 ** k)
        m_k = None if mask is None else F.max_pool3d((~mask).float(), 2 ** k) == 0
        want = want + w[k] * loss(outputs[k], t_k, class_weights=weights, mask=m_k)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert float(got) != pytest.approx(float(loss(outputs[0], target, class_weights=weights, mask=mask)), rel=1e-3)


def test_a_zero_weight_output_adds_nothing_and_the_count_must_match():
    loss, outputs, target, _, _, _ = _loss_case("dice_ce", False, False, False)
    plain = loss(outputs[0], target)
    assert float(DeepSupervisionLoss(loss, [1.0, 0.0, 0.0])(outputs, target)) == pytest.approx(float(plain))
    with pytest.raises(ValueError, match="weighs 2 outputs, got 3"):
        DeepSupervisionLoss(loss, [0.5, 0.5])(outputs, target)


# --------------------------------------------------------------------------- the network


def test_the_hook_sees_each_decoder_level_and_changes_nothing():
    torch.manual_seed(0)
    net = UNet3D(1, 3, [4, 8, 16, 32]).eval()
    keys = list(net.state_dict())
    x = torch.randn(1, 1, 16, 16, 8)
    seen = []
    with torch.no_grad():
        plain = net(x)
        hooked = net(x, on_decoder=lambda level, t: seen.append((level, tuple(t.shape))))
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    assert seen == [(2, (1, 16, 4, 4, 2)), (1, (1, 8, 8, 8, 4)), (0, (1, 4, 16, 16, 8))]
    assert list(net.state_dict()) == keys
    heads = AuxiliaryHeads([4, 8, 16, 32], 3, 2)
    assert list(heads.state_dict()) == ["heads.0.weight", "heads.0.bias", "heads.1.weight", "heads.1.bias"]
    logits, aux = deep_outputs(net, heads, x)
    assert [tuple(a.shape) for a in aux] == [(1, 3, 8, 8, 4), (1, 3, 4, 4, 2)]
    with pytest.raises(ValueError, match="1..2 decoder levels"):
        AuxiliaryHeads([4, 8, 16, 32], 3, 3)


def _net(features, seed=0):
    torch.manual_seed(seed)
    net = UNet3D(1, 3, list(features)).train()
    with torch.no_grad():  # non-trivial norms, and slope 1 as in test_training_engine.py
        for m in net.modules():
            if isinstance(m, nn.InstanceNorm3d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            if isinstance(m, nn.LeakyReLU):
                m.negative_slope = 1.0
    heads = AuxiliaryHeads(features, 3, len(features) - 2)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0, 0.5)
    return net, heads


def _outputs_and_grads(net, heads, run, x, y, loss_fn, seed):
    net.zero_grad(set_to_none=True)
    heads.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    logits, aux = deep_outputs(run, heads, xi)
    gen = torch.Generator().manual_seed(seed)
    # a fixed random gradient on every output, plus the deep-supervised loss
    total = loss_fn([logits] + aux, y) + sum((o * torch.randn(o.shape, generator=gen)).sum() * 1e-3
                                              for o in [logits] + aux)
    total.backward()
    return {"logits": logits.detach(), **{f"aux{k}": a.detach() for k, a in enumerate(aux)},
            "loss": total.detach(), "input": xi.grad,
            **{f"net.{n}": p.grad for n, p in net.named_parameters()},
            **{f"heads.{n}": p.grad for n, p in heads.named_parameters()}}


@pytest.mark.skipif(unsupported_reason(UNet3D(1, 2, [4, 8])) is not None,
                    reason="the CPU training path does not run on this machine")
@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("features,shape,checkpointing", [
    ((4, 8, 16), (16, 24, 8), True),
    ((8, 16, 32, 64), (24, 8, 16), False),       # 3 x 1 x 2 voxels at the deepest level
    ((16, 32, 64, 128), (24, 16, 40), False),    # the demo configuration's network
    ((6, 12, 24, 48, 96), (32, 48, 16), True),   # five levels: three auxiliary outputs
])
def test_the_training_path_gives_the_modules_outputs_and_gradients_with_deep_supervision(
        n, features, shape, checkpointing):
    net, heads = _net(features)
    set_activation_checkpointing(net, checkpointing)
    loss_fn = DeepSupervisionLoss(build_loss({"name": "dice_ce"}, NAMES, [0.9, 0.05, 0.05]),
                                  halving_weights(len(features) - 1))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, *shape, generator=gen) * 1.5 + 0.3
    y = torch.randint(0, 3, (n, 1, *shape), generator=gen)
    ref = _outputs_and_grads(net, heads, net, x, y, loss_fn, seed=2)
    fast_forward = training_forward(net, engine="auto")  # what the trainers call
    assert fast_forward is not net
    got = _outputs_and_grads(net, heads, fast_forward, x, y, loss_fn, seed=2)
    assert set(got) == set(ref)
    assert len(ref) == 3 + (len(features) - 2) + len(list(net.parameters())) + len(list(heads.parameters()))
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        assert _rel(got[name], ref[name]) < 1e-4, name
    direct = _outputs_and_grads(net, heads, TrainingPath(net), x, y, loss_fn, seed=2)
    for name in ref:  # the trainers' function is the path itself
        assert _rel(direct[name], got[name]) <= 1e-6, name


# --------------------------------------------------------------------------- training


def test_a_bundle_trained_with_deep_supervision_holds_the_plain_network(tmp_path, tiny_config, tiny_cases,
                                                                        monkeypatch):
    on = load_bundle(train(_config(tiny_config, deep_supervision={"enabled": True}), tiny_cases, [],
                           tmp_path / "on", log=lambda m: None))
    off = load_bundle(train(_config(tiny_config), tiny_cases, [], tmp_path / "off", log=lambda m: None))
    assert type(on.network) is UNet3D and on.card["network"] == off.card["network"]
    assert list(on.network.state_dict()) == list(off.network.state_dict())
    assert {k: v.shape for k, v in on.network.state_dict().items()} == \
        {k: v.shape for k, v in off.network.state_dict().items()}
    moved = sum(float((on.network.state_dict()[k] - off.network.state_dict()[k]).abs().sum())
                for k in off.network.state_dict())
    assert moved > 0  # the auxiliary losses changed the training
    entry = on.card["training"]["deep_supervision"]
    assert entry["levels"] == 1 and entry["weights"] == "halving"
    assert [o["weight"] for o in entry["outputs"]] == pytest.approx([2 / 3, 1 / 3])
    assert on.card["training"]["config"]["deep_supervision"] == {"enabled": True}
    assert "deep_supervision" not in off.card["training"]
    ck = torch.load(tmp_path / "on" / "checkpoint.pt", weights_only=True)
    assert sorted(ck["deep_supervision"]) == ["heads.0.bias", "heads.0.weight"]
    assert tuple(ck["deep_supervision"]["heads.0.weight"].shape) == (3, 8, 1, 1, 1)
    assert "deep_supervision" not in torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)

    def never(self, decoder):
        raise AssertionError("an auxiliary head ran at inference")

    monkeypatch.setattr(AuxiliaryHeads, "forward", never)
    img, lab = sphere_case(42)
    pred = predict(sitk.GetImageFromArray(img), on)  # the plain network's sliding window
    assert pred.labels.shape == lab.shape


def test_resume_with_deep_supervision_mixup_adversarial_and_class_weights_matches_an_uninterrupted_run(
        tmp_path, tiny_config, tiny_cases):
    cfg = _config(tiny_config, method="asym_combined", class_weighting={"method": "cdifw", "tau": 5},
                  rare_classes=["Bead"], iterations=12, features=[4, 8, 16, 32],
                  deep_supervision={"enabled": True})
    assert cfg.mixup_settings["clean_step"] and cfg.adversarial["probability"] == 1.0
    full = train(cfg, tiny_cases, [], tmp_path / "full", log=lambda m: None)

    ck = train_killed_at(train, 10, cfg, tiny_cases, [], tmp_path / "resumed")
    assert ck["iteration"] == 8 and len(ck["deep_supervision"]) == 4
    resumed = train(cfg, tiny_cases, [], tmp_path / "resumed", log=lambda m: None)
    a, b = load_bundle(full), load_bundle(resumed)
    for k, v in a.network.state_dict().items():
        torch.testing.assert_close(v, b.network.state_dict()[k], rtol=0, atol=1e-6)
    heads_a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["deep_supervision"]
    heads_b = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["deep_supervision"]
    for k, v in heads_a.items():
        torch.testing.assert_close(v, heads_b[k], rtol=0, atol=1e-6)
    assert heads_a["heads.0.weight"].shape == (3, 8, 1, 1, 1) and heads_a["heads.1.weight"].shape == (3, 16, 1, 1, 1)
    wa = [h["class_weights"] for h in a.card["training"]["history"] if "class_weights" in h]
    wb = [h["class_weights"] for h in b.card["training"]["history"] if "class_weights" in h]
    assert wa == wb and wa[-1] != wa[0]
    assert a.card["training"]["deep_supervision"]["levels"] == 2 and "mixup" in a.card["training"]


def test_resume_refuses_a_checkpoint_of_other_deep_supervision_settings(tmp_path, tiny_config, tiny_cases):
    base = dict(iterations=2, checkpoint_every=2, features=[4, 8, 16, 32])
    train(_config(tiny_config, **base), tiny_cases, [], tmp_path / "off", log=lambda m: None)
    with pytest.raises(ValueError, match="different config"):
        train(_config(tiny_config, deep_supervision={"enabled": True}, **base), tiny_cases, [], tmp_path / "off")
    train(_config(tiny_config, deep_supervision={"enabled": True}, **base), tiny_cases, [], tmp_path / "on",
          log=lambda m: None)
    for other in ({"enabled": False}, {"enabled": True, "levels": 1}, {"enabled": True, "weights": [1, 1, 1]}):
        with pytest.raises(ValueError, match="different config"):
            train(_config(tiny_config, deep_supervision=other, **base), tiny_cases, [], tmp_path / "on")
    # the same settings written out in full resume (nothing left to do)
    train(_config(tiny_config, deep_supervision={"enabled": True, "levels": 2, "weights": "halving"}, **base),
          tiny_cases, [], tmp_path / "on", log=lambda m: None)
    # a checkpoint without the heads' state is refused even if its config matched
    ck = torch.load(tmp_path / "off" / "checkpoint.pt", weights_only=True)
    net = UNet3D(1, 3, [4, 8, 16, 32])
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    with pytest.raises(ValueError, match="deep supervision off"):
        restore_checkpoint(ck, network=net, optimizer=opt, scheduler=sched, rng=np.random.default_rng(0),
                           auxiliary=AuxiliaryHeads([4, 8, 16, 32], 3, 2))


@pytest.mark.parametrize("method", [m for m, p in METHOD_PRESETS.items()
                                    if p.get("semi_supervised", {}).get("method", "none") == "none"])
def test_every_supervised_method_trains_with_deep_supervision(tmp_path, tiny_config, tiny_cases, method, monkeypatch):
    calls = []
    real = DeepSupervisionLoss.forward

    def counting(self, outputs, target, class_weights=None, mask=None):
        calls.append((len(outputs), class_weights is not None, mask is not None))
        return real(self, outputs, target, class_weights=class_weights, mask=mask)

    monkeypatch.setattr(DeepSupervisionLoss, "forward", counting)
    cfg = _config(tiny_config, method=method, iterations=2, deep_supervision={"enabled": True})
    card = load_bundle(train(cfg, tiny_cases, [], tmp_path, log=lambda m: None)).card
    assert card["training"]["method"] == method and card["training"]["deep_supervision"]["levels"] == 1
    assert len(calls) >= 2 and all(c[0] == 2 for c in calls)
    if cfg.class_weighting.get("method", "none") != "none":
        assert all(c[1] for c in calls)


def test_semi_supervised_training_deep_supervises_each_networks_supervised_loss(tmp_path, tiny_config, tiny_cases,
                                                                                 monkeypatch):
    from imbalanceseglib.training import make_case
    calls = []
    real = DeepSupervisionLoss.forward

    def counting(self, outputs, target, class_weights=None, mask=None):
        calls.append([tuple(o.shape) for o in outputs])
        return real(self, outputs, target, class_weights=class_weights, mask=mask)

    monkeypatch.setattr(DeepSupervisionLoss, "forward", counting)
    unlabelled = [make_case(sphere_case(100 + s)[0], np.zeros((32, 32, 32), np.uint8), name=f"u{s}")
                  for s in range(2)]
    cfg = _config(tiny_config, method="double_mix", iterations=3, checkpoint_every=3,
                  semi_supervised={"method": "double_mix", "mix_start": 0.0}, deep_supervision={"enabled": True})
    bundle = load_bundle(train(cfg, tiny_cases[:2], [], tmp_path, log=lambda m: None, unlabeled_cases=unlabelled))
    # two networks a step, each on the 2 labelled patches only, full and half resolution
    assert calls == [[(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]] * 6
    entry = bundle.card["training"]["deep_supervision"]
    assert entry["levels"] == 1 and "pseudo-label losses stay at full resolution" in entry["applies_to"]
    assert bundle.card["network"]["arch"] == "UNet3DEnsemble"
    plain = [k for k in bundle.network.state_dict()]
    assert all(k.startswith("members.") for k in plain) and not any("heads" in k for k in plain)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert sorted(ck["deep_supervision"]) == ["0.heads.0.bias", "0.heads.0.weight", "1.heads.0.bias",
                                              "1.heads.0.weight"]


# --------------------------------------------------------------------------- command line


def _cli_data(tmp_path, train_cfg):
    for sub in ("images", "labels"):
        (tmp_path / sub).mkdir(exist_ok=True)
    for i in range(2):
        img, lab = sphere_case(i)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(tmp_path / "images" / f"case{i}.nrrd"))
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "labels" / f"case{i}.nrrd"))
    cfg = {"data": {"kind": "folders", "images": "images", "labels": "labels"}, "train": train_cfg}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_the_command_line_flag_and_the_config_key(tmp_path, monkeypatch):
    import imbalanceseglib.training as training
    from imbalanceseglib.cli import main
    base = dict(name="cli", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
                features=[4, 8, 16, 32], iterations=2, batch_size=1, val_every=1000, checkpoint_every=2,
                log_every=1, normalization={"scheme": "none"}, seed=1)
    seen = []

    def fake_train(config, *args, **kwargs):
        seen.append(config.deep_supervision_settings)
        return tmp_path / "x.imbseg"

    monkeypatch.setattr(training, "train", fake_train)
    cases = [(base, [], {"enabled": False, "levels": 2, "weights": "halving"}),
             (base, ["--deep-supervision"], {"enabled": True, "levels": 2, "weights": "halving"}),
             ({**base, "deep_supervision": {"enabled": True, "levels": 1}}, [],
              {"enabled": True, "levels": 1, "weights": "halving"}),
             ({**base, "deep_supervision": {"levels": 1, "weights": [1, 1]}}, ["--deep-supervision"],
              {"enabled": True, "levels": 1, "weights": [1, 1]})]
    for train_cfg, flags, want in cases:
        cfg = _cli_data(tmp_path, train_cfg)
        assert main(["train", str(cfg), "--out", str(tmp_path / "out"), *flags]) == 0
        assert seen[-1] == want
    monkeypatch.undo()
    cfg = _cli_data(tmp_path, base)  # a real run with the flag
    assert main(["train", str(cfg), "--out", str(tmp_path / "real"), "--deep-supervision"]) == 0
    card = load_bundle(tmp_path / "real" / "cli.imbseg").card
    assert [o["weight"] for o in card["training"]["deep_supervision"]["outputs"]] == pytest.approx(
        [4 / 7, 2 / 7, 1 / 7])
