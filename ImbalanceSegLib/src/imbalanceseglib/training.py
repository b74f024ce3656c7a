"""Supervised training with rare-class-aware patch sampling, atomic checkpoints and resume.

Imbalance-aware methods are selected by name (``TrainConfig.method``, see
:data:`METHOD_PRESETS`) or configured field by field: the loss
(:func:`imbalanceseglib.losses.build_loss`, including the asymmetric focal and
large-margin losses), class weights that follow training (DisW/DifW/CDifW,
:mod:`imbalanceseglib.imbalance`), asymmetric mixup and asymmetric adversarial
training, and class-specific augmentation (:mod:`imbalanceseglib.augment`).
One "rare" class mask (``rare_classes`` by name, or every foreground class under
``rare_threshold`` of the training voxels) drives all of them.

``train`` takes preprocessed cases and a :class:`TrainConfig`, writes
``checkpoint.pt`` (atomically, loadable with ``weights_only=True``) every
``checkpoint_every`` iterations, resumes from it when asked, and ends with a
model bundle whose card records the method, hyper-parameters, class voxel
fractions of the training data and per-class validation Dice.
"""

from __future__ import annotations

import copy
import json
import os
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from . import __version__
from .atomic import atomic_path
from .bundle import BUNDLE_SUFFIX, save_bundle
from .images import (check_image, check_same_geometry, needs_resampling, normalise_intensities,
                     resample_to_spacing, to_canonical)
from .inference import sliding_window_logits
from .augment import ClassSpecificAugmenter, policy_from_config
from .imbalance import (ConfidenceDifficultyWeights, DifficultyWeights, DistributionWeights,
                        asymmetric_adversarial_input, asymmetric_mixup, class_voxel_counts as batch_voxel_counts,
                        per_class_batch_dice, per_class_confidence)
from .losses import DEFAULT_LOSS, build_loss, resolve_rare_mask
from .metrics import overlap_metrics
from . import distributed as dd
from . import events as ev
from .networks import build_network, set_activation_checkpointing

LogFn = Callable[[str], None]

from .presets import METHOD_PRESETS  # noqa: E402  (named training methods; torch-free, see presets.py)


