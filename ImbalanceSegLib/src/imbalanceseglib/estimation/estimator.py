"""The fitted estimator: calibration parameters applied to logits, and the card's calibration entry.

Method: class-specific performance estimation (Li et al., MICCAI 2022, arXiv:2207.09957, the
method MOVAL implements), our own implementation. :class:`PerformanceEstimator` holds a method
(``none``, ``ts``, ``doc``, ``atc``, ``ts-atc``), a confidence score and one parameter per
predicted class (temperature ``T_j``, offset ``delta_j`` or threshold ``t_j``; the same value for
every class in the global variant); per voxel it gives the calibrated probability ``q_j`` of the
predicted class (``s`` at ``T_j``; ``clip(s - delta_j, 0, 1)``; ``1[s > t_j]``, see
:mod:`.statistics`) and shares the rest ``1 - q_j`` among the other classes, and from those the
expected counts and metrics of :mod:`.case_estimate` (Dice ``2 TP_k / (N_k + G_k)``), in one pass
or piece by piece (:mod:`.accumulate`).

A model card's ``calibration`` entry becomes an estimator in one place,
:func:`estimator_from_card`, after the card schema's own check
(:func:`imbalanceseglib.card.check_calibration`); inference, streaming, the command line and
the Slicer module all take their estimator from there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..card import check_calibration
from .accumulate import EstimateAccumulator
from .case_estimate import CaseEstimate, metrics_from_expectations
from .scores import (CHUNK, TEMPERATURE_GRID, EstimationError, check_logits, doubt_and_shares, nearest_grid_index,
                     threshold_to_bins)
from .statistics import CaseStatistics, contribution

__all__ = ["PerformanceEstimator", "estimator_from_card"]


@dataclass
class PerformanceEstimator:
    """Fitted calibration: method, confidence score and per-class parameters.

    ``logit_temperature`` is set only for a card whose calibration is the plain ``temperature``
    entry (one value, or one per class channel): the logits are divided by it
    (:meth:`scale_logits`) before anything else, and the estimate is then the plain
    confidence (``method="none"``)."""

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
    logit_temperature: Union[None, float, List[float]] = None

    # ---- parameters per predicted class (as arrays)
    def class_temperatures(self) -> np.ndarray:
        if self.temperature is None:
            return np.ones(self.num_classes)
        return np.asarray(self.temperature, dtype=np.float64)

    def _bins(self) -> np.ndarray:
        return np.array([threshold_to_bins(t) for t in self.threshold]) if self.threshold is not None else None

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
            tp, leak = contribution(h, c, "none", np.zeros(1))
        elif m == "ts":
            tp, leak = contribution(h, c, "ts", self.class_temperatures()[j:j + 1])
        elif m == "doc":
            tp, leak = contribution(h, c, "doc", np.asarray(self.offset[j:j + 1]))
        elif m == "atc":
            tp, leak = contribution(h, c, "atc", self._bins()[j:j + 1])
        else:
            tp, leak = contribution(h, c, "ts-atc", self._bins()[j:j + 1], self.class_temperatures()[j])
        return float(tp[0]), leak[0]

    def estimate_stats(self, st: CaseStatistics, class_names: Optional[Sequence[str]] = None) -> CaseEstimate:
        if self.method in ("ts", "ts-atc") and not (st.temperatures and st.leaks):
            raise EstimationError(f"{self.method} needs statistics collected over temperatures (with leaks)")
        if st.confidence != self.confidence:
            raise EstimationError(f"statistics use the {st.confidence!r} score, the estimator {self.confidence!r}")
        if self.method == "ts-atc" and st.binned is not None:
            needed = {nearest_grid_index(t) for t in self.class_temperatures()}
            missing = sorted(needed - set(np.flatnonzero(st.binned).tolist()))
            if missing:
                raise EstimationError("TS-ATC needs histograms at its temperatures; add them with "
                                      "add_binned_temperatures()")
        tp, n, g = self.expectations_from_stats(st)
        names = list(class_names) if class_names else [f"class {k}" for k in range(st.num_classes)]
        return CaseEstimate(names, metrics_from_expectations(tp, n, g, self.absent_voxels), self.method,
                            self.class_specific)

    def calibrated_voxels(self, zc: torch.Tensor, method: Optional[str] = None):
        """Predicted class and calibrated q_pred, shares r (V, C) for a chunk of logits
        (with ``method``: as if the estimator used that method, with its own parameters)."""
        method = method or self.method
        c = zc.shape[1]
        pred = torch.argmax(zc, dim=1)
        temps = torch.tensor(self.class_temperatures() if method in ("ts", "ts-atc") else np.ones(c),
                             dtype=torch.float32)
        if method == "ts-atc":
            temps = torch.tensor([TEMPERATURE_GRID[nearest_grid_index(t)] for t in self.class_temperatures()],
                                 dtype=torch.float32)
        t_vox = temps[pred]
        _, v, r = doubt_and_shares(zc, t_vox, self.confidence, self.score_range)
        s = 1.0 - v
        if method in ("none", "ts"):
            q = s
        elif method == "doc":
            q = (s - torch.tensor(self.offset, dtype=torch.float32)[pred]).clamp(0.0, 1.0)
        else:  # confident iff s > t iff v < 1 - t
            limit = 1.0 - torch.tensor(self.threshold, dtype=torch.float64)
            q = (v.double() < limit[pred]).float()
        return pred, q, r

    def estimate(self, logits: np.ndarray, class_names: Optional[Sequence[str]] = None) -> CaseEstimate:
        """Per-class estimate for one unlabelled case (logits ``(C, ...)``, as :meth:`scale_logits`
        gives them)."""
        logits = check_logits(logits)
        c = logits.shape[0]
        if self.num_classes and c != self.num_classes:
            raise EstimationError(f"the estimator was fitted for {self.num_classes} classes, "
                                  f"the logits have {c}")
        acc = self.accumulator(c)
        acc.add(logits)
        return acc.result(class_names)

    def accumulator(self, num_classes: int) -> EstimateAccumulator:
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
        method = {"atc": "none", "ts-atc": "ts"}.get(self.method, self.method)
        for start in range(0, z.shape[0], CHUNK):
            zc = z[start:start + CHUNK]
            pred, q, r = self.calibrated_voxels(zc, method)
            probs = r * (1.0 - q)[:, None]
            probs.scatter_(1, pred[:, None], q[:, None])
            out[start:start + CHUNK] = probs
        return out.reshape(*shape[:1], *shape[2:], c).movedim(-1, 1).to(logits.dtype)

    # ---- what inference applies
    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, ...) as the estimator sees them: divided by ``logit_temperature`` (one
        value, or one per class channel), unchanged when there is none."""
        t = self.logit_temperature
        if t is None:
            return logits
        if isinstance(t, (list, tuple)):
            if len(t) != logits.shape[1]:
                raise EstimationError(f"calibration has {len(t)} temperatures for {logits.shape[1]} classes")
            tt = torch.tensor(t, dtype=logits.dtype, device=logits.device).view(1, -1, *([1] * (logits.ndim - 2)))
        else:
            tt = float(t)
        return logits / tt

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The probability maps inference shows for logits (N, C, ...): the softmax of
        :meth:`scale_logits` for ``none`` (plain or temperature-scaled confidence),
        :meth:`calibrated_probabilities` for the fitted methods."""
        if self.method == "none":
            return torch.softmax(self.scale_logits(logits), dim=1)
        return self.calibrated_probabilities(logits)

    # ---- model card
    def to_card(self) -> Dict[str, Any]:
        """The model card's ``calibration`` entry (read back by :func:`estimator_from_card`)."""
        if self.logit_temperature is not None:
            t = self.logit_temperature
            return {"method": "temperature", "temperature": list(t) if isinstance(t, (list, tuple)) else t}
        entry: Dict[str, Any] = {"method": self.method, "class_specific": self.class_specific,
                                 "confidence": self.confidence}
        if self.method in ("ts", "ts-atc"):
            entry["temperature"] = [float(t) for t in self.class_temperatures()]
        if self.method == "doc":
            entry["offset"] = [float(o) for o in self.offset]
        if self.method in ("atc", "ts-atc"):
            entry["threshold"] = [float(t) for t in self.threshold]
        if self.score_range is not None:
            entry["score_range"] = [float(self.score_range[0]), float(self.score_range[1])]
        if self.fitted_on:
            entry["fitted_on"] = self.fitted_on
        return entry


