"""Per-class evaluation of segmentations that is right for small, empty and image-wide structures.

Orchestration of :mod:`imbalanceseglib.metrics` per case and per folder, with the
edge-case policies below. The metric definitions (and their papers: Metrics
Reloaded, Maier-Hein et al. 2024, for overlap, HD95 and ASSD; Nikolov et al.
2021 for surface Dice; Guo et al. 2017 and Mehta et al. 2022 for calibration
and QU-BraTS) live in that package.

All values are per class and in physical units (voxel spacing honoured; arrays
in (z, y, x) order take spacing in the same order, images take it from ITK).

Metrics
-------
* Overlap: Dice, IoU, sensitivity, precision, reference/predicted volume (mm^3),
  relative volume error (V_pred - V_ref) / V_ref.
* Boundary (definitions in :mod:`imbalanceseglib.metrics.surface`): HD, HD95 (larger of
  the two directed 95th percentiles of border-voxel distances), ASSD (mean of the
  pooled directed distances), as Metrics Reloaded and MONAI compute them; and
  normalised surface Dice at a tolerance in mm on DeepMind's surface elements.
* Detection (connected components, 26-connectivity in 3-D by default):
  ``detected`` (does the prediction touch the reference structure at all),
  the number of reference components and how many of them the prediction
  touches, the number of predicted components and how many touch no reference
  voxel (false-positive structures; where the reference is empty every
  predicted component is one).

Edge-case policy (one policy per class and case; the ``policy`` field names it
and :func:`summarize` counts how often each applied)
----------------------------------------------------------------------------------

================  ===========================  ==========================================  ==========================
policy            when                         overlap                                     HD / HD95 / ASSD / NSD
================  ===========================  ==========================================  ==========================
both_empty        reference and prediction     Dice, IoU, sensitivity, precision, RVE      undefined: None; NSD None
                  empty                        undefined: None; volumes 0; detected None
reference_empty   reference empty, prediction  Dice 0, IoU 0, precision 0, sensitivity     penalty: HD = HD95 = ASSD
                  not (hallucination)          and RVE None (undefined); every predicted   = ``max_distance_mm``; NSD 0
                                               component is a false-positive structure
prediction_empty  prediction empty, reference  Dice 0, IoU 0, sensitivity 0, precision     penalty as above; NSD 0
                  not (missed structure)       None, RVE -1, detected False
image_wide        reference or prediction      computed as usual; the image edge is the    computed (image edge = surface,
                  covers every voxel           structure's surface (outside = background)  as MONAI and DeepMind do)
single_voxel      reference or prediction is   computed as usual; a lone voxel is its own  computed; HD95 then comes
                  exactly one voxel            border                                      from very few distances
normal            anything else                computed                                    computed
================  ===========================  ==========================================  ==========================

The first row that matches applies (so a one-voxel prediction of an absent
structure is ``reference_empty``, not ``single_voxel``).

``max_distance_mm`` is the diagonal of the image's field of view,
sqrt(sum_i (n_i s_i)^2) for n_i voxels of s_i mm along axis i: larger than any
distance that can be measured in the image, finite, and never 0. Distances are
therefore never NaN or infinite, and a missed structure is never reported as
HD95 = 0. ``distance_penalty`` is True on rows where the penalty was
substituted, so summaries can exclude or count them.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from .metrics import surface
from .metrics.overlap import overlap_from_counts
from .atomic import atomic_write_text

POLICIES = ("normal", "both_empty", "reference_empty", "prediction_empty", "image_wide", "single_voxel")
METRIC_GROUPS = ("overlap", "distance", "nsd", "detection")
DEFAULT_NSD_TOLERANCE_MM = 2.0

#: Metric columns written per case and summarised across cases.
NUMERIC_FIELDS = ("dice", "iou", "sensitivity", "precision", "reference_volume_mm3", "predicted_volume_mm3",
                  "relative_volume_error", "hd_mm", "hd95_mm", "assd_mm", "nsd",
                  "reference_components", "detected_components", "predicted_components",
                  "false_positive_components")


@dataclass
class ClassResult:
    """Evaluation of one class in one case. ``None`` means undefined under ``policy``."""

    label: int
    name: str
    policy: str
    case: Optional[str] = None
    reference_voxels: int = 0
    predicted_voxels: int = 0
    true_positives: int = 0
    false_positives: int = 0
    false_negatives: int = 0
    dice: Optional[float] = None
    iou: Optional[float] = None
    sensitivity: Optional[float] = None
    precision: Optional[float] = None
    reference_volume_mm3: float = 0.0
    predicted_volume_mm3: float = 0.0
    relative_volume_error: Optional[float] = None
    hd_mm: Optional[float] = None
    hd95_mm: Optional[float] = None
    assd_mm: Optional[float] = None
    nsd: Optional[float] = None
    nsd_tolerance_mm: Optional[float] = None
    distance_penalty: bool = False
    max_distance_mm: Optional[float] = None
    detected: Optional[bool] = None
    reference_components: Optional[int] = None
    detected_components: Optional[int] = None
    predicted_components: Optional[int] = None
    false_positive_components: Optional[int] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class CaseResult:
    """All classes of one case, plus how long the evaluation took.

    ``reference_labels`` and ``prediction_labels`` are the non-zero labels present in
    each map, evaluated or not (so callers can say which present labels were left out).
    """

    case: Optional[str]
    shape: Tuple[int, ...]
    spacing: Tuple[float, ...]
    classes: List[ClassResult] = field(default_factory=list)
    seconds: float = 0.0
    reference_labels: Tuple[int, ...] = ()
    prediction_labels: Tuple[int, ...] = ()

    def by_label(self) -> Dict[int, ClassResult]:
        return {c.label: c for c in self.classes}

    def rows(self) -> List[Dict[str, Any]]:
        return [c.as_dict() for c in self.classes]

    def policy_counts(self) -> Dict[str, int]:
        counts = {p: 0 for p in POLICIES}
        for c in self.classes:
            counts[c.policy] += 1
        return counts


# --- helpers ----------------------------------------------------------------------------------

def max_distance_mm(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """Penalty distance: the diagonal of the field of view (mm)."""
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing))))


def _metric_set(metrics: Optional[Iterable[str]]) -> frozenset:
    chosen = frozenset(METRIC_GROUPS if metrics is None else metrics)
    unknown = chosen - set(METRIC_GROUPS)
    if unknown:
        raise ValueError(f"unknown metric groups {sorted(unknown)}; choose from {list(METRIC_GROUPS)}")
    return chosen | {"overlap"}


def _structure(ndim: int, connectivity: Optional[int]) -> np.ndarray:
    return ndimage.generate_binary_structure(ndim, ndim if connectivity is None else connectivity)


def _components(p: np.ndarray, r: np.ndarray, both: np.ndarray, structure: np.ndarray) -> Dict[str, int]:
    out = {"reference_components": 0, "detected_components": 0,
           "predicted_components": 0, "false_positive_components": 0}
    if r.any():
        lab_r, n_r = ndimage.label(r, structure)
        out["reference_components"] = int(n_r)
        out["detected_components"] = int(np.count_nonzero(np.unique(lab_r[both])))
    if p.any():
        lab_p, n_p = ndimage.label(p, structure)
        out["predicted_components"] = int(n_p)
        touching = np.unique(lab_p[both])
        out["false_positive_components"] = int(n_p - np.count_nonzero(touching))
    return out


def _class_result(p: Optional[np.ndarray], r: Optional[np.ndarray], sp: np.ndarray, *, label: int, name: str,
                  case: Optional[str], image_shape: Sequence[int], groups: frozenset,
                  nsd_tolerance_mm: float, structure: np.ndarray) -> ClassResult:
    """Evaluate one class given its masks cropped to the (margin-grown) union box."""
    voxel_mm3 = float(np.prod(sp))
    image_voxels = int(np.prod(image_shape))
    penalty = max_distance_mm(image_shape, sp)
    if p is None or r is None:
        return ClassResult(label=label, name=name, policy="both_empty", case=case, max_distance_mm=penalty,
                           nsd_tolerance_mm=nsd_tolerance_mm if "nsd" in groups else None,
                           **({"reference_components": 0, "detected_components": 0, "predicted_components": 0,
                               "false_positive_components": 0} if "detection" in groups else {}))
    n_r = int(np.count_nonzero(r))
    n_p = int(np.count_nonzero(p))
    both = p & r
    tp = int(np.count_nonzero(both))
    fp, fn = n_p - tp, n_r - tp
    res = ClassResult(label=label, name=name, policy="normal", case=case, reference_voxels=n_r, predicted_voxels=n_p,
                      true_positives=tp, false_positives=fp, false_negatives=fn,
                      reference_volume_mm3=n_r * voxel_mm3, predicted_volume_mm3=n_p * voxel_mm3,
                      max_distance_mm=penalty, nsd_tolerance_mm=nsd_tolerance_mm if "nsd" in groups else None)
    if n_r == 0 and n_p == 0:  # pragma: no cover - callers pass None for absent classes
        res.policy = "both_empty"
        return res
    m = overlap_from_counts(tp, fp, fn)
    res.dice, res.iou, res.sensitivity, res.precision = m["dice"], m["iou"], m["sensitivity"], m["precision"]
    res.relative_volume_error = (n_p - n_r) / n_r if n_r else None
    if "detection" in groups:
        for k, v in _components(p, r, both, structure).items():
            setattr(res, k, v)
    res.detected = (tp > 0) if n_r else None
    if n_r == 0 or n_p == 0:
        res.policy = "reference_empty" if n_r == 0 else "prediction_empty"
        if "distance" in groups:
            res.hd_mm = res.hd95_mm = res.assd_mm = penalty
            res.distance_penalty = True
        if "nsd" in groups:
            res.nsd = 0.0
        return res
    if n_r == image_voxels or n_p == image_voxels:
        res.policy = "image_wide"
    elif n_r == 1 or n_p == 1:
        res.policy = "single_voxel"
    if "distance" in groups:
        d_pr, d_rp = surface.border_distances(surface.border_voxels(p), surface.border_voxels(r), sp)
        res.hd_mm = surface.hausdorff(d_pr, d_rp)
        res.hd95_mm = surface.hausdorff(d_pr, d_rp, 95.0)
        res.assd_mm = surface.assd(d_pr, d_rp)
    if "nsd" in groups:
        if p.ndim != 3:
            raise ValueError("normalised surface Dice is implemented for 3-D images; drop the 'nsd' metric group")
        res.nsd = surface.surface_dice_from_masks(p, r, sp, nsd_tolerance_mm)
    return res


def check_labels(labels: Iterable[Any]) -> List[int]:
    """Requested label values as distinct ints in the given order; a negative value is an error."""
    out: List[int] = []
    for lab in labels:
        value = int(lab)
        if value != lab:
            raise ValueError(f"label values are whole numbers; got {lab!r}")
        if value < 0:
            raise ValueError(f"label values are 0 or more; got {value}")
        if value not in out:
            out.append(value)
    return out


def _as_label_array(a: Any, what: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a.view(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
            raise ValueError(f"{what} must hold integer labels")
        a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{what} holds negative labels")
    return a


# --- public API -------------------------------------------------------------------------------

def evaluate_binary(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None, *,
                    label: int = 1, name: str = "foreground", case: Optional[str] = None,
                    metrics: Optional[Iterable[str]] = None,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    connectivity: Optional[int] = None) -> ClassResult:
    """Evaluate one binary prediction against one binary reference (any non-zero is foreground)."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    pred = pred if pred.dtype == bool else pred != 0
    ref = ref if ref.dtype == bool else ref != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    sp = surface.as_spacing(spacing, pred.ndim)
    groups = _metric_set(metrics)
    box = surface.union_box(surface.bounding_box(pred), surface.bounding_box(ref), pred.shape)
    p, r = (None, None) if box is None else (pred[box], ref[box])
    return _class_result(p, r, sp, label=label, name=name, case=case, image_shape=pred.shape, groups=groups,
                         nsd_tolerance_mm=nsd_tolerance_mm, structure=_structure(pred.ndim, connectivity))


