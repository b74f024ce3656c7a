"""Which unlabelled scans to annotate next: uncertainty combined with representativeness.

Method: suggestive annotation (Yang et al., "Suggestive annotation: a deep active learning
framework for biomedical image segmentation", MICCAI 2017), our own implementation for 3D
volumes and imbalanced classes. Three steps, each usable on its own:

1. **Uncertainty of a scan** (:func:`scan_uncertainty`, :func:`prediction_uncertainty`), from the
   trained model's own prediction (:func:`imbalanceseglib.inference.predict`). Per foreground
   class ``c``:

   * ``R_c``: the voxels predicted ``c`` or where ``p_c >= plausible`` (default 0.25: the model
     considered the class there), dilated by ``margin`` voxels (default 1, 6-connected), so the
     boundary band, where the uncertainty of a small structure lives, is inside;
   * ``H_c``: the mean normalised entropy (:func:`imbalanceseglib.inference.normalised_entropy`,
     in [0, 1]) over ``R_c``;
   * ``D_c``: the label-free estimated Dice of the class (``Prediction.performance``: the card's
     calibration, or plain confidence; :mod:`imbalanceseglib.estimation`), or, on bare arrays, the
     plain expected Dice ``2 sum_{pred=c} p_c / (N_c + sum p_c)``;
   * ``u_c = (H_c + (1 - D_c)) / 2`` when the class is predicted somewhere; ``H_c`` alone when it
     is not (the estimated Dice of an unpredicted class is 0 or undefined and says nothing of how
     sure the model is); 0 when ``R_c`` is empty (the model is sure the class is absent).

   The scan's uncertainty is the weighted mean of ``u_c`` over the foreground classes, every class
   weighing the same by default (``class_weights`` by name otherwise). Background is left out and
   no class counts by its voxels, so a scan whose small class is uncertain ranks above one whose
   large class or background holds more uncertain voxels.

2. **Descriptor of a scan** (:func:`scan_features`, :func:`encoder_features`), as Yang et al.: the
   output of the network's deepest encoder level, averaged over space (global average pooling),
   one vector per scan of that level's width. The scan gets the card's preprocessing (canonical
   axes, target spacing, intensity normalisation: what inference does) and is tiled by windows of
   the card's patch size (no overlap, the last one flush with the end; an axis shorter than the
   window is zero-padded around the centre); the descriptor is the mean over the windows. An
   ensemble bundle (semi-supervised: several U-Nets) gives its members' descriptors side by side.
   Similarity is the cosine of two descriptors, i.e. 1 minus half the squared distance between
   them scaled to unit length, so the max-cover below is a k-medoids-like choice of typical scans.
   (Pooled activations are mostly of one sign, so a cohort's cosines sit close to 1; that does not
   matter: while none is under 0, the greedy choice is the same for any positive affine change of
   all similarities.)

3. **Selection** (:func:`select`), Yang et al.'s two steps: the ``K = candidates_factor * n`` most
   uncertain scans are the candidates (default factor 2, Yang et al.'s 16 for 8); from them, greedily,
   the set ``S`` of ``n`` that maximises the representativeness of the whole unlabelled pool
   ``F(S) = sum_{x in pool} max_{s in S} sim(s, x)`` (similarities under 0 count as 0), a
   maximum-cover (facility-location) function, monotone and submodular, so the greedy choice is
   within ``1 - 1/e`` of the best set. Scans already annotated count as already in ``S`` (a pool
   scan like one of them is covered: the picks move to what is not). Ties go to the more uncertain
   scan, then to the earlier one. For comparison: ``"uncertainty"`` (the ``n`` most uncertain) and
   ``"random"`` (seeded).

:func:`rank_for_annotation` runs all three on a mapping of named SimpleITK images and returns one
:class:`AnnotationSuggestion` per scan (rank, chosen, uncertainty, representativeness gain and the
reason in words) for the command line and the Slicer module to show. ``"random"`` runs no network
and ``"uncertainty"`` no descriptors. :class:`LazyScans` gives it a cohort read one scan at a time.
Callers: ``imbalanceseg suggest`` (:mod:`imbalanceseglib.cli`) over a folder, and the Slicer
module's ``ImbalanceSegLogic.suggestAnnotations`` over the scene's unlabelled volumes.

Measured (Testing/Benchmarks/reports/suggestive_annotation.md, ACDC, 3 seeds, from 4 to 16
labelled scans): the uncertainty follows the error (Spearman about 0.6), but with so few labelled
scans ``"random"`` gave the better next models (suggestive lost 9 of 9 paired comparisons,
uncertainty-only 7 of 9): from a tiny start, prefer ``"random"`` (larger labelled sets were
not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

from .bundle import BundleError, ModelBundle
from .images import ImageError, check_image, needs_resampling, normalise_intensities, resample_to_spacing, to_canonical
from .input_checks import refuse_blank

__all__ = ["STRATEGIES", "AnnotationSuggestion", "LazyScans", "ScanUncertainty", "Selection", "SuggestionError",
           "cosine_similarity", "encoder_features", "expected_dice", "prediction_uncertainty",
           "rank_for_annotation", "representativeness", "scan_features", "scan_uncertainty", "select",
           "suggestions_from"]

#: Selection strategies :func:`select` knows.
STRATEGIES = ("suggestive", "uncertainty", "random")
#: Candidates for the max-cover step, as a multiple of the scans to pick (Yang et al.: 16 for 8).
DEFAULT_CANDIDATES_FACTOR = 2.0
#: Dilation of each class's region, in voxels, for the entropy term.
DEFAULT_MARGIN = 1
#: A voxel where a class has at least this probability belongs to that class's region.
DEFAULT_PLAUSIBLE = 0.25

ProgressCallback = Callable[[str, float], None]


class SuggestionError(ValueError):
    """The request cannot be answered as given (bad ``n``, empty pool, unknown strategy, ...)."""


# --------------------------------------------------------------------------- 1. uncertainty


@dataclass
class ScanUncertainty:
    """One scan's uncertainty (see the module docstring) and its parts per foreground class."""

    score: float
    per_class: Dict[str, Dict[str, Optional[float]]] = field(default_factory=dict)

    def describe(self) -> str:
        """``'Anterior 0.41, Posterior 0.12'``: each foreground class's ``u_c``."""
        return ", ".join(f"{n} {v['score']:.2f}" for n, v in self.per_class.items())


