"""Reviewing a result: where is the model least sure about a class, and what happens to a
class when its probability threshold moves.

Pure numpy/scipy functions (on arrays in SimpleITK's z, y, x order) plus the few helpers
that read and write the result nodes. Qt-free; the Logic wraps them.

The result nodes of one run are linked from the segmentation node by node references
(``ImbalanceSegProbability0``, ``ImbalanceSegProbability1``, ... one per class, ``ImbalanceSegUncertainty``,
``ImbalanceSegPerformance``, ``ImbalanceSegClassTable``, ``ImbalanceSegInput``), so the
review works on a scene that was saved and loaded again, not only right after Apply.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
from scipy import ndimage

PROBABILITY_REF = "ImbalanceSegProbability"
UNCERTAINTY_REF = "ImbalanceSegUncertainty"
PERFORMANCE_REF = "ImbalanceSegPerformance"
CLASS_TABLE_REF = "ImbalanceSegClassTable"
INPUT_REF = "ImbalanceSegInput"
THRESHOLDS_ATTRIBUTE = "ImbalanceSeg.Thresholds"
CLASSES_ATTRIBUTE = "ImbalanceSeg.Classes"
#: On the confidence and uncertainty maps of a result ("probability" or "uncertainty"): they are
#: outputs, not scans (the "Annotate next" pool leaves them out).
RESULT_MAP_ATTRIBUTE = "ImbalanceSeg.ResultMap"

#: Probability band counted as "in doubt" for a class when looking for regions to review.
RELEVANT_PROBABILITY = 0.05


def link_result_nodes(segmentation_node, input_node, probability_nodes: Sequence[Any], uncertainty_node,
                      performance_table, class_table, classes: Sequence[Mapping[str, Any]]) -> None:
    """Record on the segmentation node which nodes belong to the same result."""
    segmentation_node.SetAttribute(CLASSES_ATTRIBUTE, json.dumps(
        [{"name": c["name"], "value": int(c["value"])} for c in classes]))
    segmentation_node.SetNodeReferenceID(INPUT_REF, input_node.GetID())
    for i, node in enumerate(probability_nodes):
        segmentation_node.SetNodeReferenceID(f"{PROBABILITY_REF}{i}", node.GetID())
        node.SetAttribute("ImbalanceSeg.ClassIndex", str(i))
        node.SetAttribute("ImbalanceSeg.ClassName", str(classes[i]["name"]))
        node.SetAttribute(RESULT_MAP_ATTRIBUTE, "probability")
    segmentation_node.SetNodeReferenceID(UNCERTAINTY_REF, uncertainty_node.GetID())
    uncertainty_node.SetAttribute(RESULT_MAP_ATTRIBUTE, "uncertainty")
    if performance_table is not None:
        segmentation_node.SetNodeReferenceID(PERFORMANCE_REF, performance_table.GetID())
    if class_table is not None:
        segmentation_node.SetNodeReferenceID(CLASS_TABLE_REF, class_table.GetID())


def result_classes(segmentation_node) -> List[Dict[str, Any]]:
    """The classes (name, label value) of a result segmentation; a clear error for any other node."""
    text = segmentation_node.GetAttribute(CLASSES_ATTRIBUTE) if segmentation_node is not None else None
    if not text:
        name = segmentation_node.GetName() if segmentation_node is not None else None
        raise ValueError(f"segmentation {name!r} is not an ImbalanceSeg result (no linked confidence maps); "
                         "run Apply first")
    return json.loads(text)


def class_index(segmentation_node, class_name: str) -> int:
    classes = result_classes(segmentation_node)
    names = [c["name"] for c in classes]
    if class_name not in names[1:]:
        raise ValueError(f"unknown class {class_name!r}; the result has {', '.join(names[1:])}")
    return names.index(class_name)


def probability_nodes(segmentation_node) -> List[Any]:
    classes = result_classes(segmentation_node)
    nodes = [segmentation_node.GetNodeReference(f"{PROBABILITY_REF}{i}") for i in range(len(classes))]
    missing = [classes[i]["name"] for i, n in enumerate(nodes) if n is None or n.GetImageData() is None]
    if missing:
        raise ValueError(f"the confidence maps of {', '.join(missing)} were removed from the scene; "
                         "run Apply again to review this result")
    return nodes


def node_array(node) -> np.ndarray:
    """A read-only (z, y, x) view of a scalar volume node's voxels."""
    from vtkmodules.util import numpy_support
    image = node.GetImageData()
    dims = image.GetDimensions()
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    arr.flags.writeable = False
    return arr


