"""Is this input one the model was made for? Checks against the training data's profile.

A model only knows the inputs it was trained on. At training time :func:`input_profile`
records in the model card (``input_profile``) what the training images looked like:

* the distribution of intensities after the model's own normalisation, on its working grid
  (quantiles at :data:`QUANTILE_LEVELS`): its median over the training cases and how far the
  training cases themselves lie from it (a mean absolute quantile difference, i.e. the
  1-Wasserstein distance between two distributions estimated at those levels);
* the voxel spacing and the field of view (mm per canonical axis x, y, z), min and max;
* the volume of every class (ml) in the training label maps, min and max over the cases that
  contain it, and the fraction of cases that contain it.

At inference :func:`check_input` (before the network) and :func:`check_prediction` (after it)
compare a volume with that profile. Each finding names what differs, by how much and the
training range. A spacing, field-of-view or predicted-volume finding (severity ``"warning"``)
marks the classes it concerns "unreliable" in the label-free estimate (:func:`mark_unreliable`):
the confidence of a network on an input unlike its training data says nothing about its
accuracy. An intensity distribution unlike training is a ``"caution"``: it is said wherever
warnings are (CLI, panel, ``input_checks.json``) and listed in each row's ``cautions``, but it
does not mark classes unreliable on its own. Measured on real patients
(Testing/Benchmarks/shift_estimation.py, the flag rules chosen on 20 validation patients under
eight acquisition shifts): marking on the intensity check alone raised false alarms from 1 % to
19 % (held-out patients: 21 %) and found 1 more failure in 51 (held-out: 8 in 119), all of them
ones the confidence or the stability check can catch; a gamma-0.5 contrast change, which the
model segments as well as the originals, moved 60 % of the patients past the margin. A constant
volume is refused outright (:func:`refuse_blank`): no model can be meant for it.

The margins are fixed a priori and are the same for every model (they are not fitted to any
data set): intensity distance above :data:`INTENSITY_MARGIN` times the largest distance of a
training case; spacing coarser than :data:`SCALE_MARGIN` times the coarsest training spacing;
a field of view more than :data:`SCALE_MARGIN` times larger, or less than 1/:data:`SCALE_MARGIN`
times smaller, than any training case's; a predicted class volume outside the training range
widened by the factor :data:`SCALE_MARGIN` on both sides, or no voxel of a class that every
training case contains.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .images import ImageError

__all__ = ["QUANTILE_LEVELS", "INTENSITY_MARGIN", "SCALE_MARGIN", "PROFILE_VERSION", "Finding", "case_profile",
           "input_profile", "profile_from_cases",
           "normalised_quantiles", "geometry", "check_input", "check_prediction", "mark_unreliable", "refuse_blank",
           "validate_profile"]

PROFILE_VERSION = 1
#: Quantile levels of the normalised intensity distribution.
QUANTILE_LEVELS: Tuple[float, ...] = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
#: An input's intensity distance may exceed the largest training case's by this factor.
INTENSITY_MARGIN = 1.5
#: Spacing, field of view and class volumes may differ from the training range by this factor.
SCALE_MARGIN = 2.0
_MAX_SAMPLE = 1 << 20  # voxels used for the quantiles (evenly strided)


@dataclass(frozen=True)
class Finding:
    """One way an input differs from the training data.

    ``classes``: the class names it concerns (``None``: every foreground class);
    ``short``: a few words for a table cell; ``severity``: ``"warning"`` (marks those classes
    unreliable), ``"caution"`` (said like a warning and listed in the rows' ``cautions``, marks
    nothing on its own) or ``"info"`` (said, marks nothing)."""

    kind: str
    message: str
    short: str
    classes: Optional[Tuple[str, ...]] = None
    severity: str = "warning"
    values: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "short": self.short,
                "classes": None if self.classes is None else list(self.classes), "severity": self.severity,
                "values": dict(self.values)}


def normalised_quantiles(normalised: np.ndarray) -> np.ndarray:
    """Quantiles (:data:`QUANTILE_LEVELS`) of a volume on the model's working grid after the
    model's normalisation (what the network sees), from an evenly strided sample."""
    flat = np.asarray(normalised).reshape(-1)
    step = max(1, int(math.ceil(flat.size / _MAX_SAMPLE)))
    return np.quantile(flat[::step].astype(np.float64), QUANTILE_LEVELS)


