"""Reading a user's reference segmentation as a label array on the input volume's grid.

The user's segmentation node is only read. (Slicer's
``ExportSegmentsToLabelmapNode`` was tried first: on oblique grids each call
changed the source segmentation's labelmap slightly, so it is not used here.)
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonMath import vtkMatrix4x4

BINARY_LABELMAP = "Binary labelmap"


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())


def _matrix(getter) -> np.ndarray:
    m = vtkMatrix4x4()
    getter(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _reference_geometry(volume_node):
    geom = slicer.vtkOrientedImageData()
    dims = volume_node.GetImageData().GetDimensions()
    geom.SetExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    geom.SetImageToWorldMatrix(m)
    return geom


def _segment_mask(segment, volume_node, shape_zyx) -> np.ndarray:
    """Boolean mask (z, y, x) of one segment on the volume's voxel grid."""
    mask = np.zeros(shape_zyx, dtype=bool)
    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is None or image.GetPointData().GetScalars() is None:
        return mask
    ext = image.GetExtent()
    if ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return mask  # empty segment
    same_grid = np.allclose(_matrix(image.GetImageToWorldMatrix), _matrix(volume_node.GetIJKToRASMatrix), atol=1e-6)
    if not same_grid:
        copy = slicer.vtkOrientedImageData()
        copy.DeepCopy(image)  # never resample the user's data in place
        resampled = slicer.vtkOrientedImageData()
        ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
            copy, _reference_geometry(volume_node), resampled, False)
        if not ok:
            raise RuntimeError(f"could not resample reference segment {segment.GetName()!r} to the input grid")
        image = resampled
        ext = image.GetExtent()
        if ext[1] < ext[0]:
            return mask
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims)
    seg_mask = arr == segment.GetLabelValue()  # shared labelmaps hold several segments
    # Paste the extent into the full grid, clipping parts outside the volume.
    lo = np.array([ext[4], ext[2], ext[0]])
    src_lo = np.maximum(0, -lo)
    dst_lo = np.maximum(0, lo)
    dst_hi = np.minimum(np.array(shape_zyx), lo + np.array(dims))
    if np.any(dst_hi <= dst_lo):
        return mask
    src_hi = src_lo + (dst_hi - dst_lo)
    mask[dst_lo[0]:dst_hi[0], dst_lo[1]:dst_hi[1], dst_lo[2]:dst_hi[2]] = \
        seg_mask[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1], src_lo[2]:src_hi[2]]
    return mask


def matching_classes(segmentation_node, class_names: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(the foreground classes that a segment of ``segmentation_node`` is named like, the segment
    names), matched as :func:`reference_label_array` matches them; reads names only."""
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetSegment(segmentation.GetNthSegmentID(i)).GetName()
             for i in range(segmentation.GetNumberOfSegments())]
    normalised = {_norm(n) for n in names}
    return [c for c in class_names[1:] if _norm(c) in normalised], names


def check_same_transform(segmentation_node, volume_node) -> None:
    """Segment masks are computed on the volume's own voxel grid, which is only right when both
    nodes sit in the same frame: under the same parent transform, or both under none."""
    a, b = segmentation_node.GetParentTransformNode(), volume_node.GetParentTransformNode()
    if (a.GetID() if a is not None else None) != (b.GetID() if b is not None else None):
        def where(node):
            return f"under transform {node.GetName()!r}" if node is not None else "under no transform"
        raise ValueError(f"segmentation {segmentation_node.GetName()!r} is {where(a)} but volume "
                         f"{volume_node.GetName()!r} is {where(b)}; put both under the same transform (or harden "
                         "the transforms) before comparing")


def reference_label_array(scene, segmentation_node, reference_volume_node,
                          class_names: Sequence[str]) -> Tuple[np.ndarray, Dict[str, str]]:
    """Label array (z, y, x) on ``reference_volume_node``'s grid, values = class indices.

    Segments are matched to classes by name (case and underscores ignored).
    Returns the array and a mapping class name -> segment ID for the classes
    that were found; classes without a segment are absent from the mapping.
    Where reference segments overlap, the later class wins. Nothing in the scene
    is added or changed.
    """
    check_same_transform(segmentation_node, reference_volume_node)
    segmentation = segmentation_node.GetSegmentation()
    if segmentation.GetSourceRepresentationName() != BINARY_LABELMAP and not segmentation.ContainsRepresentation(BINARY_LABELMAP):
        raise ValueError(f"reference segmentation {segmentation_node.GetName()!r} has no binary labelmap; "
                         "create one in the Segmentations module first")
    by_name = {}
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        by_name[_norm(segmentation.GetSegment(seg_id).GetName())] = seg_id
    matched: Dict[str, str] = {}
    for name in class_names[1:]:
        if _norm(name) in by_name:
            matched[name] = by_name[_norm(name)]
    shape = tuple(reversed(reference_volume_node.GetImageData().GetDimensions()))
    labels = np.zeros(shape, dtype=np.uint8)
    for class_index, name in enumerate(class_names):
        if name in matched:
            labels[_segment_mask(segmentation.GetSegment(matched[name]), reference_volume_node, shape)] = class_index
    return labels, matched
