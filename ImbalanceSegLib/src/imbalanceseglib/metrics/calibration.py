"""Calibration and uncertainty metrics for per-voxel class probabilities.

Implements the binned expected calibration error and reliability diagrams of Guo
et al. (On calibration of modern neural networks, ICML 2017; ECE of Naeini et al.
2015), the class-wise ECE of Kull et al. (NeurIPS 2019) and the QU-BraTS
uncertainty score of Mehta et al. (MELBA 2022), with the formulas below.

Expected calibration error (ECE), equal-width bins
-------------------------------------------------
Bins are [0, 1/B), [1/B, 2/B), ..., [(B-1)/B, 1] (a confidence of exactly 1 falls
in the last bin). ECE = sum_b (n_b / N) |accuracy_b - confidence_b| (Guo et al.
2017, with n_b voxels in bin b out of N).

* **global**: confidence = the largest class probability, correct = (arg-max
  class == reference class);
* **class-wise** (one-vs-rest, Kull et al. 2019): for each class c, the
  probability p_c of every voxel against the indicator (reference == c); the
  class-wise ECE is the mean over classes;
* **near structures**: the same, restricted to voxels within ``radius_mm`` (10 mm
  by default, spacing honoured) of the reference or predicted foreground. On a
  whole volume the many easy background voxels make ECE look far better than it
  is where the structures are; report both.

Bins are additive (counts, summed confidence, summed correctness), so
:class:`ReliabilityBins` from several cases can be pooled with ``+``.

Volume from probabilities: per class the sum of p_c times the voxel volume, the
volume of the thresholded (arg-max) prediction and the reference volume.

QU-BraTS uncertainty score (Mehta et al., MELBA 2022)
----------------------------------------------------
For uncertainty thresholds tau from 100 down to 0 (``num_points`` equal steps,
40 by default as in the challenge), voxels with uncertainty > tau are filtered
out. At each tau: Dice of the remaining voxels (1 when both remaining masks are
empty, the challenge's convention), the filtered true-positive ratio
(TP_all - TP_kept) / TP_all and the filtered true-negative ratio (same for TN;
both ratios count only voxels inside an optional region mask, the challenge's
brain mask; a ratio is 0 when its denominator is 0). Each curve is integrated
over tau in [0, 100] with the trapezoidal rule and divided by 100. Score = (AUC_Dice + (1 - AUC_FTP) + (1 - AUC_FTN)) / 3, higher is
better. Uncertainties are expected in [0, ``max_uncertainty``] (100 in the
challenge; pass 1.0 for the normalised entropy that inference produces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..atomic import atomic_path
from .surface import as_spacing, bounding_box

DEFAULT_BINS = 15
DEFAULT_NEAR_RADIUS_MM = 10.0


@dataclass
class ReliabilityBins:
    """Per-bin counts, summed confidence and summed correctness (additive across cases)."""

    counts: np.ndarray
    confidence_sum: np.ndarray
    correct_sum: np.ndarray

    @property
    def n_bins(self) -> int:
        return int(self.counts.size)

    @property
    def edges(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.n_bins + 1)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def mean_confidence(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.confidence_sum / np.maximum(self.counts, 1), np.nan)

    def accuracy(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.correct_sum / np.maximum(self.counts, 1), np.nan)

    def ece(self) -> Optional[float]:
        """Expected calibration error; ``None`` when no voxel was binned."""
        n = self.total
        if n == 0:
            return None
        return float(np.abs(self.correct_sum - self.confidence_sum).sum() / n)

    def __add__(self, other: "ReliabilityBins") -> "ReliabilityBins":
        if other.n_bins != self.n_bins:
            raise ValueError("cannot pool reliability bins with different bin counts")
        return ReliabilityBins(self.counts + other.counts, self.confidence_sum + other.confidence_sum,
                               self.correct_sum + other.correct_sum)

    def as_rows(self) -> List[Dict[str, Any]]:
        e, conf, acc = self.edges, self.mean_confidence(), self.accuracy()
        return [{"bin_low": float(e[i]), "bin_high": float(e[i + 1]), "count": int(self.counts[i]),
                 "mean_confidence": None if np.isnan(conf[i]) else float(conf[i]),
                 "accuracy": None if np.isnan(acc[i]) else float(acc[i])} for i in range(self.n_bins)]


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Bin confidences (in [0, 1]) with equal-width bins; ``correct`` is boolean or in [0, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64).ravel()
    correct = np.asarray(correct, dtype=np.float64).ravel()
    if confidence.shape != correct.shape:
        raise ValueError("confidence and correctness must have the same number of voxels")
    if n_bins < 1:
        raise ValueError("n_bins must be at least 1")
    if confidence.size and (not np.all(np.isfinite(confidence)) or confidence.min() < 0 or confidence.max() > 1):
        raise ValueError("confidences must be finite and within [0, 1]")
    idx = np.minimum((confidence * n_bins).astype(np.int64), n_bins - 1)
    return ReliabilityBins(np.bincount(idx, minlength=n_bins).astype(np.int64),
                           np.bincount(idx, weights=confidence, minlength=n_bins),
                           np.bincount(idx, weights=correct, minlength=n_bins))


def _check_probs(probs: np.ndarray, ref: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs)
    if probs.ndim != np.ndim(ref) + 1 or probs.shape[1:] != np.shape(ref):
        raise ValueError(f"probabilities {probs.shape} must be (classes, *reference shape {np.shape(ref)})")
    return probs


def global_bins(probs: np.ndarray, ref: np.ndarray, n_bins: int = DEFAULT_BINS,
                mask: Optional[np.ndarray] = None) -> ReliabilityBins:
    """Top-label reliability bins: max probability against (arg-max == reference)."""
    probs = _check_probs(probs, ref)
    ref = np.asarray(ref)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        probs, ref = probs[:, m], ref[m]
    conf = probs.max(axis=0)
    correct = probs.argmax(axis=0) == ref
    return reliability_bins(conf, correct, n_bins)


def classwise_bins(probs: np.ndarray, ref: np.ndarray, n_bins: int = DEFAULT_BINS,
                   mask: Optional[np.ndarray] = None) -> List[ReliabilityBins]:
    """One-vs-rest reliability bins per class."""
    probs = _check_probs(probs, ref)
    ref = np.asarray(ref)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        probs, ref = probs[:, m], ref[m]
    return [reliability_bins(probs[c], ref == c, n_bins) for c in range(probs.shape[0])]


def near_structure_region(ref: np.ndarray, pred: Optional[np.ndarray] = None,
                          spacing: Optional[Sequence[float]] = None,
                          radius_mm: float = DEFAULT_NEAR_RADIUS_MM) -> np.ndarray:
    """Voxels within ``radius_mm`` of the reference or predicted foreground (label != 0)."""
    fg = np.asarray(ref) != 0
    if pred is not None:
        fg = fg | (np.asarray(pred) != 0)
    sp = as_spacing(spacing, fg.ndim)
    region = np.zeros(fg.shape, bool)
    box = bounding_box(fg)
    if box is None:
        return region
    grow = [int(math.ceil(radius_mm / s)) for s in sp]
    big = tuple(slice(max(b.start - g, 0), min(b.stop + g, n)) for b, g, n in zip(box, grow, fg.shape))
    dist = ndimage.distance_transform_edt(~fg[big], sampling=sp)
    region[big] = dist <= radius_mm
    return region


def probability_volumes(probs: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                        pred: Optional[np.ndarray] = None) -> List[Dict[str, float]]:
    """Per class: soft volume (sum of probabilities), thresholded volume and reference volume, in mm^3."""
    probs = _check_probs(probs, ref)
    sp = as_spacing(spacing, np.ndim(ref))
    vox = float(np.prod(sp))
    n_classes = probs.shape[0]
    pred = probs.argmax(axis=0) if pred is None else np.asarray(pred)
    hard = np.bincount(pred.ravel().astype(np.int64), minlength=n_classes)
    true = np.bincount(np.asarray(ref).ravel().astype(np.int64), minlength=n_classes)
    soft = probs.reshape(n_classes, -1).sum(axis=1, dtype=np.float64)
    out = []
    for c in range(n_classes):
        row = {"label": c, "probability_volume_mm3": float(soft[c]) * vox,
               "thresholded_volume_mm3": float(hard[c]) * vox, "reference_volume_mm3": float(true[c]) * vox}
        ref_v = row["reference_volume_mm3"]
        row["probability_volume_error"] = (row["probability_volume_mm3"] - ref_v) / ref_v if ref_v else None
        row["thresholded_volume_error"] = (row["thresholded_volume_mm3"] - ref_v) / ref_v if ref_v else None
        out.append(row)
    return out


def calibration_report(probs: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                       pred: Optional[np.ndarray] = None, n_bins: int = DEFAULT_BINS,
                       radius_mm: float = DEFAULT_NEAR_RADIUS_MM) -> Dict[str, Any]:
    """Global, class-wise and near-structure ECE plus probability volumes for one case.

    ``pred`` defaults to the arg-max of ``probs``. ``None`` values mean undefined
    (e.g. no foreground anywhere, so no near-structure region: policy
    ``no_foreground``).
    """
    probs = _check_probs(probs, ref)
    pred = probs.argmax(axis=0) if pred is None else np.asarray(pred)
    region = near_structure_region(ref, pred, spacing, radius_mm)
    g = global_bins(probs, ref, n_bins)
    cw = classwise_bins(probs, ref, n_bins)
    has_region = bool(region.any())
    gn = global_bins(probs, ref, n_bins, region) if has_region else None
    cwn = classwise_bins(probs, ref, n_bins, region) if has_region else None
    cw_e = [b.ece() for b in cw]
    cwn_e = [b.ece() for b in cwn] if cwn else [None] * len(cw)
    return {
        "policy": "normal" if has_region else "no_foreground",
        "n_bins": n_bins, "near_radius_mm": radius_mm,
        "ece": g.ece(), "ece_near": gn.ece() if gn else None,
        "classwise_ece": float(np.mean(cw_e)),
        "classwise_ece_near": float(np.mean(cwn_e)) if cwn else None,
        "classwise_ece_per_class": cw_e, "classwise_ece_near_per_class": cwn_e,
        "voxels": g.total, "voxels_near": int(region.sum()),
        "bins": g, "bins_near": gn,
        "volumes": probability_volumes(probs, ref, spacing, pred),
    }


# --- reliability diagram (PNG without plotting dependencies) ------------------------------------

# 3x5 bitmap glyphs, rows top to bottom, for the few characters the diagram needs.
_GLYPHS = {
    "0": ("111", "101", "101", "101", "111"), "1": ("010", "110", "010", "010", "111"),
    "2": ("111", "001", "111", "100", "111"), "3": ("111", "001", "111", "001", "111"),
    "4": ("101", "101", "111", "001", "001"), "5": ("111", "100", "111", "001", "111"),
    "6": ("111", "100", "111", "101", "111"), "7": ("111", "001", "010", "010", "010"),
    "8": ("111", "101", "111", "101", "111"), "9": ("111", "101", "111", "001", "111"),
    ".": ("000", "000", "000", "000", "010"), "=": ("000", "111", "000", "111", "000"),
    " ": ("000", "000", "000", "000", "000"), "E": ("111", "100", "111", "100", "111"),
    "C": ("111", "100", "100", "100", "111"), "N": ("101", "111", "111", "111", "101"),
    "A": ("010", "101", "111", "101", "101"), "R": ("110", "101", "110", "101", "101"),
    "-": ("000", "000", "111", "000", "000"), ":": ("000", "010", "000", "010", "000"),
    "a": ("000", "011", "101", "101", "011"), "b": ("100", "110", "101", "101", "110"),
    "c": ("000", "011", "100", "100", "011"), "d": ("001", "011", "101", "101", "011"),
    "e": ("000", "010", "111", "100", "011"), "f": ("011", "010", "111", "010", "010"),
    "g": ("011", "101", "011", "001", "110"), "h": ("100", "110", "101", "101", "101"),
    "i": ("010", "000", "010", "010", "010"), "l": ("010", "010", "010", "010", "001"),
    "m": ("000", "111", "111", "101", "101"), "n": ("000", "110", "101", "101", "101"),
    "o": ("000", "010", "101", "101", "010"), "p": ("000", "110", "101", "110", "100"),
    "r": ("000", "011", "100", "100", "100"), "s": ("000", "011", "110", "011", "110"),
    "t": ("010", "111", "010", "010", "001"), "u": ("000", "101", "101", "101", "011"),
    "v": ("000", "101", "101", "101", "010"), "w": ("000", "101", "101", "111", "111"),
    "x": ("000", "101", "010", "010", "101"), "y": ("000", "101", "011", "001", "110"),
}


def _text(img: np.ndarray, x: int, y: int, s: str, color, scale: int = 2) -> None:
    for ch in s:
        g = _GLYPHS.get(ch, _GLYPHS[" "])
        for r, row in enumerate(g):
            for c, bit in enumerate(row):
                if bit == "1":
                    img[y + r * scale: y + (r + 1) * scale, x + c * scale: x + (c + 1) * scale] = color
        x += 4 * scale


def render_reliability_diagram(bins: ReliabilityBins, title: str = "", size: int = 420) -> np.ndarray:
    """RGB uint8 image: accuracy per bin (blue bars), gap to the diagonal (red), voxel share (grey, below)."""
    img = np.full((size, size, 3), 255, np.uint8)
    left, top, plot = 40, 30, size - 60
    hist_h = 50
    x0, y_bottom = left, top + plot - hist_h - 22   # reliability panel spans top .. y_bottom
    ph = y_bottom - top
    acc, conf = bins.accuracy(), bins.mean_confidence()
    n = bins.n_bins
    w = plot / n
    share = bins.counts / max(bins.total, 1)
    for i in range(n):
        xa, xb = int(round(x0 + i * w)) + 1, int(round(x0 + (i + 1) * w)) - 1
        if bins.counts[i] > 0:
            ya = int(round(y_bottom - acc[i] * ph))
            yc = int(round(y_bottom - conf[i] * ph))
            img[ya:y_bottom, xa:xb] = (60, 110, 200)
            lo, hi = sorted((ya, yc))
            img[lo:hi + 1, xa:xb] = (220, 70, 60)
            hh = int(round(share[i] * hist_h)) if share[i] > 0 else 0
            hh = max(hh, 1)
            img[top + plot - hh: top + plot, xa:xb] = (150, 150, 150)
    for t in range(plot):  # diagonal of perfect calibration
        yy = int(round(y_bottom - t / plot * ph))
        img[max(yy - 1, 0):yy + 1, x0 + t] = (0, 0, 0)
    img[top:y_bottom + 1, x0 - 1] = 0
    img[y_bottom, x0:x0 + plot] = 0
    img[top + plot, x0:x0 + plot] = 0
    _text(img, x0 - 10, y_bottom + 4, "0", (0, 0, 0))
    _text(img, x0 + plot // 2 - 8, y_bottom + 4, "0.5", (0, 0, 0))
    _text(img, x0 + plot - 4, y_bottom + 4, "1", (0, 0, 0))
    _text(img, 8, top, "1", (0, 0, 0))
    _text(img, 4, top + 14, "acc", (0, 0, 0))
    _text(img, x0, top + plot + 6, "confidence", (0, 0, 0))
    _text(img, x0 + 100, top + plot + 6, "blue accuracy", (60, 110, 200))
    _text(img, x0 + 215, top + plot + 6, "red gap", (220, 70, 60))
    _text(img, x0 + 280, top + plot + 6, "grey share", (120, 120, 120))
    e = bins.ece()
    _text(img, left, 8, (title + " " if title else "") + ("ECE=" + (f"{e:.4f}" if e is not None else "-")),
          (0, 0, 0))
    return img


def write_reliability_diagram(bins: ReliabilityBins, path: Union[str, Path], title: str = "") -> Path:
    """Write the reliability diagram as a PNG (atomically) with SimpleITK, a dependency already."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(render_reliability_diagram(bins, title), isVector=True)
    with atomic_path(path, suffix=".png") as tmp:
        sitk.WriteImage(img, str(tmp))
    return Path(path)


