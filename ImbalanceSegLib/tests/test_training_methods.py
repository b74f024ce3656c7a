"""Imbalance-aware training methods wired into ``train`` (issue #3)."""

import json

import pytest
import torch

from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.training import METHOD_PRESETS, TrainConfig, train
from libtest_helpers import train_killed_at


def _cfg(tiny_config, **changes):
    d = tiny_config.to_dict()
    for key in ("loss", "mixup", "adversarial", "class_weighting", "augmentation", "semi_supervised"):
        d.pop(key)  # let the method preset fill them
    d.update(iterations=12, checkpoint_every=4, log_every=2, patch_size=[16, 16, 16])
    d.update(changes)
    return TrainConfig.from_dict(d)


def test_resume_with_mixup_adversarial_class_weights_and_augmentation_matches_an_uninterrupted_run(
        tmp_path, tiny_config, tiny_cases):
    cfg = _cfg(tiny_config, method="asym_combined", class_weighting={"method": "cdifw", "tau": 5},
               augmentation={"default": "default", "rare": "rare"}, rare_classes=["Bead"])
    full = train(cfg, tiny_cases, [], tmp_path / "full", log=lambda m: None)

    ck = train_killed_at(train, 10, cfg, tiny_cases, [], tmp_path / "resumed")
    assert ck["iteration"] == 8 and json.loads(ck["class_weights"])["kind"]
    resumed = train(cfg, tiny_cases, [], tmp_path / "resumed", log=lambda m: None)
    a, b = load_bundle(full), load_bundle(resumed)
    for k, v in a.network.state_dict().items():
        torch.testing.assert_close(v, b.network.state_dict()[k], rtol=0, atol=1e-6)
    wa = [h["class_weights"] for h in a.card["training"]["history"] if "class_weights" in h]
    wb = [h["class_weights"] for h in b.card["training"]["history"] if "class_weights" in h]
    assert wa == wb and wa[-1] != wa[0]  # the weights followed training, identically after the resume
    card = a.card["training"]
    assert card["method"] == "asym_combined" and card["loss"] == "asym_large_margin"
    assert card["rare_classes"] == ["Bead"] and card["seconds_per_iteration"] > 0


@pytest.mark.parametrize("method", sorted(METHOD_PRESETS))
def test_every_method_trains_by_name_and_records_itself(tmp_path, tiny_config, tiny_cases, method):
    cfg = _cfg(tiny_config, method=method, iterations=2, checkpoint_every=2)
    unlabeled = tiny_cases[1:] if cfg.is_semi_supervised else None
    card = load_bundle(train(cfg, tiny_cases[:1], [], tmp_path, log=lambda m: None, unlabeled_cases=unlabeled)).card
    assert card["training"]["method"] == method
    assert card["training"]["loss"] == METHOD_PRESETS[method]["loss"]["name"]
    assert card["training"]["config"]["method"] == method


def test_method_settings_are_validated(tiny_config):
    with pytest.raises(ValueError, match="unknown training method 'magic'"):
        _cfg(tiny_config, method="magic")
    with pytest.raises(ValueError, match="rare_classes"):
        _cfg(tiny_config, rare_classes=["Liver"])
    with pytest.raises(ValueError, match="class_weighting"):
        _cfg(tiny_config, class_weighting={"method": "focal"})
    with pytest.raises(ValueError, match="class_weighting.*min_weight"):
        _cfg(tiny_config, class_weighting={"method": "disw", "min_weight": -1})
    with pytest.raises(ValueError, match="class_weighting.*momentum_typo"):
        _cfg(tiny_config, class_weighting={"method": "disw", "momentum_typo": 0.5})
    with pytest.raises(ValueError, match="mixup.probability"):
        _cfg(tiny_config, mixup={"probability": 2})
    with pytest.raises(ValueError, match="flip"):
        _cfg(tiny_config, augmentation={"default": {"flip": 1}, "rare": "none"})
