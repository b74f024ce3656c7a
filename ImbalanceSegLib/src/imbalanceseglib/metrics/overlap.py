"""Overlap metrics from per-class confusion counts (training, the model card, the module's table).

Definitions (per class c, one-vs-rest counts TP, FP, FN over all voxels):

* Dice = 2 TP / (2 TP + FP + FN) (Dice 1945; Sorensen 1948);
* IoU = TP / (TP + FP + FN) (Jaccard 1912);
* sensitivity (recall) = TP / (TP + FN); precision = TP / (TP + FP);

as Metrics Reloaded defines them (Maier-Hein et al., Nature Methods 2024).

Empty-structure policy (one place, used everywhere): when a class is absent from
both the reference and the prediction, Dice, sensitivity and precision are
*undefined* and returned as ``None`` (never NaN and never a silent 1 or 0);
callers report such classes as "absent". When exactly one side is empty the
metric is 0 (a missed or hallucinated structure).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


def confusion_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, 3) array of true positives, false positives and false negatives per class."""
    pred = np.asarray(pred).ravel().astype(np.int64)
    ref = np.asarray(ref).ravel().astype(np.int64)
    if pred.shape != ref.shape:
        raise ValueError("prediction and reference must have the same number of voxels")
    joint = np.bincount(ref * num_classes + pred, minlength=num_classes * num_classes)
    cm = joint[: num_classes * num_classes].reshape(num_classes, num_classes)  # rows: ref, cols: pred
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    return np.stack([tp, fp, fn], axis=1)


def overlap_from_counts(tp: int, fp: int, fn: int) -> Dict[str, Optional[float]]:
    """Dice, IoU, sensitivity and precision from counts, following the empty-structure policy."""
    ref_n, pred_n = tp + fn, tp + fp
    union = ref_n + pred_n - tp
    return {"dice": None if ref_n + pred_n == 0 else 2.0 * tp / (ref_n + pred_n),
            "iou": None if union == 0 else tp / union,
            "sensitivity": None if ref_n == 0 else tp / ref_n,
            "precision": None if pred_n == 0 else tp / pred_n}


def overlap_metrics(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> List[Dict[str, Optional[float]]]:
    """Per-class Dice, sensitivity and precision following the empty-structure policy."""
    out = []
    for tp, fp, fn in confusion_counts(pred, ref, num_classes):
        tp, fp, fn = int(tp), int(fp), int(fn)
        m = overlap_from_counts(tp, fp, fn)
        out.append({"dice": m["dice"], "sensitivity": m["sensitivity"], "precision": m["precision"],
                    "reference_voxels": tp + fn, "predicted_voxels": tp + fp})
    return out


def dice_per_class(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> List[Optional[float]]:
    return [m["dice"] for m in overlap_metrics(pred, ref, num_classes)]