def evaluate_labels(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None, *,
                    labels: Optional[Sequence[int]] = None,
                    class_names: Optional[Union[Sequence[str], Dict[int, str]]] = None,
                    case: Optional[str] = None, metrics: Optional[Iterable[str]] = None,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    connectivity: Optional[int] = None) -> CaseResult:
    """Evaluate every class of a label map.

    ``labels`` defaults to every non-zero value present in the reference or the
    prediction (pass the full list to get ``both_empty`` rows for absent classes).
    Label 0 is evaluated only when listed. ``class_names`` is a list indexed by
    label value or a {label: name} mapping.
    """
    t0 = time.perf_counter()
    pred = _as_label_array(pred, "prediction")
    ref = _as_label_array(ref, "reference")
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    sp = surface.as_spacing(spacing, pred.ndim)
    groups = _metric_set(metrics)
    structure = _structure(pred.ndim, connectivity)
    # One pass per map finds the bounding boxes of all classes.
    obj_p = ndimage.find_objects(pred)
    obj_r = ndimage.find_objects(ref)
    in_pred = tuple(i + 1 for i, s in enumerate(obj_p) if s is not None)
    in_ref = tuple(i + 1 for i, s in enumerate(obj_r) if s is not None)
    if labels is None:
        labels = sorted(set(in_pred) | set(in_ref))
    labels = check_labels(labels)
    names: Dict[int, str] = {}
    if isinstance(class_names, dict):
        names = {int(k): str(v) for k, v in class_names.items()}
    elif class_names is not None:
        names = {i: str(n) for i, n in enumerate(class_names)}
    full = tuple(slice(0, n) for n in pred.shape)
    out = CaseResult(case=case, shape=tuple(pred.shape), spacing=tuple(float(s) for s in sp),
                     reference_labels=in_ref, prediction_labels=in_pred)
    for lab in labels:
        lab = int(lab)
        if lab == 0:
            box = full if (pred == 0).any() or (ref == 0).any() else None
        else:
            bp = obj_p[lab - 1] if lab - 1 < len(obj_p) else None
            br = obj_r[lab - 1] if lab - 1 < len(obj_r) else None
            box = surface.union_box(bp, br, pred.shape)
        p = r = None
        if box is not None:
            p, r = pred[box] == lab, ref[box] == lab
        out.classes.append(_class_result(p, r, sp, label=lab, name=names.get(lab, f"label_{lab}"), case=case,
                                         image_shape=pred.shape, groups=groups,
                                         nsd_tolerance_mm=nsd_tolerance_mm, structure=structure))
    out.seconds = time.perf_counter() - t0
    return out


