"""Which volumes of the scene are unlabelled, for suggestive annotation ("Annotate next").

Qt-free; ``ImbalanceSegLogic.suggestAnnotations`` ranks the pool found here with
:func:`imbalanceseglib.suggestive.rank_for_annotation` and fills the table.

**The pool** is every scalar volume of the scene that is a scan: not a label map, one component,
at least 2 voxels along each axis, with image data, and not a confidence or uncertainty map
made by this module. **A volume is labelled** when a segmentation node of the scene has it as
its reference geometry (the volume it was drawn on: the Segment Editor's source volume) and
holds at least one non-empty segment. A segmentation this module made (a result of Apply) is the
model's prediction, not an annotation: it does not make its input labelled (pass
``labelledVolumeNodes`` to say otherwise). Nothing here changes a node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from vtkmodules.util import numpy_support

from .review import CLASSES_ATTRIBUTE, PROBABILITY_REF, RESULT_MAP_ATTRIBUTE, UNCERTAINTY_REF

BINARY_LABELMAP = "Binary labelmap"
CLOSED_SURFACE = "Closed surface"


@dataclass
class AnnotationPool:
    """What the scene offers for annotation: ``unlabelled`` volume nodes (scene order),
    ``labelled``: node ID -> the names of the segmentations that label it, ``skipped``: volume
    name -> why it is not a scan to rank (label maps, vector volumes, single slices, no data)."""

    unlabelled: List[Any] = field(default_factory=list)
    labelled: Dict[str, List[str]] = field(default_factory=dict)
    labelledNodes: List[Any] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)


def _nodes(scene, class_name: str) -> List[Any]:
    return [scene.GetNthNodeByClass(i, class_name) for i in range(scene.GetNumberOfNodesByClass(class_name))]


def segment_is_empty(segmentation, segment_id: str) -> bool:
    """Whether a segment holds nothing: no voxel of its binary labelmap carries its label value
    (shared labelmaps hold several segments), or, when the segmentation has no binary labelmap,
    its closed surface has no points."""
    segment = segmentation.GetSegment(segment_id)
    image = segment.GetRepresentation(BINARY_LABELMAP)
    if image is not None:
        scalars = image.GetPointData().GetScalars() if image.GetPointData() is not None else None
        ext = image.GetExtent()
        if scalars is None or ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
            return True
        return not np.any(numpy_support.vtk_to_numpy(scalars) == segment.GetLabelValue())
    surface = segment.GetRepresentation(CLOSED_SURFACE)
    return surface is None or surface.GetNumberOfPoints() == 0


def is_result_segmentation(segmentation_node) -> bool:
    """A segmentation made by this module's Apply (the model's prediction)."""
    return bool(segmentation_node.GetAttribute(CLASSES_ATTRIBUTE))


def labelled_volumes(scene) -> Dict[str, List[str]]:
    """Volume node ID -> names of the segmentations that label it (see the module docstring)."""
    out: Dict[str, List[str]] = {}
    for seg in _nodes(scene, "vtkMRMLSegmentationNode"):
        if is_result_segmentation(seg):
            continue
        volume = seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole())
        if volume is None:
            continue
        segmentation = seg.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        if any(not segment_is_empty(segmentation, s) for s in ids):
            out.setdefault(volume.GetID(), []).append(seg.GetName())
    return out


def _result_maps(scene) -> set:
    """IDs of the confidence and uncertainty maps of results (marked, or linked from a result)."""
    ids = set()
    for seg in _nodes(scene, "vtkMRMLSegmentationNode"):
        if is_result_segmentation(seg):
            classes = json.loads(seg.GetAttribute(CLASSES_ATTRIBUTE))
            for role in [f"{PROBABILITY_REF}{i}" for i in range(len(classes))] + [UNCERTAINTY_REF]:
                node = seg.GetNodeReference(role)
                if node is not None:
                    ids.add(node.GetID())
    return ids


def why_not_a_scan(node) -> Optional[str]:
    """Why a volume node cannot be ranked as a scan (None: it can)."""
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return "a label map volume"
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return "no image data"
    if image.GetPointData().GetScalars().GetNumberOfComponents() != 1:
        return "more than one component per voxel (a vector or colour volume)"
    dims = image.GetDimensions()
    if min(dims) < 2:
        return f"{'x'.join(map(str, dims))} voxels: not a 3-D volume"
    return None


def annotation_pool(scene) -> AnnotationPool:
    """The scene's unlabelled scans, its labelled volumes and what was left out (module docstring)."""
    maps = _result_maps(scene)
    labelled = labelled_volumes(scene)
    pool = AnnotationPool(labelled=labelled)
    for node in _nodes(scene, "vtkMRMLScalarVolumeNode"):
        if node.GetAttribute(RESULT_MAP_ATTRIBUTE) or node.GetID() in maps:
            continue  # our own outputs
        why = why_not_a_scan(node)
        if why is not None:
            pool.skipped[node.GetName()] = why
        elif node.GetID() in labelled:
            pool.labelledNodes.append(node)
        else:
            pool.unlabelled.append(node)
    return pool


def scan_keys(nodes: Sequence[Any], taken: Sequence[str] = ()) -> List[str]:
    """One name per volume node for the ranking: its name, or, where names repeat (also with
    ``taken``), the name with the node ID."""
    names = [n.GetName() for n in nodes]
    seen = list(names) + list(taken)
    return [name if seen.count(name) == 1 else f"{name} ({node.GetID()})" for name, node in zip(names, nodes)]


@dataclass
class AnnotationSuggestions:
    """What ``ImbalanceSegLogic.suggestAnnotations`` found: ``rows`` by rank (the table's columns,
    plus ``volumeNode`` and ``perClass``: each foreground class's uncertainty), the table node
    filled (None when not asked for), the strategy, the labelled volumes the ranking counted as
    covered (suggestive only), the labelled volumes of the scene, and the volumes that are not
    scans (name -> why)."""

    rows: List[Dict[str, Any]]
    tableNode: Any
    strategy: str
    coveredBy: List[str] = field(default_factory=list)
    labelled: List[str] = field(default_factory=list)
    skipped: Dict[str, str] = field(default_factory=dict)

    @property
    def chosenNodes(self) -> List[Any]:
        return [r["volumeNode"] for r in self.rows if r["Chosen"] == "yes"]

    def summary(self) -> str:
        """One paragraph for the panel's status line."""
        chosen = [r["Volume"] for r in self.rows if r["Chosen"] == "yes"]
        text = (f"Annotate next: {', '.join(chosen)} ({len(chosen)} of {len(self.rows)} unlabelled volume(s), "
                f"strategy {self.strategy}")
        if self.coveredBy:
            text += f"; already labelled, counted as covered: {', '.join(self.coveredBy)}"
        elif self.labelled:
            text += f"; labelled, left out: {', '.join(self.labelled)}"
        text += ")."
        if self.skipped:
            text += " Not scans: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items()) + "."
        return text
