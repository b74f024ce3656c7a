"""Named training methods: the presets ``TrainConfig.method`` selects.

Plain data, free of torch, so that a user interface can list the methods before
PyTorch is installed; :class:`imbalanceseglib.train_config.TrainConfig` applies them.
"""

from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["METHOD_PRESETS", "method_names", "semi_supervised_choice", "semi_supervised_method_names"]

#: Asymmetric mixup as in the reference code of Li, Kamnitsas & Glocker: lambda ~ 0.8 * Beta(0.3, 0.3), a
#: rare label kept hard where its image weighs more than 0.2,
#: one step on the clean batch and then one on the mixed batch every iteration, and the voxels whose
#: mixed target is not one-hot left out of the loss (train_config.MIXUP_DEFAULTS explains each key).
_REFERENCE_MIXUP: Dict[str, Any] = {"probability": 1.0, "alpha": 0.3, "margin": 0.2, "lambda_scale": 0.8,
                                    "clean_step": True, "soft_targets": False}

#: Named training methods (issue #3).  Each entry sets config fields; explicit fields in a
#: config override the preset.  The asymmetric methods follow Li, Kamnitsas & Glocker (TMI
#: 2020) and use the rare-class mask; the weighting ones follow DHC (MICCAI 2023) and
#: Double-Mix (IJCARS 2024).
METHOD_PRESETS: Dict[str, Dict[str, Any]] = {
    "ce": {"loss": {"name": "ce"}},
    "dice_ce": {"loss": {"name": "dice_ce"}},
    # The asymmetric methods as the reference code of Li, Kamnitsas & Glocker sets them (focal gamma 4,
    # large margin 1), each on top of Dice + CE so that only the asymmetry differs from ``dice_ce``: the
    # configurations measured on real patients (Testing/Benchmarks/reports/real_imbalance.md).
    "asym_focal": {"loss": {"name": "asym_focal", "gamma": 4.0, "margin": 0.0, "lambda_dice": 1.0}},
    "asym_large_margin": {"loss": {"name": "asym_large_margin", "margin": 1.0, "gamma": 0.0, "lambda_dice": 1.0}},
    "asym_mixup": {"loss": {"name": "dice_ce"}, "mixup": dict(_REFERENCE_MIXUP)},
    "asym_adversarial": {"loss": {"name": "dice_ce"},
                         "adversarial": {"probability": 1.0, "epsilon": 10.0, "weight": 1.0}},
    "asym_combined": {"loss": {"name": "asym_large_margin", "margin": 1.0, "gamma": 4.0, "lambda_dice": 1.0},
                      "mixup": dict(_REFERENCE_MIXUP),
                      "adversarial": {"probability": 1.0, "epsilon": 10.0, "weight": 1.0}},
    "disw": {"loss": {"name": "dice_ce"}, "class_weighting": {"method": "disw"}},
    "difw": {"loss": {"name": "dice_ce"}, "class_weighting": {"method": "difw"}},
    "cdifw": {"loss": {"name": "dice_ce"}, "class_weighting": {"method": "cdifw"}},
    # DisW with every weight at least 1 (the unweighted value): DHC's zero weight for the most
    # frequent class (background) makes a network trained on supervised losses alone over-segment.
    "disw_floor": {"loss": {"name": "dice_ce"}, "class_weighting": {"method": "disw", "min_weight": 1.0}},
    # Semi-supervised (labelled + unlabelled cases; see imbalanceseglib.semi_supervised).
    "cps": {"loss": {"name": "dice_ce"}, "semi_supervised": {"method": "cps"}},
    "cps_weighted": {"loss": {"name": "dice_ce"},
                     "semi_supervised": {"method": "cps", "weights_a": {"method": "cdifw"},
                                         "weights_b": {"method": "disw"}}},
    # CPS + CDifW/DisW with every weight at least 1: the DHC weights give the background (the most
    # frequent, soon learned class) a weight near 0, and on ACDC with 3-14 labelled patients both
    # networks then over-segment (Testing/Benchmarks/reports/real_imbalance.md).
    "cps_weighted_floor": {"loss": {"name": "dice_ce"},
                           "semi_supervised": {"method": "cps", "weights_a": {"method": "cdifw", "min_weight": 1.0},
                                               "weights_b": {"method": "disw", "min_weight": 1.0}}},
    "double_mix": {"loss": {"name": "dice_ce"},
                   "semi_supervised": {"method": "double_mix", "weights_a": {"method": "cdifw"},
                                       "weights_b": {"method": "disw"}}},
    "class_specific_augmentation": {"loss": {"name": "dice_ce"},
                                    "augmentation": {"default": "default", "rare": "rare"}},
    "shift_robust": {"loss": {"name": "dice_ce"}, "augmentation": {"default": "shift_robust", "rare": "shift_robust"}},
}


def method_names() -> List[str]:
    """The names of the training methods, in the order of :data:`METHOD_PRESETS`."""
    return list(METHOD_PRESETS)


def semi_supervised_method_names() -> List[str]:
    """The methods that train on labelled and unlabelled cases (``semi_supervised.method`` set)."""
    return [name for name, preset in METHOD_PRESETS.items()
            if preset.get("semi_supervised", {}).get("method", "none") != "none"]


def semi_supervised_choice() -> str:
    """``cps, cps_weighted, ... or double_mix``: the semi-supervised methods for a message."""
    names = semi_supervised_method_names()
    return ", ".join(names[:-1]) + " or " + names[-1]