def evaluate_images(pred_image, ref_image, *, labels: Optional[Sequence[int]] = None,
                    class_names: Optional[Union[Sequence[str], Dict[int, str]]] = None,
                    case: Optional[str] = None, metrics: Optional[Iterable[str]] = None,
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    connectivity: Optional[int] = None, geometry_tolerance: float = 1e-3) -> CaseResult:
    """Evaluate two SimpleITK label images that share one grid (spacing taken from the reference)."""
    import SimpleITK as sitk

    if pred_image.GetSize() != ref_image.GetSize():
        raise ValueError(f"prediction size {pred_image.GetSize()} differs from reference size {ref_image.GetSize()}")
    for what, a, b in (("spacing", pred_image.GetSpacing(), ref_image.GetSpacing()),
                       ("origin", pred_image.GetOrigin(), ref_image.GetOrigin()),
                       ("direction", pred_image.GetDirection(), ref_image.GetDirection())):
        if not np.allclose(a, b, rtol=geometry_tolerance, atol=geometry_tolerance):
            raise ValueError(f"prediction and reference differ in {what}: {tuple(a)} vs {tuple(b)}; "
                             "resample the prediction onto the reference grid first")
    pred = sitk.GetArrayViewFromImage(pred_image)
    ref = sitk.GetArrayViewFromImage(ref_image)
    spacing = tuple(reversed(ref_image.GetSpacing()))  # ITK (x, y, z) -> array (z, y, x)
    return evaluate_labels(pred, ref, spacing, labels=labels, class_names=class_names, case=case,
                           metrics=metrics, nsd_tolerance_mm=nsd_tolerance_mm, connectivity=connectivity)


