"""Training cases and patch sampling, shared by the supervised and semi-supervised trainers.

:func:`prepare_case` applies the preprocessing of inference (canonical orientation,
resampling to the config's spacing, intensity normalisation) to a labelled case,
:func:`prepare_unlabeled_case` to an unlabelled image; :class:`PatchSampler` draws
training patches, a fraction of them centred on a voxel of a class drawn uniformly among
the classes present (nnU-Net-style foreground oversampling, per class so that rare classes
are seen as often as large ones), optionally through a class-specific augmenter
(:mod:`imbalanceseglib.augment`); :func:`check_training_data` refuses data that cannot teach
every class of the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from .augment import ClassSpecificAugmenter
from .images import (check_image, check_same_geometry, needs_resampling, normalise_intensities,
                     resample_to_spacing, to_canonical)
from .train_config import TrainConfig

__all__ = ["Case", "PatchSampler", "check_training_data", "class_voxel_counts", "make_case", "prepare_case",
           "prepare_unlabeled_case"]


@dataclass
class Case:
    """One preprocessed training case: normalised image and label arrays (z, y, x)."""

    image: np.ndarray
    labels: np.ndarray
    name: str = ""
    # Flat indices of the voxels of each class present in the case (for sampling).
    class_voxels: Dict[int, np.ndarray] = field(default_factory=dict)
    # What the card's input profile needs of this case (input_checks.case_profile; set by
    # prepare_case, None for arrays made by hand): train() records the profile when every
    # training case has one.
    profile: Optional[Dict[str, Any]] = None


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
    case = make_case(arr, lab_arr, name)
    from .input_checks import case_profile
    case.profile = case_profile(image, case.image, labels, [c["name"] for c in config.classes])
    return case


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
    """Draws (image, label) patches; a fraction is centred on a uniformly chosen present class.

    Where a patch reaches past the volume it is padded with ``pad_value`` (normalised intensity),
    0 by default: the value inference pads with (MONAI's sliding window and the streaming path
    pad with zeros), so the network sees the same border in training as in use. ``None`` pads
    with the case minimum (what training did before 2026-12-02; the validation Dice of a model
    trained that way moved erratically, see Testing/Benchmarks/reports/training_speed.md).
    The augmentation's bias field still multiplies about the case minimum (zero signal)."""

    pad_value: Optional[float] = 0.0

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
        background = float(case.image.min())
        fill = background if self.pad_value is None else float(self.pad_value)
        img, lab = self._crop(case.image, start, fill), self._crop(case.labels, start, 0)
        if self.augmenter is not None:  # stronger policy for patches centred on a rare class
            img, lab = self.augmenter(img, lab, chosen, rng, background=background)
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

