"""Fixtures for the Qt-free ImbalanceSegSlicer tests (run with slicer-core).

Run:  VTK_DEFAULT_OPENGL_WINDOW=vtkOSOpenGLRenderWindow python -m pytest ImbalanceSeg/Testing/Python -q
"""

import os
import sys

import numpy as np
import pytest

# ImbalanceSeg/ on sys.path so that ``import ImbalanceSegSlicer.scene`` works.
_MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if _MODULE_DIR not in sys.path:
    sys.path.insert(0, _MODULE_DIR)
# The pure-Python library, when it is not pip-installed (source checkout).
_LIB_SRC = os.path.abspath(os.path.join(_MODULE_DIR, "..", "ImbalanceSegLib", "src"))
if os.path.isdir(_LIB_SRC) and _LIB_SRC not in sys.path:
    sys.path.append(_LIB_SRC)

# Offscreen rendering (OSMesa) must be selected before any render window exists.
if sys.platform.startswith("linux"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")

slicer = pytest.importorskip("slicer", reason="slicer-core (pip install slicer-core) is required")
sitk = pytest.importorskip("SimpleITK")

from moduletest_helpers import (CLASSES, COUNT_A, COUNT_B, ORIGIN, SIZE, SPACING, SPHERE_A,  # noqa: E402,F401
                                 SPHERE_B, _sphere_mask, oblique_direction)


@pytest.fixture
def scene():
    """Fresh vtkMRMLScene with the default colour tables (vtkMRMLColorLogic)."""
    from ImbalanceSegSlicer.scene import create_scene

    s = create_scene()
    yield s
    s.Clear(True)


@pytest.fixture
def synthetic():
    """Intensity image + label map (SimpleITK, LPS) with two spheres."""
    mask_a = _sphere_mask(**SPHERE_A)
    mask_b = _sphere_mask(**SPHERE_B)
    label = np.zeros(SIZE[::-1], dtype=np.uint8)
    label[mask_a] = 1
    label[mask_b] = 2
    zz, yy, xx = np.mgrid[0 : SIZE[2], 0 : SIZE[1], 0 : SIZE[0]]
    intensity = (100.0 + 30.0 * np.sin(xx / 3.0) + 20.0 * np.cos(yy / 4.0) + 2.0 * zz).astype(np.int16)
    intensity[mask_a] += 300
    intensity[mask_b] += 500

    image = sitk.GetImageFromArray(intensity)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(oblique_direction())
    label_image = sitk.GetImageFromArray(label)
    label_image.CopyInformation(image)
    # Smooth "probability" of sphere A in [0, 1].
    dist = np.sqrt(
        ((xx - SPHERE_A["center"][0]) * SPACING[0]) ** 2
        + ((yy - SPHERE_A["center"][1]) * SPACING[1]) ** 2
        + ((zz - SPHERE_A["center"][2]) * SPACING[2]) ** 2
    )
    prob = np.clip(1.0 - dist / (2 * SPHERE_A["radius_mm"]), 0.0, 1.0).astype(np.float32)
    prob_image = sitk.GetImageFromArray(prob)
    prob_image.CopyInformation(image)
    return dict(
        image=image,
        label=label_image,
        prob=prob_image,
        intensity=intensity,
        label_array=label,
        classes=[dict(c) for c in CLASSES],
        counts={"Sphere A": COUNT_A, "Sphere B": COUNT_B, "Absent": 0},
    )