# --- summaries and files ----------------------------------------------------------------------

def summarize(results: Sequence[CaseResult]) -> List[Dict[str, Any]]:
    """Per class across cases: policy counts and mean/std/median/n of every metric.

    Statistics use the defined values only (``None`` rows are counted in
    ``n_undefined_<metric>``); penalty distances are included, and
    ``n_distance_penalty`` says on how many cases they were substituted.
    """
    by_label: Dict[int, List[ClassResult]] = {}
    for case in results:
        for c in case.classes:
            by_label.setdefault(c.label, []).append(c)
    rows = []
    for lab in sorted(by_label):
        items = by_label[lab]
        row: Dict[str, Any] = {"label": lab, "name": items[0].name, "cases": len(items)}
        for p in POLICIES:
            row[f"policy_{p}"] = sum(1 for c in items if c.policy == p)
        row["n_distance_penalty"] = sum(1 for c in items if c.distance_penalty)
        row["detected_rate"] = _mean([float(c.detected) for c in items if c.detected is not None])
        for f in NUMERIC_FIELDS:
            vals = np.array([getattr(c, f) for c in items if getattr(c, f) is not None], dtype=np.float64)
            row[f"{f}_mean"] = float(vals.mean()) if vals.size else None
            row[f"{f}_std"] = float(vals.std(ddof=1)) if vals.size > 1 else None
            row[f"{f}_median"] = float(np.median(vals)) if vals.size else None
            row[f"{f}_n"] = int(vals.size)
        rows.append(row)
    return rows


