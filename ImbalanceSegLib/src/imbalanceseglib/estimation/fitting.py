"""Fitting the calibration on labelled validation cases.

Method: the global and class-specific (CS) calibration fits of Li et al., MICCAI 2022
(arXiv:2207.09957, the method MOVAL implements), our own implementation:

* *global* TS, DoC, ATC, TS-ATC: one parameter for all classes such that the pooled expected
  voxel accuracy ``sum_j sum_{pred = j} q_j`` equals the pooled true accuracy (the classical
  fitting target of temperature scaling, difference of confidences and average thresholded
  confidence);
* *class-specific*: one parameter per predicted class, starting from the global fit, by
  coordinate descent on the mean absolute per-case Dice error ``|2 TP_k / (N_k + G_k) - Dice_k|``
  over every (case, class) pair where the true Dice is defined (each class's parameter also moves
  the expected false negatives of the others);
* TS-ATC: TS first, then ATC's threshold on the score at the fitted temperature (the grid
  temperature nearest the fit).

Each one-dimensional step is an exhaustive search over a fixed grid of candidates, evaluated on
the :class:`~.statistics.CaseStatistics` of the cases (never on voxels); see
``Testing/Benchmarks/performance_estimation_differences.md`` for how this differs from MOVAL.
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, Optional, Sequence, Tuple

import numpy as np

from .estimator import PerformanceEstimator
from .scores import (CONFIDENCE_SCORES, N_BINS, T1_INDEX, TEMPERATURE_GRID, EstimationError, bins_to_threshold,
                     energy_range, nearest_grid_index)
from .statistics import METHODS, CaseStatistics, add_binned_temperatures, case_statistics, contribution

__all__ = ["fit_estimator"]

_TS_CANDIDATES = np.exp(np.linspace(math.log(TEMPERATURE_GRID[0]), math.log(TEMPERATURE_GRID[-1]), 353))
_DOC_CANDIDATES = np.linspace(-1.0, 1.0, 801)
_ATC_CANDIDATES = np.arange(N_BINS + 1)


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
            tp, _ = contribution(st.hist[:, j], st.num_classes, method, cand,
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
        return contribution(st.hist[:, j], c, method, values,
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
                    np.arange(len(TEMPERATURE_GRID)) == T1_INDEX)
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
            temps = np.array([TEMPERATURE_GRID[nearest_grid_index(x)] for x in temps])
            needed = {nearest_grid_index(x) for x in temps}
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
        est.threshold = [bins_to_threshold(int(b)) for b in bins]
    est.fit_seconds = time.perf_counter() - t0
    est.fitted_on = {"cases": len(stats), "voxels": int(sum(st.voxels for st in stats))}
    return est
