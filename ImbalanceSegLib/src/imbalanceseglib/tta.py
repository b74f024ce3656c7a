"""Test-time augmentation (TTA) with per-class merging of the augmented predictions.

Class-specific test-time augmentation after Li et al. (joint optimization of
class-specific training- and test-time data augmentation in segmentation, IEEE
TMI 2023): the volume is predicted under T flips and in-plane quarter turns, each
prediction is mapped back to the input grid, and the class probabilities are
merged per class,

* ``"mean"``: p_c(x) = (1/T) sum_t T_t^-1[softmax(f(T_t V))]_c(x), the usual TTA
  average (a consensus estimate);
* ``"max"``:  p_c(x) = max_t T_t^-1[softmax(f(T_t V))]_c(x), a soft union that
  favours sensitivity, for the rare classes that networks under-segment
  (:func:`rare_class_merge`);

then renormalised over classes at each voxel (p_c / sum_k p_k).  Li et al. learn
the policies by meta-learning; here the transforms and merge rules are fixed.
Training-time augmentation is :mod:`imbalanceseglib.augment`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

__all__ = [
    "TTA_TRANSFORMS",
    "AGREEMENT_VIEWS",
    "STABILITY_VIEWS",
    "parse_transform",
    "rare_class_merge",
    "segmentation_agreement",
    "tta_logits",
    "view_labels",
]

#: The views :func:`view_labels` knows besides :data:`TTA_TRANSFORMS`: ``shift`` (the volume
#: moved by a quarter of the network's window along every axis, so every voxel is seen from
#: another place in the sliding window), ``gamma_low`` and ``gamma_high`` (a mild contrast change,
#: gamma 0.8 and 1.25 on the volume's intensity range). A network is meant to be unaffected by
#: these for any anatomy; mirroring is not: it swaps sides and ends of asymmetric anatomy (anterior
#: and posterior hippocampus, left and right kidney) unless the network was trained with flips.
STABILITY_VIEWS = ("shift", "gamma_low", "gamma_high")
#: The default views of the stability check (:func:`imbalanceseglib.inference.agreement_check`).
AGREEMENT_VIEWS = STABILITY_VIEWS
_GAMMA = {"gamma_low": 0.8, "gamma_high": 1.25}

#: Transform names :func:`tta_logits` accepts: ``identity``; ``flip_`` followed by
#: the mirrored axes among ``z``, ``y``, ``x`` (``flip_x``, ``flip_zy``, ...); and
#: in-plane rotations ``rot90``, ``rot180``, ``rot270`` in the ``(y, x)`` plane.
TTA_TRANSFORMS = ("identity", "flip_z", "flip_y", "flip_x", "flip_zy", "flip_zx", "flip_yx", "flip_zyx",
                  "rot90", "rot180", "rot270")

_AXIS = {"z": 0, "y": 1, "x": 2}


def parse_transform(name: str) -> tuple[tuple[int, ...], int]:
    """(flip axes, number of quarter turns in the y-x plane) of a transform name."""
    if name == "identity":
        return (), 0
    if name.startswith("flip_"):
        letters = name[5:]
        if letters and all(ch in _AXIS for ch in letters) and len(set(letters)) == len(letters):
            return tuple(sorted(_AXIS[ch] for ch in letters)), 0
    if name in ("rot90", "rot180", "rot270"):
        return (), int(name[3:]) // 90
    raise ValueError(f"unknown test-time transform {name!r}; use 'identity', 'flip_' + axes among z, y, x "
                     "(e.g. 'flip_x', 'flip_zy'), or 'rot90', 'rot180', 'rot270'")


def rare_class_merge(n_classes: int, rare_classes: set[int] | Sequence[int]) -> list[str]:
    """Per-class merge rules for :func:`tta_logits`: ``"max"`` for the rare classes, ``"mean"`` otherwise."""
    rare = {int(c) for c in rare_classes}
    return ["max" if c in rare else "mean" for c in range(n_classes)]


def tta_logits(
    predict_fn: Callable[[np.ndarray], torch.Tensor | np.ndarray],
    volume: np.ndarray,
    transforms: Sequence[str] = ("identity", "flip_z", "flip_y", "flip_x"),
    merge: str | Sequence[str] = "mean",
    outputs: str = "logits",
) -> torch.Tensor:
    """Test-time augmentation with per-class merging; returns probabilities ``(C, z, y, x)``.

    ``predict_fn`` maps a ``(z, y, x)`` float32 volume to a ``(C, z, y, x)``
    tensor (a leading batch axis of size 1 is accepted) of ``outputs``:
    ``"logits"`` (a softmax is applied) or ``"probabilities"`` (used as given;
    apply the card's calibration inside ``predict_fn`` this way).  For each
    transform the volume is transformed, predicted, and the prediction mapped
    back by the inverse transform (mirroring again, rotating back), so every
    prediction is on the input grid.

    ``merge`` says, per class, how the probabilities of the augmented
    predictions are combined: ``"mean"`` (average; a calibrated, consensus
    estimate) or ``"max"`` (the highest probability any view gave: a soft union
    that favours sensitivity, for rare classes that tend to be under-segmented;
    see :func:`rare_class_merge`).  One string applies to every class.  The
    merged values are then divided by their sum over classes at each voxel, so
    the result is a probability distribution again.  With ``max`` on some
    classes, those classes gain probability mass at the expense of all the
    others, so the argmax can differ from that of the plain average (typically
    more voxels of the rare classes; precision may drop) and the probabilities
    are no longer calibrated.  With ``"mean"`` everywhere nothing is
    renormalised beyond rounding.

    The result is a float32 tensor on the CPU.  The function is named for what
    it consumes; to hand its result to code that expects logits, use its
    logarithm (``softmax(log p) == p``).  Memory: one running merge and one
    prediction at a time, whatever the number of transforms.
    """
    if outputs not in ("logits", "probabilities"):
        raise ValueError(f"outputs must be 'logits' or 'probabilities', got {outputs!r}")
    names = list(transforms)
    if not names:
        raise ValueError("tta_logits needs at least one transform")
    parsed = [parse_transform(str(n)) for n in names]
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim != 3:
        raise ValueError(f"volume must be 3-D (z, y, x), got shape {vol.shape}")

    rules: list[str] | None = None
    acc: torch.Tensor | None = None
    is_max: torch.Tensor | None = None
    for flips, quarter in parsed:
        x = vol
        if flips:
            x = np.flip(x, flips)
        if quarter:
            x = np.rot90(x, quarter, axes=(1, 2))
        out = predict_fn(np.ascontiguousarray(x))
        out = torch.as_tensor(out).detach().to("cpu", torch.float32)
        if out.ndim == 5 and out.shape[0] == 1:
            out = out[0]
        if out.ndim != 4 or tuple(out.shape[1:]) != x.shape:
            raise ValueError(f"predict_fn returned shape {tuple(out.shape)} for an input of shape {x.shape}; "
                             "expected (C, z, y, x)")
        prob = torch.softmax(out, dim=0) if outputs == "logits" else out
        # Back to the input grid: undo the rotation, then the mirroring.
        if quarter:
            prob = torch.rot90(prob, -quarter, dims=(2, 3))
        if flips:
            prob = torch.flip(prob, [a + 1 for a in flips])
        if acc is None:
            n_cls = prob.shape[0]
            rules = [merge] * n_cls if isinstance(merge, str) else [str(m) for m in merge]
            if len(rules) != n_cls:
                raise ValueError(f"merge lists {len(rules)} rules for {n_cls} classes")
            bad = sorted({m for m in rules if m not in ("mean", "max")})
            if bad:
                raise ValueError(f"unknown merge rules {bad}; use 'mean' or 'max'")
            is_max = torch.tensor([m == "max" for m in rules]).view(-1, 1, 1, 1)
            acc = prob.clone()
        else:
            if prob.shape[0] != acc.shape[0]:
                raise ValueError("predict_fn returned a different number of classes for another transform")
            acc = torch.where(is_max, torch.maximum(acc, prob), acc + prob)
    assert acc is not None and is_max is not None
    merged = torch.where(is_max, acc, acc / len(parsed))
    total = merged.sum(dim=0, keepdim=True)
    # A voxel where every merged value is 0 (all-zero probabilities given) becomes uniform.
    n_cls = merged.shape[0]
    merged = torch.where(total > 0, merged / total.clamp_min(1e-30), torch.full_like(merged, 1.0 / n_cls))
    return merged.contiguous()


def _shift(shape: Sequence[int], window: Sequence[int] | None) -> tuple[int, ...]:
    w = window or shape
    return tuple(max(1, min(int(k) // 4, int(n) // 4)) if n > 1 else 0 for k, n in zip(w, shape))


def view_labels(predict_fn: Callable[[np.ndarray], torch.Tensor | np.ndarray], volume: np.ndarray,
                transform: str, window: Sequence[int] | None = None,
                fallback: np.ndarray | None = None) -> np.ndarray:
    """The argmax labels of ``predict_fn`` on one view of ``volume``, mapped back to the volume's
    grid (uint8/uint16 ``(z, y, x)``); ``predict_fn`` returns logits, or integer labels ``(z, y, x)``. ``transform``: a name of :data:`TTA_TRANSFORMS` or of
    :data:`STABILITY_VIEWS`; ``window``: the network's window (for ``shift``); ``fallback``:
    labels for the voxels a shift moves out of the volume (default: background)."""
    x = np.asarray(volume, dtype=np.float32)
    if transform in _GAMMA:
        lo, hi = float(x.min()), float(x.max())
        scaled = (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)
        out = predict_fn(np.ascontiguousarray(scaled ** _GAMMA[transform] * (hi - lo) + lo, dtype=np.float32))
        return _argmax(out)
    if transform == "shift":
        d = _shift(x.shape, window)
        moved = np.pad(x, [(k, 0) for k in d], mode="edge")[tuple(slice(0, n) for n in x.shape)]
        labels = _argmax(predict_fn(np.ascontiguousarray(moved)))
        back = np.zeros_like(labels) if fallback is None else np.array(fallback, dtype=labels.dtype)
        back[tuple(slice(0, n - k) for n, k in zip(x.shape, d))] = labels[tuple(slice(k, None) for k in d)]
        return back
    flips, quarter = parse_transform(str(transform))
    if flips:
        x = np.flip(x, flips)
    if quarter:
        x = np.rot90(x, quarter, axes=(1, 2))
    labels = _argmax(predict_fn(np.ascontiguousarray(x)))
    if quarter:
        labels = np.rot90(labels, -quarter, axes=(1, 2))
    if flips:
        labels = np.flip(labels, flips)
    return np.ascontiguousarray(labels)


def _argmax(out: torch.Tensor | np.ndarray) -> np.ndarray:
    """Labels from logits ``(C, z, y, x)`` / ``(1, C, z, y, x)``, or labels ``(z, y, x)`` as they are
    (a ``predict_fn`` that already returns labels, e.g. a bounded-memory streaming pass)."""
    if out.ndim == 3:
        arr = out.detach().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out)
        if arr.dtype.kind not in "ui":
            raise ValueError(f"a 3-D view result must be integer labels, got {arr.dtype}")
        return arr.astype(np.uint8 if arr.size == 0 or arr.max() < 256 else np.uint16, copy=False)
    out = torch.as_tensor(out).detach().to("cpu", torch.float32)
    if out.ndim == 5 and out.shape[0] == 1:
        out = out[0]
    return out.argmax(0).numpy().astype(np.uint8 if out.shape[0] <= 256 else np.uint16)


def segmentation_agreement(labels: np.ndarray, others: Sequence[np.ndarray], n_classes: int) -> list:
    """Per class, the mean Dice between ``labels`` (the prediction) and each of ``others`` (the
    same volume predicted under test-time transforms, or by each member of an ensemble), on
    one grid. A class in neither of two maps adds nothing; ``None`` for a class absent
    everywhere. Background (class 0) is ``None`` too: it is not estimated.

    A segmentation that changes when the input is merely mirrored, or between two networks
    trained side by side, is one the confidence alone may call certain: the agreement is what
    the label-free estimate cannot see (an input unlike the training data often shows here)."""
    out: list = [None]
    for c in range(1, n_classes):
        a = labels == c
        na = int(a.sum())
        scores = []
        for other in others:
            b = other == c
            nb = int(b.sum())
            if na + nb:
                scores.append(2.0 * int(np.logical_and(a, b).sum()) / (na + nb))
        out.append(float(np.mean(scores)) if scores else None)
    return out
