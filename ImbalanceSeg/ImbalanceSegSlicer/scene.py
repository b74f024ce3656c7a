"""Qt-free helpers operating on a real ``vtkMRMLScene``.

Everything here takes the scene explicitly, so it works both inside 3D Slicer
(pass ``slicer.mrmlScene``) and with the ``slicer-core`` PyPI wheel, where no
application, no Qt and no global scene exist.

Coordinate systems: MRML stores geometry in RAS, ITK/SimpleITK in LPS. The
conversion flips the sign of the first two rows of the direction matrix and of
the first two origin components; spacing is unchanged. These are exact
floating point operations, so geometry round-trips bit-for-bit.
"""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
import weakref
from typing import Iterable, Sequence

import numpy as np
import SimpleITK as sitk
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonCore import (
    vtkDoubleArray,
    vtkIntArray,
    vtkStringArray,
)
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

__all__ = [
    "create_scene",
    "ensure_scene_logic",
    "sitk_from_volume_node",
    "volume_node_from_sitk",
    "segmentation_from_labelmap",
    "segment_voxel_counts",
    "add_probability_volume",
    "get_or_create_colormap_node",
    "table_node_from_rows",
    "save_node",
    "save_scene",
    "load_scene",
    "colormap_rgb",
    "safe_file_name",
]

GREY_COLOR_NODE_ID = "vtkMRMLColorTableNodeGrey"
LABELS_COLOR_NODE_ID = "vtkMRMLColorTableNodeLabels"
BINARY_LABELMAP = "Binary labelmap"

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# Logic objects must outlive the call that created them. They are kept per
# scene (weakly keyed by the scene's Python wrapper, so they go away with it).
_SCENE_LOGIC: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------
# Scene / logic setup
# ---------------------------------------------------------------------------
def ensure_scene_logic(scene) -> dict:
    """Make sure ``scene`` has what the helpers need.

    In a bare slicer-core scene the default colour tables (Grey, Labels, ...)
    do not exist; they are added by a ``vtkMRMLColorLogic`` bound to the scene.
    (``vtkSlicerColorLogic`` works as well but logs an error because it needs an
    application logic to find its colour files.) Inside 3D Slicer the tables
    exist already and nothing is created.
    """
    logic = _SCENE_LOGIC.get(scene)
    if logic is not None:
        return logic
    logic = {}
    if scene.GetNodeByID(GREY_COLOR_NODE_ID) is None:
        color_logic = slicer.vtkMRMLColorLogic()
        color_logic.SetMRMLScene(scene)
        logic["color"] = color_logic
    _SCENE_LOGIC[scene] = logic
    return logic


def remove_node_with_dependents(scene, node) -> None:
    """Remove ``node`` and the display and storage nodes that only it uses (a bare MRML scene
    leaves them behind when the node alone is removed)."""
    if node is None or node.GetScene() is not scene:
        return
    dependents = []
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for dep in dependents:
        if dep is not None and dep.GetScene() is scene:
            scene.RemoveNode(dep)


def create_scene():
    """Return a new ``vtkMRMLScene`` with the default colour tables."""
    scene = slicer.vtkMRMLScene()
    ensure_scene_logic(scene)
    return scene


# ---------------------------------------------------------------------------
# Geometry helpers
# ---------------------------------------------------------------------------
def _node_geometry_lps(node):
    """(spacing, origin_lps, direction_lps 3x3 ndarray) of a volume node."""
    spacing = tuple(float(v) for v in node.GetSpacing())
    origin_ras = np.array(node.GetOrigin(), dtype=float)
    m = vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    dir_ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    return spacing, _LPS_TO_RAS @ origin_ras, _LPS_TO_RAS @ dir_ras


def _set_node_geometry_from_sitk(node, image: sitk.Image) -> None:
    direction_lps = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    origin_lps = np.array(image.GetOrigin(), dtype=float)
    dir_ras = _LPS_TO_RAS @ direction_lps
    origin_ras = _LPS_TO_RAS @ origin_lps
    m = vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, float(dir_ras[r, c]))
    node.SetIJKToRASDirectionMatrix(m)
    node.SetSpacing(*[float(v) for v in image.GetSpacing()])
    node.SetOrigin(*[float(v) for v in origin_ras])


