"""Offscreen slice snapshots rendered with Slicer's own slice pipeline.

No Qt is involved: a ``vtkMRMLSliceLogic`` produces the blended
background/foreground layer image (window/level and colour tables of the
volume display nodes applied exactly as in Slicer), and the slice-view
displayable managers (``vtkMRMLSegmentationsDisplayableManager2D``) draw the
segment fill and outlines into the same renderer. The render window is an
offscreen OpenGL window (OSMesa unless another offscreen backend is chosen
via ``VTK_DEFAULT_OPENGL_WINDOW``).
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Sequence

import numpy as np

_ORIENTATIONS = ("Axial", "Coronal", "Sagittal")
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

    def render(self, path: str) -> None:
        self.logic.UpdateImageData()
        connection = self.logic.GetImageDataConnection()
        self.image_mapper.SetInputConnection(connection)
        self.image_actor.SetVisibility(connection is not None)
        self.renderer.ResetCamera()
        self.render_window.Render()
        _write_png_atomic(self.render_window, path)

    def finalize(self):
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
) -> dict[str, str]:
    """Render axial/coronal/sagittal PNG snapshots through ``center_ras``
    (default: centre of ``background_volume_node``).

    Returns ``{"axial": path, "coronal": path, "sagittal": path}``; files are
    named ``f"{prefix}{orientation}.png"`` and written atomically. Only the
    given segmentation is shown (other segmentation nodes of the scene are
    hidden during rendering and restored afterwards). Temporary slice/composite
    nodes are removed from the scene after rendering.
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
