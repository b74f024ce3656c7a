"""Sliding-window inference that keeps the per-class probabilities.

``predict`` takes a SimpleITK image in any orientation and spacing, applies the
bundle's preprocessing (canonical axis order, target spacing, intensity
normalisation), runs the network with Gaussian-blended sliding windows (MONAI),
applies the card's calibration, and returns per-class probabilities, the label
map and a normalised-entropy uncertainty map on the *input* grid, plus the
label-free per-class performance estimate (``performance``) computed from the
logits on the working grid with the card's calibration (plain confidence when
the card has none; see :mod:`imbalanceseglib.estimation`). The card is read once
into its typed view (:attr:`~imbalanceseglib.bundle.ModelBundle.model_card`) and its
calibration once into an estimator (:func:`imbalanceseglib.estimation.estimator_from_card`).

Uncertainty is the Shannon entropy of the class probabilities divided by its
maximum, u = -sum_c p_c log p_c / log C, in [0, 1]. Optional test-time
augmentation with per-class merging is :mod:`imbalanceseglib.tta` (Li et al.,
IEEE TMI 2023).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from monai.inferers import sliding_window_inference

from .bundle import BundleError, ModelBundle
from .card import DEFAULT_FEATURES
from .estimation import CaseEstimate, PerformanceEstimator, estimator_from_card
from .images import (ImageError, available_memory_bytes, check_image, check_same_geometry, format_bytes,
                     image_from_array, needs_resampling, normalise_intensities, orientation_code, resample_to_spacing,
                     resampled_size, to_canonical)
from .input_checks import refuse_blank

ProgressCallback = Callable[[str, float], None]


def _noop_progress(stage: str, fraction: float) -> None:
    pass


@dataclass
class Prediction:
    """Per-class probabilities (C, z, y, x), labels and uncertainty on the input grid."""

    probabilities: np.ndarray
    labels: np.ndarray
    uncertainty: np.ndarray
    reference: sitk.Image
    class_names: List[str]
    timings: Dict[str, float] = field(default_factory=dict)
    performance: Optional[CaseEstimate] = None
    estimator: Optional[PerformanceEstimator] = None
    # How the input differs from the training data (imbalanceseglib.input_checks.Finding);
    # the classes a warning concerns are "unreliable" in ``performance``.
    findings: List[Any] = field(default_factory=list)

    def _image(self, array: np.ndarray) -> sitk.Image:
        return image_from_array(array, self.reference)

    def probability_image(self, index: int) -> sitk.Image:
        return self._image(self.probabilities[index])

    def label_image(self) -> sitk.Image:
        return self._image(self.labels)

    def uncertainty_image(self) -> sitk.Image:
        return self._image(self.uncertainty)


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of the class distribution at each voxel divided by log(C): 0 certain, 1 uniform."""
    c = probabilities.shape[0]
    # one class at a time: temporaries of one volume, not of all classes (a 600^3 volume with
    # 6 classes would otherwise hold three more copies of every probability map, 15 GB)
    ent = np.zeros(probabilities.shape[1:], dtype=np.float32)
    for k in range(c):
        pk = probabilities[k]
        term = np.clip(pk, 1e-12, 1.0)
        np.log(term, out=term)
        term *= pk
        ent -= term
    ent /= math.log(c)
    return ent


