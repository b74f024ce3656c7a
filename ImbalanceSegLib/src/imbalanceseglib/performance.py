"""Class-specific calibration and label-free per-class performance estimation.

The idea (Li et al., MICCAI 2022, "Estimating model performance under domain
shifts with class-specific confidence scores"): calibrate a per-voxel
confidence score on labelled validation cases so that it predicts how often
the predicted class is right, then, on a new unlabelled case, read Dice,
sensitivity and precision off the calibrated scores.  Our own implementation
(no code taken from MOVAL); see ``Testing/Benchmarks/reports/performance_estimation.md``
for where our definitions knowingly differ from MOVAL's and why.

Definitions used throughout
---------------------------
At a voxel with logits ``z`` the network predicts ``j = argmax z``.  A
*confidence score* ``s`` in [0, 1] is one of

* ``mcp``     maximum class probability, ``max softmax(z / T)``;
* ``entropy`` ``1 - H(softmax(z / T)) / log C``;
* ``energy``  ``T * logsumexp(z / T)`` (negative free energy), min-max normalised
  with the range seen on the validation cases at ``T = 1`` and clipped;
* ``doctor``  ``1 - D / (C - 1)`` with DOCTOR's ``D = (1 - g) / g``,
  ``g = sum_k p_k^2`` (normalised by its exact bounds ``0 <= D <= C - 1``).

A *method* turns ``s`` into the calibrated probability ``q_j`` that the voxel
truly belongs to its predicted class ``j``:

* ``none``   ``q_j = s`` (plain average confidence, nothing fitted);
* ``ts``     temperature scaling: ``s`` computed from ``softmax(z / T)``;
* ``doc``    difference of confidences: ``q_j = clip(s - delta)``;
* ``atc``    average thresholded confidence: ``q_j = 1[s > t]``;
* ``ts-atc`` ``atc`` applied to the temperature-scaled score.

The remaining probability ``1 - q_j`` is shared among the other classes in
proportion to their (temperature-scaled) softmax probabilities, so every voxel
carries a full calibrated distribution ``q_k``.  Each method has a *global*
variant (one parameter) and a *class-specific* (CS) variant (one parameter per
predicted class: the parameter of class ``j`` acts on the voxels predicted
``j``).

For one case, with ``N_k`` the voxels predicted ``k``:

* expected true positives ``TP_k = sum_{pred = k} q_k``;
* expected reference volume ``G_k = sum_x q_k(x)``; the part outside the
  prediction (``sum_{pred != k} q_k``) is the expected false negatives coming
  from the voxels of *other* predicted classes;
* Dice ``2 TP_k / (N_k + G_k)``, sensitivity ``TP_k / G_k``, precision
  ``TP_k / N_k`` - the same formulas as the true metrics with counts replaced
  by their expectations.

Classes: a class with ``N_k = 0`` and ``G_k`` below ``absent_voxels`` (default
0.5 voxel) is estimated *absent*: its metrics are ``None`` (undefined, as in
``metrics.overlap_from_counts`` when both sides are empty), never NaN.  With
``N_k = 0`` but ``G_k`` at or above the limit, Dice and sensitivity are 0 and the
state says the class may have been missed.

Fitting never re-reads voxels per optimiser step: each case is reduced once to
per-class sufficient statistics (:class:`CaseStatistics`: histograms of the
score over a grid of temperatures, with the per-bin sums needed for every
method), and all fitting runs on those arrays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .metrics import confusion_counts

__all__ = [
    "CONFIDENCE_SCORES", "METHODS", "CaseStatistics", "CaseEstimate", "PerformanceEstimator",
    "case_statistics", "fit_estimator", "energy_range", "cohort_estimate", "TEMPERATURE_GRID",
]

# Defined with the model-card schema (imbalanceseglib.card, torch-free), which checks cards against them.
from .card import CONFIDENCE_SCORES  # noqa: E402
from .card import ESTIMATION_METHODS as METHODS  # noqa: E402

#: Temperatures at which statistics are collected: 1/8 to 16 in quarter octaves (T = 1, 2, 4 are on it).
TEMPERATURE_GRID = np.exp2(np.linspace(-3.0, 4.0, 29))
_T1 = int(np.argmin(np.abs(TEMPERATURE_GRID - 1.0)))

# Bins over the "doubt" v = 1 - s: log-spaced below 1/64 (confident voxels dominate
# segmentation, and a threshold must resolve 0.999 from 0.99999), linear above.
_V_EDGES = np.unique(np.concatenate([[0.0], np.logspace(-8, math.log10(1 / 64), 49),
                                     np.linspace(1 / 64, 1.0, 64)]))
_V_EDGES[-1] = 1.0 + 1e-9
_NB = len(_V_EDGES) - 1
_CHUNK = 1 << 19


class EstimationError(ValueError):
    """Input that cannot be used for calibration or estimation (the message names it)."""


def _check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
    arr = np.asarray(logits)
    if arr.ndim < 2:
        raise EstimationError(f"{what} must be (C, ...) with one channel per class, got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise EstimationError(f"{what} need at least 2 classes (background and one structure), got {arr.shape[0]}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise EstimationError(f"{what} must be floating point, got {arr.dtype}")
    if arr.size and not np.isfinite(arr).all():
        raise EstimationError(f"{what} contain NaN or infinite values; the network output is unusable")
    return arr


def _flat(logits: np.ndarray) -> torch.Tensor:
    """(C, ...) -> (V, C) float32 tensor (a view where possible)."""
    c = logits.shape[0]
    return torch.from_numpy(np.ascontiguousarray(logits.reshape(c, -1), dtype=np.float32)).T


def _gaps(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted class, max logit, and logit gaps z_k - z_max with the predicted class pushed
    to -1e30 (so exp gives exactly 0 there and sums over the other classes stay accurate)."""
    zmax, pred = torch.max(z, dim=1)
    d = z - zmax[:, None]
    d.scatter_(1, pred[:, None], -1e30)
    return pred, zmax, d