def estimator_from_card(calibration: Optional[Mapping[str, Any]], num_classes: int) -> PerformanceEstimator:
    """The estimator a model card's ``calibration`` entry describes: the one place the entry is
    read. No entry, ``none`` and the plain ``temperature`` entry (whose logits
    :meth:`PerformanceEstimator.scale_logits` divides first) give the plain confidence; ``ts``,
    ``doc``, ``atc`` and ``ts-atc`` give the fitted estimator (a single value stands for every
    class). The entry is checked by the card schema (:func:`imbalanceseglib.card.check_calibration`,
    the same check as when a bundle is loaded) and nowhere else: an invalid entry raises its
    :class:`~imbalanceseglib.card.BundleError`."""
    if calibration is None:
        return PerformanceEstimator(method="none", num_classes=num_classes)
    entry = dict(calibration)
    check_calibration(entry, num_classes)
    method = entry.get("method", "none")
    if method == "temperature":
        t = entry["temperature"]
        return PerformanceEstimator(method="none", num_classes=num_classes,
                                    logit_temperature=[float(x) for x in t] if isinstance(t, list) else float(t))
    if method == "none":
        return PerformanceEstimator(method="none", num_classes=num_classes)

    def per_class(key: str) -> Optional[List[float]]:
        if key not in entry:
            return None
        v = entry[key]
        return [float(x) for x in (v if isinstance(v, list) else [v] * num_classes)]

    score_range = entry.get("score_range")
    return PerformanceEstimator(method=method, class_specific=bool(entry.get("class_specific", False)),
                                confidence=entry.get("confidence", "mcp"), num_classes=num_classes,
                                fitted_on=dict(entry.get("fitted_on", {})), temperature=per_class("temperature"),
                                offset=per_class("offset"), threshold=per_class("threshold"),
                                score_range=None if score_range is None else (float(score_range[0]),
                                                                              float(score_range[1])))

