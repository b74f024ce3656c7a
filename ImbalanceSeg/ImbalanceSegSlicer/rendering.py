"""Offscreen slice snapshots rendered with Slicer's own slice pipeline.

No Qt is involved: a ``vtkMRMLSliceLogic`` produces the blended
background/foreground layer image (window/level and colour tables of the
volume display nodes applied exactly as in Slicer), and the slice-view
displayable managers (``vtkMRMLSegmentationsDisplayableManager2D``) draw the
segment fill and outlines into the same renderer. The render window is an
offscreen OpenGL window (OSMesa unless another offscreen backend is chosen
via ``VTK_DEFAULT_OPENGL_WINDOW``).

On request the snapshots are annotated in a second renderer layer drawn over the
slice: a legend of the segments (colour swatch and name), a colour bar of the
overlay (foreground) volume's colour table over its window (the range the colours
span), and orientation letters at the four view edges computed from the slice
node's ``SliceToRAS`` matrix (the anatomical direction each screen axis points to,
so they stay right for volume-aligned oblique slices too). With Slicer's default
slice orientation presets (patient right on screen left) an axial view reads R
(left edge), L (right), A (top), P (bottom); coronal R, L, S, I; sagittal A (left
edge), P (right), S, I: what Slicer's own Red/Green/Yellow views show.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Sequence

import numpy as np

_ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
#: Letter for the positive / negative direction of each RAS axis.
_RAS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))
_SLICE_NODE_NAMES = {"Axial": "Red", "Coronal": "Green", "Sagittal": "Yellow"}
_OFFSCREEN_HINT = (
    "No offscreen OpenGL render window is available. On Debian/Ubuntu install "
    "libosmesa6 (apt-get install libosmesa6) and set "
    "VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow."
)


def _ensure_offscreen_env() -> None:
    # Must happen before the first vtkRenderWindow is instantiated. OSMesa is
    # a Linux thing; elsewhere VTK's platform default renders offscreen too.
    if not os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") and sys.platform.startswith("linux"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkOSOpenGLRenderWindow"


def _create_render_window(width: int, height: int):
    _ensure_offscreen_env()
    import vtkmodules.vtkRenderingOpenGL2  # noqa: F401  (registers OpenGL factories)
    from vtkmodules.vtkRenderingCore import vtkRenderWindow

    try:
        rw = vtkRenderWindow()
    except Exception as exc:  # pragma: no cover - depends on the platform
        raise RuntimeError(f"{_OFFSCREEN_HINT} ({exc})") from exc
    if rw is None or "OpenGL" not in rw.GetClassName():
        raise RuntimeError(_OFFSCREEN_HINT)
    rw.SetOffScreenRendering(1)
    rw.ShowWindowOff()
    rw.SetMultiSamples(0)
    rw.SetSize(int(width), int(height))
    try:
        supported = rw.SupportsOpenGL()
    except Exception:  # pragma: no cover
        supported = 0
    if not supported:
        raise RuntimeError(f"{_OFFSCREEN_HINT} (render window {rw.GetClassName()} cannot create a context)")
    return rw


def check_offscreen_rendering() -> None:
    """Raise RuntimeError (with what to install) when no offscreen render window can be made,
    so a caller can refuse a job before doing the work the snapshots would end."""
    _create_render_window(8, 8).Finalize()


def _volume_center_ras(volume_node) -> tuple[float, float, float]:
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    dims = volume_node.GetImageData().GetDimensions()
    m = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(m)
    ijk = [(d - 1) / 2.0 for d in dims] + [1.0]
    ras = m.MultiplyPoint(ijk)
    return (ras[0], ras[1], ras[2])


def _write_png_atomic(render_window, path: str) -> None:
    from vtkmodules.vtkIOImage import vtkPNGWriter
    from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

    w2i = vtkWindowToImageFilter()
    w2i.SetInput(render_window)
    w2i.SetInputBufferTypeToRGB()
    w2i.ReadFrontBufferOff()
    w2i.Update()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex[:8]}-{os.path.basename(path)}")
    writer = vtkPNGWriter()
    writer.SetFileName(tmp)
    writer.SetInputConnection(w2i.GetOutputPort())
    try:
        writer.Write()
        if not os.path.exists(tmp) or os.path.getsize(tmp) == 0:
            raise RuntimeError(f"Writing {path} failed")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def direction_letter(vector: Sequence[float]) -> str:
    """The anatomical letter (R/L/A/P/S/I) of the RAS axis closest to ``vector``."""
    v = [float(x) for x in vector][:3]
    axis = max(range(3), key=lambda i: abs(v[i]))
    return _RAS_LETTERS[axis][0 if v[axis] >= 0 else 1]


def orientation_letters(slice_to_ras) -> dict[str, str]:
    """Letters at the view edges for a slice node's ``SliceToRAS`` (``vtkMatrix4x4`` or 4x4/3x3
    nested sequence): the screen's x axis (rightwards) is its first column, the y axis (upwards)
    its second. Returns ``{"left", "right", "top", "bottom"}``."""
    if hasattr(slice_to_ras, "GetElement"):
        col = lambda c: [slice_to_ras.GetElement(r, c) for r in range(3)]  # noqa: E731
    else:
        col = lambda c: [slice_to_ras[r][c] for r in range(3)]  # noqa: E731
    x, y = col(0), col(1)
    return {"left": direction_letter([-v for v in x]), "right": direction_letter(x),
            "top": direction_letter(y), "bottom": direction_letter([-v for v in y])}


def _rectangle_actor(x0: float, y0: float, x1: float, y1: float, color, opacity: float = 1.0):
    """A filled rectangle in viewport pixels (origin bottom left)."""
    from vtkmodules.vtkCommonCore import vtkPoints
    from vtkmodules.vtkCommonDataModel import vtkCellArray, vtkPolyData
    from vtkmodules.vtkRenderingCore import vtkActor2D, vtkPolyDataMapper2D

    pts = vtkPoints()
    for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
        pts.InsertNextPoint(float(x), float(y), 0.0)
    cells = vtkCellArray()
    cells.InsertNextCell(4, [0, 1, 2, 3])
    poly = vtkPolyData()
    poly.SetPoints(pts)
    poly.SetPolys(cells)
    mapper = vtkPolyDataMapper2D()
    mapper.SetInputData(poly)
    actor = vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*[float(c) for c in color][:3])
    actor.GetProperty().SetOpacity(float(opacity))
    return actor


def _text_actor(text: str, x: float, y: float, size: int, horizontal: str = "left", vertical: str = "bottom"):
    from vtkmodules.vtkRenderingCore import vtkTextActor

    actor = vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontSize(int(size))
    prop.SetColor(1.0, 1.0, 1.0)
    prop.BoldOn()
    prop.ShadowOn()
    getattr(prop, {"left": "SetJustificationToLeft", "center": "SetJustificationToCentered",
                   "right": "SetJustificationToRight"}[horizontal])()
    getattr(prop, {"bottom": "SetVerticalJustificationToBottom", "center": "SetVerticalJustificationToCentered",
                   "top": "SetVerticalJustificationToTop"}[vertical])()
    actor.SetDisplayPosition(int(round(x)), int(round(y)))
    return actor


def _segment_legend_entries(segmentation_node) -> list[tuple[str, tuple[float, float, float]]]:
    """(name, colour) of the segments shown, in segmentation order, with the display colour."""
    segmentation = segmentation_node.GetSegmentation()
    display = segmentation_node.GetDisplayNode()
    entries = []
    for i in range(segmentation.GetNumberOfSegments()):
        seg_id = segmentation.GetNthSegmentID(i)
        if display is not None and not display.GetSegmentVisibility(seg_id):
            continue
        segment = segmentation.GetSegment(seg_id)
        color = tuple(float(c) for c in segment.GetColor())
        if display is not None:
            override = display.GetSegmentOverrideColor(seg_id)
            if override is not None and min(override) >= 0:
                color = tuple(float(c) for c in override)
        entries.append((segment.GetName(), color))
    return entries


def _overlay_lookup_table(volume_node):
    """A lookup table with the colours of ``volume_node``'s colour node spread over the range
    its window/level maps them to, or None when it has no colour node."""
    from vtkmodules.vtkCommonCore import vtkLookupTable

    display = volume_node.GetDisplayNode()
    color_node = display.GetColorNode() if display is not None else None
    if color_node is None:
        return None, None
    source = color_node.GetScalarsToColors()
    if hasattr(display, "GetWindowLevelMin"):
        lo, hi = float(display.GetWindowLevelMin()), float(display.GetWindowLevelMax())
    else:  # pragma: no cover - every scalar volume display node has a window/level
        lo, hi = source.GetRange()
    n = color_node.GetNumberOfColors() if color_node.GetNumberOfColors() > 0 else 256
    lut = vtkLookupTable()
    lut.SetNumberOfTableValues(n)
    src_lo, src_hi = source.GetRange()
    for i in range(n):
        value = src_lo + (src_hi - src_lo) * (i / max(n - 1, 1))
        rgb = [0.0, 0.0, 0.0]
        source.GetColor(value, rgb)
        lut.SetTableValue(i, rgb[0], rgb[1], rgb[2], 1.0)
    lut.SetRange(lo, hi)
    lut.Build()
    return lut, (lo, hi)


class _SliceViewRenderer:
    """A minimal Qt-free slice view: slice logic + displayable managers."""

    def __init__(self, scene, app_logic, layout_name: str, size: tuple[int, int]):
        import slicer
        from vtkmodules.vtkRenderingCore import vtkActor2D, vtkImageMapper, vtkRenderer

        self.scene = scene
        self.width, self.height = int(size[0]), int(size[1])
        self.render_window = _create_render_window(self.width, self.height)
        self.renderer = vtkRenderer()
        self.renderer.SetBackground(0.0, 0.0, 0.0)
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.render_window.AddRenderer(self.renderer)
        # Displayable managers observe the interactor (widgets); a generic
        # interactor needs no windowing system and is never started.
        from vtkmodules.vtkRenderingUI import vtkGenericRenderWindowInteractor

        self.interactor = vtkGenericRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.render_window)

        # Slice logic: computes the blended RGBA layer image for the slice node.
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(app_logic)
        self.logic.SetMRMLScene(scene)
        self.slice_node = self.logic.AddSliceNode(layout_name)
        app_logic.GetSliceLogics().AddItem(self.logic)
        self.app_logic = app_logic

        # The image is already windowed / colour-mapped RGBA (0..255), shown
        # pixel-for-pixel in display coordinates behind the 2D actors.
        self.image_mapper = vtkImageMapper()
        self.image_mapper.SetColorWindow(255.0)
        self.image_mapper.SetColorLevel(127.5)
        self.image_actor = vtkActor2D()
        self.image_actor.SetMapper(self.image_mapper)
        self.image_actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(self.image_actor)

        # Displayable managers (segment outlines/fill are drawn by these).
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(app_logic)
        for name in ("vtkMRMLSegmentationsDisplayableManager2D",):
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.dm_group = slicer.vtkMRMLDisplayableManagerGroup()
        self.dm_group.Initialize(factory, self.renderer)
        self.dm_group.SetMRMLDisplayableNode(self.slice_node)

    def set_layers(self, background, foreground=None, foreground_opacity=0.5):
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID() if background else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        composite.SetForegroundOpacity(float(foreground_opacity) if foreground else 0.0)
        composite.SetLabelVolumeID(None)

    def setup(self, orientation: str, center_ras, align_to_volume: bool, fit_node):
        self.slice_node.SetOrientation(orientation)
        self.logic.ResizeSliceNode(self.width, self.height)
        if align_to_volume:
            # Like Slicer does when a volume is shown: slice planes follow the
            # volume axes (no oblique resampling of an oblique acquisition).
            self.logic.RotateSliceToLowestVolumeAxes(False)
        if fit_node is not None:
            self.logic.FitSliceToVolume(fit_node, self.width, self.height)
        else:
            self.logic.FitSliceToAll(self.width, self.height)
        # Move the slice plane through the point without panning: the fitted field of view stays.
        self.slice_node.JumpSliceByOffsetting(*center_ras)
        if align_to_volume:
            # Show an actual voxel plane (no interpolation between planes).
            self.logic.SnapSliceOffsetToIJK()
        self.slice_node.UpdateMatrices()

    def annotate(self, segmentation_node=None, foreground_node=None, legend: bool = True,
                 letters: bool = True, overlay_title: str | None = None) -> dict:
        """Add the legend, the overlay's colour bar and the orientation letters in a second
        renderer layer over the slice (call after :meth:`setup`). Returns what was drawn, boxes
        in PNG pixels (x0, y0, x1, y1; origin top left, inclusive)."""
        from vtkmodules.vtkRenderingCore import vtkRenderer
        import vtkmodules.vtkRenderingFreeType  # noqa: F401  (text rendering)

        w, h = self.width, self.height
        info: dict = {}
        self.overlay = vtkRenderer()
        self.overlay.SetLayer(1)
        self.overlay.InteractiveOff()
        self.render_window.SetNumberOfLayers(2)
        self.render_window.AddRenderer(self.overlay)
        short = min(w, h)
        margin = max(3, short // 100)

        def png_box(x0, y0, x1, y1):
            return (int(round(x0)), int(round(h - y1)), int(round(x1)) - 1, int(round(h - y0)) - 1)

        if letters:
            size = max(10, short // 24)
            found = orientation_letters(self.slice_node.GetSliceToRAS())
            places = {"left": (margin, h / 2, "left", "center"), "right": (w - margin, h / 2, "right", "center"),
                      "top": (w / 2, h - margin, "center", "top"), "bottom": (w / 2, margin, "center", "bottom")}
            actors = {}
            for edge, (x, y, hj, vj) in places.items():
                actors[edge] = _text_actor(found[edge], x, y, size, hj, vj)
                self.overlay.AddViewProp(actors[edge])
            info["letters"] = {edge: a.GetInput() for edge, a in actors.items()}
            info["letter_actors"] = actors

        if legend and segmentation_node is not None:
            entries = _segment_legend_entries(segmentation_node)
            if entries:
                size = max(8, short // 32)
                while size > 7 and len(entries) * (size + max(4, size // 3)) + 2 * margin > 0.45 * h:
                    size -= 1
                row = size + max(4, size // 3)
                pad = max(3, size // 3)
                max_chars = max(4, int((0.42 * w - 3 * pad - size) / (0.62 * size)))
                names = [n if len(n) <= max_chars else n[: max_chars - 3] + "..." for n, _ in entries]
                width = 3 * pad + size + 0.62 * size * max(len(n) for n in names)
                x0, y1 = margin, h - margin
                y0 = y1 - 2 * pad - len(entries) * row + (row - size)
                self.overlay.AddViewProp(_rectangle_actor(x0, y0, x0 + width, y1, (0.0, 0.0, 0.0), 0.6))
                swatches = []
                for k, (name, (n, color)) in enumerate(zip(names, entries)):
                    top = y1 - pad - k * row
                    sx0, sy0, sx1, sy1 = x0 + pad, top - size, x0 + pad + size, top
                    self.overlay.AddViewProp(_rectangle_actor(sx0, sy0, sx1, sy1, color))
                    self.overlay.AddViewProp(_text_actor(name, sx1 + pad, (sy0 + sy1) / 2, size, "left", "center"))
                    swatches.append({"name": n, "label": name, "color": color, "box": png_box(sx0, sy0, sx1, sy1)})
                info["legend"] = swatches
                info["legend_box"] = png_box(x0, y0, x0 + width, y1)

        if legend and foreground_node is not None:
            from vtkmodules.vtkRenderingAnnotation import vtkScalarBarActor

            lut, value_range = _overlay_lookup_table(foreground_node)
            if lut is not None:
                bar = vtkScalarBarActor()
                bar.SetLookupTable(lut)
                bar.SetOrientationToVertical()
                bar.SetNumberOfLabels(3)
                bar.SetLabelFormat("%.3g")
                bar.SetTextPositionToPrecedeScalarBar()
                bar.SetMaximumNumberOfColors(256)
                bar.UnconstrainedFontSizeOn()
                font = max(8, short // 36)
                prop = bar.GetLabelTextProperty()
                prop.SetColor(1.0, 1.0, 1.0)
                prop.SetFontSize(font)
                prop.ShadowOn()
                prop.BoldOff()
                prop.ItalicOff()
                # The title is a text actor of its own above the bar (the bar's own title is
                # squeezed into the bar's box and clipped at the view's top edge).
                title = overlay_title if overlay_title is not None else foreground_node.GetName()
                x1, top = w - margin, h - margin
                title_actor = _text_actor(title, x1, top, font, "right", "top")
                title_actor.GetTextProperty().BoldOff()
                self.overlay.AddViewProp(title_actor)
                bar_w, bar_h = max(40, int(0.16 * w)), int(0.4 * h)
                y1 = top - int(1.8 * font)
                x0, y0 = x1 - bar_w, y1 - bar_h
                coord = bar.GetPositionCoordinate()
                coord.SetCoordinateSystemToDisplay()
                coord.SetValue(x0, y0)
                bar.GetPosition2Coordinate().SetCoordinateSystemToDisplay()
                bar.GetPosition2Coordinate().SetReferenceCoordinate(None)
                bar.GetPosition2Coordinate().SetValue(x1, y1)
                bar.SetBarRatio(0.25)
                self.overlay.AddViewProp(bar)
                info["colour_bar"] = {"title": title_actor.GetInput(), "range": value_range,
                                      "box": png_box(x0, y0, x1, y1), "actor": bar, "title_actor": title_actor}
        return info

    def render(self, path: str) -> None:
        self.logic.UpdateImageData()
        connection = self.logic.GetImageDataConnection()
        self.image_mapper.SetInputConnection(connection)
        self.image_actor.SetVisibility(connection is not None)
        self.renderer.ResetCamera()
        self.render_window.Render()
        _write_png_atomic(self.render_window, path)

    def finalize(self):
        if getattr(self, "overlay", None) is not None:
            self.render_window.RemoveRenderer(self.overlay)
        self.dm_group.SetMRMLDisplayableNode(None)
        self.app_logic.GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        self.render_window.Finalize()


def _get_app_logic(scene):
    import slicer

    from .scene import ensure_scene_logic

    logics = ensure_scene_logic(scene)
    app_logic = logics.get("app")
    if app_logic is None:
        app_logic = slicer.vtkMRMLApplicationLogic()
        app_logic.SetMRMLScene(scene)
        logics["app"] = app_logic
    if app_logic.GetSliceLogics() is None:
        from vtkmodules.vtkCommonCore import vtkCollection

        app_logic.SetSliceLogics(vtkCollection())
    return app_logic


def render_slice_snapshots(
    scene,
    background_volume_node,
    segmentation_node=None,
    foreground_volume_node=None,
    foreground_opacity: float = 0.5,
    out_dir: str = ".",
    size: Sequence[int] = (512, 512),
    prefix: str = "",
    center_ras: Sequence[float] | None = None,
    orientations: Sequence[str] = _ORIENTATIONS,
    align_to_volume: bool = True,
    segmentation_fill_opacity: float = 0.3,
    segmentation_outline_width: float = 2.0,
    legend: bool = False,
    orientation_markers: bool = False,
    overlay_title: str | None = None,
    annotations: dict | None = None,
) -> dict[str, str]:
    """Render axial/coronal/sagittal PNG snapshots through ``center_ras``
    (default: centre of ``background_volume_node``).

    Returns ``{"axial": path, "coronal": path, "sagittal": path}``; files are
    named ``f"{prefix}{orientation}.png"`` and written atomically. Only the
    given segmentation is shown (other segmentation nodes of the scene are
    hidden during rendering and restored afterwards). Temporary slice/composite
    nodes are removed from the scene after rendering.

    ``legend``: draw the segments' names and colours (top left) and, with a foreground
    volume, its colour bar over the window its colours span (top right, titled
    ``overlay_title``, default the node's name). ``orientation_markers``: R/L/A/P/S/I at the
    view edges from the slice's SliceToRAS. ``annotations``: a dict filled per view
    (``"axial"``, ...) with what was drawn (``letters``, ``letter_actors``, ``legend`` entries
    with their swatch boxes, ``legend_box``, ``colour_bar``; boxes in PNG pixels).
    """
    if background_volume_node is None or background_volume_node.GetImageData() is None:
        raise ValueError("background_volume_node must be a volume node with image data")
    width, height = int(size[0]), int(size[1])
    os.makedirs(out_dir, exist_ok=True)
    center = tuple(center_ras) if center_ras is not None else _volume_center_ras(background_volume_node)
    app_logic = _get_app_logic(scene)

    # Only show the requested segmentation; remember display state to restore.
    restore = []
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationDisplayNode")):
        dn = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationDisplayNode")
        restore.append((dn, dn.GetVisibility(), dn.GetVisibility2DFill(), dn.GetVisibility2DOutline(),
                        dn.GetOpacity2DFill(), dn.GetSliceIntersectionThickness()))
        owner = dn.GetDisplayableNode()
        dn.SetVisibility(segmentation_node is not None and owner is segmentation_node)
    if segmentation_node is not None:
        if segmentation_node.GetDisplayNode() is None:
            segmentation_node.CreateDefaultDisplayNodes()
        dn = segmentation_node.GetDisplayNode()
        if not any(r[0] is dn for r in restore):
            restore.append((dn, dn.GetVisibility(), dn.GetVisibility2DFill(), dn.GetVisibility2DOutline(),
                            dn.GetOpacity2DFill(), dn.GetSliceIntersectionThickness()))
        dn.SetVisibility(True)
        dn.SetVisibility2D(True)
        dn.SetVisibility2DFill(True)
        dn.SetVisibility2DOutline(True)
        dn.SetOpacity2DFill(float(segmentation_fill_opacity))
        dn.SetSliceIntersectionThickness(int(round(segmentation_outline_width)))

    paths: dict[str, str] = {}
    views = []
    # The slice logic adds slice, composite, slice model (+transform, display)
    # nodes; they are removed again afterwards so the scene stays clean.
    ids_before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    try:
        for orientation in orientations:
            if orientation not in _ORIENTATIONS:
                raise ValueError(f"Unknown orientation {orientation!r}")
            view = _SliceViewRenderer(
                scene, app_logic, f"ImbalanceSegSnapshot{_SLICE_NODE_NAMES[orientation]}", (width, height)
            )
            views.append(view)
            view.set_layers(background_volume_node, foreground_volume_node, foreground_opacity)
            view.setup(orientation, center, align_to_volume, background_volume_node)
            if legend or orientation_markers:
                drawn = view.annotate(segmentation_node, foreground_volume_node, legend=legend,
                                      letters=orientation_markers, overlay_title=overlay_title)
                if annotations is not None:
                    annotations[orientation.lower()] = drawn
            path = os.path.join(out_dir, f"{prefix}{orientation.lower()}.png")
            view.render(path)
            paths[orientation.lower()] = os.path.abspath(path)
    finally:
        for view in views:
            view.finalize()
        added = [
            scene.GetNthNode(i)
            for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in ids_before
            and not scene.GetNthNode(i).IsA("vtkMRMLSubjectHierarchyNode")
        ]
        for node in added:
            if node.GetScene() is scene:
                scene.RemoveNode(node)
        for dn, vis, fill, outline, fill_opacity, thickness in restore:
            dn.SetVisibility(vis)
            dn.SetVisibility2DFill(fill)
            dn.SetVisibility2DOutline(outline)
            dn.SetOpacity2DFill(fill_opacity)
            dn.SetSliceIntersectionThickness(thickness)
    return paths


def count_pixels_near_color(png_path: str, rgb: Sequence[float], tolerance: int = 40) -> int:
    """Number of pixels in a PNG within ``tolerance`` (max abs per channel, 0..255)
    of ``rgb`` (0..1 floats or 0..255 ints). Handy for tests / QA."""
    from vtkmodules.util import numpy_support
    from vtkmodules.vtkIOImage import vtkPNGReader

    reader = vtkPNGReader()
    reader.SetFileName(png_path)
    reader.Update()
    img = reader.GetOutput()
    arr = numpy_support.vtk_to_numpy(img.GetPointData().GetScalars())
    arr = arr.reshape(-1, img.GetNumberOfScalarComponents())[:, :3].astype(int)
    target = np.array([float(v) for v in rgb][:3])
    if target.max() <= 1.0:
        target = target * 255.0
    return int(np.count_nonzero(np.abs(arr - target).max(axis=1) <= tolerance))
