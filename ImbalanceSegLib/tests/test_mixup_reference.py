"""Asymmetric mixup with the settings of the reference code (issue #21): ``mixup.lambda_scale``,
``mixup.clean_step`` and ``mixup.soft_targets`` (Li, Kamnitsas & Glocker, TMI 2021)."""

import math

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from imbalanceseglib import training
from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.losses import build_loss
from imbalanceseglib.networks import build_network
from imbalanceseglib.perturbations import asymmetric_mixup, mixup_lambda, one_hot_voxels
from imbalanceseglib.train_config import MIXUP_DEFAULTS
from imbalanceseglib.training import METHOD_PRESETS, TrainConfig, train
from imbalanceseglib.training_engine import ENV_VAR

NAMES = ["Background", "Ball", "Bead"]
REFERENCE = {"margin": 0.2, "lambda_scale": 0.8, "clean_step": True, "soft_targets": False}


def _cfg(tiny_config, **changes):
    d = tiny_config.to_dict()
    for key in ("loss", "mixup", "adversarial", "class_weighting", "augmentation", "semi_supervised"):
        d.pop(key)  # let the method preset fill them
    d.update(iterations=2, checkpoint_every=2, log_every=1, patch_size=[16, 16, 16])
    d.update(changes)
    return TrainConfig.from_dict(d)


# --------------------------------------------------------------------------- lambda scale


def test_scaled_lambda_mixes_the_images_by_hand():
    lam = mixup_lambda(0.3, np.random.default_rng(11), scale=0.8)
    drawn = np.random.default_rng(11).beta(0.3, 0.3)   # the same draw, unscaled
    assert lam == pytest.approx(0.8 * drawn, rel=1e-12) and 0.0 <= lam <= 0.8
    x_a = torch.tensor([[[1.0, 2.0, -3.0, 0.5]]])      # (N=1, Cin=1, 4 voxels)
    x_b = torch.tensor([[[4.0, -1.0, 0.0, 2.5]]])
    y = torch.zeros(1, 1, 4, dtype=torch.long)
    x_mix, _, used = asymmetric_mixup(x_a, y, x_b, y, [False, True], lam=lam)
    assert used == lam
    expected = [0.8 * drawn * a + (1 - 0.8 * drawn) * b for a, b in zip([1.0, 2.0, -3.0, 0.5], [4.0, -1.0, 0.0, 2.5])]
    assert x_mix.reshape(-1).tolist() == pytest.approx(expected, abs=1e-6)
    # a lambda of 0.5 scaled by 0.8: 0.4 * a + 0.6 * b, by hand
    x_half, _, _ = asymmetric_mixup(x_a, y, x_b, y, [False, True], lam=0.8 * 0.5)
    assert x_half.reshape(-1).tolist() == pytest.approx([2.8, 0.2, -1.2, 1.7], abs=1e-6)
    with pytest.raises(ValueError, match="scale"):
        mixup_lambda(0.3, 0, scale=0.0)


def test_the_trainer_scales_the_drawn_lambda(tmp_path, tiny_config, tiny_cases, monkeypatch):
    calls = []

    def recording(x_a, y_a, x_b, y_b, rare, *args, **kw):
        out = asymmetric_mixup(x_a, y_a, x_b, y_b, rare, *args, **kw)
        calls.append((x_a.clone(), x_b.clone(), out[0].clone(), out[2]))
        return out
    monkeypatch.setattr(training, "asymmetric_mixup", recording)
    mixed = {}
    for scale in (1.0, 0.8):
        calls.clear()
        cfg = _cfg(tiny_config, method="asym_mixup", iterations=1, checkpoint_every=1,
                   mixup={"probability": 1.0, "alpha": 0.3, "margin": 0.5, "lambda_scale": scale})
        train(cfg, tiny_cases[:1], [], tmp_path / str(scale), log=lambda m: None)
        assert len(calls) == 1
        mixed[scale] = calls[0]
    x_a, x_b, x_mix, lam = mixed[0.8]
    drawn = mixed[1.0][3]                 # same seed, same stream: the unscaled draw of the other run
    assert torch.equal(x_a, mixed[1.0][0]) and torch.equal(x_b, mixed[1.0][1])
    assert lam == pytest.approx(0.8 * drawn, rel=1e-12)
    torch.testing.assert_close(x_mix, 0.8 * drawn * x_a + (1 - 0.8 * drawn) * x_b, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- clean step


def _count_steps():
    counter = {"steps": 0}
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: counter.__setitem__("steps", counter["steps"] + 1))
    return counter, handle


