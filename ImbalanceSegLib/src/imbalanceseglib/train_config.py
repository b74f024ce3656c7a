"""Training configuration: :class:`TrainConfig`, the named methods it applies, and the
semi-supervised settings, validated in one place.

``TrainConfig.from_dict`` fills the fields a JSON config leaves out from the named method
(:data:`~imbalanceseglib.presets.METHOD_PRESETS`, torch-free) and validates the result with
:meth:`TrainConfig.validate`, the only place a training method name, the class weighting,
the augmentation, the deep supervision, the context labels and the semi-supervised settings are checked.  Everything downstream (the
command line, the Slicer module, the trainers in :mod:`imbalanceseglib.training` and
:mod:`imbalanceseglib.semi_supervised`) takes the validated config: :meth:`TrainConfig.validated`
checks again only a config whose fields changed since it was last validated.

Importing this module needs neither torch nor MONAI; validating a config imports the
class-weight, augmentation and loss modules it checks against.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from .presets import METHOD_PRESETS
from .rare import RARE_FRACTION

__all__ = ["CONTEXT_LABELS_DEFAULTS", "DEEP_SUPERVISION_DEFAULTS", "METHOD_PRESETS", "MIXUP_DEFAULTS",
           "SEMI_DEFAULTS", "SEMI_METHODS", "TrainConfig", "context_labels_settings", "deep_supervision_settings",
           "make_class_weighter", "semi_supervised_settings"]

# --------------------------------------------------------------------------- asymmetric mixup settings

#: ``TrainConfig.mixup`` settings and the values used where a config leaves them out
#: (asymmetric mixup, :func:`imbalanceseglib.perturbations.asymmetric_mixup`):
#:
#: * ``probability``: chance that an iteration uses mixup (0: never);
#: * ``alpha``: ``lam ~ Beta(alpha, alpha)``;
#: * ``margin``: a rare label keeps its hard target where its image weighs more than this;
#: * ``lambda_scale``: ``lam`` is multiplied by it, in (0, 1]; the reference code of Li,
#:   Kamnitsas & Glocker uses 0.8, so the second image always keeps some weight;
#: * ``clean_step``: true makes an iteration whose mixup fires take two optimizer steps, one
#:   on the clean batch and then one on the mixed batch (the reference code); false (default)
#:   replaces the batch with the mixed one.  With the clean step the learning-rate schedule
#:   still steps once per iteration, the logged loss is the mean of the two steps' losses, the
#:   class weights (DisW/DifW/CDifW) follow the clean batch only, and adversarial training, when
#:   it fires, adds its term to each of the two steps;
#: * ``soft_targets``: true (default) trains on the soft mixed targets; false leaves out of the
#:   loss every voxel whose mixed target is not one-hot (the reference code; needs a loss that
#:   takes a voxel mask: ce, dice, dice_ce, asym_focal, asym_large_margin).  Under torchrun each
#:   process averages the cross-entropy over its own kept voxels.
#:
#: The ``asym_mixup`` and ``asym_combined`` presets set lambda_scale 0.8, clean_step true and
#: soft_targets false; the defaults here keep the earlier behaviour for configs that set none.
MIXUP_DEFAULTS: Dict[str, Any] = {
    "probability": 0.0,
    "alpha": 0.3,
    "margin": 0.5,
    "lambda_scale": 1.0,
    "clean_step": False,
    "soft_targets": True,
}


def _check_mixup(mixup: Dict[str, Any], loss_name: str) -> None:
    """ValueError naming the ``mixup`` setting whose type or value is wrong."""
    alpha, margin = mixup.get("alpha", MIXUP_DEFAULTS["alpha"]), mixup.get("margin", MIXUP_DEFAULTS["margin"])
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not float(alpha) > 0:
        raise ValueError(f"mixup.alpha must be a number > 0, got {alpha!r}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= float(margin) <= 1.0:
        raise ValueError(f"mixup.margin must be a number in [0, 1], got {margin!r}")
    scale = mixup.get("lambda_scale", MIXUP_DEFAULTS["lambda_scale"])
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < float(scale) <= 1.0:
        raise ValueError(f"mixup.lambda_scale must be a number in (0, 1] (the reference code uses 0.8), "
                         f"got {scale!r}")
    for key in ("clean_step", "soft_targets"):
        value = mixup.get(key, MIXUP_DEFAULTS[key])
        if not isinstance(value, bool):
            raise ValueError(f"mixup.{key} must be true or false, got {value!r}")
    if not mixup.get("soft_targets", True) and mixup.get("probability", 0.0):
        from .losses import MASKABLE_LOSS_NAMES  # needs torch
        if loss_name not in MASKABLE_LOSS_NAMES:
            raise ValueError(f"mixup.soft_targets false leaves voxels out of the loss, which loss {loss_name!r} "
                             f"cannot do; use one of {', '.join(MASKABLE_LOSS_NAMES)} or soft_targets true")

# --------------------------------------------------------------------------- deep supervision settings

#: ``TrainConfig.deep_supervision`` settings and the values used where a config leaves them out
#: (deep supervision, Dou et al., "3D deeply supervised network for automated segmentation of
#: volumetric medical images", MedIA 2017; trained as :mod:`imbalanceseglib.deep_supervision`):
#:
#: * ``enabled``: true adds an auxiliary output (a 1x1x1 convolution to the classes) at each
#:   supervised decoder level during training; inference never computes them and the bundle
#:   holds the plain network.  Works with every loss, class weighting, mixup, adversarial
#:   training and the semi-supervised trainer;
#: * ``levels``: how many decoder levels coarser than the full resolution get an auxiliary
#:   output, from the next-coarser one down: 1 .. ``len(features) - 2``; null (default) means
#:   all of them (a U-Net of ``features`` [16, 32, 64, 128] has 2: at 1/2 and 1/4 resolution;
#:   the bottleneck is an encoder level, not a decoder one);
#: * ``weights``: ``"halving"`` (nnU-Net's): the full-resolution output weighs 1, each coarser
#:   output half the previous one, then all are divided by their sum.  For the 4-level U-Net
#:   above (main output + 2 auxiliary): 4/7, 2/7, 1/7 (0.5714, 0.2857, 0.1429); with 3
#:   auxiliary outputs (a 5-level U-Net): 8/15, 4/15, 2/15, 1/15.  Or a list of ``levels + 1``
#:   numbers >= 0 (the full-resolution output's first, and > 0), divided by their sum the same way.
#:
#: Each auxiliary loss is the training loss at that output's own resolution against the target
#: averaged over 2^k-voxel blocks (class fractions) and a voxel mask kept only where all its
#: fine voxels are (:func:`imbalanceseglib.deep_supervision.downsample_target`).  Unlike nnU-Net,
#: the coarsest decoder output is supervised too (nnU-Net gives it weight 0); ``levels`` leaves
#: it out.
DEEP_SUPERVISION_DEFAULTS: Dict[str, Any] = {
    "enabled": False,
    "levels": None,
    "weights": "halving",
}


def deep_supervision_settings(entry: Any, features: List[int]) -> Dict[str, Any]:
    """``TrainConfig.deep_supervision`` with the defaults filled in and ``levels`` resolved
    for a U-Net of ``features`` (0 when it has no decoder level below the full resolution and
    deep supervision is off); ValueError naming the key whose type or value is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"deep_supervision must be a mapping such as {{\"enabled\": true}}, got {entry!r}")
    unknown = sorted(set(entry) - set(DEEP_SUPERVISION_DEFAULTS))
    if unknown:
        raise ValueError(f"deep_supervision: unknown settings {unknown}; known: {sorted(DEEP_SUPERVISION_DEFAULTS)}")
    s = {**copy.deepcopy(DEEP_SUPERVISION_DEFAULTS), **copy.deepcopy(entry)}
    if not isinstance(s["enabled"], bool):
        raise ValueError(f"deep_supervision.enabled must be true or false, got {s['enabled']!r}")
    most = len(features) - 2  # decoder levels coarser than the full resolution
    if s["enabled"] and most < 1:
        raise ValueError(f"deep_supervision needs a U-Net with a decoder level below the full resolution "
                         f"(at least 3 features), got features {list(features)}")
    levels = s["levels"]
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= most):
        raise ValueError(f"deep_supervision.levels must be null (all) or an integer in 1..{max(most, 1)} for "
                         f"features {list(features)}, got {levels!r}")
    s["levels"] = levels if levels is not None else max(most, 0)
    weights = s["weights"]
    if isinstance(weights, list):
        if len(weights) != s["levels"] + 1 or any(isinstance(w, bool) or not isinstance(w, (int, float))
                                                   or not float(w) >= 0 for w in weights) \
                or not float(weights[0]) > 0:
            raise ValueError(f"deep_supervision.weights as a list needs levels + 1 = {s['levels'] + 1} numbers >= 0, "
                             f"the full-resolution output's first and > 0, got {weights!r}")
    elif weights != "halving":
        raise ValueError(f"deep_supervision.weights must be \"halving\" or a list of levels + 1 numbers, "
                         f"got {weights!r}")
    return s