def _vtk_image_from_sitk(image: sitk.Image) -> vtkImageData:
    """vtkImageData with unit spacing / zero origin (MRML convention)."""
    if image.GetDimension() != 3:
        raise ValueError(f"Only 3D images are supported, got {image.GetDimension()}D")
    arr = sitk.GetArrayViewFromImage(image)  # (k, j, i[, c]) - i fastest, like VTK
    ncomp = image.GetNumberOfComponentsPerPixel()
    flat = np.ascontiguousarray(arr).reshape(-1, ncomp) if ncomp > 1 else np.ascontiguousarray(arr).ravel()
    if flat.dtype == np.bool_:
        flat = flat.astype(np.uint8)
    vtk_arr = numpy_support.numpy_to_vtk(flat, deep=True)
    vtk_arr.SetName("ImageScalars")
    img = vtkImageData()
    img.SetDimensions(*[int(v) for v in image.GetSize()])
    img.GetPointData().SetScalars(vtk_arr)
    return img


def _check_image_matches_node(image: sitk.Image, node) -> bool:
    spacing, origin, direction = _node_geometry_lps(node)
    dims = node.GetImageData().GetDimensions() if node.GetImageData() else None
    return (
        dims is not None
        and tuple(dims) == tuple(image.GetSize())
        and np.allclose(spacing, image.GetSpacing(), rtol=0, atol=1e-6)
        and np.allclose(origin, image.GetOrigin(), rtol=0, atol=1e-4)
        and np.allclose(direction.ravel(), image.GetDirection(), rtol=0, atol=1e-6)
    )


# ---------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------
def sitk_from_volume_node(node) -> sitk.Image:
    """Copy a MRML volume node (scalar, labelmap or vector) into a SimpleITK image.

    Parent transforms are ignored (the node's own IJK-to-RAS geometry is used).
    """
    image_data = node.GetImageData()
    if image_data is None:
        raise ValueError(f"Volume node {node.GetID()} has no image data")
    dims = image_data.GetDimensions()
    scalars = image_data.GetPointData().GetScalars()
    arr = numpy_support.vtk_to_numpy(scalars)
    ncomp = scalars.GetNumberOfComponents()
    shape = (dims[2], dims[1], dims[0]) + ((ncomp,) if ncomp > 1 else ())
    arr = np.array(arr, copy=True).reshape(shape)
    image = sitk.GetImageFromArray(arr, isVector=ncomp > 1)
    spacing, origin, direction = _node_geometry_lps(node)
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def _update_volume_node_from_sitk(node, image: sitk.Image) -> None:
    _set_node_geometry_from_sitk(node, image)
    node.SetAndObserveImageData(_vtk_image_from_sitk(image))


def volume_node_from_sitk(scene, image: sitk.Image, name: str, node_class: str = "vtkMRMLScalarVolumeNode"):
    """Add a new volume node holding ``image`` (LPS) to ``scene`` (RAS).

    A default display node is created: scalar volumes get the Grey colour table
    with automatic window/level, label maps the Labels table.
    """
    ensure_scene_logic(scene)
    node = scene.AddNewNodeByClass(node_class, name)
    if node is None:
        raise ValueError(f"Could not create node of class {node_class!r}")
    _update_volume_node_from_sitk(node, image)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None and display.IsA("vtkMRMLScalarVolumeDisplayNode") and not node.IsA(
        "vtkMRMLLabelMapVolumeNode"
    ):
        if not display.GetColorNodeID():
            display.SetAndObserveColorNodeID(GREY_COLOR_NODE_ID)
        _auto_window_level(display, image)
    elif display is not None and node.IsA("vtkMRMLLabelMapVolumeNode") and not display.GetColorNodeID():
        display.SetAndObserveColorNodeID(LABELS_COLOR_NODE_ID)
    return node


def _auto_window_level(display, image: sitk.Image) -> None:
    """Robust window/level from the 0.5-99.5 percentile (like Slicer's auto W/L)."""
    arr = sitk.GetArrayViewFromImage(image)
    if arr.size == 0 or image.GetNumberOfComponentsPerPixel() != 1:
        return
    lo, hi = (float(v) for v in np.percentile(arr, [0.5, 99.5]))
    if not math.isfinite(lo) or not math.isfinite(hi):
        return
    if hi <= lo:
        hi = lo + 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(lo, hi)


