"""Cases reduced once to sufficient statistics, and the expected counts each method reads off them.

Method: the calibration maps of class-specific performance estimation (Li et al., MICCAI
2022, arXiv:2207.09957, the method MOVAL implements), evaluated on histograms instead of
voxels. A *method* turns the score ``s`` of :mod:`.scores` into the calibrated probability
``q_j`` that a voxel truly belongs to its predicted class ``j``:

* ``none``   ``q_j = s`` (plain average confidence, nothing fitted);
* ``ts``     temperature scaling: ``s`` computed from ``softmax(z / T_j)``;
* ``doc``    difference of confidences: ``q_j = clip(s - delta_j, 0, 1)``;
* ``atc``    average thresholded confidence: ``q_j = 1[s > t_j]``;
* ``ts-atc`` ``atc`` applied to the temperature-scaled score.

The remaining ``1 - q_j`` goes to the other classes in proportion to their shares ``r_k``, so
every voxel carries a full calibrated distribution ``q_k``. The parameter of class ``j``
(``T_j``, ``delta_j``, ``t_j``) acts on the voxels predicted ``j``: one value for all classes
is the global method, one per class the class-specific (CS) variant of the paper.

Over the voxels predicted ``j`` of one case :func:`contribution` gives the expected true
positives ``sum_{pred = j} q_j`` and the expected voxels of every other class ``k`` among them,
``sum_{pred = j} (1 - q_j) r_k`` (the misses of ``k`` hidden in ``j``'s segment), for any
candidate parameters, without touching a voxel: each case is reduced once to
:class:`CaseStatistics` (histograms of the doubt ``1 - s`` over a grid of temperatures, with
the per-bin sums every method needs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional, Tuple

import numpy as np
import torch

from ..card import ESTIMATION_METHODS as METHODS
from ..metrics.overlap import confusion_counts
from .scores import (CHUNK, CONFIDENCE_SCORES, DOUBT_EDGES, N_BINS, T1_INDEX, TEMPERATURE_GRID, EstimationError,
                     check_logits, doubt_from_gaps, flat_logits, grid_position, logit_gaps, nearest_grid_index)

__all__ = ["METHODS", "CaseStatistics", "case_statistics", "add_binned_temperatures"]


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
        v, r = doubt_from_gaps(pred, zmax, d, float(TEMPERATURE_GRID[ti]), confidence, score_range)
        s = 1.0 - v
        w[:, 1] = s
        w[:, 2:2 + c] = r
        w[:, 2 + c:] = r * s[:, None]
        hist[ti].index_add_(0, pred * N_BINS + torch.bucketize(v, edges, right=True), w)


def case_statistics(logits: np.ndarray, labels: Optional[np.ndarray] = None, confidence: str = "mcp",
                    score_range: Optional[Tuple[float, float]] = None, temperatures: bool = True,
                    binned_temperatures: Any = (), leaks: bool = True) -> CaseStatistics:
    """Reduce one case (logits ``(C, ...)``, optional integer labels ``(...)``) to statistics.

    Always: histograms at T = 1 (all that ``none``, ``doc`` and ``atc`` need).
    ``temperatures=True`` adds, at every grid temperature, the per-class totals TS
    needs; ``binned_temperatures`` (grid indices, or ``"all"``) adds full histograms at
    those temperatures (TS-ATC needs them at its fitted temperatures;
    :func:`~imbalanceseglib.estimation.fit_estimator` adds them with :func:`add_binned_temperatures`).
    ``leaks=False`` keeps only the sum of the score at those temperatures (what a *global* TS fit
    needs; such statistics cannot be used to estimate with TS)."""
    logits = check_logits(logits)
    c = logits.shape[0]
    if confidence not in CONFIDENCE_SCORES:
        raise EstimationError(f"unknown confidence score {confidence!r}; known: {', '.join(CONFIDENCE_SCORES)}")
    z = flat_logits(logits)
    m = 2 + 2 * c
    hist = torch.zeros((len(TEMPERATURE_GRID), c * N_BINS, m), dtype=torch.float64)
    edges = torch.tensor(DOUBT_EDGES[1:-1], dtype=torch.float32)
    predicted = np.zeros(c, dtype=np.int64)
    if binned_temperatures == "all":
        bin_idx = set(range(len(TEMPERATURE_GRID)))
    else:
        bin_idx = {T1_INDEX} | {int(t) for t in (binned_temperatures or ())}
    total_idx = [t for t in range(len(TEMPERATURE_GRID)) if t not in bin_idx] if temperatures else []
    for start in range(0, z.shape[0], CHUNK):
        pred, zmax, d = logit_gaps(z[start:start + CHUNK])
        predicted += np.bincount(pred.numpy(), minlength=c)[:c]
        _accumulate_bins(hist, sorted(bin_idx), pred, zmax, d, confidence, score_range, edges, c, m)
        if total_idx:
            onehot = torch.nn.functional.one_hot(pred, c).to(torch.float32)
            counts_j = onehot.sum(0).double()
            for ti in total_idx:
                v, r = doubt_from_gaps(pred, zmax, d, float(TEMPERATURE_GRID[ti]), confidence, score_range,
                                        shares=leaks)
                view = hist[ti].view(c, N_BINS, m)
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
    return CaseStatistics(hist=hist.reshape(len(TEMPERATURE_GRID), c, N_BINS, m).numpy(), predicted=predicted,
                          counts=counts, confidence=confidence, voxels=int(z.shape[0]),
                          temperatures=bool(temperatures) or binned.all(), binned=binned,
                          leaks=bool(leaks) or not temperatures)


def add_binned_temperatures(st: CaseStatistics, logits: np.ndarray, t_indices: Iterable[int],
                            score_range: Optional[Tuple[float, float]] = None) -> None:
    """Add full histograms at more grid temperatures to ``st`` (a second pass over the case)."""
    todo = sorted(int(t) for t in set(t_indices) if not st.binned[int(t)])
    if not todo:
        return
    logits = check_logits(logits)
    c = logits.shape[0]
    m = 2 + 2 * c
    z = flat_logits(logits)
    edges = torch.tensor(DOUBT_EDGES[1:-1], dtype=torch.float32)
    hist = torch.zeros((len(TEMPERATURE_GRID), c * N_BINS, m), dtype=torch.float64)
    for start in range(0, z.shape[0], CHUNK):
        pred, zmax, d = logit_gaps(z[start:start + CHUNK])
        _accumulate_bins(hist, todo, pred, zmax, d, st.confidence, score_range, edges, c, m)
    h = hist.reshape(len(TEMPERATURE_GRID), c, N_BINS, m).numpy()
    st.hist[todo] = h[todo]
    st.binned[todo] = True


# --------------------------------------------------------------------------- contributions

def contribution(h: np.ndarray, c: int, method: str, theta: np.ndarray, temperature: Optional[np.ndarray] = None):
    """Expected TP and leaked mass from the voxels predicted j, for candidate parameters.

    ``h``: hist[:, j] of one case, (nT, NB, m).  ``theta``: (K,) candidates.
    Returns tp (K,) and leak (K, C) (expected voxels of class k among those predicted j).
    """
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if method in ("none", "ts"):
        tot = h.sum(axis=1)  # (nT, m)
        if method == "none":
            row = np.broadcast_to(tot[T1_INDEX], (len(theta), tot.shape[1]))
        else:
            lo, hi, w = grid_position(theta)
            row = tot[lo] * (1 - w)[:, None] + tot[hi] * w[:, None]
        tp = row[:, 1]
        leak = row[:, 2:2 + c] - row[:, 2 + c:2 + 2 * c]
        return tp, leak
    if method == "doc":
        b = h[T1_INDEX]  # (NB, m)
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
            b = h[T1_INDEX]
        else:
            b = h[nearest_grid_index(float(temperature))]
        # theta: number of leading (most confident) bins counted as correct, 0..NB
        k = np.clip(np.asarray(theta, dtype=int), 0, N_BINS)
        cum = np.concatenate([np.zeros((1, b.shape[1])), np.cumsum(b, axis=0)], axis=0)  # (NB+1, m)
        tp = cum[k, 0]
        leak = cum[-1, 2:2 + c][None, :] - cum[k, 2:2 + c]
        return tp, leak
    raise EstimationError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
