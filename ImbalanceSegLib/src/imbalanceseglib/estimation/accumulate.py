"""Streaming accumulation of the label-free estimate, piece by piece over a volume.

Method: the expected counts of class-specific performance estimation (Li et al., MICCAI 2022,
arXiv:2207.09957, the method MOVAL implements) are sums over voxels, so a volume can be added
in any split into pieces (the slabs of :mod:`imbalanceseglib.streaming`) and the estimate read
at the end. Per class ``k`` :class:`EstimateAccumulator` sums the expected true positives
``TP_k = sum_{pred = k} q_k``, the predicted voxels ``N_k`` and the expected voxels of ``k`` in
other classes' segments ``sum_{pred != k} (1 - q_pred) r_k``; the metrics are then those of
:mod:`.case_estimate` (Dice ``2 TP_k / (N_k + G_k)`` with ``G_k = TP_k + the misses``).
:meth:`EstimateAccumulator.add_with_maps` also returns the calibrated probability maps, the
labels and the normalised-entropy uncertainty ``-sum_k p_k log p_k / log C`` in the same pass.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Tuple

import numpy as np
import torch

from .case_estimate import CaseEstimate, metrics_from_expectations
from .scores import CHUNK, TEMPERATURE_GRID, EstimationError, check_logits, flat_logits, nearest_grid_index

__all__ = ["EstimateAccumulator"]


class EstimateAccumulator:
    """Per-class expected true positives, predicted and expected reference voxels, summed over
    pieces of one case (see :meth:`PerformanceEstimator.accumulator`)."""

    def __init__(self, estimator: Any, num_classes: int):
        """``estimator``: the :class:`~.estimator.PerformanceEstimator` whose calibration is summed."""
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
            logits = check_logits(logits)
            if logits.shape[0] != self.c:
                raise EstimationError(f"expected {self.c} classes, got logits of shape {logits.shape}")
            z = flat_logits(logits)
        for start in range(0, z.shape[0], CHUNK):
            pred, q, r = self.estimator.calibrated_voxels(z[start:start + CHUNK])
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
            temps = est.class_temperatures()
            grid = np.array([TEMPERATURE_GRID[nearest_grid_index(t)] for t in temps])
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
        temps = est.class_temperatures() if est.method in ("ts", "ts-atc") else np.ones(c)
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
        return CaseEstimate(names, metrics_from_expectations(self.tp.numpy(), self.n.numpy(), g.numpy(),
                                                              self.estimator.absent_voxels),
                            self.estimator.method, self.estimator.class_specific)