# --------------------------------------------------------------------------- context label settings

#: ``TrainConfig.context_labels`` settings and the values used where a config leaves them out
#: (context label learning, CoLab: Li, Kamnitsas, Ouyang, Chen & Glocker, "Context label
#: learning: improving background class representations in semantic segmentation", IEEE TMI
#: 2023; trained as :mod:`imbalanceseglib.context_labels`, defaults from the authors' code,
#: github.com/ZerojumpLine/CoLab):
#:
#: * ``enabled``: true trains the segmentation network with ``classes`` more outputs, context
#:   classes that split the background, whose labels a task generator (a second U-Net) makes
#:   and meta-learns; the bundle's network merges them back into the background, so it
#:   predicts the config's classes.  Supervised training only, without asymmetric mixup, in one
#:   process (refused otherwise); works with every loss, class weighting, adversarial training,
#:   augmentation and deep supervision;
#: * ``classes``: context classes added to the background (1..16; default 1: the background is
#:   split in two, as the authors' liver-tumour command, ``--taskcls 2``);
#: * ``update_every``: the generator's meta step runs every this many iterations (default 5,
#:   the authors' ``--taskupdate``), the segmentation network's ordinary step every iteration;
#: * ``generator_features``: the generator U-Net's channels per level (null: the segmentation
#:   network's, as the authors' code; at most as many levels);
#: * ``generator_learning_rate``: Adam's learning rate for the generator (3e-4, the authors'
#:   ``--arch_learning_rate``), with the segmentation network's polynomial decay;
#: * ``lookahead_learning_rate``: the step size of the segmentation network's one-step
#:   look-ahead in the meta step (a plain gradient step; 0.01, the authors' SGD learning rate,
#:   with the same decay);
#: * ``near_mm`` and ``falloff_mm``: context labels are generated within ``near_mm`` of the
#:   patch's foreground, fading out as ``exp(-(d - near_mm) / falloff_mm)`` beyond it (the rest
#:   is plain background; a patch without foreground gets none); null ``near_mm`` generates them
#:   on the whole background.  Defaults 60 and 40 mm: the authors' 30 and 20 voxels
#:   (``--threshold_sub``, ``--threshold_dev``) on their 1.9 x 1.9 x 2.47 mm grid, rounded.
CONTEXT_LABELS_DEFAULTS: Dict[str, Any] = {
    "enabled": False,
    "classes": 1,
    "update_every": 5,
    "generator_features": None,
    "generator_learning_rate": 3e-4,
    "lookahead_learning_rate": 1e-2,
    "near_mm": 60.0,
    "falloff_mm": 40.0,
}
MAX_CONTEXT_CLASSES = 16  # networks.MAX_CONTEXT_CLASSES (this module stays torch-free)