@pytest.mark.parametrize("clean_step, probability, steps", [(True, 1.0, 4), (False, 1.0, 2), (True, 0.0, 2)])
def test_clean_step_takes_two_optimizer_steps_per_mixed_iteration(tmp_path, tiny_config, tiny_cases, monkeypatch,
                                                                   clean_step, probability, steps):
    seen = []
    real_build = training.build_training_loss

    def recording_loss(*args, **kw):
        loss_fn, rare_names, rare_mask = real_build(*args, **kw)

        def wrapped(logits, target, class_weights=None, mask=None):
            seen.append(("soft" if target.shape[1] > 1 else "labels", mask is not None))
            return loss_fn(logits, target, class_weights=class_weights, mask=mask)
        return wrapped, rare_names, rare_mask
    monkeypatch.setattr(training, "build_training_loss", recording_loss)
    cfg = _cfg(tiny_config, method="asym_mixup",
               mixup={"probability": probability, "alpha": 0.3, "margin": 0.5, "lambda_scale": 0.8,
                      "clean_step": clean_step, "soft_targets": False})
    counter, handle = _count_steps()
    try:
        bundle = train(cfg, tiny_cases[:1], [], tmp_path, log=lambda m: None)
    finally:
        handle.remove()
    assert counter["steps"] == steps     # 2 iterations
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["scheduler"]["last_epoch"] == 2   # the schedule steps once per iteration
    if probability and clean_step:       # clean batch (labels, no mask), then mixed (soft, masked)
        assert seen == [("labels", False), ("soft", True)] * 2
    elif probability:
        assert seen == [("soft", True)] * 2
    else:
        assert seen == [("labels", False)] * 2
    card = load_bundle(bundle).card["training"]
    if probability:
        assert card["mixup"] == {**MIXUP_DEFAULTS, "probability": probability, "lambda_scale": 0.8,
                                 "clean_step": clean_step, "soft_targets": False}
    else:
        assert "mixup" not in card


def test_clean_step_weights_equal_two_steps_by_hand(tmp_path, tiny_config, tiny_cases, monkeypatch):
    """One iteration with a clean step = an AdamW step on the clean batch, then one on the mixed batch."""
    batches = []
    real_mixup = training.asymmetric_mixup

    def recording(x_a, y_a, x_b, y_b, rare, *args, **kw):
        out = real_mixup(x_a, y_a, x_b, y_b, rare, *args, **kw)
        batches.append(((x_a.clone(), y_a.clone()), (out[0].clone(), out[1].clone())))
        return out
    monkeypatch.setattr(training, "asymmetric_mixup", recording)
    monkeypatch.setenv(ENV_VAR, "module")  # the network's own module, as run by hand below
    cfg = _cfg(tiny_config, method="asym_mixup", iterations=1, checkpoint_every=1)
    assert cfg.mixup_settings["clean_step"] and not cfg.mixup_settings["soft_targets"]
    net = load_bundle(train(cfg, tiny_cases[:1], [], tmp_path, log=lambda m: None)).network
    (x, y), (x_mix, t_mix) = batches[0]

    torch.manual_seed(cfg.seed)           # the trainer's initial weights
    ref = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": list(cfg.features)})
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = build_loss({"name": "dice_ce"}, NAMES, [0.9, 0.09, 0.01])   # the preset: Dice + CE
    after = []
    for inp, target, mask in ((x, y, None), (x_mix, t_mix, one_hot_voxels(t_mix))):
        opt.zero_grad(set_to_none=True)
        loss_fn(ref(inp), target, mask=mask).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 12.0)
        opt.step()
        after.append({k: v.detach().clone() for k, v in ref.state_dict().items()})
    got = net.state_dict()
    for k, v in after[1].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5)
    assert max(float((got[k] - v).abs().max()) for k, v in after[0].items()) > 1e-3   # not the clean step alone


# --------------------------------------------------------------------------- one-hot targets only