def _mean(vals: List[float]) -> Optional[float]:
    return float(np.mean(vals)) if vals else None


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


def rows_to_csv(rows: Sequence[Dict[str, Any]]) -> str:
    """CSV text; undefined values (``None``) are written as empty cells."""
    if not rows:
        return ""
    columns: List[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(k)) for k in columns])
    return buf.getvalue()


def write_csv(rows: Sequence[Dict[str, Any]], path: Union[str, Path]) -> Path:
    return atomic_write_text(path, rows_to_csv(rows))


IMAGE_SUFFIXES = (".nii.gz", ".seg.nrrd", ".nrrd", ".nii", ".mha", ".mhd")


def case_id(path: Path) -> Optional[str]:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _index_folder(folder: Path) -> Dict[str, Path]:
    """case id -> label file: ``<case>.<ext>`` files, or ``<case>/labels.*`` as ``imbalanceseg predict`` writes."""
    out: Dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file():
            cid = case_id(p)
            if cid is not None:
                out[cid] = p
        elif p.is_dir():
            for q in sorted(p.iterdir()):
                if q.is_file() and case_id(q) == "labels":
                    out[p.name] = q
                    break
    return out


def _probability_files(label_file: Path) -> List[Path]:
    """``probability_XX.*`` files beside a ``<case>/labels.*`` prediction, in class order."""
    if case_id(label_file) != "labels":
        return []
    files = [q for q in label_file.parent.iterdir()
             if q.is_file() and (case_id(q) or "").startswith("probability_")]
    return sorted(files, key=lambda q: int(case_id(q).split("_")[1]))


def _read_probability(path: Path, cid: str) -> np.ndarray:
    """A probability map written by ``imbalanceseg predict``: float, or uint8 with
    ``ImbalanceSeg_probability_scale = 1/255`` (``predict --stream --storage uint8``)."""
    import SimpleITK as sitk

    from .images import read_image
    img = read_image(path, f"probability map {path.name}")
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    if img.HasMetaDataKey("ImbalanceSeg_probability_scale"):
        if img.GetMetaData("ImbalanceSeg_probability_scale") != "1/255":
            raise ValueError(f"{path}: unknown probability scale {img.GetMetaData('ImbalanceSeg_probability_scale')!r}")
        arr *= np.float32(1.0 / 255.0)
    return arr