# ---------------------------------------------------------------------------
# Colour tables
# ---------------------------------------------------------------------------
# Degree-6 polynomial fits of matplotlib's perceptually uniform colour maps
# (Matt Zucker, https://www.shadertoy.com/view/WlfXRN, CC0). Coefficients are
# c0..c6 for t in [0, 1]; max error vs. the reference tables is < 1/255-ish.
_POLY_COLORMAPS = {
    "Inferno": (
        (0.0002189403691192265, 0.001651004631001012, -0.01948089843709184),
        (0.1065134194856116, 0.5639564367884091, 3.932712388889277),
        (11.60249308247187, -3.972853965665698, -15.9423941062914),
        (-41.70399613139459, 17.43639888205313, 44.35414519872813),
        (77.162935699427, -33.40235894210092, -81.80730925738993),
        (-71.31942824499214, 32.62606426397723, 73.20951985803202),
        (25.13112622477341, -12.24266895238567, -23.07032500287172),
    ),
    "Viridis": (
        (0.2777273272234177, 0.005407344544966578, 0.3340998053353061),
        (0.1050930431085774, 1.404613529898575, 1.384590162594685),
        (-0.3308618287255563, 0.214847559468213, 0.09509516302823659),
        (-4.634230498983486, -5.799100973351585, -19.33244095627987),
        (6.228269936347081, 14.17993336680509, 56.69055260068105),
        (4.776384997670288, -13.74514537774601, -65.35303263337234),
        (-5.435455855934631, 4.645852612178535, 26.3124352495832),
    ),
}


def colormap_rgb(colormap: str, n: int = 256) -> np.ndarray:
    """(n, 3) float array in [0, 1] for a supported colour map name."""
    coeffs = _POLY_COLORMAPS.get(colormap)
    if coeffs is None:
        raise ValueError(f"Unknown colormap {colormap!r}; supported: {sorted(_POLY_COLORMAPS)}")
    t = np.linspace(0.0, 1.0, n)[:, None]
    c = np.array(coeffs)  # (7, 3)
    rgb = np.zeros((n, 3))
    for k in range(c.shape[0] - 1, -1, -1):  # Horner
        rgb = rgb * t + c[k]
    return np.clip(rgb, 0.0, 1.0)


_COLORMAP_ATTRIBUTE = "ImbalanceSeg.Colormap"


#: The node ID of Slicer's own colour table of each name: the application loads them from colour
#: files at start-up (``vtkMRMLColorLogic``; the same ID in Slicer 5.8.1, 5.10.0 and main, see
#: ImbalanceSeg/Testing/Data/slicer_api.json, "color_nodes").
SLICER_COLOR_NODE_IDS = {"Inferno": "vtkMRMLColorTableNodeFileInferno.txt",
                         "Viridis": "vtkMRMLColorTableNodeFileViridis.txt"}


def get_or_create_colormap_node(scene, colormap: str = "Inferno"):
    """The colour table ``colormap``: Slicer's own when the scene has it (inside the application),
    else a 256-entry ``vtkMRMLColorTableNode`` built here.

    Slicer ships Inferno/Viridis as colour *files* that slicer-core does not
    contain; there the table is built (and saved with the scene as .ctbl).
    An existing table created by this function is reused.
    """
    builtin = SLICER_COLOR_NODE_IDS.get(colormap)
    if builtin and scene.GetNodeByID(builtin) is not None:
        return scene.GetNodeByID(builtin)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetAttribute(_COLORMAP_ATTRIBUTE) == colormap:
            return node
    rgb = colormap_rgb(colormap, 256)
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(colormap)
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    node.GetLookupTable().SetTableRange(0, 255)
    for i, (r, g, b) in enumerate(rgb):
        node.SetColor(i, f"{colormap}_{i}", float(r), float(g), float(b), 1.0)
    node.SetAttribute(_COLORMAP_ATTRIBUTE, colormap)
    node.SetAttribute("Category", "ImbalanceSeg")
    scene.AddNode(node)
    return node