def _batch(seed=0, c=3, shape=(2, 3, 4, 5)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape[0], c, *shape[1:], generator=g)
    labels = torch.randint(0, c, (shape[0], 1, *shape[1:]), generator=g)
    onehot = torch.nn.functional.one_hot(labels[:, 0], c).movedim(-1, 1).float()
    keep = torch.rand(shape[0], 1, *shape[1:], generator=g) > 0.4
    other = torch.nn.functional.one_hot((labels[:, 0] + 1) % c, c).movedim(-1, 1).float()
    target = torch.where(keep, onehot, 0.3 * onehot + 0.7 * other)   # dropped voxels: soft targets
    return logits, labels, target, keep


def _kept(z, keep):
    """(1, C, K): the kept voxels only, as one image of K voxels."""
    return z.movedim(1, -1)[keep[:, 0]].T.unsqueeze(0)


def test_one_hot_voxels_by_hand():
    x = torch.zeros(1, 1, 4)
    y_a = torch.tensor([[[0, 1, 2, 2]]])
    y_b = torch.tensor([[[0, 2, 1, 0]]])
    # rare = class 2; lam 0.3: a's rare label (weight 0.3 <= 0.5) stays soft, b's (0.7) is hard
    _, t, _ = asymmetric_mixup(x, y_a, x, y_b, [False, False, True], margin=0.5, lam=0.3)
    assert one_hot_voxels(t).reshape(-1).tolist() == [True, True, False, False]
    _, t, _ = asymmetric_mixup(x, y_a, x, y_b, [False, False, True], margin=0.5, lam=0.8)
    assert one_hot_voxels(t).reshape(-1).tolist() == [True, False, True, True]


def test_masked_ce_is_the_mean_over_the_kept_voxels():
    logits, labels, target, keep = _batch()
    ce = build_loss({"name": "ce"})
    got = ce(logits, target, mask=keep)
    logp = torch.log_softmax(logits, 1).gather(1, labels)        # by hand
    assert float(got) == pytest.approx(float(-logp[keep].mean()), rel=1e-5)
    assert float(got) == pytest.approx(float(ce(_kept(logits, keep), _kept(target, keep))), rel=1e-5)
    assert float(got) != pytest.approx(float(ce(logits, target)), rel=1e-3)   # the mask changed something
    none_kept = ce(logits, target, mask=torch.zeros_like(keep))
    assert float(none_kept) == 0.0


@pytest.mark.parametrize("settings", [
    {"name": "dice_ce"},
    {"name": "asym_focal", "gamma": 2.0, "lambda_dice": 1.0},
    {"name": "asym_large_margin", "margin": 2.0},
    {"name": "asym_large_margin", "margin": 1.0, "gamma": 4.0, "lambda_dice": 1.0},   # the combined loss
])
def test_masked_loss_equals_the_loss_on_the_kept_voxels_only(settings):
    logits, _, target, keep = _batch(seed=1)
    loss = build_loss(dict(settings, rare_classes=["Bead"]) if settings["name"].startswith("asym") else settings,
                      NAMES, [0.9, 0.09, 0.01])
    leaf = logits.clone().requires_grad_(True)
    got = loss(leaf, target, mask=keep)
    want = loss(_kept(logits, keep), _kept(target, keep))
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-5)
    got.backward()
    dropped = ~keep.expand_as(leaf)
    assert float(leaf.grad[dropped].abs().max()) == 0.0           # dropped voxels have no say
    assert float(leaf.grad[~dropped].abs().max()) > 0.0


def test_a_zero_target_alone_does_not_drop_a_voxel_from_dice():
    logits, _, target, keep = _batch(seed=2)
    dice_ce = build_loss({"name": "dice_ce"})
    zeroed = target * keep                      # dropped voxels: all-zero target, no mask
    masked = dice_ce(logits, target, mask=keep)
    assert not math.isclose(float(dice_ce(logits, zeroed)), float(masked), rel_tol=1e-4)
    assert float(masked) == pytest.approx(float(dice_ce(_kept(logits, keep), _kept(target, keep))), rel=1e-5)


def test_monai_losses_refuse_a_mask():
    logits, _, target, keep = _batch()
    with pytest.raises(ValueError, match="voxel mask"):
        build_loss({"name": "tversky"})(logits, target, mask=keep)


# --------------------------------------------------------------------------- config