def _evaluate_case(cid: str, ref_path: Path, pred_path: Optional[Path], *, labels, class_names, metrics,
                   nsd_tolerance_mm: float, calibration: bool, n_bins: int, near_radius_mm: float,
                   max_uncertainty: float):
    """One case of :func:`evaluate_folders`: (CaseResult, (calibration report, QU-BraTS rows) or None)."""
    import SimpleITK as sitk

    from .metrics import calibration as cm
    from .images import read_image

    ref_img = read_image(ref_path, f"reference {cid}")
    if pred_path is not None:
        pred_img = read_image(pred_path, f"prediction {cid}")
    else:
        pred_img = sitk.Image(ref_img.GetSize(), sitk.sitkUInt8)
        pred_img.CopyInformation(ref_img)
    res = evaluate_images(pred_img, ref_img, labels=labels, class_names=class_names, case=cid,
                          metrics=metrics, nsd_tolerance_mm=nsd_tolerance_mm)
    prob_files = _probability_files(pred_path) if (calibration and pred_path is not None) else []
    if not prob_files:
        return res, None
    ref_arr = sitk.GetArrayViewFromImage(ref_img)
    pred_arr = sitk.GetArrayViewFromImage(pred_img)
    probs = np.stack([_read_probability(f, cid) for f in prob_files])
    if probs.shape[1:] != ref_arr.shape:
        raise ValueError(f"probabilities of {cid} have shape {probs.shape[1:]}, the reference {ref_arr.shape}")
    rep = cm.calibration_report(probs, ref_arr, res.spacing, pred=pred_arr, n_bins=n_bins,
                                radius_mm=near_radius_mm)
    qu_rows: List[Dict[str, Any]] = []
    unc_file = next((q for q in sorted(pred_path.parent.glob("uncertainty.*")) if case_id(q)), None)
    if unc_file is not None:
        unc = sitk.GetArrayFromImage(read_image(unc_file, f"uncertainty map {unc_file.name}"))
        for c in res.classes:
            if c.label == 0:
                continue
            q = cm.qubrats_score(pred_arr == c.label, ref_arr == c.label, unc, max_uncertainty=max_uncertainty)
            qu_rows.append({"case": cid, "label": c.label, "name": c.name, "score": q["score"],
                            "auc_dice": q["auc_dice"], "auc_ftp": q["auc_ftp"], "auc_ftn": q["auc_ftn"]})
    return res, (rep, qu_rows)


def _case_error(exc: Exception, cid: str, ref_path: Path, pred_path: Optional[Path]) -> Exception:
    """The same kind of error with the case and its files in front of the message."""
    where = (f"case {cid} (prediction {pred_path if pred_path is not None else 'missing, evaluated as empty'}, "
             f"reference {ref_path})")
    message = f"{where}: {exc}"
    if isinstance(exc, ValueError):
        return ValueError(message)
    if isinstance(exc, FloatingPointError):
        return FloatingPointError(message)
    if isinstance(exc, OSError):
        return OSError(message)
    if isinstance(exc, RuntimeError):  # SimpleITK's errors: reported as a problem of the input
        return ValueError(message)
    if hasattr(exc, "add_note"):  # anything else (a bug, memory): keep the type and traceback, add the case
        exc.add_note(where)
    return exc


def _label_report(results: Sequence[CaseResult], labels: Optional[Sequence[int]]):
    """(labels present but not requested -> [(case, where)], requested labels present in no case)."""
    if labels is None:
        return {}, []
    wanted = set(labels)
    unlisted: Dict[int, List[Tuple[Optional[str], str]]] = {}
    seen: set = set()
    for r in results:
        in_ref, in_pred = set(r.reference_labels), set(r.prediction_labels)
        seen |= in_ref | in_pred
        for lab in sorted((in_ref | in_pred) - wanted):
            where = ("reference and prediction" if lab in in_ref and lab in in_pred
                     else "reference" if lab in in_ref else "prediction")
            unlisted.setdefault(lab, []).append((r.case, where))
    absent = [lab for lab in labels if lab != 0 and lab not in seen]
    return dict(sorted(unlisted.items())), absent