def _doubt_from_gaps(pred: torch.Tensor, zmax: torch.Tensor, d: torch.Tensor, temperature, confidence: str,
                     score_range: Optional[Tuple[float, float]], shares: bool = True):
    """Doubt v = 1 - s and the shares r_k of the remaining probability (r_pred = 0, rows
    sum to 1) at a temperature (scalar or one per voxel), computed from the logit gaps
    without forming 1 - p_max (which float32 cannot resolve for confident voxels)."""
    c = d.shape[1]
    t = temperature.reshape(-1, 1) if isinstance(temperature, torch.Tensor) else float(temperature)
    e = torch.exp(d / t)                      # exp((z_k - z_max) / T), 0 for the predicted class
    o = e.sum(1)                              # sum over the other classes
    r = None
    if shares:
        safe = o > 0
        r = torch.where(safe[:, None], e / torch.where(safe, o, 1.0)[:, None], 1.0 / (c - 1))
        r.scatter_(1, pred[:, None], 0.0)
    if confidence == "mcp":
        v = o / (1.0 + o)
    elif confidence == "entropy":
        tt = t.reshape(-1) if isinstance(t, torch.Tensor) else t
        dm = torch.where(e > 0, d, torch.zeros_like(d))
        v = (torch.log1p(o) - (e * dm).sum(1) / tt / (1.0 + o)) / math.log(c)
    elif confidence == "doctor":
        e2 = (e * e).sum(1)
        v = (2.0 * o + o * o - e2) / (1.0 + e2) / (c - 1)
    elif confidence == "energy":
        if score_range is None:
            raise EstimationError("the energy score needs the score range of the validation cases")
        lo, hi = score_range
        tt = t.reshape(-1) if isinstance(t, torch.Tensor) else t
        energy = zmax + tt * torch.log1p(o)
        v = 1.0 - (energy - lo) / max(hi - lo, 1e-12)
    else:
        raise EstimationError(f"unknown confidence score {confidence!r}; known: {', '.join(CONFIDENCE_SCORES)}")
    return v.clamp(0.0, 1.0), r


def _doubt_and_shares(z: torch.Tensor, temperature, confidence: str,
                      score_range: Optional[Tuple[float, float]]):
    pred, zmax, d = _gaps(z)
    v, r = _doubt_from_gaps(pred, zmax, d, temperature, confidence, score_range)
    return pred, v, r


def energy_range(logit_cases: Iterable[np.ndarray]) -> Tuple[float, float]:
    """Range of the (unnormalised) energy score over cases, at T = 1."""
    lo, hi = math.inf, -math.inf
    for logits in logit_cases:
        z = _flat(_check_logits(logits))
        for start in range(0, z.shape[0], _CHUNK):
            e = torch.logsumexp(z[start:start + _CHUNK], dim=1)
            lo, hi = min(lo, float(e.min())), max(hi, float(e.max()))
    if not math.isfinite(lo):
        raise EstimationError("no voxels to compute the energy range from")
    return lo, hi


@dataclass
class CaseStatistics:
    """One case reduced to what fitting and estimation need.

    ``hist[t, j, b, :]`` sums, over voxels predicted ``j`` whose doubt at
    temperature ``TEMPERATURE_GRID[t]`` falls in bin ``b``: the voxel count, the
    score ``s``, the shares ``r_k`` (C values) and ``r_k * s`` (C values).
    Only the temperatures marked in ``binned`` (always T = 1) have bins; at the
    other grid temperatures (``temperatures=True``) bin 0 holds the totals over
    all bins in the form TS needs (count, sum of s, sum of r_k (1 - s), zeros).
    ``counts`` holds true (TP, FP, FN) per class when labels were given.
    """

    hist: np.ndarray
    predicted: np.ndarray
    counts: Optional[np.ndarray]
    confidence: str
    voxels: int
    temperatures: bool = True
    binned: Optional[np.ndarray] = None
    leaks: bool = True

    @property
    def num_classes(self) -> int:
        return self.hist.shape[1]

    def true_dice(self) -> np.ndarray:
        """(C,) true Dice, NaN where undefined (class absent from both)."""
        if self.counts is None:
            raise EstimationError("this case has no labels")
        tp, fp, fn = self.counts[:, 0], self.counts[:, 1], self.counts[:, 2]
        den = 2 * tp + fp + fn
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, 2 * tp / np.maximum(den, 1), np.nan)


def _accumulate_bins(hist, t_indices, pred, zmax, d, confidence, score_range, edges, c, m) -> None:
    w = torch.empty((pred.shape[0], m), dtype=torch.float64)
    w[:, 0] = 1.0
    for ti in t_indices:
        v, r = _doubt_from_gaps(pred, zmax, d, float(TEMPERATURE_GRID[ti]), confidence, score_range)
        s = 1.0 - v
        w[:, 1] = s
        w[:, 2:2 + c] = r
        w[:, 2 + c:] = r * s[:, None]
        hist[ti].index_add_(0, pred * _NB + torch.bucketize(v, edges, right=True), w)


