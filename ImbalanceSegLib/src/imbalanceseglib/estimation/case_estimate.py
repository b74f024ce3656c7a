"""The label-free estimate of one case, and of a cohort, from expected counts.

Method: class-specific performance estimation (Li et al., MICCAI 2022, arXiv:2207.09957, the
method MOVAL implements) extended, as the paper does, from accuracy to the Dice similarity
coefficient; our own implementation (``Testing/Benchmarks/performance_estimation_differences.md``
lists where our definitions knowingly differ from MOVAL's and why). With the calibrated
distribution ``q_k`` of every voxel (:mod:`.statistics`) and ``N_k`` the voxels predicted ``k``,
the metrics of one case are the true metrics with counts replaced by their expectations:

* expected true positives ``TP_k = sum_{pred = k} q_k``;
* expected reference volume ``G_k = sum_x q_k(x)`` (the part outside the prediction,
  ``sum_{pred != k} q_k``, is the expected false negatives hidden in other classes' segments);
* Dice ``2 TP_k / (N_k + G_k)``, sensitivity ``TP_k / G_k``, precision ``TP_k / N_k``.

A class with ``N_k = 0`` and ``G_k`` below ``absent_voxels`` (default 0.5 voxel) is *absent*: its
metrics are ``None`` (undefined, as in ``metrics.overlap_from_counts`` when both sides are
empty), never NaN. With ``N_k = 0`` but ``G_k`` at or above the limit, Dice and sensitivity are 0
and the state says the class may have been missed. :func:`cohort_estimate` combines cases: the
mean and spread of each metric over the cases where it is defined, and the pooled Dice
``2 sum TP_k / sum (N_k + G_k)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

import numpy as np

from .scores import EstimationError

__all__ = ["CaseEstimate", "cohort_estimate", "metrics_from_expectations"]


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


def metrics_from_expectations(tp: np.ndarray, n_pred: np.ndarray, g: np.ndarray,
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