def test_presets_use_the_reference_settings(tiny_config):
    for method in ("asym_mixup", "asym_combined"):
        assert {k: METHOD_PRESETS[method]["mixup"][k] for k in REFERENCE} == REFERENCE
        assert {k: _cfg(tiny_config, method=method).mixup_settings[k] for k in REFERENCE} == REFERENCE
    plain = _cfg(tiny_config, method="dice_ce", mixup={"probability": 0.5})
    assert plain.mixup_settings == {**MIXUP_DEFAULTS, "probability": 0.5}
    assert (MIXUP_DEFAULTS["lambda_scale"], MIXUP_DEFAULTS["clean_step"], MIXUP_DEFAULTS["soft_targets"]) \
        == (1.0, False, True)


@pytest.mark.parametrize("mixup, message", [
    ({"lambda_scale": 0.0}, r"mixup.lambda_scale must be a number in \(0, 1\]"),
    ({"lambda_scale": 1.5}, r"mixup.lambda_scale must be a number in \(0, 1\].*got 1.5"),
    ({"lambda_scale": "0.8"}, r"mixup.lambda_scale .*got '0.8'"),
    ({"lambda_scale": True}, r"mixup.lambda_scale .*got True"),
    ({"clean_step": "yes"}, r"mixup.clean_step must be true or false, got 'yes'"),
    ({"clean_step": 1}, r"mixup.clean_step must be true or false, got 1"),
    ({"soft_targets": 0}, r"mixup.soft_targets must be true or false, got 0"),
    ({"alpha": 0}, r"mixup.alpha must be a number > 0"),
    ({"margin": 2}, r"mixup.margin must be a number in \[0, 1\]"),
])
def test_mixup_settings_are_validated(tiny_config, mixup, message):
    with pytest.raises(ValueError, match=message):
        _cfg(tiny_config, method="asym_mixup", mixup={"probability": 1.0, **mixup})


def test_one_hot_targets_need_a_loss_that_takes_a_mask(tiny_config):
    with pytest.raises(ValueError, match="mixup.soft_targets false .*'tversky'.*dice_ce"):
        _cfg(tiny_config, method="asym_mixup", loss={"name": "tversky"},
             mixup={"probability": 1.0, "soft_targets": False})
    _cfg(tiny_config, method="asym_mixup", loss={"name": "tversky"}, mixup={"probability": 1.0})  # soft: fine


# --------------------------------------------------------------------------- torchrun


def _ddp_config():
    from libtest_helpers import CLASSES
    # Dice per image: a loss that does not depend on how the batch is split, so two processes
    # must follow one process exactly, masked voxels and clean + mixed steps included.
    return TrainConfig.from_dict(dict(
        name="ddp", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
        features=[4, 8], iterations=4, batch_size=4, learning_rate=1e-2, val_every=1000,
        checkpoint_every=4, log_every=1, normalization={"scheme": "none"}, seed=5, method="asym_mixup",
        loss={"name": "dice", "dice_reduction": "image"}, class_weighting={"method": "cdifw"},
        mixup={"probability": 1.0, "alpha": 0.3, "margin": 0.2, **REFERENCE}))


def _ddp_cases():
    from libtest_helpers import sphere_case

    from imbalanceseglib.training import make_case
    return [make_case(*sphere_case(s, shape=(24, 24, 24)), name=f"c{s}") for s in range(3)]


def _rank_main(rank, world, port, out):
    import os
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       "RANK": str(rank), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    train(_ddp_config(), _ddp_cases(), [], out, log=lambda m: None)
    import torch.distributed as dist
    dist.destroy_process_group()


def test_two_processes_take_the_clean_and_mixed_steps_like_one(tmp_path):
    import socket

    import torch.multiprocessing as mp
    torch.set_num_threads(1)
    single = load_bundle(train(_ddp_config(), _ddp_cases(), [], tmp_path / "single", log=lambda m: None)).card
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(2, port, tmp_path / "ddp"), nprocs=2, join=True, start_method="spawn")
    ddp = load_bundle(tmp_path / "ddp" / "ddp.imbseg").card
    assert ddp["training"]["processes"] == 2 and ddp["training"]["mixup"]["clean_step"]
    for key in ("loss", "class_weights"):
        a = [h[key] for h in single["training"]["history"] if key in h]
        b = [h[key] for h in ddp["training"]["history"] if key in h]
        assert len(a) == len(b) == 4
        for x, y in zip(a, b):
            assert y == pytest.approx(x, rel=1e-4, abs=2e-4)