def _positive_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(float(v)) and float(v) > 0


def context_labels_settings(entry: Any, features: List[int]) -> Dict[str, Any]:
    """``TrainConfig.context_labels`` with the defaults filled in (``generator_features`` resolved
    to the network's ``features`` when null); ValueError naming the key whose type or value is
    wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"context_labels must be a mapping such as {{\"enabled\": true}}, got {entry!r}")
    unknown = sorted(set(entry) - set(CONTEXT_LABELS_DEFAULTS))
    if unknown:
        raise ValueError(f"context_labels: unknown settings {unknown}; known: {sorted(CONTEXT_LABELS_DEFAULTS)}")
    s = {**copy.deepcopy(CONTEXT_LABELS_DEFAULTS), **copy.deepcopy(entry)}
    if not isinstance(s["enabled"], bool):
        raise ValueError(f"context_labels.enabled must be true or false, got {s['enabled']!r}")
    for key, hi in (("classes", MAX_CONTEXT_CLASSES), ("update_every", 10 ** 6)):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise ValueError(f"context_labels.{key} must be an integer in 1..{hi}, got {v!r}")
    gf = s["generator_features"]
    if gf is None:
        s["generator_features"] = [int(f) for f in features]
    elif (not isinstance(gf, list) or not 2 <= len(gf) <= len(features)
          or not all(not isinstance(f, bool) and isinstance(f, int) and 1 <= f <= 4096 for f in gf)):
        raise ValueError(f"context_labels.generator_features must be null (the network's) or a list of 2 to "
                         f"{len(features)} channel counts (as many levels as features {list(features)} at most), "
                         f"got {gf!r}")
    for key in ("generator_learning_rate", "lookahead_learning_rate", "falloff_mm"):
        if not _positive_number(s[key]):
            raise ValueError(f"context_labels.{key} must be a number > 0, got {s[key]!r}")
    near = s["near_mm"]
    if near is not None and (isinstance(near, bool) or not isinstance(near, (int, float))
                             or not math.isfinite(float(near)) or float(near) < 0):
        raise ValueError(f"context_labels.near_mm must be null (the whole background) or a distance >= 0 in mm, "
                         f"got {near!r}")
    return s

# --------------------------------------------------------------------------- semi-supervised settings

SEMI_METHODS = ("none", "cps", "double_mix")
#: What a network learns from on a Double-Mix patch (see :mod:`imbalanceseglib.semi_supervised`).
MIX_TARGETS = ("mixed_labels", "own_prediction")

#: ``TrainConfig.semi_supervised`` defaults (see :mod:`imbalanceseglib.semi_supervised`).
SEMI_DEFAULTS: Dict[str, Any] = {
    "method": "none",
    "weights_a": {"method": "none"},
    "weights_b": {"method": "none"},
    "unsup_weight": 0.1,
    "rampup": 0.4,
    "mix_weight": 0.5,
    "mix_start": 0.1,
    "mix_target": "mixed_labels",
    "ema_decay": 0.99,
    "unlabeled_batch_size": None,
}


def _filled_semi_settings(config_entry: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    return {**copy.deepcopy(SEMI_DEFAULTS), **dict(config_entry or {})}


def semi_supervised_settings(config_entry: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The semi-supervised settings with defaults filled in, validated (ValueError names the key)."""
    entry = dict(config_entry or {})
    unknown = sorted(set(entry) - set(SEMI_DEFAULTS))
    if unknown:
        raise ValueError(f"semi_supervised: unknown settings {unknown}; known: {sorted(SEMI_DEFAULTS)}")
    s = _filled_semi_settings(entry)
    if s["method"] not in SEMI_METHODS:
        raise ValueError(f"semi_supervised.method must be one of {', '.join(SEMI_METHODS)}, got {s['method']!r}")
    for key, lo, hi in (("unsup_weight", 0.0, 1e3), ("rampup", 0.0, 1.0), ("mix_weight", 0.0, 1e3),
                        ("mix_start", 0.0, 1.0), ("ema_decay", 0.0, 1.0)):
        v = s[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
            raise ValueError(f"semi_supervised.{key} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if s["mix_target"] not in MIX_TARGETS:
        raise ValueError(f"semi_supervised.mix_target must be one of {', '.join(MIX_TARGETS)}, got {s['mix_target']!r}")
    ub = s["unlabeled_batch_size"]
    if ub is not None and (isinstance(ub, bool) or not isinstance(ub, int) or ub < 1):
        raise ValueError(f"semi_supervised.unlabeled_batch_size must be a positive integer, got {ub!r}")
    for key in ("weights_a", "weights_b"):
        if not isinstance(s[key], dict) or "method" not in s[key]:
            raise ValueError(f"semi_supervised.{key} must be a class weighting such as {{'method': 'disw'}}, "
                             f"got {s[key]!r}")
    return s


# --------------------------------------------------------------------------- class weighting


def make_class_weighter(settings: Dict[str, Any], n_classes: int):
    """DisW / DifW / CDifW weighter from ``TrainConfig.class_weighting`` (None for ``none``)."""
    opts = {k: v for k, v in settings.items() if k != "method"}
    method = settings.get("method", "none")
    if method == "none":
        return None
    from .class_weights import ConfidenceDifficultyWeights, DifficultyWeights, DistributionWeights  # needs torch
    if method == "disw":
        return DistributionWeights(n_classes, **opts)
    if method == "difw":
        return DifficultyWeights(n_classes, **opts)
    if method == "cdifw":
        return ConfidenceDifficultyWeights(n_classes, **opts)
    raise ValueError(f"unknown class weighting {method!r}")


# --------------------------------------------------------------------------- the config


def _default_loss() -> Dict[str, Any]:
    from .losses import DEFAULT_LOSS  # needs torch and MONAI: imported when a config is made
    return dict(DEFAULT_LOSS)


@dataclass
class TrainConfig:
    name: str
    classes: List[Dict[str, Any]]
    target_spacing: List[float]
    patch_size: List[int] = field(default_factory=lambda: [64, 64, 64])
    features: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    normalization: Dict[str, Any] = field(default_factory=lambda: {
        "scheme": "percentile_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5})
    loss: Dict[str, Any] = field(default_factory=_default_loss)
    iterations: int = 1000
    batch_size: int = 2
    learning_rate: float = 2e-3
    weight_decay: float = 1e-5
    # Fraction of patches centred on a foreground voxel of a class drawn uniformly
    # among the classes present in the case, so rare classes are seen as often as large ones.
    foreground_fraction: float = 0.67
    seed: int = 0
    val_every: int = 250
    checkpoint_every: int = 50
    log_every: int = 25
    num_threads: int = 0
    description: str = ""
    modality: str = ""  # never assumed: from the config, the dataset.json, or left empty (any modality)
    # Imbalance-aware methods (see METHOD_PRESETS; ``method`` is recorded in the model card).
    method: str = "dice_ce"
    rare_classes: Optional[List[str]] = None   # names; None: every foreground class under rare_threshold
    rare_threshold: float = RARE_FRACTION
    class_weighting: Dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    # Asymmetric mixup: probability, alpha, margin, lambda_scale, clean_step, soft_targets
    # (MIXUP_DEFAULTS explains each and fills those left out; mixup_settings has them all).
    # The default lists only the first three, so configs written before the others existed
    # keep their checkpoint fingerprint.
    mixup: Dict[str, Any] = field(default_factory=lambda: {"probability": 0.0, "alpha": 0.3, "margin": 0.5})
    adversarial: Dict[str, Any] = field(default_factory=lambda: {"probability": 0.0, "epsilon": 10.0,
                                                                 "weight": 1.0})
    augmentation: Dict[str, Any] = field(default_factory=lambda: {"default": "none", "rare": "none"})
    # Semi-supervised training (imbalanceseglib.semi_supervised); method "none" is supervised.
    semi_supervised: Dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    # Recompute block activations in the backward pass (less memory for large patches).
    activation_checkpointing: bool = False
    # Deep supervision: enabled, levels, weights (DEEP_SUPERVISION_DEFAULTS explains each;
    # deep_supervision_settings has them all).  Off, it is left out of the checkpoint's config
    # fingerprint, so runs from before it existed still resume.
    deep_supervision: Dict[str, Any] = field(default_factory=lambda: {"enabled": False})
    # Context label learning (CoLab): enabled, classes, update_every, generator_features,
    # generator_learning_rate, lookahead_learning_rate, near_mm, falloff_mm
    # (CONTEXT_LABELS_DEFAULTS explains each; context_labels_settings has them all).  Off, it is
    # left out of the checkpoint's config fingerprint, so runs from before it existed still resume.
    context_labels: Dict[str, Any] = field(default_factory=lambda: {"enabled": False})

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Config from JSON, validated; a ``method`` naming a preset fills the fields the dict leaves out."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {unknown}")
        import dataclasses
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING  # type: ignore[misc]
                   and f.name not in d]
        if missing:
            hint = (" (imbalanceseg train takes the classes from a data folder: --data, or a data section "
                    "naming a folder with classes.json or dataset.json)" if "classes" in missing else "")
            raise ValueError(f"training config lacks the required field(s) {missing}{hint}")
        d = copy.deepcopy(d)
        for key, value in METHOD_PRESETS.get(d.get("method", "dice_ce"), {}).items():
            d.setdefault(key, copy.deepcopy(value))  # an unknown method is refused by validate()
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field (ValueError naming it); the one place a training method name is checked."""
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"unknown training method {self.method!r}; known: {', '.join(METHOD_PRESETS)}")
        if not isinstance(self.activation_checkpointing, bool):
            raise ValueError(f"activation_checkpointing must be true or false, got {self.activation_checkpointing!r}")
        if len(self.classes) < 2:
            raise ValueError("config.classes must list the background and at least one foreground class")
        for i, c in enumerate(self.classes):
            if c.get("value") != i:
                raise ValueError(f"config.classes[{i}] must have value {i}")
        if len(self.patch_size) != 3 or any(p % 2 ** (len(self.features) - 1) for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be 3 sizes divisible by {2 ** (len(self.features) - 1)}")
        from .card import patch_size_problem  # the rule the model card is read with (one home)
        problem = patch_size_problem(list(self.patch_size), {"arch": "UNet3D", "params": {"features": self.features}})
        if problem:
            raise ValueError(problem.replace("preprocessing.patch_size", "patch_size"))
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch_size must be positive")
        names = [c["name"] for c in self.classes]
        if self.rare_classes is not None:
            bad = [n for n in self.rare_classes if n not in names[1:]]
            if bad:
                raise ValueError(f"rare_classes {bad} are not foreground classes of the config ({names[1:]})")
        if not 0.0 < float(self.rare_threshold) < 1.0:
            raise ValueError(f"rare_threshold must be a voxel fraction in (0, 1), got {self.rare_threshold!r}")
        cw = self.class_weighting.get("method", "none")
        if cw not in ("none", "disw", "difw", "cdifw"):
            raise ValueError(f"class_weighting.method must be none, disw, difw or cdifw, got {cw!r}")
        try:
            make_class_weighter(self.class_weighting, len(self.classes))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"class_weighting {self.class_weighting!r}: {exc}") from None
        for key, cfg in (("mixup", self.mixup), ("adversarial", self.adversarial)):
            p = cfg.get("probability", 0.0)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{key}.probability must be in [0, 1], got {p!r}")
        _check_mixup(self.mixup, str(self.loss.get("name", "dice_ce")))
        deep_supervision_settings(self.deep_supervision, list(self.features))
        context = context_labels_settings(self.context_labels, list(self.features))
        from .augment import policy_from_config  # needs torch
        for key in ("default", "rare"):
            policy_from_config(self.augmentation.get(key, "none"))  # raises naming the bad key
        ss = semi_supervised_settings(self.semi_supervised)
        for key in ("weights_a", "weights_b"):
            try:
                make_class_weighter(ss[key], len(self.classes))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"semi_supervised.{key} {ss[key]!r}: {exc}") from None
        if ss["method"] != "none" and self.class_weighting.get("method", "none") != "none":
            raise ValueError("semi-supervised training weights each network through semi_supervised.weights_a/"
                             "weights_b; leave class_weighting at 'none'")
        if ss["method"] != "none" and (self.mixup.get("probability", 0.0) or self.adversarial.get("probability", 0.0)):
            raise ValueError("asymmetric mixup and adversarial training are supervised-only; "
                             "turn them off for semi-supervised training")
        if context["enabled"] and ss["method"] != "none":
            raise ValueError(f"context_labels are supervised-only (the pseudo-labels of {ss['method']!r} have no "
                             "context classes); turn one of them off")
        if context["enabled"] and self.mixup.get("probability", 0.0):
            raise ValueError("context_labels cannot be combined with asymmetric mixup (it mixes the labels of two "
                             "patches by the classes' rarity, which the generated context labels have none of); "
                             "set mixup.probability to 0 (e.g. method asym_focal or asym_adversarial instead of "
                             "asym_mixup/asym_combined) or turn context labels off")
        object.__setattr__(self, "_validated_as", self._fingerprint())

    def validated(self) -> "TrainConfig":
        """This config, for a trainer: validated again only if a field changed since :meth:`validate`
        last passed (a config from :meth:`from_dict` is not checked twice)."""
        if getattr(self, "_validated_as", None) != self._fingerprint():
            self.validate()
        return self

    def _fingerprint(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=repr)

    @property
    def is_semi_supervised(self) -> bool:
        return self.semi_supervised.get("method", "none") != "none"

    @property
    def mixup_settings(self) -> Dict[str, Any]:
        """``mixup`` with the defaults (:data:`MIXUP_DEFAULTS`) filled in; the trainer reads these
        and the model card records them (``training.mixup``) when mixup is on."""
        return {**MIXUP_DEFAULTS, **copy.deepcopy(self.mixup)}

    @property
    def deep_supervision_settings(self) -> Dict[str, Any]:
        """``deep_supervision`` with the defaults (:data:`DEEP_SUPERVISION_DEFAULTS`) filled in and
        ``levels`` resolved for this config's U-Net; the trainers read these, the checkpoint's
        config fingerprint and the model card (``training.deep_supervision``) record them."""
        return deep_supervision_settings(self.deep_supervision, list(self.features))

    @property
    def context_labels_settings(self) -> Dict[str, Any]:
        """``context_labels`` with the defaults (:data:`CONTEXT_LABELS_DEFAULTS`) filled in and
        ``generator_features`` resolved; the trainer reads these, the checkpoint's config
        fingerprint and the model card (``training.context_labels``) record them."""
        return context_labels_settings(self.context_labels, list(self.features))

    @property
    def semi_settings(self) -> Dict[str, Any]:
        """``semi_supervised`` with the defaults filled in (validated with the config)."""
        return _filled_semi_settings(self.semi_supervised)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)