def label_warnings(out: Dict[str, Any], requested_by: str = "the requested labels",
                   class_names: Optional[Dict[int, str]] = None, max_cases: int = 10) -> List[str]:
    """Lines that tell the user about the labels :func:`evaluate_folders` left out or found nowhere."""
    names = class_names or {}
    lines = []
    for lab, where in out.get("unlisted_labels", {}).items():
        shown = ", ".join(f"{cid} ({w})" for cid, w in where[:max_cases])
        more = f" and {len(where) - max_cases} more" if len(where) > max_cases else ""
        lines.append(f"label {lab} is in the maps but not evaluated (not in {requested_by}): "
                     f"{len(where)} case(s): {shown}{more}")
    for lab in out.get("absent_labels", []):
        name = f" ({names[lab]})" if lab in names else ""
        lines.append(f"label {lab}{name} is requested but found in no case (no reference, no prediction): "
                     "its rows are both_empty, Dice undefined")
    return lines


def evaluate_folders(pred_dir: Union[str, Path], ref_dir: Union[str, Path], out_dir: Union[str, Path], *,
                     labels: Optional[Sequence[int]] = None,
                     class_names: Optional[Union[Sequence[str], Dict[int, str]]] = None,
                     metrics: Optional[Iterable[str]] = None,
                     nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                     allow_missing: bool = False, calibration: bool = True, n_bins: int = 15,
                     near_radius_mm: float = 10.0, max_uncertainty: float = 1.0, log=None) -> Dict[str, Any]:
    """Evaluate every reference in ``ref_dir`` against the prediction with the same case id.

    Writes ``per_case.csv`` (one row per case and class), ``summary.csv`` (one
    row per class) and ``policies.csv`` (how often each policy applied) into
    ``out_dir``. A missing prediction is an error unless ``allow_missing``, in
    which case it is evaluated as an all-background prediction (policy
    ``prediction_empty`` for every present class) and listed in the result.

    Where a prediction is a folder written by ``imbalanceseg predict``
    (``<case>/labels.nrrd`` beside ``probability_XX.nrrd`` and
    ``uncertainty.nrrd``) and ``calibration`` is on, also writes
    ``calibration.csv`` (global, class-wise and near-structure ECE per case),
    ``volumes.csv`` (probability-sum, thresholded and reference volume per case
    and class), ``reliability.png`` / ``reliability_near.png`` with
    ``reliability_bins.csv`` (bins pooled over all cases) and ``qubrats.csv``
    (QU-BraTS score per case and class; uncertainty in [0, ``max_uncertainty``]).

    Labels: with ``labels`` given, the result also says which labels were left out or
    missing: ``unlisted_labels`` maps each non-zero label present in some map but not in
    ``labels`` to the ``(case, "reference" | "prediction" | "reference and prediction")``
    where it is, and ``absent_labels`` lists the requested non-zero labels found in no
    map of any case (their rows are ``both_empty``); :func:`label_warnings` words both.
    A negative label is an error. Any error while evaluating a case names the case and
    its files.
    """
    from .metrics import calibration as cm

    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    if labels is not None:
        labels = check_labels(labels)
    for what, d in (("prediction folder", pred_dir), ("reference folder", ref_dir)):
        if not d.is_dir():
            raise FileNotFoundError(f"{what} {d} does not exist")
    refs = _index_folder(ref_dir)
    preds = _index_folder(pred_dir)
    if not refs:
        raise ValueError(f"no reference images in {ref_dir}")
    missing = sorted(set(refs) - set(preds))
    if missing and not allow_missing:
        raise ValueError(f"{len(missing)} reference case(s) have no prediction: {', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}")
    _metric_set(metrics)  # an unknown metric group is refused before any case is read

    results: List[CaseResult] = []
    cal_rows: List[Dict[str, Any]] = []
    vol_rows: List[Dict[str, Any]] = []
    qu_rows: List[Dict[str, Any]] = []
    pooled = pooled_near = None
    for cid, ref_path in refs.items():
        try:
            res, cal = _evaluate_case(cid, ref_path, preds.get(cid), labels=labels, class_names=class_names,
                                      metrics=metrics, nsd_tolerance_mm=nsd_tolerance_mm, calibration=calibration,
                                      n_bins=n_bins, near_radius_mm=near_radius_mm,
                                      max_uncertainty=max_uncertainty)
        except Exception as exc:
            raise _case_error(exc, cid, ref_path, preds.get(cid)) from exc
        results.append(res)
        if cal is not None:
            rep, qu = cal
            cal_rows.append({"case": cid, "policy": rep["policy"], "ece": rep["ece"], "ece_near": rep["ece_near"],
                             "classwise_ece": rep["classwise_ece"], "classwise_ece_near": rep["classwise_ece_near"],
                             "voxels": rep["voxels"], "voxels_near": rep["voxels_near"]})
            vol_rows.extend({"case": cid, **v} for v in rep["volumes"])
            pooled = rep["bins"] if pooled is None else pooled + rep["bins"]
            if rep["bins_near"] is not None:
                pooled_near = rep["bins_near"] if pooled_near is None else pooled_near + rep["bins_near"]
            qu_rows.extend(qu)
        if log:
            log(f"[evaluate] {cid}: {len(res.classes)} classes in {res.seconds:.2f} s")
    unlisted, absent = _label_report(results, labels)
    if labels is None:  # give every case a row for every class seen anywhere (both_empty where absent)
        all_labels = sorted({c.label for r in results for c in r.classes})
        names = {c.label: c.name for r in results for c in r.classes}
        groups = _metric_set(metrics)
        for r in results:
            have = {c.label for c in r.classes}
            for lab in all_labels:
                if lab not in have:
                    r.classes.append(_class_result(None, None, np.asarray(r.spacing), label=lab, name=names[lab],
                                                   case=r.case, image_shape=r.shape, groups=groups,
                                                   nsd_tolerance_mm=nsd_tolerance_mm, structure=None))
            r.classes.sort(key=lambda c: c.label)
    per_case = [row for r in results for row in r.rows()]
    summary = summarize(results)
    policies = [{"label": s["label"], "name": s["name"], **{p: s[f"policy_{p}"] for p in POLICIES},
                 "distance_penalty": s["n_distance_penalty"]} for s in summary]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(per_case, out_dir / "per_case.csv")
    write_csv(summary, out_dir / "summary.csv")
    write_csv(policies, out_dir / "policies.csv")
    files = [out_dir / "per_case.csv", out_dir / "summary.csv", out_dir / "policies.csv"]
    if cal_rows:
        files += [write_csv(cal_rows, out_dir / "calibration.csv"), write_csv(vol_rows, out_dir / "volumes.csv")]
        files.append(cm.write_reliability_diagram(pooled, out_dir / "reliability.png", title="whole volume"))
        bin_rows = [{"region": "all", **b} for b in pooled.as_rows()]
        if pooled_near is not None:
            files.append(cm.write_reliability_diagram(pooled_near, out_dir / "reliability_near.png",
                                                       title=f"within {near_radius_mm:g} mm"))
            bin_rows += [{"region": f"within {near_radius_mm:g} mm", **b} for b in pooled_near.as_rows()]
        files.append(write_csv(bin_rows, out_dir / "reliability_bins.csv"))
    if qu_rows:
        files.append(write_csv(qu_rows, out_dir / "qubrats.csv"))
    return {"cases": len(results), "missing_predictions": missing, "results": results, "summary": summary,
            "calibration": cal_rows, "files": files, "unlisted_labels": unlisted, "absent_labels": absent,
            "ece_pooled": pooled.ece() if pooled is not None else None,
            "ece_near_pooled": pooled_near.ece() if pooled_near is not None else None}