def argmax_labels(probabilities: np.ndarray) -> np.ndarray:
    """The most probable class at each voxel, uint8, computed slab by slab (numpy's argmax makes
    an int64 map: 8 bytes a voxel, more than a probability map)."""
    shape = probabilities.shape[1:]
    out = np.empty(shape, dtype=np.uint8 if probabilities.shape[0] <= 256 else np.uint16)
    step = max(1, (1 << 22) // max(1, int(np.prod(shape[1:]))))
    for z in range(0, shape[0], step):
        out[z:z + step] = np.argmax(probabilities[:, z:z + step], axis=0)
    return out


def apply_calibration(logits: torch.Tensor, calibration: Optional[Mapping[str, Any]]) -> torch.Tensor:
    """Turn logits (N, C, ...) into probabilities following the card's calibration entry.

    ``{"method": "none"}`` (or no entry) is the plain softmax; ``temperature``
    divides the logits by one temperature, or by one per class channel when a list
    is given; ``ts``/``doc``/``atc``/``ts-atc`` give the calibrated distribution of
    :meth:`PerformanceEstimator.calibrated_probabilities`. (The entry is read by
    :func:`~imbalanceseglib.estimation.estimator_from_card`; to apply it to many pieces, build
    the estimator once and call its :meth:`~PerformanceEstimator.probabilities`.)
    """
    return estimator_from_card(calibration, logits.shape[1]).probabilities(logits)


def count_windows(shape: Sequence[int], roi: Sequence[int], overlap: float) -> int:
    """Number of windows MONAI's sliding window visits for this shape (for progress)."""
    n = 1
    for s, r in zip(shape, roi):
        if s <= r:
            continue
        step = max(1, int(r * (1 - overlap)))
        n *= math.ceil((s - r) / step) + 1
    return n


def sliding_window_logits(network: torch.nn.Module, volume: np.ndarray, roi_size: Sequence[int],
                          overlap: float = 0.5, sw_batch_size: int = 2, device: str = "cpu",
                          progress: ProgressCallback = _noop_progress, engine: str = "auto") -> torch.Tensor:
    """Logits (1, C, z, y, x) for one normalised volume (z, y, x).

    ``engine``: ``"auto"`` runs the bundled U-Nets on an x86-64 CPU through
    :func:`imbalanceseglib.cpu_engine.cpu_engine` (same logits up to float rounding, about twice
    as fast; checked against the module on one random window first, and not used if they differ),
    ``"module"`` always runs ``network`` itself."""
    from .cpu_engine import TOLERANCE, cpu_engine, measured_faster_here, probe_agreement
    if engine not in ("auto", "module"):
        raise ValueError(f"engine must be 'auto' or 'module', got {engine!r}")
    dev = torch.device(device)
    network = network.to(dev).eval()
    # only where we measured the engine faster: there are no trials on this path
    fast = cpu_engine(network) if engine == "auto" and dev.type == "cpu" and measured_faster_here() else None
    if fast is not None and probe_agreement(fast, network, (1, *roi_size)) > TOLERANCE:
        fast = None  # it does not compute this network here
    run = fast if fast is not None else network
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(dev)
    padded_shape = [max(s, r) for s, r in zip(volume.shape, roi_size)]
    total_batches = max(1, math.ceil(count_windows(padded_shape, roi_size, overlap) / sw_batch_size))
    done = [0]

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        out = run(batch)
        done[0] += 1
        progress("network", min(1.0, done[0] / total_batches))
        return out

    with torch.inference_mode():
        logits = sliding_window_inference(x, roi_size=list(roi_size), sw_batch_size=sw_batch_size,
                                          predictor=predictor, overlap=overlap, mode="gaussian",
                                          sw_device=dev, device=torch.device("cpu"))
    return logits


#: Bytes per window voxel, first-level channel and window of a batch at the peak of one forward
#: pass of the U-Net under inference_mode (the highest-resolution decoder block holds the
#: concatenated skip, the convolution and normalisation outputs, plus the convolution's
#: workspace): 5.5-7.7 measured by Testing/Benchmarks/memory_estimate.py, taken as 8 float32.
ACTIVATION_BYTES = 32


def network_memory_bytes(patch_size: Sequence[int], features: Sequence[int], n_classes: int,
                         sw_batch_size: int = 2) -> int:
    """Peak memory of the network's activations for one batch of windows (and the batch's
    logits), which grows with the window and the network's width (first-level channels)."""
    window = float(np.prod(patch_size, dtype=np.float64)) * int(sw_batch_size)
    return int(window * (ACTIVATION_BYTES * int(features[0]) + 4 * (n_classes + 1)))


def estimate_memory_bytes(input_size: Sequence[int], input_spacing: Sequence[float],
                          target_spacing: Optional[Sequence[float]], n_classes: int,
                          patch_size: Optional[Sequence[int]] = None, features: Optional[Sequence[int]] = None,
                          sw_batch_size: int = 2) -> int:
    """Peak memory of :func:`predict`: float32 copies of the volume, logits, blending buffers and
    probabilities on the working and the input grid, and (given the window ``patch_size`` and the
    network's ``features``) the network's activations (:func:`network_memory_bytes`)."""
    n_in = float(np.prod(input_size, dtype=np.float64))
    n_work = n_in if target_spacing is None else float(
        np.prod(resampled_size(input_size, input_spacing, target_spacing), dtype=np.float64))
    # input grid: probabilities, the float32 input and its canonical copy, uncertainty and one
    # class's temporary, labels; working grid: volume, logits, blending buffers, probabilities
    total = 4 * (n_in * (n_classes + 8) + n_work * (3 * n_classes + 6))
    if patch_size is not None:
        total += network_memory_bytes(patch_size, features or DEFAULT_FEATURES, n_classes, sw_batch_size)
    return int(total)


def card_memory_bytes(card: Any, input_size: Sequence[int], input_spacing: Sequence[float],
                      sw_batch_size: int = 2) -> int:
    """:func:`estimate_memory_bytes` for a model card (:class:`imbalanceseglib.card.ModelCard`):
    its spacing, classes, window (96^3 when it names none, as inference uses) and width."""
    return estimate_memory_bytes(input_size, input_spacing, card.preprocessing.get("target_spacing"),
                                 card.num_classes, patch_size=card.preprocessing.get("patch_size") or [96, 96, 96],
                                 features=card.network.get("params", {}).get("features"),
                                 sw_batch_size=sw_batch_size)


def check_model_fits(bundle: ModelBundle, modality: Optional[str] = None,
                     class_names: Optional[Sequence[str]] = None) -> None:
    """Refuse a model whose modality or classes do not fit the request, naming the mismatch.

    ``modality``: e.g. "CT" or "MR"; compared with the first word of the card's modality.
    ``class_names``: classes the caller needs; each must be in the model card.
    """
    card = bundle.model_card
    card_modality = str(card.preprocessing.get("modality", "")).strip()
    if modality and card_modality:
        want, have = modality.split()[0].upper(), card_modality.split()[0].upper()
        if want != have:
            raise BundleError(f"model {card.name!r} is for {card_modality} images, "
                              f"but the input is {modality}")
    if class_names:
        missing = [c for c in class_names if c not in card.class_names]
        if missing:
            raise BundleError(f"model {card.name!r} does not segment {missing}; "
                              f"it knows {card.class_names[1:]}")


def card_input_profile(bundle: ModelBundle) -> Optional[Dict[str, Any]]:
    """The card's ``input_profile`` (checked), or None for a model trained without one."""
    from .input_checks import validate_profile
    profile = bundle.card.get("input_profile")
    if profile is None:
        return None
    try:
        return validate_profile(profile, bundle.class_names)
    except ValueError as exc:
        raise BundleError(f"model {bundle.model_card.name!r}: {exc}") from None


def check_against_training(image: sitk.Image, bundle: ModelBundle, normalised: np.ndarray) -> List[Any]:
    """Findings (:mod:`imbalanceseglib.input_checks`) on an input before the network runs;
    ``normalised``: the input on the model's working grid after its normalisation."""
    from .input_checks import check_input
    return check_input(image, card_input_profile(bundle), normalised)


def check_estimate(performance: CaseEstimate, bundle: ModelBundle, findings: List[Any], voxel_ml: float,
                   agreement: Optional[Sequence[Optional[float]]] = None) -> List[Any]:
    """Add the predicted-volume findings to ``findings``, record each class's ``agreement`` (from
    :func:`agreement_check`) when given, and mark the estimate's classes the findings concern
    "unreliable" (in place); returns all findings."""
    from .input_checks import check_prediction, mark_unreliable
    names = bundle.class_names
    if agreement is not None:
        for row, a in zip(performance.classes, agreement):
            row["agreement"] = a
    predicted = {names[k]: row["predicted_voxels"] * voxel_ml for k, row in enumerate(performance.classes) if k > 0}
    findings = list(findings) + check_prediction(predicted, card_input_profile(bundle))
    mark_unreliable(performance.classes, names, findings)
    return findings


def refuse_untrained_flips(bundle: ModelBundle, views: Sequence[str]) -> None:
    """Refuse a mirrored or rotated view the model was not trained for: mirroring swaps the sides
    or ends of asymmetric anatomy, so such a model disagrees with itself by design."""
    from .augment import policy_from_config
    from .tta import TTA_TRANSFORMS, parse_transform
    geometric = [v for v in views if v in TTA_TRANSFORMS and v != "identity"]
    if not geometric:
        return
    aug = (bundle.card.get("training", {}).get("config", {}) or {}).get("augmentation") or {}
    flip = [0.0, 0.0, 0.0]
    rot = 0.0
    for key in ("default", "rare"):
        try:
            policy = policy_from_config(aug.get(key, "none"))
        except (ValueError, TypeError):
            continue
        flip = [max(a, float(b)) for a, b in zip(flip, policy.flip_prob)]
        rot = max(rot, float(policy.rot90_prob))
    for view in geometric:
        axes, quarter = parse_transform(view)
        missing = [("z", "y", "x")[a] for a in axes if flip[a] <= 0.0]
        if missing or (quarter and rot <= 0.0):
            raise BundleError(f"agreement view {view!r}: model {bundle.model_card.name!r} was not trained with "
                              f"{'mirroring along ' + ', '.join(missing) if missing else 'quarter turns'}, so its "
                              "segmentation of asymmetric anatomy changes under it by design; use shift, gamma_low, "
                              "gamma_high (the default) or members")


#: A class whose segmentation agrees less than this (mean Dice) with its own test-time views,
#: or between the members of an ensemble, is marked unreliable (fixed a priori).
AGREEMENT_THRESHOLD = 0.8


def agreement_check(bundle: ModelBundle, volume: np.ndarray, logits: Optional[torch.Tensor], views: Sequence[str],
                    roi: Sequence[int], overlap: float = 0.5, sw_batch_size: int = 2, device: str = "cpu",
                    progress: Optional[ProgressCallback] = None, plain: Optional[np.ndarray] = None,
                    labels_of: Optional[Callable[[torch.nn.Module], Callable[[np.ndarray], Any]]] = None
                    ) -> Tuple[List[Optional[float]], List[Any]]:
    """Per-class agreement of a prediction with itself under ``views`` and the findings it gives.

    ``volume``: the normalised working-grid volume; ``logits``: its ``(1, C, z, y, x)`` logits.
    ``views``: test-time transform names (:data:`imbalanceseglib.tta.TTA_TRANSFORMS`, e.g.
    :data:`imbalanceseglib.tta.AGREEMENT_VIEWS`) and/or ``"members"`` (each network of an
    ensemble bundle separately: the two networks of a semi-supervised model). Returns the
    agreement per class (:func:`imbalanceseglib.tta.segmentation_agreement`) and one
    ``agreement`` finding per class under :data:`AGREEMENT_THRESHOLD`.

    ``plain`` (instead of ``logits``): the plain prediction's argmax labels of the raw logits;
    ``labels_of(network)``: a function from a volume to that network's logits or labels on it
    (default: the in-memory sliding window), e.g. the bounded-memory pass of
    :func:`imbalanceseglib.streaming.predict_streaming`."""
    from .input_checks import Finding
    from .tta import segmentation_agreement, view_labels
    names = bundle.class_names
    network = bundle.network

    def in_memory(net):
        return lambda v: sliding_window_logits(net, v, roi, overlap=overlap, sw_batch_size=sw_batch_size,
                                               device=device, progress=progress or _noop_progress)[0]

    run = labels_of or in_memory
    others, what = [], []
    views = list(views)
    if plain is None:
        if logits is None:
            raise ValueError("agreement_check needs the plain prediction's logits or labels")
        plain = logits[0].argmax(0).numpy()
    refuse_untrained_flips(bundle, views)
    for view in views:
        if view == "members":
            members = getattr(network, "members", None)
            if members is None:
                raise BundleError(f"model {bundle.model_card.name!r} has one network: 'members' agreement needs an "
                                  "ensemble (a semi-supervised model); use test-time views such as flip_x")
            others += [view_labels(run(m), volume, "identity") for m in members]
            what.append("its networks")
        else:
            others.append(view_labels(run(network), volume, view, window=roi, fallback=plain))
            what.append(view)
    agree = segmentation_agreement(plain, others, len(names))
    findings = []
    has_members, has_views = "members" in views, any(v != "members" for v in views)
    label = "its networks" if not has_views else "its views" if not has_members else "its views and networks"
    for c in range(1, len(names)):
        if agree[c] is not None and agree[c] < AGREEMENT_THRESHOLD:
            findings.append(Finding(
                "agreement", f"{names[c]}: the segmentation changes between {label} ({', '.join(what)}): mean Dice "
                f"{agree[c]:.2f} with the plain prediction, under {AGREEMENT_THRESHOLD:g}",
                f"unstable across {label} (agreement {agree[c]:.2f})", classes=(names[c],),
                values={"agreement": agree[c]}))
    return agree, findings


def _preprocess(image: sitk.Image, pre: Mapping[str, Any]):
    """Input -> (original float32, canonical, working grid image, resampled?, normalised array)."""
    original = sitk.Cast(image, sitk.sitkFloat32)
    canonical = to_canonical(original)
    resampled = needs_resampling(canonical, pre.get("target_spacing"))
    work = resample_to_spacing(canonical, pre["target_spacing"]) if resampled else canonical
    volume = normalise_intensities(sitk.GetArrayViewFromImage(work), pre.get("normalization", {}))
    return original, canonical, work, resampled, volume


def working_grid_logits(image: sitk.Image, bundle: ModelBundle, labels: Optional[sitk.Image] = None,
                        device: str = "cpu", overlap: float = 0.5, sw_batch_size: int = 2,
                        progress: Optional[ProgressCallback] = None):
    """Raw logits ``(C, z, y, x)`` on the model's working grid (what :func:`predict` computes
    before calibration), with ``labels`` (if given, same geometry as ``image``) brought onto
    the same grid by nearest-neighbour resampling.  Used to fit calibration.

    Returns ``(logits float32 ndarray, labels uint8 ndarray or None, working-grid image)``.
    """
    if bundle.network is None:
        raise BundleError("bundle was loaded without weights; use load_bundle()")
    check_image(image, "input volume", min_size=2)
    refuse_blank(image)
    pre = bundle.model_card.preprocessing
    original, canonical, work, resampled, volume = _preprocess(image, pre)
    roi = pre.get("patch_size") or [min(s, 96) for s in volume.shape]
    logits = sliding_window_logits(bundle.network, volume, roi, overlap=overlap, sw_batch_size=sw_batch_size,
                                   device=device, progress=progress or _noop_progress)[0].numpy()
    lab = None
    if labels is not None:
        check_image(labels, "label map")
        check_same_geometry(image, labels)
        lab_img = sitk.Resample(sitk.Cast(labels, sitk.sitkUInt8), work, sitk.Transform(),
                                sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        lab = sitk.GetArrayFromImage(lab_img)
    return logits, lab, work


def predict(image: sitk.Image, bundle: ModelBundle, device: str = "cpu", overlap: float = 0.5,
            sw_batch_size: int = 2, progress: Optional[ProgressCallback] = None,
            memory_limit_bytes: Optional[int] = None, tta: Optional[Sequence[str]] = None,
            tta_merge: Any = None, agreement: Optional[Sequence[str]] = None) -> Prediction:
    """Segment one volume with a bundle; see the module docstring.

    Refuses early (before any work) when the estimated peak memory exceeds
    ``memory_limit_bytes`` (default: the memory the OS reports as available).

    ``tta``: test-time augmentation transforms (e.g. ``("identity", "flip_x")``, see
    :func:`imbalanceseglib.tta.tta_logits`), merged per class: ``tta_merge`` is one
    rule or one per class (``"mean"``/``"max"``); by default ``"max"`` for the classes
    the card lists as rare (``training.rare_classes``) and ``"mean"`` otherwise.  The
    log of the merged probabilities then takes the place of the logits (calibration and
    the performance estimate; the energy score is meaningless on them).

    ``agreement``: views to compare the prediction with (:func:`agreement_check`: test-time
    transforms such as ``("flip_z", "flip_y", "flip_x")`` and/or ``"members"`` for an ensemble);
    each class gets an ``agreement`` entry in the estimate, and a class under
    :data:`AGREEMENT_THRESHOLD` is marked unreliable. Costs one more network pass per view.
    """
    progress = progress or _noop_progress
    if bundle.network is None:
        raise BundleError("bundle was loaded without weights; use load_bundle()")
    check_image(image, "input volume", min_size=2)
    card = bundle.model_card  # read once; everything below takes its sections
    need = card_memory_bytes(card, image.GetSize(), image.GetSpacing(), sw_batch_size)
    limit = memory_limit_bytes if memory_limit_bytes is not None else available_memory_bytes()
    if limit is not None and need > limit:
        raise ImageError(f"input volume {'x'.join(map(str, image.GetSize()))} needs about "
                         f"{format_bytes(need)} to segment with {card.num_classes} classes, but only "
                         f"{format_bytes(limit)} is available; crop or downsample it first")
    refuse_blank(image)
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    pre = card.preprocessing
    in_ch = card.in_channels
    if in_ch != 1:
        raise BundleError(f"model expects {in_ch} input channels; ImbalanceSeg passes one volume")
    progress("preprocess", 0.0)
    original, canonical, work, resampled, volume = _preprocess(image, pre)
    findings = check_against_training(image, bundle, volume)
    timings["preprocess"] = time.perf_counter() - t0
    progress("preprocess", 1.0)

    t1 = time.perf_counter()
    roi = pre.get("patch_size") or [min(s, 96) for s in volume.shape]
    if tta:
        from .tta import rare_class_merge, tta_logits
        rare = set(card.rare_classes)
        merge = tta_merge or rare_class_merge(card.num_classes, {i for i, n in enumerate(card.class_names)
                                                                  if n in rare})
        merged = tta_logits(lambda v: sliding_window_logits(bundle.network, v, roi, overlap=overlap,
                                                            sw_batch_size=sw_batch_size, device=device,
                                                            progress=progress)[0],
                            volume, transforms=list(tta), merge=merge)
        logits = torch.log(merged.clamp_min(1e-12))[None]
    else:
        logits = sliding_window_logits(bundle.network, volume, roi, overlap=overlap,
                                       sw_batch_size=sw_batch_size, device=device, progress=progress)
    agree = None
    if agreement:
        if tta:
            raise ValueError("agreement compares the plain prediction with its views; leave out tta")
        agree, more = agreement_check(bundle, volume, logits, list(agreement), roi, overlap, sw_batch_size, device,
                                      progress)
        findings = findings + more
    estimator = estimator_from_card(card.calibration, card.num_classes)
    probs_t = estimator.probabilities(logits)[0]
    probs = probs_t.numpy().astype(np.float32, copy=False)
    timings["network"] = time.perf_counter() - t1

    t_est = time.perf_counter()
    progress("estimate", 0.0)
    performance = estimator.estimate(estimator.scale_logits(logits)[0].numpy(), card.class_names)
    voxel_ml = float(np.prod(work.GetSpacing())) / 1000.0
    for row in performance.classes:
        row["predicted_ml"] = row["predicted_voxels"] * voxel_ml
        row["expected_ml"] = row["expected_voxels"] * voxel_ml
    findings = check_estimate(performance, bundle, findings, voxel_ml, agree)
    del logits
    timings["estimate"] = time.perf_counter() - t_est
    progress("estimate", 1.0)

    t2 = time.perf_counter()
    progress("postprocess", 0.0)
    probs = to_input_grid(probs, work, canonical, original, resampled)
    labels = argmax_labels(probs)
    uncertainty = normalised_entropy(probs)
    timings["postprocess"] = time.perf_counter() - t2
    progress("postprocess", 1.0)
    return Prediction(probabilities=probs, labels=labels, uncertainty=uncertainty, reference=original,
                      class_names=card.class_names, timings=timings, performance=performance,
                      estimator=estimator, findings=findings)


def to_input_grid(probs: np.ndarray, work: sitk.Image, canonical: sitk.Image, original: sitk.Image,
                   resampled: bool) -> np.ndarray:
    """Map per-class probabilities from the working grid back to the input grid."""
    code = orientation_code(original)
    out = np.empty((probs.shape[0],) + tuple(reversed(original.GetSize())), dtype=np.float32)
    for c in range(probs.shape[0]):
        img = image_from_array(probs[c], work)
        if resampled:
            # Resample straight onto the input grid (handles any direction matrix).
            img = sitk.Resample(img, original, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        else:
            img = sitk.DICOMOrient(img, code)  # exact inverse of the axis permutation/flip
        out[c] = sitk.GetArrayViewFromImage(img)
    if resampled:
        total = out.sum(axis=0, keepdims=True)
        total[total <= 0] = 1.0
        out /= total
    return out