def expected_dice(probabilities: np.ndarray, absent_voxels: float = 0.5) -> List[Optional[float]]:
    """Plain expected Dice per class from probabilities ``(C, ...)``: ``2 TP_c / (N_c + G_c)`` with
    ``TP_c = sum_{pred=c} p_c``, ``N_c`` the voxels predicted ``c`` and ``G_c = sum p_c``; None for a
    class neither predicted nor expected (``G_c < absent_voxels``), as in
    :mod:`imbalanceseglib.estimation`."""
    probs = np.asarray(probabilities)
    pred = np.argmax(probs, axis=0)
    out: List[Optional[float]] = []
    for c in range(probs.shape[0]):
        pc = probs[c]
        mask = pred == c
        n = float(mask.sum())
        g = float(pc.sum(dtype=np.float64))
        tp = float(pc[mask].sum(dtype=np.float64))
        out.append(None if n == 0 and g < absent_voxels else (2 * tp / (n + g) if n + g > 0 else 0.0))
    return out


def _entropy(probabilities: np.ndarray) -> np.ndarray:
    c = probabilities.shape[0]
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    return (-(probabilities * np.log(p)).sum(axis=0) / math.log(c)).astype(np.float32)


def _dilated_mean(values: np.ndarray, mask: np.ndarray, margin: int) -> Optional[float]:
    """Mean of ``values`` over ``mask`` dilated by ``margin`` voxels (None for an empty mask); the
    dilation runs in the mask's bounding box grown by the margin only."""
    if not mask.any():
        return None
    idx = np.nonzero(mask)
    lo = [max(0, int(i.min()) - margin) for i in idx]
    hi = [min(s, int(i.max()) + margin + 1) for i, s in zip(idx, mask.shape)]
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    sub = mask[box]
    if margin > 0:
        sub = ndimage.binary_dilation(sub, ndimage.generate_binary_structure(mask.ndim, 1), iterations=margin)
    return float(values[box][sub].mean(dtype=np.float64))


