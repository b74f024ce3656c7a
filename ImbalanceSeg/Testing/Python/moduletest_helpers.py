"""Synthetic case shared by the module tests (imported by name; conftest holds the fixtures)."""

import numpy as np

# Synthetic case geometry: anisotropic spacing, oblique direction.
SIZE = (40, 30, 20)  # x, y, z (SimpleITK order)
SPACING = (0.8, 0.9, 2.5)
ORIGIN = (12.5, -30.25, 7.125)
SPHERE_A = dict(center=(14, 15, 10), radius_mm=6.0)  # label 1
SPHERE_B = dict(center=(28, 15, 10), radius_mm=5.0)  # label 2
# Exact voxel counts of the two spheres for the grid above (checked in
# test_synthetic_counts_are_known so the constants cannot silently drift).
COUNT_A = 499
COUNT_B = 277

CLASSES = [
    dict(value=1, name="Sphere A", color=(1.0, 0.0, 0.0)),
    dict(value=2, name="Sphere B", color=(0.0, 1.0, 0.0)),
    dict(value=3, name="Absent", color=(0.0, 0.0, 1.0)),  # never in the label map
]


def oblique_direction():
    """Rotation (LPS) about a tilted axis: 25 deg around z then 12 deg around x."""
    a, b = np.deg2rad(25.0), np.deg2rad(12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple(float(v) for v in (rz @ rx).ravel())


def _sphere_mask(center, radius_mm):
    zz, yy, xx = np.mgrid[0 : SIZE[2], 0 : SIZE[1], 0 : SIZE[0]]
    d2 = ((xx - center[0]) * SPACING[0]) ** 2 + ((yy - center[1]) * SPACING[1]) ** 2 + ((zz - center[2]) * SPACING[2]) ** 2
    return d2 < radius_mm**2


def render_or_skip(*args, **kwargs):
    """``rendering.render_slice_snapshots``, skipping the test where offscreen OpenGL (Debian's
    libosmesa6) is missing."""
    import pytest
    from ImbalanceSegSlicer import rendering
    try:
        return rendering.render_slice_snapshots(*args, **kwargs)
    except RuntimeError as exc:
        if "libosmesa6" in str(exc):
            pytest.skip(str(exc))
        raise