def add_probability_volume(scene, image: sitk.Image, name: str, colormap: str = "Inferno"):
    """Scalar volume for a probability / uncertainty map in [0, 1].

    Uses a perceptual colour table (``"Inferno"`` for probabilities,
    ``"Viridis"`` for uncertainty) and a fixed window/level covering 0..1.
    """
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        image = sitk.Cast(image, sitk.sitkFloat32)
    node = volume_node_from_sitk(scene, image, name, "vtkMRMLScalarVolumeNode")
    color = get_or_create_colormap_node(scene, colormap)
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(color.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.SetAttribute(_COLORMAP_ATTRIBUTE, colormap)
    return node


# ---------------------------------------------------------------------------
# Segmentations
# ---------------------------------------------------------------------------
def _color01(color: Sequence[float]) -> tuple[float, float, float]:
    c = [float(v) for v in color][:3]
    if any(v > 1.0 for v in c):  # 0..255 given
        c = [v / 255.0 for v in c]
    return (c[0], c[1], c[2])


#: Characters Slicer's segmentation display node writes into the .mrml file unescaped (it
#: percent-encodes a segment ID for ``SegmentationDisplayProperties`` but leaves ``&`` as it is,
#: which makes the scene file ill-formed XML), or that percent-encoding itself would confuse.
_UNSAFE_ID_CHARS = re.compile(r"[&<>\"'%\x00-\x1f\x7f]")


def segment_id_for(name: str, value: int) -> str:
    """The segment ID of a class: its name when that is safe to write into a scene file, else
    ``Segment_<value>`` (the segment keeps its full name either way; lookups go by name)."""
    name = str(name)
    return name if name and not _UNSAFE_ID_CHARS.search(name) else f"Segment_{int(value)}"


def segmentation_from_labelmap(
    scene,
    label_image: sitk.Image,
    reference_volume_node,
    classes: list[dict],
    name: str,
):
    """Create a segmentation node with one segment per entry of ``classes``.

    ``classes``: dicts with ``value`` (label value in ``label_image``), ``name``,
    ``color`` (RGB, 0..1 or 0..255) and optionally ``id`` (segment ID, defaults
    to ``name``). A class with value 0 (background) is skipped. Every other
    class gets a segment, also when its label value does not
    occur (empty segment), so segment IDs/names are stable across cases. Label
    values not listed in ``classes`` are dropped.

    All segments share one binary labelmap (Slicer's "shared labelmap" layer,
    each segment's label value = class value); the source representation is
    binary labelmap; the reference image geometry is taken from
    ``reference_volume_node``. The labelmap keeps ``label_image``'s geometry.
    """
    ensure_scene_logic(scene)
    # A background class (value 0) is not a segment; it is skipped.
    classes = [c for c in classes if int(c["value"]) != 0]
    if not classes:
        raise ValueError("classes must contain at least one non-background (value > 0) class")
    values = [int(c["value"]) for c in classes]
    if len(set(values)) != len(values):
        raise ValueError(f"Duplicate class values: {values}")
    if any(v < 0 for v in values):
        raise ValueError("Class label values must be >= 0 (0 = background, skipped)")
    ids = [str(c["id"]) if "id" in c else segment_id_for(c["name"], int(c["value"])) for c in classes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"Duplicate segment IDs: {ids}")

    arr = sitk.GetArrayViewFromImage(label_image)
    dtype = np.uint8 if max(values) <= 255 else np.uint16
    clean = np.where(np.isin(arr, values), arr, 0).astype(dtype)
    clean_img = sitk.GetImageFromArray(clean)
    clean_img.CopyInformation(label_image)

    # Convert via a (scene-less) labelmap volume node so the segmentation logic
    # builds the oriented image data with the right IJK-to-RAS geometry.
    label_node = slicer.vtkMRMLLabelMapVolumeNode()
    _update_volume_node_from_sitk(label_node, clean_img)
    logic_cls = slicer.vtkSlicerSegmentationsModuleLogic
    shared = logic_cls.CreateOrientedImageDataFromVolumeNode(label_node)
    if shared is None:
        raise RuntimeError("CreateOrientedImageDataFromVolumeNode failed")

    if reference_volume_node is not None and not _check_image_matches_node(label_image, reference_volume_node):
        logging.getLogger(__name__).warning(
            "Label map geometry differs from reference volume %r; segments keep the label map geometry",
            reference_volume_node.GetName(),
        )

    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg_node.SetSourceRepresentationToBinaryLabelmap()
    if reference_volume_node is not None:
        seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segmentation = seg_node.GetSegmentation()
    was_modifying = seg_node.StartModify()
    for cls, seg_id, value in zip(classes, ids, values):
        segment = slicer.vtkSegment()
        segment.SetName(str(cls["name"]))
        segment.SetColor(*_color01(cls.get("color", (0.5, 0.5, 0.5))))
        segment.SetNameAutoGenerated(False)  # names and colours come from the model card, as set
        segment.SetColorAutoGenerated(False)
        segment.AddRepresentation(BINARY_LABELMAP, shared)
        segment.SetLabelValue(value)
        segment.SetTag("ImbalanceSeg.ClassValue", str(value))
        if cls.get("terminology"):
            segment.SetTerminology(terminology_string(cls["terminology"]))
        if not segmentation.AddSegment(segment, seg_id):
            raise RuntimeError(f"Failed to add segment {seg_id!r}")
    seg_node.EndModify(was_modifying)

    seg_node.CreateDefaultDisplayNodes()
    display = seg_node.GetDisplayNode()
    if display is not None:
        display.SetVisibility2DFill(True)
        display.SetVisibility2DOutline(True)
    return seg_node


DEFAULT_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
DEFAULT_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_string(term: dict) -> str:
    """Slicer's serialized terminology entry for a model card's class ``terminology``
    (``category``/``type``/... as [coding scheme, code value, code meaning])."""
    entry = slicer.vtkSlicerTerminologyEntry()
    entry.SetTerminologyContextName(term.get("context", DEFAULT_TERMINOLOGY_CONTEXT))
    targets = {"category": entry.GetCategoryObject(), "type": entry.GetTypeObject(),
               "type_modifier": entry.GetTypeModifierObject(), "region": entry.GetRegionObject(),
               "region_modifier": entry.GetRegionModifierObject()}
    for key, obj in targets.items():
        if term.get(key):
            scheme, value, meaning = term[key]
            obj.SetCodingSchemeDesignator(scheme)
            obj.SetCodeValue(value)
            obj.SetCodeMeaning(meaning)
    if term.get("region"):
        entry.SetRegionContextName(DEFAULT_ANATOMIC_CONTEXT)
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry)