def case_statistics(logits: np.ndarray, labels: Optional[np.ndarray] = None, confidence: str = "mcp",
                    score_range: Optional[Tuple[float, float]] = None, temperatures: bool = True,
                    binned_temperatures: Any = (), leaks: bool = True) -> CaseStatistics:
    """Reduce one case (logits ``(C, ...)``, optional integer labels ``(...)``) to statistics.

    Always: histograms at T = 1 (all that ``none``, ``doc`` and ``atc`` need).
    ``temperatures=True`` adds, at every grid temperature, the per-class totals TS
    needs; ``binned_temperatures`` (grid indices, or ``"all"``) adds full histograms at
    those temperatures (TS-ATC needs them at its fitted temperatures;
    :func:`fit_estimator` adds them with :func:`add_binned_temperatures`).  ``leaks=False``
    keeps only the sum of the score at those temperatures (what a *global* TS fit needs;
    such statistics cannot be used to estimate with TS)."""
    logits = _check_logits(logits)
    c = logits.shape[0]
    if confidence not in CONFIDENCE_SCORES:
        raise EstimationError(f"unknown confidence score {confidence!r}; known: {', '.join(CONFIDENCE_SCORES)}")
    z = _flat(logits)
    m = 2 + 2 * c
    hist = torch.zeros((len(TEMPERATURE_GRID), c * _NB, m), dtype=torch.float64)
    edges = torch.tensor(_V_EDGES[1:-1], dtype=torch.float32)
    predicted = np.zeros(c, dtype=np.int64)
    if binned_temperatures == "all":
        bin_idx = set(range(len(TEMPERATURE_GRID)))
    else:
        bin_idx = {_T1} | {int(t) for t in (binned_temperatures or ())}
    total_idx = [t for t in range(len(TEMPERATURE_GRID)) if t not in bin_idx] if temperatures else []
    for start in range(0, z.shape[0], _CHUNK):
        pred, zmax, d = _gaps(z[start:start + _CHUNK])
        predicted += np.bincount(pred.numpy(), minlength=c)[:c]
        _accumulate_bins(hist, sorted(bin_idx), pred, zmax, d, confidence, score_range, edges, c, m)
        if total_idx:
            onehot = torch.nn.functional.one_hot(pred, c).to(torch.float32)
            counts_j = onehot.sum(0).double()
            for ti in total_idx:
                v, r = _doubt_from_gaps(pred, zmax, d, float(TEMPERATURE_GRID[ti]), confidence, score_range,
                                        shares=leaks)
                view = hist[ti].view(c, _NB, m)
                view[:, 0, 0] += counts_j
                if leaks:
                    wt = torch.cat([(1.0 - v)[:, None], r * v[:, None]], dim=1)
                    view[:, 0, 1:2 + c] += (onehot.T @ wt).double()  # (C, 1 + C) per predicted class
                else:  # the sum of s per predicted class only (enough for global TS)
                    view[:, 0, 1] += (onehot.T @ (1.0 - v)).double()
    counts = None
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != logits.shape[1:]:
            raise EstimationError(f"labels have shape {lab.shape} but the logits cover {logits.shape[1:]}")
        if lab.size and (lab.min() < 0 or lab.max() >= c):
            raise EstimationError(f"labels hold values outside 0..{c - 1} (found {lab.min()}..{lab.max()})")
        counts = confusion_counts(np.argmax(logits, axis=0), lab, c)
    binned = np.zeros(len(TEMPERATURE_GRID), dtype=bool)
    binned[sorted(bin_idx)] = True
    return CaseStatistics(hist=hist.reshape(len(TEMPERATURE_GRID), c, _NB, m).numpy(), predicted=predicted,
                          counts=counts, confidence=confidence, voxels=int(z.shape[0]),
                          temperatures=bool(temperatures) or binned.all(), binned=binned,
                          leaks=bool(leaks) or not temperatures)


def add_binned_temperatures(st: CaseStatistics, logits: np.ndarray, t_indices: Iterable[int],
                            score_range: Optional[Tuple[float, float]] = None) -> None:
    """Add full histograms at more grid temperatures to ``st`` (a second pass over the case)."""
    todo = sorted(int(t) for t in set(t_indices) if not st.binned[int(t)])
    if not todo:
        return
    logits = _check_logits(logits)
    c = logits.shape[0]
    m = 2 + 2 * c
    z = _flat(logits)
    edges = torch.tensor(_V_EDGES[1:-1], dtype=torch.float32)
    hist = torch.zeros((len(TEMPERATURE_GRID), c * _NB, m), dtype=torch.float64)
    for start in range(0, z.shape[0], _CHUNK):
        pred, zmax, d = _gaps(z[start:start + _CHUNK])
        _accumulate_bins(hist, todo, pred, zmax, d, st.confidence, score_range, edges, c, m)
    h = hist.reshape(len(TEMPERATURE_GRID), c, _NB, m).numpy()
    st.hist[todo] = h[todo]
    st.binned[todo] = True


# --------------------------------------------------------------------------- contributions