# --- QU-BraTS ------------------------------------------------------------------------------------

def qubrats_score(pred: np.ndarray, ref: np.ndarray, uncertainty: np.ndarray, *,
                  num_points: int = 40, max_uncertainty: float = 100.0,
                  region: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """QU-BraTS uncertainty score of one binary structure (see module docstring).

    Returns the thresholds (on the 0..100 scale), the three curves, their AUCs and
    the score. Counting is done once with sorted uncertainties, so the cost does
    not grow with ``num_points``.
    """
    p = np.asarray(pred) != 0
    r = np.asarray(ref) != 0
    u = np.asarray(uncertainty, dtype=np.float64)
    if not (p.shape == r.shape == u.shape):
        raise ValueError("prediction, reference and uncertainty must have the same shape")
    if not np.all(np.isfinite(u)):
        raise ValueError("uncertainty holds NaN or infinite values")
    u = u * (100.0 / max_uncertainty)
    if u.size and (u.min() < -1e-9 or u.max() > 100 + 1e-6):
        raise ValueError(f"uncertainty must lie in [0, {max_uncertainty}]")
    if num_points < 1:
        raise ValueError("num_points must be at least 1")
    m = np.ones(p.shape, bool) if region is None else np.asarray(region, dtype=bool)
    thresholds = np.linspace(100.0, 0.0, num_points + 1)

    def kept(sel: np.ndarray) -> np.ndarray:
        vals = np.sort(u[sel])
        return np.searchsorted(vals, thresholds, side="right").astype(np.float64)  # count with u <= tau

    tp_k, fp_k, fn_k = kept(p & r), kept(p & ~r), kept(~p & r)
    tp_in = kept(p & r & m) if region is not None else tp_k
    tn_k = kept(~p & ~r & m)
    tp_all = float(np.count_nonzero(p & r & m))
    tn_all = float(np.count_nonzero(~p & ~r & m))
    denom = 2 * tp_k + fp_k + fn_k
    dice = np.where(denom > 0, 2 * tp_k / np.maximum(denom, 1), 1.0)
    ftp = (tp_all - tp_in) / tp_all if tp_all > 0 else np.zeros_like(tp_k)
    ftn = (tn_all - tn_k) / tn_all if tn_all > 0 else np.zeros_like(tn_k)

    def auc(y: np.ndarray) -> float:
        # thresholds run 100 -> 0; integrate over increasing tau
        x = thresholds[::-1]
        y = y[::-1]
        return float(np.sum((y[1:] + y[:-1]) * 0.5 * np.diff(x)) / 100.0)

    a_d, a_tp, a_tn = auc(dice), auc(ftp), auc(ftn)
    return {"thresholds": thresholds, "dice": dice, "ftp_ratio": ftp, "ftn_ratio": ftn,
            "auc_dice": a_d, "auc_ftp": a_tp, "auc_ftn": a_tn,
            "score": (a_d + (1.0 - a_tp) + (1.0 - a_tn)) / 3.0}