def place_in_subject_hierarchy(scene, input_node, nodes: Sequence, folder_name: str) -> int:
    """Put ``nodes`` in a new subject hierarchy folder beside ``input_node`` (same parent:
    patient/study when the input came from DICOM). Returns the folder item ID.

    Inside Slicer every node already has an item; on a bare slicer-core scene items are created."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None:
        raise RuntimeError("the scene has no subject hierarchy")
    scene_item = sh.GetSceneItemID()
    input_item = sh.GetItemByDataNode(input_node)
    if not input_item:
        input_item = sh.CreateItem(scene_item, input_node)
    parent = sh.GetItemParent(input_item) or scene_item
    folder = sh.CreateFolderItem(parent, folder_name)
    sh.SetItemAttribute(folder, "ImbalanceSeg.ResultFolder", "1")
    for node in nodes:
        if node is None:
            continue
        item = sh.GetItemByDataNode(node)
        if not item:
            sh.CreateItem(folder, node)
        else:
            sh.SetItemParent(item, folder)
    return folder


def segment_voxel_counts(segmentation_node) -> dict[str, int]:
    """Number of voxels in each segment's binary labelmap, keyed by segment ID."""
    segmentation = segmentation_node.GetSegmentation()
    counts = {}
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(seg_id)
        image = segment.GetRepresentation(BINARY_LABELMAP)
        if image is None or image.GetPointData().GetScalars() is None:
            counts[seg_id] = 0
            continue
        arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        counts[seg_id] = int(np.count_nonzero(arr == segment.GetLabelValue()))
    return counts


# ---------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------
_ARRAY_TYPES = {"string": vtkStringArray, "double": vtkDoubleArray, "int": vtkIntArray}


def table_node_from_rows(scene, name: str, columns: list[dict], rows: Iterable[Sequence]):
    """Create a ``vtkMRMLTableNode``.

    ``columns``: dicts with ``name``, ``type`` ("string" | "double" | "int"),
    optional ``unit``, ``description`` and ``title`` (defaults to ``name``).
    Column metadata is stored the way Slicer's Segment Statistics module does
    (column properties saved in the ``.schema.tsv`` next to the table).
    ``None`` becomes NaN (double), 0 (int) or "" (string).
    """
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"Row has {len(r)} values, expected {len(columns)}: {r!r}")
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    fill_table_node(node, columns, rows)
    return node