def _grid_position(temperature: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interpolation in log T between grid temperatures: lower index, upper index, weight."""
    lt = np.log(np.clip(temperature, TEMPERATURE_GRID[0], TEMPERATURE_GRID[-1]))
    pos = (lt - math.log(TEMPERATURE_GRID[0])) / (math.log(TEMPERATURE_GRID[1]) - math.log(TEMPERATURE_GRID[0]))
    lo = np.clip(np.floor(pos).astype(int), 0, len(TEMPERATURE_GRID) - 2)
    return lo, lo + 1, np.clip(pos - lo, 0.0, 1.0)


def _nearest_t(temperature: float) -> int:
    return int(np.argmin(np.abs(np.log(TEMPERATURE_GRID) - math.log(max(temperature, 1e-12)))))


def _contribution(h: np.ndarray, c: int, method: str, theta: np.ndarray, temperature: Optional[np.ndarray] = None):
    """Expected TP and leaked mass from the voxels predicted j, for candidate parameters.

    ``h``: hist[:, j] of one case, (nT, NB, m).  ``theta``: (K,) candidates.
    Returns tp (K,) and leak (K, C) (expected voxels of class k among those predicted j).
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if method in ("none", "ts"):
        tot = h.sum(axis=1)  # (nT, m)
        if method == "none":
            row = np.broadcast_to(tot[_T1], (len(theta), tot.shape[1]))
        else:
            lo, hi, w = _grid_position(theta)
            row = tot[lo] * (1 - w)[:, None] + tot[hi] * w[:, None]
        tp = row[:, 1]
        leak = row[:, 2:2 + c] - row[:, 2 + c:2 + 2 * c]
        return tp, leak
    if method == "doc":
        b = h[_T1]  # (NB, m)
        n = b[:, 0]
        mean_s = np.divide(b[:, 1], n, out=np.zeros_like(n), where=n > 0)
        lin = mean_s[None, :] - theta[:, None]  # (K, NB)
        inside = (lin >= 0) & (lin <= 1)
        full = lin > 1
        q_sum = np.where(inside, b[None, :, 1] - theta[:, None] * n[None, :], 0.0) + np.where(full, n[None, :], 0.0)
        r_sum = b[:, 2:2 + c]
        rq_sum = (np.where(inside, 1.0, 0.0)[:, :, None] * (b[None, :, 2 + c:2 + 2 * c] - theta[:, None, None] * r_sum[None])
                  + np.where(full, 1.0, 0.0)[:, :, None] * r_sum[None])
        tp = q_sum.sum(1)
        leak = r_sum.sum(0)[None, :] - rq_sum.sum(1)
        return tp, leak
    if method in ("atc", "ts-atc"):
        if method == "atc":
            b = h[_T1]
        else:
            b = h[_nearest_t(float(temperature))]
        # theta: number of leading (most confident) bins counted as correct, 0..NB
        k = np.clip(np.asarray(theta, dtype=int), 0, _NB)
        cum = np.concatenate([np.zeros((1, b.shape[1])), np.cumsum(b, axis=0)], axis=0)  # (NB+1, m)
        tp = cum[k, 0]
        leak = cum[-1, 2:2 + c][None, :] - cum[k, 2:2 + c]
        return tp, leak
    raise EstimationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _threshold_to_bins(threshold: float) -> int:
    """Bins counted confident for a score threshold t (voxel confident iff s > t iff v < 1 - t):
    the bin edge nearest to 1 - t (in log scale; thresholds are fitted on bin edges)."""
    limit = 1.0 - float(threshold)
    if limit <= 0.0:
        return 0
    pos = np.log(_V_EDGES[1:])
    return 1 + int(np.argmin(np.abs(pos - math.log(limit))))


def _bins_to_threshold(k: int) -> float:
    return float(1.0 - _V_EDGES[int(k)]) if k < len(_V_EDGES) else 0.0


# --------------------------------------------------------------------------- estimates

@dataclass
class CaseEstimate:
    """Estimated per-class performance of one case (see the module docstring)."""

    class_names: List[str]
    classes: List[Dict[str, Any]]
    method: str
    class_specific: bool

    def metric_array(self, name: str) -> np.ndarray:
        """(C,) float64 of one metric, NaN where it is undefined (explicitly, never silently)."""
        return np.array([np.nan if row[name] is None else row[name] for row in self.classes], dtype=np.float64)

    def as_rows(self) -> List[Dict[str, Any]]:
        return [dict(row, name=n) for n, row in zip(self.class_names, self.classes)]


def _metrics_from_expectations(tp: np.ndarray, n_pred: np.ndarray, g: np.ndarray,
                               absent_voxels: float) -> List[Dict[str, Any]]:
    rows = []
    for k in range(len(tp)):
        tpk, nk, gk = float(tp[k]), float(n_pred[k]), float(g[k])
        if nk == 0 and gk < absent_voxels:
            rows.append({"dice": None, "sensitivity": None, "precision": None, "state": "absent",
                         "predicted_voxels": 0, "expected_voxels": gk, "expected_tp": tpk, "mean_confidence": None})
            continue
        state = "predicted" if nk > 0 else "possibly missed"
        rows.append({"dice": 2 * tpk / (nk + gk) if nk + gk > 0 else 0.0,
                     "sensitivity": tpk / gk if gk > 0 else (None if nk == 0 else 0.0),
                     "precision": tpk / nk if nk > 0 else None,
                     "state": state, "predicted_voxels": int(nk), "expected_voxels": gk, "expected_tp": tpk,
                     "mean_confidence": tpk / nk if nk > 0 else None})
    return rows


def cohort_estimate(estimates: Sequence[CaseEstimate]) -> List[Dict[str, Any]]:
    """Cohort-level per-class estimate: mean (and spread) of the per-case metrics over the
    cases where they are defined, plus the pooled (voxel-summed) Dice."""
    if not estimates:
        raise EstimationError("no case estimates to combine")
    names = estimates[0].class_names
    out = []
    for k, name in enumerate(names):
        row: Dict[str, Any] = {"name": name}
        for metric in ("dice", "sensitivity", "precision"):
            vals = [e.classes[k][metric] for e in estimates if e.classes[k][metric] is not None]
            row[metric] = float(np.mean(vals)) if vals else None
            row[metric + "_std"] = float(np.std(vals)) if vals else None
        tp = sum(e.classes[k]["expected_tp"] for e in estimates)
        den = sum(e.classes[k]["predicted_voxels"] + e.classes[k]["expected_voxels"] for e in estimates)
        row["pooled_dice"] = 2 * tp / den if den > 0 else None
        row["cases_defined"] = sum(e.classes[k]["dice"] is not None for e in estimates)
        row["cases"] = len(estimates)
        out.append(row)
    return out


# --------------------------------------------------------------------------- estimator

@dataclass
class PerformanceEstimator:
    """Fitted calibration: method, confidence score and per-class parameters."""

    method: str = "none"
    class_specific: bool = False
    confidence: str = "mcp"
    temperature: Optional[List[float]] = None   # per class (CS) or one value repeated
    offset: Optional[List[float]] = None        # DoC delta
    threshold: Optional[List[float]] = None     # ATC threshold on the score
    score_range: Optional[Tuple[float, float]] = None
    num_classes: int = 0
    fit_seconds: float = 0.0
    fitted_on: Dict[str, Any] = field(default_factory=dict)
    absent_voxels: float = 0.5

    # ---- parameters per predicted class (as arrays)
    def _temps(self) -> np.ndarray:
        if self.temperature is None:
            return np.ones(self.num_classes)
        return np.asarray(self.temperature, dtype=np.float64)

    def _bins(self) -> np.ndarray:
        return np.array([_threshold_to_bins(t) for t in self.threshold]) if self.threshold is not None else None

    # ---- estimates from statistics (fitting and tests) and from logits (use)
    def expectations_from_stats(self, st: CaseStatistics) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        c = st.num_classes
        tp = np.zeros(c)
        g = np.zeros(c)
        for j in range(c):
            t, l = self._class_contribution(st.hist[:, j], c, j)
            tp[j] += t
            g += l
        return tp, st.predicted.astype(np.float64), g + tp

    def _class_contribution(self, h: np.ndarray, c: int, j: int):
        m = self.method
        if m == "none":
            tp, leak = _contribution(h, c, "none", np.zeros(1))
        elif m == "ts":
            tp, leak = _contribution(h, c, "ts", self._temps()[j:j + 1])
        elif m == "doc":
            tp, leak = _contribution(h, c, "doc", np.asarray(self.offset[j:j + 1]))
        elif m == "atc":
            tp, leak = _contribution(h, c, "atc", self._bins()[j:j + 1])
        else:
            tp, leak = _contribution(h, c, "ts-atc", self._bins()[j:j + 1], self._temps()[j])
        return float(tp[0]), leak[0]

    def estimate_stats(self, st: CaseStatistics, class_names: Optional[Sequence[str]] = None) -> CaseEstimate:
        if self.method in ("ts", "ts-atc") and not (st.temperatures and st.leaks):
            raise EstimationError(f"{self.method} needs statistics collected over temperatures (with leaks)")
        if st.confidence != self.confidence:
            raise EstimationError(f"statistics use the {st.confidence!r} score, the estimator {self.confidence!r}")
        if self.method == "ts-atc" and st.binned is not None:
            missing = sorted({_nearest_t(t) for t in self._temps()} - set(np.flatnonzero(st.binned).tolist()))
            if missing:
                raise EstimationError("TS-ATC needs histograms at its temperatures; add them with "
                                      "add_binned_temperatures()")
        tp, n, g = self.expectations_from_stats(st)
        names = list(class_names) if class_names else [f"class {k}" for k in range(st.num_classes)]
        return CaseEstimate(names, _metrics_from_expectations(tp, n, g, self.absent_voxels), self.method,
                            self.class_specific)

    def _voxel_q(self, zc: torch.Tensor):
        """Predicted class and calibrated q_pred, shares r (V, C) for a chunk of logits."""
        c = zc.shape[1]
        pred = torch.argmax(zc, dim=1)
        temps = torch.tensor(self._temps() if self.method in ("ts", "ts-atc") else np.ones(c), dtype=torch.float32)
        if self.method == "ts-atc":
            temps = torch.tensor([TEMPERATURE_GRID[_nearest_t(t)] for t in self._temps()], dtype=torch.float32)
        t_vox = temps[pred]
        _, v, r = _doubt_and_shares(zc, t_vox, self.confidence, self.score_range)
        s = 1.0 - v
        if self.method in ("none", "ts"):
            q = s
        elif self.method == "doc":
            q = (s - torch.tensor(self.offset, dtype=torch.float32)[pred]).clamp(0.0, 1.0)
        else:  # confident iff s > t iff v < 1 - t
            limit = 1.0 - torch.tensor(self.threshold, dtype=torch.float64)
            q = (v.double() < limit[pred]).float()
        return pred, q, r

    def estimate(self, logits: np.ndarray, class_names: Optional[Sequence[str]] = None) -> CaseEstimate:
        """Per-class estimate for one unlabelled case (logits ``(C, ...)``)."""
        logits = _check_logits(logits)
        c = logits.shape[0]
        if self.num_classes and c != self.num_classes:
            raise EstimationError(f"the estimator was fitted for {self.num_classes} classes, "
                                  f"the logits have {c}")
        acc = self.accumulator(c)
        acc.add(logits)
        return acc.result(class_names)

    def accumulator(self, num_classes: int) -> "EstimateAccumulator":
        """Streaming form of :meth:`estimate`: add the logits of a volume piece by piece (any
        split into voxel sets), then read the estimate; the sums are the same as in one pass."""
        return EstimateAccumulator(self, num_classes)

    def calibrated_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated per-class probabilities for logits (N, C, ...) (the module's confidence maps).

        ``none``/``ts``/``doc``: the full calibrated distribution q_k.  Threshold
        methods (``atc``, ``ts-atc``) give 0/1 per voxel, which carries no graded
        confidence, so their maps are those of the preceding stage (plain softmax
        for ``atc``, the temperature-scaled softmax for ``ts-atc``).
        """
        shape = logits.shape
        c = shape[1]
        z = logits.movedim(1, -1).reshape(-1, c).float()
        out = torch.empty_like(z)
        saved = self.method
        try:
            if saved == "atc":
                self.method = "none"
            elif saved == "ts-atc":
                self.method = "ts"
            for start in range(0, z.shape[0], _CHUNK):
                zc = z[start:start + _CHUNK]
                pred, q, r = self._voxel_q(zc)
                probs = r * (1.0 - q)[:, None]
                probs.scatter_(1, pred[:, None], q[:, None])
                out[start:start + _CHUNK] = probs
        finally:
            self.method = saved
        return out.reshape(*shape[:1], *shape[2:], c).movedim(-1, 1).to(logits.dtype)

    # ---- model card
    def to_card(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"method": self.method, "class_specific": self.class_specific,
                                 "confidence": self.confidence}
        if self.method in ("ts", "ts-atc"):
            entry["temperature"] = [float(t) for t in self._temps()]
        if self.method == "doc":
            entry["offset"] = [float(o) for o in self.offset]
        if self.method in ("atc", "ts-atc"):
            entry["threshold"] = [float(t) for t in self.threshold]
        if self.score_range is not None:
            entry["score_range"] = [float(self.score_range[0]), float(self.score_range[1])]
        if self.fitted_on:
            entry["fitted_on"] = self.fitted_on
        return entry

    @classmethod
    def from_card(cls, entry: Optional[Dict[str, Any]], num_classes: int) -> "PerformanceEstimator":
        """Estimator from a card's ``calibration`` entry (``None``/``none``: plain confidence)."""
        entry = dict(entry or {"method": "none"})
        method = entry.get("method", "none")
        if method not in METHODS:
            raise EstimationError(f"unknown calibration method {method!r}; known: {', '.join(METHODS)}")
        est = cls(method=method, class_specific=bool(entry.get("class_specific", False)),
                  confidence=entry.get("confidence", "mcp"), num_classes=num_classes,
                  fitted_on=dict(entry.get("fitted_on", {})))

        def per_class(key: str) -> Optional[List[float]]:
            if key not in entry:
                return None
            v = entry[key]
            v = list(v) if isinstance(v, list) else [float(v)] * num_classes
            if len(v) != num_classes:
                raise EstimationError(f"calibration {key} has {len(v)} values for {num_classes} classes")
            return [float(x) for x in v]

        est.temperature = per_class("temperature")
        est.offset = per_class("offset")
        est.threshold = per_class("threshold")
        if "score_range" in entry:
            est.score_range = (float(entry["score_range"][0]), float(entry["score_range"][1]))
        needs = {"ts": ["temperature"], "doc": ["offset"], "atc": ["threshold"],
                 "ts-atc": ["temperature", "threshold"], "none": []}[method]
        for key in needs:
            if getattr(est, key) is None:
                raise EstimationError(f"calibration method {method!r} needs {key!r}")
        if est.confidence == "energy" and est.score_range is None:
            raise EstimationError("calibration with the energy score needs 'score_range'")
        return est


# --------------------------------------------------------------------------- fitting

_TS_CANDIDATES = np.exp(np.linspace(math.log(TEMPERATURE_GRID[0]), math.log(TEMPERATURE_GRID[-1]), 353))
_DOC_CANDIDATES = np.linspace(-1.0, 1.0, 801)
_ATC_CANDIDATES = np.arange(_NB + 1)


def _candidates(method: str) -> np.ndarray:
    return {"ts": _TS_CANDIDATES, "doc": _DOC_CANDIDATES, "atc": _ATC_CANDIDATES, "ts-atc": _ATC_CANDIDATES}[method]


def _fit_global(stats: Sequence[CaseStatistics], method: str, temperature: Optional[np.ndarray]) -> float:
    """One parameter for all classes: pooled expected accuracy = pooled true accuracy.
    ``temperature``: per-class temperatures of the TS stage (``ts-atc`` only)."""
    cand = _candidates(method)
    correct = sum(float(st.counts[:, 0].sum()) for st in stats)
    expected = np.zeros(len(cand))
    for st in stats:
        for j in range(st.num_classes):
            tp, _ = _contribution(st.hist[:, j], st.num_classes, method, cand,
                                  None if temperature is None else temperature[j])
            expected += tp
    return float(cand[int(np.argmin(np.abs(expected - correct)))])


def _fit_class_specific(stats: Sequence[CaseStatistics], method: str, start: np.ndarray,
                        temperature: Optional[np.ndarray], sweeps: int = 3) -> np.ndarray:
    """One parameter per predicted class, by coordinate descent on the mean absolute
    per-case Dice error over all (case, class) pairs where the true Dice is defined
    (each class's parameter also moves the expected false negatives of the others)."""
    c = stats[0].num_classes
    theta = np.array(start, dtype=np.float64)
    true = np.stack([st.true_dice() for st in stats])                      # (n, C)
    defined = ~np.isnan(true)
    npred = np.stack([st.predicted for st in stats]).astype(np.float64)      # (n, C)
    cand = _candidates(method)

    def contrib(st, j, values):
        return _contribution(st.hist[:, j], c, method, values,
                             None if temperature is None else temperature[j])

    # current contributions per case and predicted class
    cur_tp = np.zeros((len(stats), c))
    cur_leak = np.zeros((len(stats), c, c))
    for i, st in enumerate(stats):
        for j in range(c):
            tp, leak = contrib(st, j, theta[j:j + 1])
            cur_tp[i, j], cur_leak[i, j] = tp[0], leak[0]
    order = np.argsort(-npred.sum(0))
    for _ in range(sweeps):
        changed = False
        for j in order:
            if npred[:, j].sum() == 0:
                continue
            err = np.zeros(len(cand))
            for i, st in enumerate(stats):
                tp_j, leak_j = contrib(st, j, cand)                          # (K,), (K, C)
                tp = np.broadcast_to(cur_tp[i], (len(cand), c)).copy()
                tp[:, j] = tp_j
                g = cur_leak[i].sum(0) - cur_leak[i, j] + leak_j + tp        # (K, C)
                den = npred[i][None, :] + g
                est = np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), 0.0)
                err += np.where(defined[i][None, :], np.abs(est - np.nan_to_num(true[i])[None, :]), 0.0).sum(1)
            best = float(cand[int(np.argmin(err))])
            if best != theta[j]:
                changed = True
                theta[j] = best
                for i, st in enumerate(stats):
                    tp, leak = contrib(st, j, theta[j:j + 1])
                    cur_tp[i, j], cur_leak[i, j] = tp[0], leak[0]
        if not changed:
            break
    return theta