@dataclass
class TrainConfig:
    name: str
    classes: List[Dict[str, Any]]
    target_spacing: List[float]
    patch_size: List[int] = field(default_factory=lambda: [64, 64, 64])
    features: List[int] = field(default_factory=lambda: [16, 32, 64, 128])
    normalization: Dict[str, Any] = field(default_factory=lambda: {
        "scheme": "percentile_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5})
    loss: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_LOSS))
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
    modality: str = "MR T1"
    # Imbalance-aware methods (see METHOD_PRESETS; ``method`` is recorded in the model card).
    method: str = "dice_ce"
    rare_classes: Optional[List[str]] = None   # names; None: every foreground class under rare_threshold
    rare_threshold: float = 0.01
    class_weighting: Dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    mixup: Dict[str, Any] = field(default_factory=lambda: {"probability": 0.0, "alpha": 0.3, "margin": 0.5})
    adversarial: Dict[str, Any] = field(default_factory=lambda: {"probability": 0.0, "epsilon": 10.0,
                                                                 "weight": 1.0})
    augmentation: Dict[str, Any] = field(default_factory=lambda: {"default": "none", "rare": "none"})
    # Semi-supervised training (imbalanceseglib.semi_supervised); method "none" is supervised.
    semi_supervised: Dict[str, Any] = field(default_factory=lambda: {"method": "none"})
    # Recompute block activations in the backward pass (less memory for large patches).
    activation_checkpointing: bool = False

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        """Config from JSON; a ``method`` naming a preset fills the fields the dict leaves out."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config fields: {unknown}")
        d = copy.deepcopy(d)
        method = d.get("method", "dice_ce")
        if method not in METHOD_PRESETS:
            raise ValueError(f"unknown training method {method!r}; known: {', '.join(METHOD_PRESETS)}")
        for key, value in METHOD_PRESETS[method].items():
            d.setdefault(key, copy.deepcopy(value))
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
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
        if self.method not in METHOD_PRESETS:
            raise ValueError(f"unknown training method {self.method!r}; known: {', '.join(METHOD_PRESETS)}")
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
        for key in ("default", "rare"):
            policy_from_config(self.augmentation.get(key, "none"))  # raises naming the bad key
        from .semi_supervised import settings as semi_settings
        ss = semi_settings(self.semi_supervised)
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

    @property
    def is_semi_supervised(self) -> bool:
        return self.semi_supervised.get("method", "none") != "none"

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class Case:
    """One preprocessed training case: normalised image and label arrays (z, y, x)."""

    image: np.ndarray
    labels: np.ndarray
    name: str = ""
    # Flat indices of the voxels of each class present in the case (for sampling).
    class_voxels: Dict[int, np.ndarray] = field(default_factory=dict)


def prepare_case(image: sitk.Image, labels: sitk.Image, config: TrainConfig, name: str = "") -> Case:
    """Apply the same geometric/intensity preprocessing as inference to one labelled case."""
    check_image(image, f"{name or 'training'} image", min_size=2)
    check_image(labels, f"{name or 'training'} labels")
    check_same_geometry(image, labels, name or "case")
    img = to_canonical(sitk.Cast(image, sitk.sitkFloat32))
    lab = to_canonical(sitk.Cast(labels, sitk.sitkUInt8))
    if needs_resampling(img, config.target_spacing):
        img = resample_to_spacing(img, config.target_spacing)
        lab = resample_to_spacing(lab, config.target_spacing, interpolator=sitk.sitkNearestNeighbor)
    arr = normalise_intensities(sitk.GetArrayViewFromImage(img), config.normalization)
    lab_arr = sitk.GetArrayFromImage(lab).astype(np.uint8)
    n_cls = len(config.classes)
    if lab_arr.max() >= n_cls:
        unknown = sorted(int(v) for v in np.unique(lab_arr) if v >= n_cls)
        raise ValueError(f"{name or 'case'}: label values {unknown} are not among the {n_cls} classes of the config")
    return make_case(arr, lab_arr, name)


def prepare_unlabeled_case(image: sitk.Image, config: TrainConfig, name: str = "") -> Case:
    """Preprocess an unlabelled image for semi-supervised training (same steps as inference).

    The returned case has an all-background label array that is never used as labels: the
    semi-supervised trainer samples only its image, at random positions."""
    check_image(image, f"{name or 'unlabelled'} image", min_size=2)
    img = to_canonical(sitk.Cast(image, sitk.sitkFloat32))
    if needs_resampling(img, config.target_spacing):
        img = resample_to_spacing(img, config.target_spacing)
    arr = normalise_intensities(sitk.GetArrayViewFromImage(img), config.normalization)
    return Case(image=np.ascontiguousarray(arr, dtype=np.float32), labels=np.zeros(arr.shape, dtype=np.uint8),
                name=name, class_voxels={})


def make_case(image: np.ndarray, labels: np.ndarray, name: str = "") -> Case:
    flat = labels.ravel()
    class_voxels = {int(c): np.flatnonzero(flat == c) for c in np.unique(flat) if c != 0}
    return Case(image=np.ascontiguousarray(image, dtype=np.float32),
                labels=np.ascontiguousarray(labels, dtype=np.uint8), name=name, class_voxels=class_voxels)


class PatchSampler:
    """Draws (image, label) patches; a fraction is centred on a uniformly chosen present class."""

    def __init__(self, cases: Sequence[Case], patch_size: Sequence[int], foreground_fraction: float,
                 augmenter: Optional[ClassSpecificAugmenter] = None):
        self.cases = list(cases)
        self.patch = np.array(patch_size, dtype=int)
        self.fg = float(foreground_fraction)
        self.augmenter = augmenter

    def _crop(self, arr: np.ndarray, start: np.ndarray, fill: float) -> np.ndarray:
        out = np.full(tuple(self.patch), fill, dtype=arr.dtype)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(start + self.patch, arr.shape)
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        out[tuple(slice(a, b) for a, b in zip(dst_lo, dst_hi))] = arr[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
        return out

    def sample(self, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray, Optional[int], str]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        shape = np.array(case.labels.shape)
        chosen: Optional[int] = None
        if case.class_voxels and rng.random() < self.fg:
            classes = sorted(case.class_voxels)
            chosen = classes[int(rng.integers(len(classes)))]
            idx = case.class_voxels[chosen][int(rng.integers(len(case.class_voxels[chosen])))]
            centre = np.array(np.unravel_index(idx, case.labels.shape))
            start = centre - self.patch // 2 + rng.integers(-self.patch // 4, self.patch // 4 + 1)
        else:
            start = np.array([int(rng.integers(min(0, s - p), max(0, s - p) + 1)) for s, p in zip(shape, self.patch)])
        # Keep the patch inside the volume when the volume is larger than the patch.
        start = np.where(shape >= self.patch, np.clip(start, 0, shape - self.patch), start)
        fill = float(case.image.min())
        img, lab = self._crop(case.image, start, fill), self._crop(case.labels, start, 0)
        if self.augmenter is not None:  # stronger policy for patches centred on a rare class
            img, lab = self.augmenter(img, lab, chosen, rng, background=fill)
        return img, lab, chosen, case.name

    def batch(self, rng: np.random.Generator, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """A batch of patches; ``last_cases`` names the cases they came from."""
        samples = [self.sample(rng) for _ in range(n)]
        self.last_cases = [s[3] for s in samples]
        return (torch.from_numpy(np.stack([s[0] for s in samples])[:, None]),
                torch.from_numpy(np.stack([s[1] for s in samples])[:, None].astype(np.int64)))


def class_voxel_counts(cases: Sequence[Case], n_classes: int) -> np.ndarray:
    counts = np.zeros(n_classes, dtype=np.int64)
    for c in cases:
        counts += np.bincount(c.labels.ravel(), minlength=n_classes)[:n_classes]
    return counts


def check_training_data(config: "TrainConfig", train_cases: Sequence[Case]) -> np.ndarray:
    """Refuse training data that cannot teach every class, naming the problem.

    Empty label maps (cases without foreground) and cases with a single class are
    fine on their own; but each foreground class of the config must appear in at
    least one training case, and the images must be finite. Returns the voxel
    count of each class over the training cases.
    """
    if not train_cases:
        raise ValueError("no training cases")
    for case in train_cases:
        if not np.isfinite(case.image).all():
            raise ValueError(f"training case {case.name or '?'} has NaN or infinite intensities")
    counts = class_voxel_counts(train_cases, len(config.classes))
    if counts[1:].sum() == 0:
        raise ValueError("every training label map is empty (background only); nothing to learn")
    missing = [config.classes[c]["name"] for c in range(1, len(config.classes)) if counts[c] == 0]
    if missing:
        raise ValueError(f"classes {missing} have no voxels in any training case; add labelled cases "
                         "for them or remove them from the config")
    return counts


def evaluate_cases(network: torch.nn.Module, cases: Sequence[Case], config: TrainConfig) -> Dict[str, Any]:
    """Per-class Dice/sensitivity/precision (mean over cases where defined)."""
    n_cls = len(config.classes)
    per_case = []
    for case in cases:
        logits = sliding_window_logits(network, case.image, config.patch_size, overlap=0.5)
        pred = logits[0].argmax(0).numpy().astype(np.uint8)
        per_case.append(overlap_metrics(pred, case.labels, n_cls))
    summary: Dict[str, Any] = {}
    for c in range(1, n_cls):
        entry: Dict[str, Any] = {}
        for key in ("dice", "sensitivity", "precision"):
            vals = [m[c][key] for m in per_case if m[c][key] is not None]
            entry[key] = float(np.mean(vals)) if vals else None
            entry[f"{key}_std"] = float(np.std(vals)) if vals else None
        entry["cases_defined"] = sum(1 for m in per_case if m[c]["dice"] is not None)
        summary[config.classes[c]["name"]] = entry
    return {"per_class": summary, "cases": len(cases)}


def make_class_weighter(settings: Dict[str, Any], n_classes: int):
    """DisW / DifW / CDifW weighter from ``TrainConfig.class_weighting`` (None for ``none``)."""
    opts = {k: v for k, v in settings.items() if k != "method"}
    method = settings.get("method", "none")
    if method == "none":
        return None
    if method == "disw":
        return DistributionWeights(n_classes, **opts)
    if method == "difw":
        return DifficultyWeights(n_classes, **opts)
    if method == "cdifw":
        return ConfidenceDifficultyWeights(n_classes, **opts)
    raise ValueError(f"unknown class weighting {method!r}")


def validation_step(network, val_cases: Sequence[Case], config: TrainConfig, done: int,
                    history: List[Dict[str, Any]], log: Callable[[str], None], label: str = "val dice",
                    events: Optional[ev.EventFn] = None) -> None:
    """Per-class validation Dice during training: appended to ``history``, logged, and sent as a
    ``validation`` event (:mod:`imbalanceseglib.events`) when ``events`` is given."""
    network.eval()
    metrics = evaluate_cases(network, val_cases, config)
    network.train()
    history.append({"iteration": done, "val": metrics["per_class"]})
    log(f"  {label}: " + "  ".join(f"{k}={v['dice']:.3f}" if v["dice"] is not None else f"{k}=absent"
                                   for k, v in metrics["per_class"].items()))
    if events is not None:
        events(ev.validation(done, {k: v["dice"] for k, v in metrics["per_class"].items()}))


def _quiet(message: str) -> None:
    pass


def update_class_weighter(weighter, logits: torch.Tensor, labels: torch.Tensor) -> None:
    """Feed one batch (detached logits, integer labels (N,1,...)) to a weighter."""
    if isinstance(weighter, DistributionWeights):
        weighter.update(batch_voxel_counts(labels, logits.shape[1]))
    elif isinstance(weighter, ConfidenceDifficultyWeights):
        weighter.update(per_class_batch_dice(logits, labels), per_class_confidence(logits, labels))
    elif isinstance(weighter, DifficultyWeights):
        weighter.update(per_class_batch_dice(logits, labels))


def _save_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def build_training_loss(config: TrainConfig, names: List[str], fractions: List[float]):
    """The configured loss, the rare class names and the rare mask (from the training voxel fractions)."""
    rare_mask = resolve_rare_mask(names, fractions, config.rare_classes, config.rare_threshold)
    rare_names = [n for n, r in zip(names, rare_mask.tolist()) if r]
    loss_settings = dict(config.loss)
    if loss_settings.get("name", "").startswith("asym"):
        loss_settings.setdefault("rare_classes", rare_names)
    return build_loss(loss_settings, names, fractions), rare_names, rare_mask


def build_augmenter(config: TrainConfig, rare_mask: torch.Tensor) -> Optional[ClassSpecificAugmenter]:
    aug = config.augmentation
    if aug.get("default", "none") == "none" and aug.get("rare", "none") == "none":
        return None
    return ClassSpecificAugmenter(policy_from_config(aug.get("default", "none")),
                                  policy_from_config(aug.get("rare", "none")),
                                  [i for i, r in enumerate(rare_mask.tolist()) if r],
                                  spacing=tuple(reversed(config.target_spacing)))


def training_card(config: TrainConfig, network_entry: Dict[str, Any], validation: Dict[str, Any],
                  rare_names: List[str], voxel_counts: np.ndarray, n_train: int, n_val: int, total_time: float,
                  history: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The model card written at the end of training."""
    return {
        "name": config.name,
        "description": config.description,
        "network": network_entry,
        "classes": config.classes,
        "preprocessing": {"modality": config.modality, "target_spacing": list(config.target_spacing),
                          "patch_size": list(config.patch_size), "normalization": config.normalization,
                          "orientation": "LPS"},
        "calibration": {"method": "none"},
        "validation": validation,
        "training": {
            "method": config.method,
            "loss": config.loss.get("name", "dice_ce"),
            "rare_classes": rare_names,
            "seconds_per_iteration": round(total_time / max(1, config.iterations), 4),
            "config": config.to_dict(),
            "class_voxel_fractions": dict(zip([c["name"] for c in config.classes],
                                              (voxel_counts / voxel_counts.sum()).tolist())),
            "train_cases": n_train, "val_cases": n_val,
            "wall_time_s": round(total_time, 1), "history": history,
            "software": {"imbalanceseglib": __version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        },
    }


def train(config: TrainConfig, train_cases: Sequence[Case], val_cases: Sequence[Case], out_dir: Path,
          resume: bool = True, log: LogFn = print, extra_card: Optional[Dict[str, Any]] = None,
          unlabeled_cases: Optional[Sequence[Case]] = None, events: Optional[ev.EventFn] = None) -> Path:
    """Train, checkpoint and write ``<out_dir>/<name>.imbseg``; returns the bundle path.

    Semi-supervised methods (``config.semi_supervised``) also take ``unlabeled_cases``
    (:func:`prepare_unlabeled_case`) and train two networks
    (:func:`imbalanceseglib.semi_supervised.train_semi_supervised`).

    ``events`` (optional, see :mod:`imbalanceseglib.events`) receives an ``iteration`` event
    with each logged loss, a ``validation`` event with each validation Dice, an ``artifact``
    event for each checkpoint and for the bundle; under torchrun only rank 0 sends them."""
    config.validate()
    if config.is_semi_supervised:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("semi-supervised training runs in one process; distributed training (torchrun) "
                             "supports the supervised methods")
        from .semi_supervised import train_semi_supervised
        return train_semi_supervised(config, train_cases, unlabeled_cases or [], val_cases, out_dir,
                                     resume=resume, log=log, extra_card=extra_card, events=events)
    if unlabeled_cases:
        raise ValueError(f"unlabelled cases were given but method {config.method!r} is supervised; "
                         "choose a semi-supervised method (cps, cps_weighted, double_mix)")
    voxel_counts = check_training_data(config, train_cases)
    ctx = dd.init_from_env()
    if ctx.active:
        dd.local_slice(config.batch_size, ctx)  # refuses a batch the ranks cannot share evenly
        if not ctx.is_main:
            log, events = _quiet, None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    n_cls = len(config.classes)
    torch.manual_seed(config.seed)
    network = build_network("UNet3D", {"in_channels": 1, "out_channels": n_cls, "features": list(config.features)})
    set_activation_checkpointing(network, config.activation_checkpointing)
    dd.broadcast_parameters(network, ctx)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: (1 - it / config.iterations) ** 0.9)  # nnU-Net's polynomial decay
    names = [c["name"] for c in config.classes]
    fractions = (voxel_counts / voxel_counts.sum()).tolist()
    loss_fn, rare_names, rare_mask = build_training_loss(config, names, fractions)
    loss_settings = config.loss
    weighter = make_class_weighter(config.class_weighting, n_cls)
    if isinstance(weighter, DistributionWeights):
        weighter.update(torch.as_tensor(voxel_counts))  # start from the training set's distribution
    aug = config.augmentation
    augmenter = build_augmenter(config, rare_mask)
    mix_p = float(config.mixup.get("probability", 0.0))
    adv_p = float(config.adversarial.get("probability", 0.0))
    log(f"method {config.method}: loss {loss_settings.get('name')}, rare classes {rare_names or 'none'}, "
        f"class weights {config.class_weighting.get('method', 'none')}, mixup p={mix_p:g}, adversarial p={adv_p:g}, "
        f"augmentation {aug.get('default', 'none')}/{aug.get('rare', 'none')}")
    sampler = PatchSampler(train_cases, config.patch_size, config.foreground_fraction, augmenter)
    rng = np.random.default_rng(config.seed)
    history: List[Dict[str, Any]] = []
    start_it = 0
    elapsed_before = 0.0
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ck = _load_checkpoint(ckpt_path)
        if ck.get("config") != json.dumps(config.to_dict(), sort_keys=True):
            raise ValueError(f"{ckpt_path} was written with a different config; use another output folder or resume=False")
        network.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        torch.set_rng_state(ck["torch_rng"])
        rng.bit_generator.state = json.loads(ck["numpy_rng"])
        history = json.loads(ck["history"])
        if weighter is not None:
            weighter.load_state_dict(json.loads(ck["class_weights"]))
        start_it = int(ck["iteration"])
        elapsed_before = float(ck["elapsed"])
        log(f"resuming from {ckpt_path} at iteration {start_it}/{config.iterations}")

    def checkpoint(it: int, elapsed: float) -> None:
        if not ctx.is_main:
            dd.barrier(ctx)
            return
        _save_checkpoint(ckpt_path, {
            "model": network.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "numpy_rng": json.dumps(rng.bit_generator.state), "history": json.dumps(history),
            "iteration": it, "elapsed": elapsed, "config": json.dumps(config.to_dict(), sort_keys=True),
            "class_weights": json.dumps(weighter.state_dict() if weighter is not None else None)})
        dd.barrier(ctx)

    t_start = time.perf_counter()
    running = []
    last_checkpoint = start_it if ckpt_path.exists() else None
    network.train()
    for it in range(start_it, config.iterations):
        x, y = sampler.batch(rng, config.batch_size)
        target = y
        if mix_p > 0 and rng.random() < mix_p:
            x_b, y_b = sampler.batch(rng, config.batch_size)
            x, target, _ = asymmetric_mixup(x, y, x_b, y_b, rare_mask, alpha=float(config.mixup.get("alpha", 0.3)),
                                            margin=float(config.mixup.get("margin", 0.5)), rng=rng)
            y = target.argmax(1, keepdim=True)  # hard labels for the weights and the adversarial step
        # decided on the global batch, so every rank takes the same kind of step
        adversarial_step = adv_p > 0 and rng.random() < adv_p and bool(rare_mask[y.long()].any())
        if ctx.active:  # this rank's slice of the global batch
            part = dd.local_slice(config.batch_size, ctx)
            x, y, target = x[part], y[part], target[part]
        weights = weighter.weights if weighter is not None else None
        logits = network(x)
        loss = loss_fn(logits, target, class_weights=weights)
        if adversarial_step:
            x_adv = asymmetric_adversarial_input(network, x, y, rare_mask,
                                                 epsilon=float(config.adversarial.get("epsilon", 10.0)))
            loss = loss + float(config.adversarial.get("weight", 1.0)) * loss_fn(network(x_adv), target,
                                                                                  class_weights=weights)
        global_loss = dd.mean_scalar(loss, ctx)
        if not torch.isfinite(global_loss):
            kept = (f"the checkpoint of iteration {last_checkpoint} in {ckpt_path} is kept"
                    if last_checkpoint is not None else "no checkpoint had been written yet")
            raise FloatingPointError(
                f"loss became {loss.item()} at iteration {it + 1} (batch from cases "
                f"{', '.join(sampler.last_cases)}; non-finite input: {not bool(torch.isfinite(x).all())}, "
                f"non-finite network output: {not bool(torch.isfinite(logits).all())}); training stopped, {kept}. "
                "Lower the learning rate or check these cases.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dd.average_gradients(network, ctx)
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12.0)
        optimizer.step()
        scheduler.step()
        if weighter is not None:  # from the whole global batch on every rank
            update_class_weighter(weighter, dd.gather_batch(logits.detach(), ctx), dd.gather_batch(y, ctx))
        running.append(float(global_loss))
        done = it + 1
        elapsed = elapsed_before + time.perf_counter() - t_start
        if done % config.log_every == 0 or done == config.iterations:
            rate = (done - start_it) / max(1e-9, time.perf_counter() - t_start)
            eta = (config.iterations - done) / max(rate, 1e-9)
            entry = {"iteration": done, "loss": float(np.mean(running)), "elapsed_s": elapsed}
            if weighter is not None:
                entry["class_weights"] = [round(float(w), 4) for w in weighter.weights]
            history.append(entry)
            log(f"iter {done:>6}/{config.iterations}  loss {np.mean(running):.4f}  "
                f"{rate:.2f} it/s  eta {eta / 60:.1f} min"
                + (f"  weights {' '.join(f'{w:.2f}' for w in entry['class_weights'])}" if weighter is not None else ""))
            if events is not None:
                events(ev.iteration(done, config.iterations, entry["loss"]))
            running = []
        if val_cases and ctx.is_main and (done % config.val_every == 0 or done == config.iterations):
            validation_step(network, val_cases, config, done, history, log, events=events)
        if done % config.checkpoint_every == 0 or done == config.iterations:
            checkpoint(done, elapsed)
            last_checkpoint = done
            if events is not None:
                events(ev.artifact("checkpoint", ckpt_path))

    network.eval()
    bundle_path = out_dir / f"{config.name}{BUNDLE_SUFFIX}"
    if not ctx.is_main:
        dd.barrier(ctx)  # rank 0 writes the bundle
        return bundle_path
    validation = evaluate_cases(network, val_cases, config) if val_cases else {"per_class": {}, "cases": 0}
    total_time = elapsed_before + time.perf_counter() - t_start
    card = training_card(config, {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": n_cls,
                                                                "features": list(config.features)}},
                         validation, rare_names, voxel_counts, len(train_cases), len(val_cases), total_time, history)
    if ctx.active:
        card["training"]["processes"] = ctx.world
    if extra_card:
        card.update(copy.deepcopy(extra_card))
    path = save_bundle(bundle_path, card, network)
    if events is not None:
        events(ev.artifact("bundle", path))
    dd.barrier(ctx)
    return path