def fill_table_node(node, columns: list[dict], rows: Iterable[Sequence]) -> None:
    """Replace all columns and rows of an existing table node (see :func:`table_node_from_rows`)."""
    rows = [list(r) for r in rows]
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"Row has {len(r)} values, expected {len(columns)}: {r!r}")
    for col in columns:
        if col.get("type", "string") not in _ARRAY_TYPES:
            raise ValueError(f"Unsupported column type {col.get('type')!r}")
    was_modifying = node.StartModify()
    table = node.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(table.GetNumberOfColumns() - 1)
    for ci, col in enumerate(columns):
        ctype = col.get("type", "string")
        if ctype not in _ARRAY_TYPES:
            raise ValueError(f"Unsupported column type {ctype!r}")
        arr = _ARRAY_TYPES[ctype]()
        arr.SetName(str(col["name"]))
        arr.SetNumberOfValues(len(rows))
        for ri, row in enumerate(rows):
            v = row[ci]
            if ctype == "string":
                arr.SetValue(ri, "" if v is None else str(v))
            elif ctype == "double":
                arr.SetValue(ri, float("nan") if v is None else float(v))
            else:
                arr.SetValue(ri, 0 if v is None else int(v))
        table.AddColumn(arr)
        cname = str(col["name"])
        node.SetColumnProperty(cname, "type", ctype)
        node.SetColumnTitle(cname, str(col.get("title", cname)))
        if col.get("unit"):
            node.SetColumnUnitLabel(cname, str(col["unit"]))
        if col.get("description"):
            node.SetColumnDescription(cname, str(col["description"]))
    node.SetUseColumnTitleAsColumnHeader(True)
    node.Modified()
    node.EndModify(was_modifying)


# ---------------------------------------------------------------------------
# Saving / loading
# ---------------------------------------------------------------------------
_DEFAULT_EXTENSIONS = {
    "vtkMRMLSegmentationNode": ".seg.nrrd",
    "vtkMRMLVolumeNode": ".nrrd",
    "vtkMRMLTableNode": ".tsv",
    "vtkMRMLColorTableNode": ".ctbl",
}


def _default_extension(node) -> str:
    for cls, ext in _DEFAULT_EXTENSIONS.items():
        if node.IsA(cls):
            return ext
    storage = node.GetStorageNode() or node.CreateDefaultStorageNode()
    ext = storage.GetDefaultWriteFileExtension() if storage else None
    return "." + ext if ext else ".dat"


def safe_file_name(name: str) -> str:
    """A file-name-safe version of a node or class name (letters, digits, -_.(); spaces become _)."""
    keep = "-_.()"
    cleaned = "".join(ch if ch.isalnum() or ch in keep else "_" for ch in name.strip())
    return cleaned or "node"


def save_node(scene, node, path: str) -> str:
    """Write ``node`` with its (default) storage node to ``path``, atomically.

    The data is written to a hidden temporary file with the same extension in
    the same folder (``.tmp-<hex>-<name><ext>``, e.g. ``.tmp-1a2b-seg.seg.nrrd``)
    and then renamed with ``os.replace``. Afterwards the storage node points to
    ``path``. Table schema files (``X.schema.tsv``) are moved the same way.
    Returns the absolute path.
    """
    if node.GetScene() is None:
        raise ValueError("node must be in a scene")
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    storage = node.GetStorageNode()
    if storage is None:
        node.AddDefaultStorageNode()
        storage = node.GetStorageNode()
    if storage is None:
        raise RuntimeError(f"Node {node.GetID()} ({node.GetClassName()}) cannot be stored")
    if storage.IsA("vtkMRMLVolumeArchetypeStorageNode") or storage.IsA("vtkMRMLSegmentationStorageNode"):
        storage.SetUseCompression(True)
    prefix = f".tmp-{uuid.uuid4().hex[:8]}-"
    tmp = os.path.join(folder, prefix + os.path.basename(path))
    storage.ResetFileNameList()
    storage.SetFileName(tmp)
    extra_tmp: list[str] = []
    try:
        ok = storage.WriteData(node)
        if not ok or not os.path.exists(tmp):
            raise RuntimeError(f"Writing {node.GetName()!r} to {path} failed")
        # Additional files (e.g. the table's .schema.tsv) are listed in the
        # storage node's file name list; they carry the same temporary prefix.
        extra_final = []
        for i in range(storage.GetNumberOfFileNames()):
            name = storage.GetNthFileName(i)
            full = name if os.path.isabs(name) else os.path.join(folder, name)
            base = os.path.basename(full)
            if os.path.abspath(full) == tmp:
                extra_final.append(path)
            elif base.startswith(prefix) and os.path.dirname(full) == folder:
                extra_tmp.append(full)
                extra_final.append(os.path.join(folder, base[len(prefix):]))
            else:
                extra_final.append(full)
        for src in extra_tmp:
            os.replace(src, os.path.join(folder, os.path.basename(src)[len(prefix):]))
        os.replace(tmp, path)
        storage.ResetFileNameList()
        for f in extra_final:
            storage.AddFileName(f)
    finally:
        for leftover in [tmp, *extra_tmp]:
            if os.path.exists(leftover):
                os.remove(leftover)
        storage.SetFileName(path)
    return path