def fit_estimator(cases: Iterable[Any], method: str = "ts-atc", class_specific: bool = True,
                  confidence: str = "mcp", score_range: Optional[Tuple[float, float]] = None
                  ) -> PerformanceEstimator:
    """Fit calibration on labelled validation cases.

    ``cases``: (logits ``(C, ...)``, labels ``(...)``) pairs, or ready
    :class:`CaseStatistics` with counts.  Global variants match the pooled
    voxel accuracy (as TS/DoC/ATC are classically fitted); class-specific
    variants fit one parameter per predicted class to the per-case Dice of
    every class (see :func:`_fit_class_specific`).
    """
    if method not in METHODS:
        raise EstimationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if confidence not in CONFIDENCE_SCORES:
        raise EstimationError(f"unknown confidence score {confidence!r}; known: {', '.join(CONFIDENCE_SCORES)}")
    t0 = time.perf_counter()
    items = list(cases)
    if not items:
        raise EstimationError("calibration needs at least one labelled validation case")
    raw = None
    if isinstance(items[0], CaseStatistics):
        stats = items
        for st in stats:
            if st.binned is None:
                st.binned = np.ones(len(TEMPERATURE_GRID), dtype=bool) if st.temperatures else (
                    np.arange(len(TEMPERATURE_GRID)) == _T1)
    else:
        raw = items
        if confidence == "energy" and score_range is None:
            score_range = energy_range(lg for lg, _ in items)
        stats = [case_statistics(lg, lab, confidence, score_range, temperatures=method in ("ts", "ts-atc"),
                                 leaks=class_specific) for lg, lab in items]
    for i, st in enumerate(stats):
        if st.counts is None:
            raise EstimationError(f"validation case #{i} has no labels")
        if method in ("ts", "ts-atc") and not st.temperatures:
            raise EstimationError(f"validation case #{i} was reduced at T = 1 only; {method} needs "
                                  f"case_statistics(..., temperatures=True)")
        if method in ("ts", "ts-atc") and class_specific and not st.leaks:
            raise EstimationError(f"validation case #{i} was reduced without leaks; class-specific {method} "
                                  f"needs case_statistics(..., leaks=True)")
        if st.confidence != confidence:
            raise EstimationError(f"validation case #{i} was reduced with the {st.confidence!r} score, "
                                  f"not {confidence!r}")
    c = stats[0].num_classes
    if any(st.num_classes != c for st in stats):
        raise EstimationError("validation cases have different numbers of classes")
    est = PerformanceEstimator(method=method, class_specific=class_specific, confidence=confidence,
                               score_range=score_range, num_classes=c)
    if method in ("ts", "ts-atc"):
        t = _fit_global(stats, "ts", None)
        temps = np.full(c, t)
        if class_specific:
            temps = _fit_class_specific(stats, "ts", temps, None)
        if method == "ts-atc":  # the threshold stage works on the grid temperature nearest the fit
            temps = np.array([TEMPERATURE_GRID[_nearest_t(x)] for x in temps])
            needed = {_nearest_t(x) for x in temps}
            for i, st in enumerate(stats):
                missing = [t for t in needed if not st.binned[t]]
                if missing:
                    if raw is None:
                        raise EstimationError(f"validation case #{i} has no histograms at the fitted temperatures; "
                                              "pass the logits, or use add_binned_temperatures()")
                    add_binned_temperatures(st, raw[i][0], missing, score_range)
        est.temperature = [float(x) for x in temps]
    if method == "doc":
        d = _fit_global(stats, "doc", None)
        off = np.full(c, d)
        if class_specific:
            off = _fit_class_specific(stats, "doc", off, None)
        est.offset = [float(x) for x in off]
    if method in ("atc", "ts-atc"):
        temps_arr = np.asarray(est.temperature) if method == "ts-atc" else None
        bins = np.full(c, _fit_global(stats, method, temps_arr))
        if class_specific:
            bins = _fit_class_specific(stats, method, bins, temps_arr)
        est.threshold = [_bins_to_threshold(int(b)) for b in bins]
    est.fit_seconds = time.perf_counter() - t0
    est.fitted_on = {"cases": len(stats), "voxels": int(sum(st.voxels for st in stats))}
    return est