def probabilities_from_nodes(segmentation_node) -> np.ndarray:
    """(C, z, y, x) float32 calibrated probabilities of a result."""
    return np.stack([node_array(n).astype(np.float32, copy=False) for n in probability_nodes(segmentation_node)])


# ---------------------------------------------------------------------------
# Thresholds
# ---------------------------------------------------------------------------
def thresholded_labels(probabilities: np.ndarray, thresholds: Mapping[int, float]) -> np.ndarray:
    """Labels from per-class probabilities with per-class thresholds.

    Without thresholds: the most probable class. A class ``c`` with threshold ``t`` gets every
    voxel where ``p_c >= t`` and loses its voxels where ``p_c < t`` (they go to the most
    probable other class). Thresholds are applied from the class with the smallest expected
    volume (sum of probabilities) last, so a small structure wins where two thresholded
    classes overlap.
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4:
        raise ValueError(f"probabilities must be (C, z, y, x), got shape {probabilities.shape}")
    n = probabilities.shape[0]
    labels = np.argmax(probabilities, axis=0).astype(np.uint8 if n <= 256 else np.uint16)
    if not thresholds:
        return labels
    for c, t in thresholds.items():
        if not 0 < c < n:
            raise ValueError(f"threshold for class index {c}: there are foreground classes 1..{n - 1}")
        if not 0.0 < float(t) < 1.0:
            raise ValueError(f"threshold for class {c} must be between 0 and 1 (exclusive), got {t!r}")
    expected = {c: float(probabilities[c].sum(dtype=np.float64)) for c in thresholds}
    for c in sorted(thresholds, key=lambda k: -expected[k]):
        t = float(thresholds[c])
        lose = (labels == c) & (probabilities[c] < t)
        if lose.any():
            others = probabilities[:, lose].copy()
            others[c] = -1.0
            labels[lose] = np.argmax(others, axis=0)
        labels[probabilities[c] >= t] = c
    return labels


def expected_metrics(probability: np.ndarray, mask: np.ndarray) -> Dict[str, Optional[float]]:
    """Expected Dice, sensitivity and precision of ``mask`` if ``probability`` is calibrated.

    E[TP] = sum of p over the mask, E[|reference|] = sum of p everywhere, so
    Dice = 2 E[TP] / (|mask| + E[|reference|]) (ratio of expectations, as in the performance table).
    """
    tp = float(probability[mask].sum(dtype=np.float64))
    g = float(probability.sum(dtype=np.float64))
    n = int(np.count_nonzero(mask))
    return {"dice": 2 * tp / (n + g) if n + g > 0 else None,
            "sensitivity": tp / g if g > 0 else None,
            "precision": tp / n if n else None,
            "voxels": n, "expected_voxels": g}


def get_thresholds(segmentation_node) -> Dict[str, float]:
    text = segmentation_node.GetAttribute(THRESHOLDS_ATTRIBUTE)
    return {str(k): float(v) for k, v in json.loads(text).items()} if text else {}


def write_labels(segmentation_node, labels: np.ndarray, reference_node, classes: Sequence[Mapping[str, Any]],
                 changed: Sequence[int]) -> None:
    """Replace the binary labelmaps of the segments of class indices ``changed``.

    Segments are found by name (the user may have renamed none of them; a missing segment is an
    error before anything is written).
    """
    import slicer
    from ImbalanceSegSlicer.scene import _update_volume_node_from_sitk, sitk_from_volume_node

    segmentation = segmentation_node.GetSegmentation()
    ids = {}
    for c in changed:
        seg_id = segmentation.GetSegmentIdBySegmentName(classes[c]["name"])
        if not seg_id:
            raise ValueError(f"segment {classes[c]['name']!r} is missing from {segmentation_node.GetName()!r}")
        ids[c] = seg_id
    import SimpleITK as sitk
    geometry = sitk_from_volume_node(reference_node) if reference_node is not None else None
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    was = segmentation_node.StartModify()
    try:
        for c, seg_id in ids.items():
            img = sitk.GetImageFromArray((labels == c).astype(np.uint8))
            if geometry is not None:
                img.CopyInformation(geometry)
            label_node = slicer.vtkMRMLLabelMapVolumeNode()
            _update_volume_node_from_sitk(label_node, img)
            oriented = logic.CreateOrientedImageDataFromVolumeNode(label_node)
            if not logic.SetBinaryLabelmapToSegment(oriented, segmentation_node, seg_id,
                                                    logic.MODE_REPLACE, oriented.GetExtent()):
                raise RuntimeError(f"could not update segment {classes[c]['name']!r}")
    finally:
        segmentation_node.EndModify(was)


# ---------------------------------------------------------------------------
# Regions to review
# ---------------------------------------------------------------------------
def review_regions(probability: np.ndarray, spacing_zyx: Sequence[float], count: int = 3,
                   radius_mm: float = 6.0) -> List[Dict[str, Any]]:
    """Places where the model is least sure about one class, most doubtful first.

    Doubt of a voxel for the class: ``1 - |2 p - 1|`` (1 at p = 0.5, 0 at p = 0 or 1), counted
    only where ``p >= 0.05``. The doubt is smoothed with a Gaussian of ``radius_mm / 2`` so a
    region is a neighbourhood with many doubtful voxels, not one noisy voxel; regions are the
    highest peaks on voxels with ``p >= 0.05``, at least ``2 * radius_mm`` apart. Each region reports its centre (voxel index,
    z, y, x), its smoothed doubt ("score", 0..1), the number of doubtful voxels (0.2 <= p <= 0.8)
    within ``radius_mm`` and their mean probability. A class with no voxel above 0.05 gives no
    region.
    """
    p = np.asarray(probability, dtype=np.float32)
    if p.ndim != 3:
        raise ValueError(f"probability must be a 3D array, got shape {p.shape}")
    if count < 1:
        raise ValueError("count must be at least 1")
    spacing = np.asarray(spacing_zyx, dtype=float)
    doubt = np.where(p >= RELEVANT_PROBABILITY, 1.0 - np.abs(2.0 * p - 1.0), 0.0).astype(np.float32)
    if not doubt.any():
        return []
    sigma = (radius_mm / 2.0) / spacing
    smooth = ndimage.gaussian_filter(doubt, sigma=sigma, mode="constant")
    zz, yy, xx = np.ogrid[:p.shape[0], :p.shape[1], :p.shape[2]]
    band = (p >= 0.2) & (p <= 0.8)
    regions = []
    work = np.where(doubt > 0, smooth, 0.0)  # centres lie on voxels where the class is considered
    for _ in range(count):
        idx = np.unravel_index(int(np.argmax(work)), work.shape)
        score = float(work[idx])
        if score <= 1e-6:
            break
        d2 = (((zz - idx[0]) * spacing[0]) ** 2 + ((yy - idx[1]) * spacing[1]) ** 2
              + ((xx - idx[2]) * spacing[2]) ** 2)
        near = d2 <= radius_mm ** 2
        in_band = band & near
        regions.append({"index_zyx": tuple(int(v) for v in idx), "score": score,
                        "doubtful_voxels": int(np.count_nonzero(in_band)),
                        "mean_probability": float(p[in_band].mean()) if in_band.any() else float(p[idx])})
        work[d2 <= (2 * radius_mm) ** 2] = 0.0
    return regions


def index_to_ras(volume_node, index_zyx: Sequence[int]) -> List[float]:
    """RAS position of a voxel centre (index in z, y, x order) of a volume node."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk = [float(index_zyx[2]), float(index_zyx[1]), float(index_zyx[0]), 1.0]
    return list(m.MultiplyPoint(ijk)[:3])