def _needs_saving(node) -> bool:
    if not node.IsA("vtkMRMLStorableNode") or not node.GetSaveWithScene():
        return False
    if node.GetHideFromEditors():
        # "Private" nodes (e.g. our colour tables) are written by
        # vtkMRMLScene::Commit itself into "<SceneName>_Private/".
        return False
    storage = node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return True
    return bool(node.GetModifiedSinceRead()) or not os.path.exists(storage.GetFileName())


def save_scene(scene, mrml_path: str, save_unsaved_nodes: bool = True) -> str:
    """Write ``scene`` as a ``.mrml`` file that 3D Slicer can load.

    Storable nodes that were not saved yet (or were modified since) are saved
    first into the MRML file's folder with default file names. Storage nodes
    reference their files relative to the MRML folder, so the folder can be
    moved/zipped and opened with File > Load scene. The MRML file itself is
    written atomically.
    """
    mrml_path = os.path.abspath(os.fspath(mrml_path))
    folder = os.path.dirname(mrml_path)
    os.makedirs(folder, exist_ok=True)
    if save_unsaved_nodes:
        used = set()
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLStorableNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLStorableNode")
            if not _needs_saving(node):
                continue
            base = safe_file_name(node.GetName() or node.GetID())
            ext = _default_extension(node)
            fname = base + ext
            n = 1
            while fname in used:
                n += 1
                fname = f"{base}_{n}{ext}"
            used.add(fname)
            save_node(scene, node, os.path.join(folder, fname))

    # Slicer derives the "<SceneFileName>_Private" folder from the part of the
    # file name before the first dot, so the temporary name must keep that part.
    first, dot, rest = os.path.basename(mrml_path).partition(".")
    tmp = os.path.join(folder, f"{first}.tmp-{uuid.uuid4().hex[:8]}{dot}{rest}")
    old_url, old_root = scene.GetURL(), scene.GetRootDirectory()
    scene.SetRootDirectory(folder)
    scene.SetURL(tmp)
    try:
        ok = scene.Commit(tmp)
        if not ok or not os.path.exists(tmp):
            raise RuntimeError(f"Saving scene to {mrml_path} failed")
        _check_relative_paths(tmp, folder)
        os.replace(tmp, mrml_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    scene.SetURL(mrml_path)
    scene.SetRootDirectory(folder)
    del old_url, old_root
    return mrml_path


def _check_relative_paths(mrml_file: str, folder: str) -> None:
    """Fail loudly if a storage node was written with an absolute path."""
    import xml.etree.ElementTree as ET

    root = ET.parse(mrml_file).getroot()
    for elem in root.iter():
        fname = elem.get("fileName")
        if fname and os.path.isabs(fname):
            raise RuntimeError(f"Storage node {elem.get('id')} references absolute path {fname!r}")


def load_scene(mrml_path: str, scene=None):
    """Load a ``.mrml`` file (with its data) into ``scene`` (new one if None)."""
    if scene is None:
        scene = create_scene()
    else:
        ensure_scene_logic(scene)
    mrml_path = os.path.abspath(os.fspath(mrml_path))
    scene.SetURL(mrml_path)
    scene.SetRootDirectory(os.path.dirname(mrml_path))
    if not scene.Import():
        raise RuntimeError(f"Loading scene {mrml_path} failed")
    return scene