def geometry(image: sitk.Image) -> Tuple[List[float], List[float]]:
    """(spacing, field of view) in mm per world axis (x, y, z; the canonical axes of
    :func:`imbalanceseglib.images.to_canonical`), read from the header without touching voxels."""
    direction = np.abs(np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3))
    axis_of = [int(np.argmax(direction[j])) for j in range(3)]  # image axis closest to world axis j
    if sorted(axis_of) != [0, 1, 2]:  # oblique by 45 degrees: keep the image's own axis order
        axis_of = [0, 1, 2]
    spacing = [float(image.GetSpacing()[i]) for i in axis_of]
    return spacing, [float(image.GetSize()[i] * s) for i, s in zip(axis_of, spacing)]


def _distance(q: np.ndarray, reference: Sequence[float]) -> float:
    return float(np.mean(np.abs(np.asarray(q, dtype=np.float64) - np.asarray(reference, dtype=np.float64))))


def _r(v: float) -> float:
    return float(f"{v:.6g}")


def case_profile(image: sitk.Image, normalised: np.ndarray, labels: sitk.Image,
                 class_names: Sequence[str]) -> Dict[str, Any]:
    """What :func:`input_profile` needs of one training case (small, kept on the prepared case by
    :func:`imbalanceseglib.training_data.prepare_case`): the quantiles of ``normalised`` (the
    image on the working grid after normalisation), the spacing and field of view of ``image``
    and the volume (ml) of each class in ``labels`` (class indices, the image's geometry)."""
    spacing, extent = geometry(image)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    counts = np.bincount(sitk.GetArrayViewFromImage(labels).reshape(-1).astype(np.int64), minlength=len(class_names))
    return {"quantiles": [float(v) for v in normalised_quantiles(normalised)], "spacing": spacing, "extent": extent,
            "class_ml": {name: float(counts[c]) * voxel_ml for c, name in enumerate(class_names) if c > 0}}


