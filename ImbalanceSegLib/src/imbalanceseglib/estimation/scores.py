"""Per-voxel confidence scores and their "doubt", computed from logit gaps.

Method: the confidence scores that class-specific performance estimation calibrates
(Li, Kamnitsas, Islam, Chen and Glocker, "Estimating model performance under domain
shifts with class-specific confidence scores", MICCAI 2022, arXiv:2207.09957 -- the
method MOVAL implements), our own implementation. At a voxel with logits ``z`` the network
predicts ``j = argmax z``; at temperature ``T`` the score ``s`` in [0, 1] is one of

* ``mcp``     maximum class probability ``s = max_k softmax(z / T)_k``;
* ``entropy`` ``s = 1 - H(softmax(z / T)) / log C``;
* ``energy``  ``s = (E - lo) / (hi - lo)`` clipped to [0, 1], with the negative free energy
  ``E = T logsumexp(z / T)`` and ``[lo, hi]`` its range on the validation cases at ``T = 1``
  (:func:`energy_range`);
* ``doctor``  ``s = 1 - D / (C - 1)``, DOCTOR's ``D = (1 - g) / g`` with ``g = sum_k p_k^2``
  (normalised by its exact bounds ``0 <= D <= C - 1``).

Everything here works on the *doubt* ``v = 1 - s`` and on the shares
``r_k = p_k / sum_{l != j} p_l`` (``r_j = 0``) of the probability left to the other
classes, both computed from the gaps ``z_k - z_max`` so that float32 resolves a
confidence of 0.99999 from 0.999 (``1 - p_max`` would round to 0). Also here: the
temperature grid the fits search and the doubt bins the statistics are kept in.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import numpy as np
import torch

# Defined with the model-card schema (imbalanceseglib.card, torch-free), which checks cards against them.
from ..card import CONFIDENCE_SCORES

__all__ = ["CONFIDENCE_SCORES", "TEMPERATURE_GRID", "EstimationError", "energy_range"]

#: Temperatures at which statistics are collected: 1/8 to 16 in quarter octaves (T = 1, 2, 4 are on it).
TEMPERATURE_GRID = np.exp2(np.linspace(-3.0, 4.0, 29))
T1_INDEX = int(np.argmin(np.abs(TEMPERATURE_GRID - 1.0)))

# Bins over the "doubt" v = 1 - s: log-spaced below 1/64 (confident voxels dominate
# segmentation, and a threshold must resolve 0.999 from 0.99999), linear above.
DOUBT_EDGES = np.unique(np.concatenate([[0.0], np.logspace(-8, math.log10(1 / 64), 49),
                                     np.linspace(1 / 64, 1.0, 64)]))
DOUBT_EDGES[-1] = 1.0 + 1e-9
N_BINS = len(DOUBT_EDGES) - 1
CHUNK = 1 << 19


class EstimationError(ValueError):
    """Input that cannot be used for calibration or estimation (the message names it)."""


def check_logits(logits: np.ndarray, what: str = "logits") -> np.ndarray:
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


def flat_logits(logits: np.ndarray) -> torch.Tensor:
    """(C, ...) -> (V, C) float32 tensor (a view where possible)."""
    c = logits.shape[0]
    return torch.from_numpy(np.ascontiguousarray(logits.reshape(c, -1), dtype=np.float32)).T


def logit_gaps(z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Predicted class, max logit, and logit gaps z_k - z_max with the predicted class pushed
    to -1e30 (so exp gives exactly 0 there and sums over the other classes stay accurate)."""
    zmax, pred = torch.max(z, dim=1)
    d = z - zmax[:, None]
    d.scatter_(1, pred[:, None], -1e30)
    return pred, zmax, d


def doubt_from_gaps(pred: torch.Tensor, zmax: torch.Tensor, d: torch.Tensor, temperature, confidence: str,
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


def doubt_and_shares(z: torch.Tensor, temperature, confidence: str,
                      score_range: Optional[Tuple[float, float]]):
    pred, zmax, d = logit_gaps(z)
    v, r = doubt_from_gaps(pred, zmax, d, temperature, confidence, score_range)
    return pred, v, r


def energy_range(logit_cases: Iterable[np.ndarray]) -> Tuple[float, float]:
    """Range of the (unnormalised) energy score over cases, at T = 1."""
    lo, hi = math.inf, -math.inf
    for logits in logit_cases:
        z = flat_logits(check_logits(logits))
        for start in range(0, z.shape[0], CHUNK):
            e = torch.logsumexp(z[start:start + CHUNK], dim=1)
            lo, hi = min(lo, float(e.min())), max(hi, float(e.max()))
    if not math.isfinite(lo):
        raise EstimationError("no voxels to compute the energy range from")
    return lo, hi


# --------------------------------------------------------------------------- grid positions

def grid_position(temperature: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Interpolation in log T between grid temperatures: lower index, upper index, weight."""
    lt = np.log(np.clip(temperature, TEMPERATURE_GRID[0], TEMPERATURE_GRID[-1]))
    pos = (lt - math.log(TEMPERATURE_GRID[0])) / (math.log(TEMPERATURE_GRID[1]) - math.log(TEMPERATURE_GRID[0]))
    lo = np.clip(np.floor(pos).astype(int), 0, len(TEMPERATURE_GRID) - 2)
    return lo, lo + 1, np.clip(pos - lo, 0.0, 1.0)


def nearest_grid_index(temperature: float) -> int:
    return int(np.argmin(np.abs(np.log(TEMPERATURE_GRID) - math.log(max(temperature, 1e-12)))))


def threshold_to_bins(threshold: float) -> int:
    """Bins counted confident for a score threshold t (voxel confident iff s > t iff v < 1 - t):
    the bin edge nearest to 1 - t (in log scale; thresholds are fitted on bin edges)."""
    limit = 1.0 - float(threshold)
    if limit <= 0.0:
        return 0
    pos = np.log(DOUBT_EDGES[1:])
    return 1 + int(np.argmin(np.abs(pos - math.log(limit))))


def bins_to_threshold(k: int) -> float:
    return float(1.0 - DOUBT_EDGES[int(k)]) if k < len(DOUBT_EDGES) else 0.0