def scan_uncertainty(probabilities: np.ndarray, class_names: Optional[Sequence[str]] = None,
                     entropy: Optional[np.ndarray] = None, labels: Optional[np.ndarray] = None,
                     estimated_dice: Optional[Sequence[Optional[float]]] = None,
                     class_weights: Optional[Mapping[str, float]] = None, margin: int = DEFAULT_MARGIN,
                     plausible: float = DEFAULT_PLAUSIBLE) -> ScanUncertainty:
    """Uncertainty of one scan from its class probabilities ``(C, z, y, x)`` (module docstring).

    ``entropy``: the normalised entropy map (``Prediction.uncertainty``; computed when not given);
    ``labels``: the most probable class per voxel (``Prediction.labels``; computed when not given);
    ``estimated_dice``: per class (background first), e.g. the label-free estimate of
    ``Prediction.performance``; the plain expected Dice (:func:`expected_dice`) when not given;
    ``class_weights``: by foreground class name (others weigh 0; default every class 1)."""
    probs = np.asarray(probabilities)
    if probs.ndim < 2 or probs.shape[0] < 2:
        raise SuggestionError(f"probabilities must be (classes, ...) with at least 2 classes, got shape {probs.shape}")
    n_cls = probs.shape[0]
    names = list(class_names) if class_names is not None else [f"class {k}" for k in range(n_cls)]
    if len(names) != n_cls:
        raise SuggestionError(f"{len(names)} class names for {n_cls} probability maps")
    if not np.isfinite(probs).all():
        raise SuggestionError("probabilities contain NaN or infinite values")
    if margin < 0:
        raise SuggestionError(f"margin must be 0 or more voxels, got {margin}")
    ent = _entropy(probs) if entropy is None else np.asarray(entropy)
    if ent.shape != probs.shape[1:]:
        raise SuggestionError(f"entropy map of shape {ent.shape} does not match probabilities {probs.shape[1:]}")
    dice = list(estimated_dice) if estimated_dice is not None else expected_dice(probs)
    if len(dice) != n_cls:
        raise SuggestionError(f"{len(dice)} estimated Dice values for {n_cls} classes")
    weights = {n: 1.0 for n in names[1:]}
    if class_weights is not None:
        unknown = sorted(set(class_weights) - set(names[1:]))
        if unknown:
            raise SuggestionError(f"class weights name unknown classes {unknown}; the foreground classes are "
                                  f"{names[1:]}")
        weights = {n: float(class_weights.get(n, 0.0)) for n in names[1:]}
        if any(w < 0 or not math.isfinite(w) for w in weights.values()) or sum(weights.values()) <= 0:
            raise SuggestionError("class weights must be finite, non-negative and not all 0, "
                                  f"got {dict(class_weights)}")
    pred = np.argmax(probs, axis=0) if labels is None else np.asarray(labels)
    if pred.shape != probs.shape[1:]:
        raise SuggestionError(f"label map of shape {pred.shape} does not match probabilities {probs.shape[1:]}")
    per_class: Dict[str, Dict[str, Optional[float]]] = {}
    total = 0.0
    for c in range(1, n_cls):
        predicted = pred == c
        region = predicted | (probs[c] >= plausible)
        h = _dilated_mean(ent, region, int(margin))
        d = dice[c]
        if h is None:
            u = 0.0
        elif predicted.any() and d is not None:
            u = 0.5 * (h + (1.0 - float(d)))
        else:
            u = h
        per_class[names[c]] = {"score": u, "entropy": h, "estimated_dice": None if d is None else float(d),
                               "weight": weights[names[c]]}
        total += weights[names[c]] * u
    return ScanUncertainty(score=total / sum(weights.values()), per_class=per_class)


def prediction_uncertainty(prediction: Any, class_weights: Optional[Mapping[str, float]] = None,
                           margin: int = DEFAULT_MARGIN, plausible: float = DEFAULT_PLAUSIBLE) -> ScanUncertainty:
    """:func:`scan_uncertainty` of a :class:`imbalanceseglib.inference.Prediction`: its probabilities,
    entropy map and label-free estimated Dice (when it has a performance estimate)."""
    dice = None
    if prediction.performance is not None:
        dice = [row.get("dice") for row in prediction.performance.classes]
    return scan_uncertainty(prediction.probabilities, prediction.class_names, entropy=prediction.uncertainty,
                            labels=prediction.labels, estimated_dice=dice, class_weights=class_weights,
                            margin=margin, plausible=plausible)


# --------------------------------------------------------------------------- 2. descriptors