class EstimateAccumulator:
    """Per-class expected true positives, predicted and expected reference voxels, summed over
    pieces of one case (see :meth:`PerformanceEstimator.accumulator`)."""

    def __init__(self, estimator: PerformanceEstimator, num_classes: int):
        if estimator.num_classes and num_classes != estimator.num_classes:
            raise EstimationError(f"the estimator was fitted for {estimator.num_classes} classes, "
                                  f"the logits have {num_classes}")
        self.estimator = estimator
        self.c = int(num_classes)
        self.tp = torch.zeros(self.c, dtype=torch.float64)
        self.g = torch.zeros(self.c, dtype=torch.float64)
        self.n = torch.zeros(self.c, dtype=torch.float64)

    def add(self, logits) -> None:
        """Logits ``(C, ...)`` of some voxels (numpy or torch)."""
        if isinstance(logits, torch.Tensor):
            if logits.shape[0] != self.c:
                raise EstimationError(f"expected {self.c} classes, got logits of shape {tuple(logits.shape)}")
            z = logits.reshape(self.c, -1).T.float()
            if not bool(torch.isfinite(z).all()):
                raise EstimationError("logits contain NaN or infinite values; the network output is unusable")
        else:
            logits = _check_logits(logits)
            if logits.shape[0] != self.c:
                raise EstimationError(f"expected {self.c} classes, got logits of shape {logits.shape}")
            z = _flat(logits)
        for start in range(0, z.shape[0], _CHUNK):
            pred, q, r = self.estimator._voxel_q(z[start:start + _CHUNK])
            qd = q.double()
            self.tp.index_add_(0, pred, qd)
            self.n += torch.bincount(pred, minlength=self.c)[:self.c].double()
            self.g += (r.double() * (1.0 - qd)[:, None]).sum(0)

    def fused_supported(self) -> bool:
        """Whether :meth:`add_with_maps` can serve this estimator in one pass: the MCP score with
        ``none``/``ts``/``atc``/``ts-atc``, whose confidence maps are a softmax at the same
        per-class temperatures that the estimate uses (for TS-ATC: temperatures on the fitting
        grid, which is where the fit puts them)."""
        est = self.estimator
        if est.confidence != "mcp" or est.method not in ("none", "ts", "atc", "ts-atc"):
            return False
        if est.method == "ts-atc":
            temps = est._temps()
            grid = np.array([TEMPERATURE_GRID[_nearest_t(t)] for t in temps])
            return bool(np.allclose(grid, temps, rtol=1e-9, atol=0.0))
        return True

    def add_with_maps(self, logits: torch.Tensor,
                      chunk: int = 1 << 16) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One pass over logits ``(C, ...)``: add them to the estimate (as :meth:`add`) and return
        the calibrated probabilities ``(C, ...)`` (as :meth:`PerformanceEstimator.calibrated_probabilities`),
        the predicted class and the normalised-entropy uncertainty, sharing the logit gaps
        between all of them. ``None`` when the estimator is not one :meth:`fused_supported`
        covers (the caller then uses the two-pass path).

        Works class by class on the ``(C, V)`` layout in cache-sized chunks, so no ``(V, C)``
        transposed copy is made. Equal to the two-pass path up to float32 rounding."""
        if not self.fused_supported():
            return None
        if not isinstance(logits, torch.Tensor) or logits.shape[0] != self.c:
            raise EstimationError(f"expected a tensor with {self.c} classes first, got shape "
                                  f"{tuple(getattr(logits, 'shape', ()))}")
        est, c = self.estimator, self.c
        shape = logits.shape
        z = logits.reshape(c, -1).float()
        if not bool(torch.isfinite(z).all()):
            raise EstimationError("logits contain NaN or infinite values; the network output is unusable")
        temps = est._temps() if est.method in ("ts", "ts-atc") else np.ones(c)
        inv_t = torch.tensor(1.0 / temps, dtype=torch.float32)
        limit = 1.0 - torch.tensor(est.threshold, dtype=torch.float64) if est.method in ("atc", "ts-atc") else None
        v_total = z.shape[1]
        probs = torch.empty((c, v_total), dtype=torch.float32)
        labels = torch.empty(v_total, dtype=torch.int64)
        unc = torch.empty(v_total, dtype=torch.float32)
        log_c = math.log(c)
        for start in range(0, v_total, chunk):
            zc = z[:, start:start + chunk]
            zmax = zc[0].clone()
            pred = torch.zeros(zc.shape[1], dtype=torch.int64)
            for k in range(1, c):  # first maximum wins, as torch.argmax
                gt = zc[k] > zmax
                zmax = torch.where(gt, zc[k], zmax)
                pred.masked_fill_(gt, k)
            e = (zc - zmax).mul_(inv_t[pred]).exp_()       # exp((z_k - z_max) / T_pred)
            e.scatter_(0, pred[None], 0.0)                  # the predicted class is not "other"
            o = e.sum(0)                                    # sum over the other classes
            v = (o / (1.0 + o)).clamp_(0.0, 1.0)            # doubt 1 - MCP
            # the estimate: q = calibrated confidence of the predicted class; what is left, 1 - q,
            # goes to the other classes in shares r_k = e_k / o
            q = (v.double() < limit[pred]).double() if limit is not None else (1.0 - v).double()
            self.tp.index_add_(0, pred, q)
            self.n += torch.bincount(pred, minlength=c)[:c].double()
            miss = 1.0 - q
            pos = o > 0
            self.g += torch.mv(e.double(), torch.where(pos, miss / torch.where(pos, o, 1.0).double(), 0.0))
            if not bool(pos.all()):  # no other class has any probability: equal shares
                w0 = torch.where(pos, 0.0, miss) / (c - 1)
                self.g += w0.sum()
                self.g -= torch.zeros(c, dtype=torch.float64).index_add_(0, pred, w0)
            # the maps: softmax at the predicted class's temperature
            p = e.mul_((1.0 / (1.0 + o))[None])
            p.scatter_(0, pred[None], (1.0 - v)[None])
            probs[:, start:start + chunk] = p
            labels[start:start + chunk] = pred
            unc[start:start + chunk] = (-(p * torch.log(p.clamp_min(1e-12))).sum(0) / log_c).clamp_(0.0, 1.0)
        return probs.reshape(shape), labels.reshape(shape[1:]), unc.reshape(shape[1:])

    def result(self, class_names: Optional[Sequence[str]] = None) -> CaseEstimate:
        g = self.g + self.tp
        names = list(class_names) if class_names else [f"class {k}" for k in range(self.c)]
        return CaseEstimate(names, _metrics_from_expectations(self.tp.numpy(), self.n.numpy(), g.numpy(),
                                                              self.estimator.absent_voxels),
                            self.estimator.method, self.estimator.class_specific)