def profile_from_cases(profiles: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """The ``input_profile`` card entry from the training cases' :func:`case_profile`."""
    if not profiles:
        raise ValueError("input_profile needs at least one training case")
    names = list(profiles[0]["class_ml"])
    q = np.array([p["quantiles"] for p in profiles], dtype=np.float64)
    median = np.median(q, axis=0)
    dists = [_distance(row, median) for row in q]
    spacings = np.array([p["spacing"] for p in profiles], dtype=np.float64)
    extents = np.array([p["extent"] for p in profiles], dtype=np.float64)
    volumes = {name: [float(p["class_ml"][name]) for p in profiles if p["class_ml"].get(name, 0.0) > 0]
               for name in names}
    n = len(profiles)
    return {
        "version": PROFILE_VERSION, "cases": n,
        "intensity": {"levels": list(QUANTILE_LEVELS), "median_quantiles": [_r(v) for v in median],
                      "max_distance": _r(max(dists)), "median_distance": _r(float(np.median(dists)))},
        "spacing_mm": {"min": [_r(v) for v in spacings.min(axis=0)], "max": [_r(v) for v in spacings.max(axis=0)]},
        "extent_mm": {"min": [_r(v) for v in extents.min(axis=0)], "max": [_r(v) for v in extents.max(axis=0)]},
        "class_volume_ml": {name: ({"min": _r(min(v)), "max": _r(max(v)), "present_fraction": _r(len(v) / n)}
                                   if v else {"min": None, "max": None, "present_fraction": 0.0})
                            for name, v in volumes.items()},
    }


def input_profile(images: Sequence[sitk.Image], normalised: Sequence[np.ndarray], label_maps: Sequence[sitk.Image],
                  class_names: Sequence[str]) -> Dict[str, Any]:
    """The ``input_profile`` card entry of the training data: the images (their geometry),
    the same images on the working grid after normalisation (what the network was trained
    on) and their label maps (class indices 0..C-1, same geometry as the images)."""
    if not images or not len(images) == len(normalised) == len(label_maps):
        raise ValueError("input_profile needs the training images, their normalised arrays and their label maps")
    return profile_from_cases([case_profile(i, a, lab, class_names) for i, a, lab in zip(images, normalised, label_maps)])


def _finite_list(value: Any, length: int, where: str) -> None:
    if (not isinstance(value, list) or len(value) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise ValueError(f"{where} must be {length} finite numbers")


def validate_profile(profile: Any, class_names: Sequence[str]) -> Dict[str, Any]:
    """Check a card's ``input_profile`` (types, lengths, finite numbers); raise ValueError naming the field."""
    if not isinstance(profile, dict):
        raise ValueError("input_profile must be an object")
    if profile.get("version") != PROFILE_VERSION:
        raise ValueError(f"input_profile version {profile.get('version')!r} is not supported")
    inten = profile.get("intensity")
    if not isinstance(inten, dict):
        raise ValueError("input_profile.intensity must be an object")
    _finite_list(inten.get("levels"), len(QUANTILE_LEVELS), "input_profile.intensity.levels")
    if [float(v) for v in inten["levels"]] != list(QUANTILE_LEVELS):
        raise ValueError("input_profile.intensity.levels differ from this library's quantile levels")
    _finite_list(inten.get("median_quantiles"), len(QUANTILE_LEVELS), "input_profile.intensity.median_quantiles")
    _finite_list([inten.get("max_distance")], 1, "input_profile.intensity.max_distance")
    for key in ("spacing_mm", "extent_mm"):
        sec = profile.get(key)
        if not isinstance(sec, dict):
            raise ValueError(f"input_profile.{key} must be an object")
        for bound in ("min", "max"):
            _finite_list(sec.get(bound), 3, f"input_profile.{key}.{bound}")
            if min(sec[bound]) <= 0:
                raise ValueError(f"input_profile.{key}.{bound} must be positive")
    vols = profile.get("class_volume_ml")
    if not isinstance(vols, dict):
        raise ValueError("input_profile.class_volume_ml must be an object")
    for name, v in vols.items():
        if name not in class_names or not isinstance(v, dict):
            raise ValueError(f"input_profile.class_volume_ml names {name!r}, which is not a class of the model")
        if v.get("min") is not None:
            _finite_list([v.get("min"), v.get("max"), v.get("present_fraction")], 3,
                         f"input_profile.class_volume_ml[{name!r}]")
    return profile


def refuse_blank(image: sitk.Image, what: str = "input volume") -> None:
    """Refuse a constant volume (every voxel the same value): there is nothing to segment."""
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(image)
    if stats.GetMinimum() == stats.GetMaximum() and np.isfinite(sitk.GetArrayViewFromImage(image)).all():
        # (NaN or infinite voxels are named by the normalisation's own check instead)
        raise ImageError(f"{what} is constant (every voxel is {stats.GetMinimum():g}): there is nothing to "
                         "segment; check that the right volume was chosen and that it loaded completely")


def _axes(values: Sequence[float]) -> str:
    return " x ".join(f"{v:.3g}" for v in values)


def check_input(image: sitk.Image, profile: Optional[Mapping[str, Any]], normalised: np.ndarray) -> List[Finding]:
    """Findings on ``image`` before the network runs; ``normalised``: the image on the model's
    working grid after its normalisation (what the network gets). Callers refuse a constant
    volume first (:func:`refuse_blank`)."""
    if profile is None:
        return [Finding("no_profile", "the model card has no input profile (the model was trained before "
                        "ImbalanceSeg recorded one): the input was not compared with the training data",
                        "not checked against the training data", severity="info")]
    findings: List[Finding] = []
    inten = profile["intensity"]
    q = normalised_quantiles(normalised)
    d = _distance(q, inten["median_quantiles"])
    limit = INTENSITY_MARGIN * float(inten["max_distance"])
    if d > limit:
        findings.append(Finding(
            "intensity", f"the intensity distribution (after the model's normalisation) is unlike every training "
            f"case: distance {d:.3g} from the training median, training cases up to {float(inten['max_distance']):.3g} "
            f"(limit {limit:.3g}); another modality, sequence or body region?",
            f"intensities unlike training (distance {d:.2g} > {limit:.2g})", severity="caution",
            values={"distance": d, "limit": limit}))
    spacing, extent = geometry(image)
    sp_max = [float(v) for v in profile["spacing_mm"]["max"]]
    coarse = [i for i in range(3) if spacing[i] > SCALE_MARGIN * sp_max[i]]
    if coarse:
        findings.append(Finding(
            "spacing", f"voxel spacing {_axes(spacing)} mm is much coarser than any training case "
            f"(at most {_axes(sp_max)} mm): small structures may be lost",
            f"spacing {_axes(spacing)} mm, training up to {_axes(sp_max)} mm", values={"spacing": spacing}))
    ex_min = [float(v) for v in profile["extent_mm"]["min"]]
    ex_max = [float(v) for v in profile["extent_mm"]["max"]]
    larger = [i for i in range(3) if extent[i] > SCALE_MARGIN * ex_max[i]]
    smaller = [i for i in range(3) if extent[i] * SCALE_MARGIN < ex_min[i]]
    if larger or smaller:
        how = "larger" if larger else "smaller"
        findings.append(Finding(
            "field_of_view", f"the field of view {_axes(extent)} mm is much {how} than any training case's "
            f"({_axes(ex_min)} to {_axes(ex_max)} mm): the model never saw an image like this",
            f"field of view {_axes(extent)} mm, training {_axes(ex_min)} to {_axes(ex_max)} mm",
            values={"extent": extent}))
    return findings


def check_prediction(predicted_ml: Mapping[str, float], profile: Optional[Mapping[str, Any]]) -> List[Finding]:
    """Findings on the predicted volume of each class against the training range."""
    if profile is None:
        return []
    findings = []
    for name, ml in predicted_ml.items():
        rng = profile["class_volume_ml"].get(name)
        if rng is None or rng.get("min") is None:
            continue
        lo, hi, present = float(rng["min"]), float(rng["max"]), float(rng["present_fraction"])
        if ml <= 0:
            if present >= 1.0:
                findings.append(Finding(
                    "volume", f"{name}: nothing predicted, but every training case contains it "
                    f"({lo:.3g} to {hi:.3g} ml)", f"none predicted; every training case has {lo:.3g}-{hi:.3g} ml",
                    classes=(name,), values={"predicted_ml": ml}))
        elif ml > SCALE_MARGIN * hi or ml * SCALE_MARGIN < lo:
            findings.append(Finding(
                "volume", f"{name}: predicted {ml:.3g} ml, outside anything seen in training ({lo:.3g} to {hi:.3g} ml "
                f"in the {present:.0%} of training cases that contain it)",
                f"{ml:.3g} ml predicted, training {lo:.3g}-{hi:.3g} ml", classes=(name,), values={"predicted_ml": ml}))
    return findings


def mark_unreliable(rows: Sequence[Dict[str, Any]], class_names: Sequence[str], findings: Sequence[Finding]) -> None:
    """Mark the estimate rows (one per class, background first) the warnings concern: their
    ``state`` becomes ``"unreliable: <reasons>"`` and ``reasons`` lists the findings' short texts;
    the cautions that concern a row are listed in its ``cautions`` (its state is kept)."""
    for c, row in enumerate(rows):
        if c == 0:
            continue
        concern = [f for f in findings if f.classes is None or class_names[c] in f.classes]
        reasons = [f.short for f in concern if f.severity == "warning"]
        cautions = [f.short for f in concern if f.severity == "caution"]
        if cautions:
            row["cautions"] = cautions
        if reasons:
            row["reasons"] = reasons
            row["state"] = "unreliable: " + "; ".join(reasons)