def _encoder_stacks(network: torch.nn.Module) -> List[torch.nn.ModuleList]:
    members = getattr(network, "members", None)
    nets = list(members) if members is not None else [network]
    stacks = [getattr(n, "encoders", None) for n in nets]
    if any(s is None or len(s) == 0 for s in stacks):
        raise BundleError(f"network {type(network).__name__} has no encoder levels (``encoders``) to describe "
                          "scans with")
    return stacks


def _starts(size: int, window: int) -> List[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, window))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def encoder_features(network: torch.nn.Module, volume: np.ndarray, patch_size: Sequence[int],
                     device: str = "cpu", batch_size: int = 2) -> np.ndarray:
    """Descriptor of one preprocessed volume ``(z, y, x)``: the deepest encoder level's output,
    averaged over each window of ``patch_size`` and then over the windows (module docstring);
    float64 of the deepest level's width (the members' widths side by side for an ensemble)."""
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise SuggestionError(f"volume must be 3-D (z, y, x), got shape {vol.shape}")
    patch = [int(p) for p in patch_size]
    if len(patch) != 3 or min(patch) < 1:
        raise SuggestionError(f"patch size must be 3 positive integers, got {list(patch_size)}")
    pad = [max(0, p - s) for s, p in zip(vol.shape, patch)]
    if any(pad):
        vol = np.pad(vol, [(q // 2, q - q // 2) for q in pad])
    corners = [(a, b, c) for a in _starts(vol.shape[0], patch[0]) for b in _starts(vol.shape[1], patch[1])
               for c in _starts(vol.shape[2], patch[2])]
    stacks = _encoder_stacks(network)
    dev = torch.device(device)
    was_training = network.training
    network.to(dev).eval()
    sums = None
    try:
        with torch.inference_mode():
            for i in range(0, len(corners), max(1, int(batch_size))):
                windows = np.stack([vol[a:a + patch[0], b:b + patch[1], c:c + patch[2]]
                                    for a, b, c in corners[i:i + batch_size]])
                x0 = torch.from_numpy(windows)[:, None].to(dev)
                parts = []
                for encoders in stacks:
                    x = x0
                    for enc in encoders:
                        x = enc(x)
                    parts.append(x.mean(dim=(2, 3, 4)))
                feats = torch.cat(parts, dim=1).double().sum(0).cpu().numpy()
                sums = feats if sums is None else sums + feats
    finally:
        network.train(was_training)
    return sums / len(corners)


def _working_volume(image: sitk.Image, pre: Mapping[str, Any]) -> np.ndarray:
    """The card's preprocessing, as inference applies it: canonical axes, target spacing, intensities."""
    canonical = to_canonical(sitk.Cast(image, sitk.sitkFloat32))
    if needs_resampling(canonical, pre.get("target_spacing")):
        canonical = resample_to_spacing(canonical, pre["target_spacing"])
    return normalise_intensities(sitk.GetArrayViewFromImage(canonical), dict(pre.get("normalization", {})))


def _patch_size(pre: Mapping[str, Any], shape: Sequence[int], divisor: int) -> List[int]:
    patch = pre.get("patch_size")
    if patch:
        return [int(p) for p in patch]
    # as inference: the volume up to 96 voxels an axis, here rounded up to what the network divides
    return [int(math.ceil(min(s, 96) / divisor) * divisor) for s in shape]


def scan_features(image: sitk.Image, bundle: ModelBundle, device: str = "cpu") -> np.ndarray:
    """Descriptor (:func:`encoder_features`) of one scan after the bundle's preprocessing."""
    if bundle.network is None:
        raise BundleError("bundle was loaded without weights; use load_bundle()")
    check_image(image, "scan", min_size=2)
    pre = bundle.model_card.preprocessing
    volume = _working_volume(image, pre)
    divisor = int(getattr(bundle.network, "size_divisor", 1))
    return encoder_features(bundle.network, volume, _patch_size(pre, volume.shape, divisor), device=device)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the rows of ``a`` (M, D) with those of ``b`` (N, D): (M, N); a zero
    vector is similar to nothing (0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    a = np.divide(a, na, out=np.zeros_like(a), where=na > 0)
    b = np.divide(b, nb, out=np.zeros_like(b), where=nb > 0)
    return a @ b.T


# --------------------------------------------------------------------------- 3. selection


@dataclass
class Selection:
    """What :func:`select` chose, by index into the pool.

    ``chosen``: the picks in the order they were chosen; ``order``: every pool index, the picks
    first, then (``suggestive``/``uncertainty``) the rest from most to least uncertain, or
    (``random``) in the random order; ``candidates``: the most uncertain scans the max-cover chose
    from (``suggestive``; for ``uncertainty`` the picks, for ``random`` every scan);
    ``uncertainty_rank``: 1 for the most uncertain (None without uncertainties);
    ``gains``: a pick's increase of ``F`` when it was chosen, for the other scans the increase they
    would still add to the final set (NaN without features); ``coverage``: each scan's similarity
    to the most similar member of the final set or the annotated scans (NaN without features), and
    ``covered_by`` that member: ``("chosen", pool index)`` or ``("annotated", index)``."""

    strategy: str
    chosen: List[int]
    order: List[int]
    candidates: List[int]
    uncertainty_rank: Optional[List[int]]
    gains: np.ndarray
    coverage: np.ndarray
    covered_by: List[Optional[Tuple[str, int]]]
    value: Optional[float] = None


def _check_n(n: Any, pool: int) -> int:
    if pool < 1:
        raise SuggestionError("the pool of unlabelled scans is empty: nothing to choose from")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise SuggestionError(f"n (scans to choose) must be an integer, got {n!r}")
    if n < 1:
        raise SuggestionError(f"n (scans to choose) must be at least 1, got {n}")
    if n > pool:
        raise SuggestionError(f"n = {n} scans to choose, but the pool has only {pool}")
    return int(n)


def _uncertainty_order(u: np.ndarray) -> List[int]:
    """Most uncertain first; ties by index."""
    return [int(i) for i in np.lexsort((np.arange(len(u)), -u))]


def representativeness(features: np.ndarray, chosen: Sequence[int],
                       annotated_features: Optional[np.ndarray] = None) -> float:
    """``F(S) = sum_{x in pool} max_{s in S} max(0, sim(s, x))`` for ``S`` = ``chosen`` (pool
    indices) and the annotated scans."""
    feats = np.asarray(features, dtype=np.float64)
    cover = np.zeros(len(feats))
    if len(chosen):
        cover = np.maximum(cover, cosine_similarity(feats[list(chosen)], feats).max(axis=0))
    if annotated_features is not None and len(annotated_features):
        cover = np.maximum(cover, cosine_similarity(annotated_features, feats).max(axis=0))
    return float(cover.sum())


def select(uncertainty: Optional[np.ndarray], features: Optional[np.ndarray], n: int,
           strategy: str = "suggestive", annotated_features: Optional[np.ndarray] = None,
           candidates_factor: float = DEFAULT_CANDIDATES_FACTOR,
           rng: Optional[np.random.Generator] = None) -> Selection:
    """Choose ``n`` of a pool of scans (module docstring, step 3).

    ``uncertainty``: (N,) one value per pool scan, higher = more uncertain (needed by
    ``suggestive`` and ``uncertainty``); ``features``: (N, D) descriptors (``suggestive``; used by
    the others, when given, only to report gains and coverage); ``annotated_features``: (A, D)
    descriptors of the scans already annotated (they count as chosen); ``candidates_factor``: the
    candidates are the ``ceil(factor * n)`` most uncertain (at least ``n``, at most the pool);
    ``rng``: for ``random`` (default ``numpy.random.default_rng(0)``)."""
    if strategy not in STRATEGIES:
        raise SuggestionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    u = None if uncertainty is None else np.asarray(uncertainty, dtype=np.float64)
    f = None if features is None else np.asarray(features, dtype=np.float64)
    if u is not None and u.ndim != 1:
        raise SuggestionError(f"uncertainty must be one value per scan (N,), got shape {u.shape}")
    if f is not None and f.ndim != 2:
        raise SuggestionError(f"features must be one vector per scan (N, D), got shape {f.shape}")
    pool = len(u) if u is not None else (len(f) if f is not None else 0)
    if u is not None and f is not None and len(f) != len(u):
        raise SuggestionError(f"{len(u)} uncertainty values but {len(f)} feature vectors")
    if strategy in ("suggestive", "uncertainty") and u is None:
        raise SuggestionError(f"strategy {strategy!r} needs one uncertainty per scan")
    if strategy == "suggestive" and f is None:
        raise SuggestionError("strategy 'suggestive' needs one feature vector per scan")
    if strategy == "random" and u is None and f is None:
        raise SuggestionError("strategy 'random' needs the pool's size: give uncertainties or features")
    n = _check_n(n, pool)
    if u is not None and not np.isfinite(u).all():
        bad = np.flatnonzero(~np.isfinite(u)).tolist()
        raise SuggestionError(f"uncertainty has NaN or infinite values at scans {bad}")
    if f is not None and not np.isfinite(f).all():
        raise SuggestionError("features contain NaN or infinite values")
    ann = None
    if annotated_features is not None and len(annotated_features):
        ann = np.asarray(annotated_features, dtype=np.float64)
        if ann.ndim != 2 or f is None or ann.shape[1] != f.shape[1]:
            raise SuggestionError(f"annotated features of shape {ann.shape} do not match the pool's features "
                                  f"{None if f is None else f.shape}")
        if not np.isfinite(ann).all():
            raise SuggestionError("annotated features contain NaN or infinite values")
    factor = float(candidates_factor)
    if not math.isfinite(factor) or factor < 1:
        raise SuggestionError(f"candidates_factor must be at least 1, got {candidates_factor}")

    by_uncertainty = _uncertainty_order(u) if u is not None else None
    u_rank = None
    if by_uncertainty is not None:
        u_rank = [0] * pool
        for r, i in enumerate(by_uncertainty):
            u_rank[i] = r + 1
    sim = cosine_similarity(f, f) if f is not None else None
    cover = np.zeros(pool)
    if ann is not None:
        cover = np.maximum(cover, cosine_similarity(ann, f).max(axis=0))
    pick_gain: Dict[int, float] = {}

    if strategy == "random":
        order = [int(i) for i in (rng if rng is not None else np.random.default_rng(0)).permutation(pool)]
        chosen, candidates = order[:n], list(range(pool))
    elif strategy == "uncertainty":
        chosen = by_uncertainty[:n]
        candidates = list(chosen)
    else:
        k = min(pool, max(n, int(math.ceil(factor * n - 1e-9))))
        candidates = by_uncertainty[:k]
        chosen = []
        remaining = list(candidates)  # most uncertain first: the first of equal gains is the more uncertain
        for _ in range(n):
            gains = np.maximum(sim[remaining] - cover[None, :], 0.0).sum(axis=1)
            best = float(gains.max())
            j = next(j for j, g in enumerate(gains) if g >= best - 1e-9 * max(1.0, abs(best)))
            c = remaining.pop(j)
            chosen.append(c)
            pick_gain[c] = float(gains[j])
            cover = np.maximum(cover, sim[c])
    if strategy != "suggestive" and sim is not None:
        for c in chosen:  # the gain each pick added, in the order picked
            pick_gain[c] = float(np.maximum(sim[c] - cover, 0.0).sum())
            cover = np.maximum(cover, sim[c])
    if strategy != "random":  # (a random order starts with its picks already)
        rest = set(chosen)
        order = chosen + [i for i in by_uncertainty if i not in rest]

    gains_out = np.full(pool, np.nan)
    coverage = np.full(pool, np.nan)
    covered_by: List[Optional[Tuple[str, int]]] = [None] * pool
    value = None
    if sim is not None:
        for i in range(pool):
            gains_out[i] = pick_gain[i] if i in pick_gain else float(np.maximum(sim[i] - cover, 0.0).sum())
        src = [("chosen", c) for c in chosen]
        rows = [sim[c] for c in chosen]
        if ann is not None:
            a_sim = cosine_similarity(ann, f)
            src += [("annotated", a) for a in range(len(ann))]
            rows += list(a_sim)
        table = np.vstack(rows)
        best = table.argmax(axis=0)
        coverage = table.max(axis=0)
        covered_by = [src[int(b)] for b in best]
        value = float(np.maximum(coverage, 0.0).sum())
    return Selection(strategy=strategy, chosen=[int(c) for c in chosen], order=[int(i) for i in order],
                     candidates=[int(c) for c in candidates], uncertainty_rank=u_rank, gains=gains_out,
                     coverage=coverage, covered_by=covered_by, value=value)


# --------------------------------------------------------------------------- the whole step


@dataclass
class AnnotationSuggestion:
    """One row of :func:`rank_for_annotation`: a pool scan, its rank (1 = annotate first), whether
    it is among the ``n`` chosen, its uncertainty (None for ``random``), its representativeness
    gain (None without descriptors) and why, in words."""

    name: str
    rank: int
    chosen: bool
    uncertainty: Optional[float]
    gain: Optional[float]
    reason: str
    per_class: Dict[str, Optional[float]] = field(default_factory=dict)
    similar_to: Optional[str] = None
    similarity: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "rank": self.rank, "chosen": self.chosen, "uncertainty": self.uncertainty,
                "gain": self.gain, "reason": self.reason, "per_class": dict(self.per_class),
                "similar_to": self.similar_to, "similarity": self.similarity}


class LazyScans(Mapping[str, sitk.Image]):
    """Scans by name, each read only when asked for and only the last one kept: the ``images`` or
    ``annotated`` of :func:`rank_for_annotation` for a cohort that does not fit in memory at once
    (the command line's folder, the Slicer module's volume nodes). ``loaders``: name -> a function
    returning the scan's SimpleITK image (e.g. :func:`imbalanceseglib.images.read_image` of a
    file); its errors are its own, so they should name the scan. :func:`rank_for_annotation`
    reads each scan twice: once when it checks them all before any network runs, once for the
    network (its prediction and descriptor share one read)."""

    def __init__(self, loaders: Mapping[str, Callable[[], sitk.Image]]):
        self._loaders = dict(loaders)
        self._last: Optional[Tuple[str, sitk.Image]] = None
        self.reads = 0  # how many times a loader ran

    def __getitem__(self, name: str) -> sitk.Image:
        if self._last is not None and self._last[0] == name:
            return self._last[1]
        loader = self._loaders[name]  # KeyError for an unknown name, as any mapping
        self._last = None  # the previous scan is freed before the next one is read
        image = loader()
        self.reads += 1
        self._last = (name, image)
        return image

    def __iter__(self):
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)


def _ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def _check_images(images: Mapping[str, sitk.Image], what: str) -> List[str]:
    names = list(images)
    for name in names:
        image = images[name]
        if not isinstance(image, sitk.Image):
            raise SuggestionError(f"{what} scan {name!r} is a {type(image).__name__}, not a SimpleITK image")
        check_image(image, f"{what} scan {name!r}", min_size=2)
        refuse_blank(image, f"{what} scan {name!r}")
    return names


def rank_for_annotation(bundle: ModelBundle, images: Mapping[str, sitk.Image], n: int,
                        strategy: str = "suggestive", annotated: Optional[Mapping[str, sitk.Image]] = None,
                        seed: int = 0, progress: Optional[ProgressCallback] = None,
                        candidates_factor: float = DEFAULT_CANDIDATES_FACTOR, device: str = "cpu",
                        class_weights: Optional[Mapping[str, float]] = None, margin: int = DEFAULT_MARGIN,
                        on_prediction: Optional[Callable[[str, Any], None]] = None) -> List[AnnotationSuggestion]:
    """Rank the unlabelled ``images`` (name -> 3-D SimpleITK image) for annotation with a trained
    ``bundle`` and choose ``n`` of them (module docstring); ``annotated``: scans already annotated
    (``suggestive`` counts them as covering the pool). Returns one row per scan, by rank.

    ``progress(stage, fraction)``: called per scan, ``fraction`` of the whole in [0, 1].
    ``on_prediction(name, prediction)``: called with each pool scan's
    :class:`~imbalanceseglib.inference.Prediction` (``suggestive`` and ``uncertainty``), e.g. to
    keep or show the segmentations without running the network again; it is not kept here.
    Every image is checked before any network runs; a problem names the scan."""
    from .inference import predict
    if strategy not in STRATEGIES:
        raise SuggestionError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    if not isinstance(images, Mapping):
        raise SuggestionError(f"images must be a mapping of scan names to images, got {type(images).__name__}")
    names = _check_images(images, "unlabelled")
    _check_n(n, len(names))
    annotated = annotated or {}
    if not isinstance(annotated, Mapping):
        raise SuggestionError(f"annotated must be a mapping of scan names to images, got {type(annotated).__name__}")
    both = sorted(set(names) & set(annotated))
    if both:
        raise SuggestionError(f"scans {both} are both annotated and in the unlabelled pool")
    ann_names = _check_images(annotated, "annotated")
    if strategy != "suggestive":
        ann_names = []  # only the max-cover uses them
    if bundle.network is None and strategy != "random":
        raise BundleError("bundle was loaded without weights; use load_bundle()")
    report = progress or (lambda stage, fraction: None)
    need_u = strategy in ("suggestive", "uncertainty")
    need_f = strategy == "suggestive"
    steps = len(names) * (int(need_u) + int(need_f)) + len(ann_names)
    done = 0

    def step(stage: str) -> None:
        nonlocal done
        done += 1
        report(stage, done / max(1, steps))

    def named(name: str, fn):
        try:
            return fn()
        except (ImageError, BundleError, ValueError) as exc:
            raise SuggestionError(f"scan {name!r}: {exc}") from exc

    scores: Dict[str, ScanUncertainty] = {}
    feats: Dict[str, np.ndarray] = {}
    for i, name in enumerate(names):
        if need_u:
            pred = named(name, lambda: predict(images[name], bundle, device=device))
            scores[name] = named(name, lambda: prediction_uncertainty(pred, class_weights=class_weights,
                                                                      margin=margin))
            if on_prediction is not None:
                on_prediction(name, pred)
            del pred
            step(f"uncertainty {i + 1}/{len(names)}: {name}")
        if need_f:
            feats[name] = named(name, lambda: scan_features(images[name], bundle, device=device))
            step(f"descriptor {i + 1}/{len(names)}: {name}")
    ann_feats = []
    for i, name in enumerate(ann_names):
        ann_feats.append(named(name, lambda: scan_features(annotated[name], bundle, device=device)))
        step(f"annotated descriptor {i + 1}/{len(ann_names)}: {name}")
    u = np.array([scores[m].score for m in names]) if need_u else None
    f = np.stack([feats[m] for m in names]) if need_f else None
    a = np.stack(ann_feats) if ann_feats else None
    sel = select(u if need_u else np.zeros(len(names)), f, n, strategy, annotated_features=a,
                 candidates_factor=candidates_factor, rng=np.random.default_rng(seed))
    report("select", 1.0)
    return suggestions_from(sel, names, scores if need_u else None, ann_names)


def suggestions_from(sel: Selection, names: Sequence[str], scores: Optional[Mapping[str, ScanUncertainty]] = None,
                     annotated_names: Sequence[str] = ()) -> List[AnnotationSuggestion]:
    """The rows of :func:`rank_for_annotation` for a :class:`Selection` over the scans ``names``."""
    chosen = set(sel.chosen)
    pick_no = {c: k + 1 for k, c in enumerate(sel.chosen)}
    cands = set(sel.candidates)
    k_cand = len(sel.candidates)
    rows = []
    for rank, i in enumerate(sel.order, start=1):
        name = names[i]
        unc = scores[name] if scores is not None else None
        gain = None if math.isnan(sel.gains[i]) else float(sel.gains[i])
        src = sel.covered_by[i]
        similar, similarity = None, None
        if src is not None and not (src[0] == "chosen" and src[1] == i):
            similar = names[src[1]] if src[0] == "chosen" else annotated_names[src[1]]
            similarity = float(sel.coverage[i])
        u_text = ""
        if unc is not None:
            u_text = (f"uncertainty {unc.score:.3f} ({_ordinal(sel.uncertainty_rank[i])} of {len(names)}; "
                      f"{unc.describe()})")
        if sel.strategy == "random":
            reason = (f"chosen at random ({_ordinal(pick_no[i])} draw)" if i in chosen
                      else "not drawn")
        elif sel.strategy == "uncertainty":
            reason = (f"chosen: among the {len(sel.chosen)} most uncertain, {u_text}" if i in chosen
                      else f"not chosen: {u_text}")
        elif i in chosen:
            reason = (f"chosen ({_ordinal(pick_no[i])} pick): among the {k_cand} most uncertain, {u_text}; "
                      f"adds {gain:.3g} to the representativeness of the {len(names)} unlabelled scans")
        elif i in cands:
            like = (f"; most like {'annotated ' if src and src[0] == 'annotated' else 'chosen '}{similar} "
                    f"(similarity {similarity:.4f})" if similar is not None else "")
            reason = (f"not chosen: among the {k_cand} most uncertain, {u_text}, but the chosen scans already "
                      f"cover what it shows (it would add {gain:.3g}){like}")
        else:
            reason = f"not chosen: not among the {k_cand} most uncertain, {u_text}"
        rows.append(AnnotationSuggestion(
            name=name, rank=rank, chosen=i in chosen, uncertainty=None if unc is None else float(unc.score),
            gain=gain, reason=reason,
            per_class={} if unc is None else {c: v["score"] for c, v in unc.per_class.items()},
            similar_to=similar, similarity=similarity))
    return rows
