"""Synthetic cohorts from one real anatomy.

The demo ships a single real subject (Colin27 T1 + AAL-derived labels).  To
train and evaluate on more than one case, this module creates plausible
*variants* of that subject: smooth non-rigid deformations, a small global
affine change, MRI-like intensity changes (bias field, gamma/contrast), Rician
noise and simulated thick-slice acquisitions.  A variant is never identical to
the source case: the elastic deformation always has a non-zero magnitude.

Conventions
-----------
* Arrays are indexed ``(z, y, x)``; ``spacing`` is the matching tuple of voxel
  sizes in mm ``(sz, sy, sx)``.
* Displacement fields have shape ``(3, Z, Y, X)``, are stored as float32 and
  are in **voxel units** (index space): output voxel ``p`` takes its value from
  the input at continuous index ``p + disp[:, p]`` (backward mapping, "pull").
* Randomness comes only from a ``numpy.random.Generator`` passed in (or created
  from ``seed``); the same seed gives bit-identical output.

Everything is numpy/scipy; no SimpleITK or torch is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import ndimage
from scipy.interpolate import CubicSpline

__all__ = [
    "VariantParams",
    "PRESETS",
    "affine_displacement",
    "random_smooth_deformation",
    "displacement_magnitude_mm",
    "warp_image",
    "warp_labels",
    "bias_field",
    "random_gamma",
    "random_contrast",
    "add_rician_noise",
    "add_gaussian_noise",
    "simulate_low_resolution",
    "make_variant",
    "make_cohort",
    "with_overrides",
]

Spacing = tuple[float, float, float]


# --------------------------------------------------------------------------- #
# Geometry
# --------------------------------------------------------------------------- #


def _spline_matrix(n_out: int, n_ctrl: int) -> np.ndarray:
    """(n_out, n_ctrl) matrix that evaluates a natural cubic spline through
    ``n_ctrl`` equally spaced control points spanning the ``n_out`` samples."""
    if n_ctrl == 1:
        return np.ones((n_out, 1))
    x_ctrl = np.linspace(0.0, 1.0, n_ctrl)
    x_out = np.linspace(0.0, 1.0, n_out)
    if n_ctrl == 2:
        w = x_out[:, None]
        return np.concatenate([1.0 - w, w], axis=1)
    return CubicSpline(x_ctrl, np.eye(n_ctrl), axis=0, bc_type="natural")(x_out)


def _separable_apply(coef: np.ndarray, mats: list[np.ndarray]) -> np.ndarray:
    """Evaluate ``sum_ijk coef[i,j,k] * A[z,i] * B[y,j] * C[x,k]`` cheaply."""
    a, b, c = mats
    out = np.tensordot(a, coef, axes=(1, 0))  # (Z, j, k)
    out = np.tensordot(out, b, axes=(1, 1))  # (Z, k, Y)
    out = np.tensordot(out, c, axes=(1, 1))  # (Z, Y, X)
    return out


def _rotation_matrix(angles_deg: tuple[float, float, float]) -> np.ndarray:
    """Rotation about the z, y and x axes (in that order), in (z, y, x) coordinates."""
    az, ay, ax = (math.radians(a) for a in angles_deg)
    # In (z, y, x) index order: rotation about z acts on (y, x), etc.
    rz = np.array([[1, 0, 0], [0, math.cos(az), -math.sin(az)], [0, math.sin(az), math.cos(az)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rx = np.array([[math.cos(ax), -math.sin(ax), 0], [math.sin(ax), math.cos(ax), 0], [0, 0, 1]])
    return rz @ ry @ rx


def affine_displacement(
    shape: tuple[int, int, int],
    spacing: Spacing,
    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0),
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0),
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> np.ndarray:
    """Displacement field (voxel units, shape ``(3, *shape)``) of a global affine map.

    The transform acts about the volume centre, in mm.  ``scale`` > 1 *enlarges*
    the anatomy in the output (the sampling grid is shrunk by ``1/scale``), so a
    structure of volume V ends up with volume ``V * prod(scale)``.  Rotation
    angles are about the z, y and x axes.  Translation moves the anatomy by
    ``translation_mm`` (z, y, x) in the output.
    """
    spacing_a = np.asarray(spacing, dtype=np.float64)
    rot = _rotation_matrix(rotation_deg)
    # Output point q (mm, centred) samples the input at R^T diag(1/s) (q - t).
    m = rot.T @ np.diag(1.0 / np.asarray(scale, dtype=np.float64))
    t = np.asarray(translation_mm, dtype=np.float64)
    a = m - np.eye(3)  # displacement = (M - I) q - M t
    b = -m @ t
    axes_mm = [
        (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing_a)
    ]
    disp = np.empty((3, *shape), dtype=np.float32)
    for i in range(3):
        d = (
            a[i, 0] * axes_mm[0][:, None, None]
            + a[i, 1] * axes_mm[1][None, :, None]
            + a[i, 2] * axes_mm[2][None, None, :]
            + b[i]
        )
        disp[i] = d / spacing_a[i]
    return disp


def displacement_magnitude_mm(disp: np.ndarray, spacing: Spacing) -> np.ndarray:
    """Per-voxel displacement length in mm for a voxel-unit field ``(3, Z, Y, X)``."""
    s = np.asarray(spacing, dtype=np.float32).reshape(3, 1, 1, 1)
    return np.sqrt(np.sum((disp * s) ** 2, axis=0))


def random_smooth_deformation(
    shape: tuple[int, int, int],
    spacing: Spacing,
    rng: np.random.Generator,
    max_displacement_mm: float = 4.0,
    control_spacing_mm: float = 32.0,
    min_displacement_mm: float | None = None,
    affine: bool = False,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.08,
    max_translation_mm: float = 5.0,
    return_params: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Random smooth displacement field (voxel units, shape ``(3, *shape)``, float32).

    Elastic part: independent uniform random values in ``[-1, 1]`` on a coarse
    control grid (one point every ``control_spacing_mm``, at least 2 per axis,
    the grid spanning the volume) for each of the three components, upsampled
    with natural cubic splines (separable, so it costs a few tensor products).
    The field is then rescaled so that its **largest** displacement length is
    ``m`` mm with ``m ~ U(min_displacement_mm, max_displacement_mm)``
    (``min_displacement_mm`` defaults to ``max_displacement_mm``, i.e. exactly the
    maximum).  With ``max_displacement_mm == 0`` and ``affine=False`` the field is
    exactly zero (identity).

    Optional global affine (``affine=True``): rotation ``U(-r, r)`` degrees about
    each axis, per-axis scale ``U(1 - max_scale, 1 + max_scale)`` and translation
    ``U(-t, t)`` mm per axis, about the volume centre (see
    :func:`affine_displacement`).  The two fields are added, which is a good
    approximation of composing them because the elastic field is smooth and small.

    Control spacing vs. magnitude: the largest strain is roughly
    ``pi * m / control_spacing_mm``; the defaults (4 mm / 32 mm, ~0.4) keep the
    map invertible (no folding).

    With ``return_params=True`` also returns a dict of the drawn parameters.
    """
    if max_displacement_mm < 0:
        raise ValueError("max_displacement_mm must be >= 0")
    lo = max_displacement_mm if min_displacement_mm is None else float(min_displacement_mm)
    if not 0 <= lo <= max_displacement_mm:
        raise ValueError("need 0 <= min_displacement_mm <= max_displacement_mm")
    shape = tuple(int(n) for n in shape)
    spacing_a = np.asarray(spacing, dtype=np.float64)
    params: dict[str, Any] = {}

    # Draw every random number unconditionally, so the stream (and hence the
    # other augmentations that follow) does not depend on the option values.
    n_ctrl = [
        max(2, int(math.ceil(n * s / control_spacing_mm)) + 1) for n, s in zip(shape, spacing_a)
    ]
    ctrl = rng.uniform(-1.0, 1.0, size=(3, *n_ctrl))
    magnitude = float(rng.uniform(lo, max_displacement_mm)) if max_displacement_mm > lo else lo
    rot = rng.uniform(-max_rotation_deg, max_rotation_deg, size=3)
    scl = 1.0 + rng.uniform(-max_scale, max_scale, size=3)
    trn = rng.uniform(-max_translation_mm, max_translation_mm, size=3)

    disp = np.zeros((3, *shape), dtype=np.float32)
    if magnitude > 0:
        mats = [_spline_matrix(n, k) for n, k in zip(shape, n_ctrl)]
        field_mm = np.stack([_separable_apply(ctrl[i], mats) for i in range(3)])
        length = np.sqrt(np.sum(field_mm**2, axis=0))
        peak = float(length.max())
        if peak > 0:
            field_mm *= magnitude / peak
        disp += (field_mm / spacing_a.reshape(3, 1, 1, 1)).astype(np.float32)
    params["elastic_max_mm"] = magnitude
    params["control_points"] = tuple(n_ctrl)

    if affine:
        disp += affine_displacement(shape, spacing, tuple(rot), tuple(scl), tuple(trn))
        params.update(
            rotation_deg=tuple(float(v) for v in rot),
            scale=tuple(float(v) for v in scl),
            translation_mm=tuple(float(v) for v in trn),
        )
    return (disp, params) if return_params else disp


def _sample_coords(disp: np.ndarray) -> list[np.ndarray]:
    """Continuous input indices (one array per axis) for a voxel-unit field."""
    shape = disp.shape[1:]
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return [disp[i] + grids[i].astype(np.float32) for i in range(3)]


def warp_image(img: np.ndarray, disp: np.ndarray, order: int = 1, mode: str = "nearest") -> np.ndarray:
    """Resample ``img`` through a voxel-unit displacement field.

    Uses :func:`scipy.ndimage.map_coordinates` with spline ``order`` (1 =
    trilinear) and border ``mode`` (``"nearest"`` repeats the edge, which suits
    images that are cropped with a margin of air).  Returns float32.  A field of
    zeros returns an exact copy.
    """
    if disp.shape != (3, *img.shape):
        raise ValueError(f"disp shape {disp.shape} does not match image {img.shape}")
    src = np.asarray(img, dtype=np.float32)
    if not np.any(disp):
        return src.copy()
    coords = _sample_coords(disp)
    return ndimage.map_coordinates(src, coords, order=order, mode=mode, prefilter=order > 1).astype(
        np.float32, copy=False
    )


def warp_labels(labels: np.ndarray, disp: np.ndarray) -> np.ndarray:
    """Resample a label map through a voxel-unit displacement field.

    Equivalent to trilinear interpolation of every class's one-hot map followed
    by an argmax (ties go to the lower label value), but computed only where it
    matters: for each output voxel the labels at the 8 surrounding input voxels
    are gathered; where all 8 agree (the vast majority) that label is copied,
    and only the remaining boundary voxels get per-class weight sums.  Borders
    are clamped (like ``mode="nearest"``).  This keeps thin and small
    structures noticeably better than nearest-neighbour resampling.  The output
    has the dtype of ``labels``; only labels present in the input can appear.
    """
    if disp.shape != (3, *labels.shape):
        raise ValueError(f"disp shape {disp.shape} does not match labels {labels.shape}")
    labels = np.asarray(labels)
    if not np.any(disp):
        return labels.copy()
    shape = labels.shape
    flat = labels.reshape(-1)
    coords = _sample_coords(disp)

    base = []
    frac = []
    for ax in range(3):
        c = np.clip(coords[ax], 0.0, shape[ax] - 1.0)
        i0 = np.floor(c)
        f = c - i0
        i0 = i0.astype(np.intp)
        i1 = np.minimum(i0 + 1, shape[ax] - 1)
        base.append((i0, i1))
        frac.append(f.astype(np.float32))
    strides = (shape[1] * shape[2], shape[2], 1)
    corner_idx = []
    corner_w = []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx = (
                    base[0][dz] * strides[0] + base[1][dy] * strides[1] + base[2][dx] * strides[2]
                )
                w = (
                    (frac[0] if dz else 1.0 - frac[0])
                    * (frac[1] if dy else 1.0 - frac[1])
                    * (frac[2] if dx else 1.0 - frac[2])
                )
                corner_idx.append(idx.reshape(-1))
                corner_w.append(w)
    corner_lab = [flat[i] for i in corner_idx]
    out = corner_lab[0].copy()
    mixed = np.zeros(out.shape, dtype=bool)
    for lab in corner_lab[1:]:
        mixed |= lab != corner_lab[0]
    sel = np.flatnonzero(mixed)
    if sel.size:
        lab_sel = np.stack([lab[sel] for lab in corner_lab])  # (8, M)
        w_sel = np.stack([np.broadcast_to(w, shape).reshape(-1)[sel] for w in corner_w])
        classes = np.unique(lab_sel)
        scores = np.zeros((classes.size, sel.size), dtype=np.float32)
        for k, cls in enumerate(classes):
            scores[k] = np.sum(np.where(lab_sel == cls, w_sel, 0.0), axis=0)
        out[sel] = classes[np.argmax(scores, axis=0)]
    return out.reshape(shape)


# --------------------------------------------------------------------------- #
# Intensity
# --------------------------------------------------------------------------- #


def _legendre_matrix(n: int, degree: int) -> np.ndarray:
    """(n, degree+1) Legendre polynomials P_0..P_degree sampled on [-1, 1]."""
    x = np.linspace(-1.0, 1.0, n)
    return np.stack([np.polynomial.legendre.Legendre.basis(d)(x) for d in range(degree + 1)], axis=1)


def bias_field(
    shape: tuple[int, int, int],
    rng: np.random.Generator,
    strength: float = 0.3,
    degree: int = 3,
) -> np.ndarray:
    """Smooth, positive, multiplicative bias field with mean exactly 1 (float32).

    ``log b`` is a random polynomial of total degree <= ``degree`` in the
    normalised coordinates (Legendre basis, coefficients ~ N(0, 1) damped as
    1/(1+order)), centred, and scaled so that its largest absolute value is
    ``strength``; then ``b = exp(log b) / mean``.  So ``strength=0.3`` means the
    field spans roughly ``exp(-0.3)..exp(0.3)`` (about -26 %..+35 %) before the
    mean normalisation.  ``strength=0`` gives all ones.
    """
    shape = tuple(int(n) for n in shape)
    k = degree + 1
    coef = rng.standard_normal((k, k, k))
    i, j, l = np.meshgrid(np.arange(k), np.arange(k), np.arange(k), indexing="ij")
    total = i + j + l
    coef = np.where((total <= degree) & (total > 0), coef / (1.0 + total), 0.0)
    if strength <= 0 or not np.any(coef):
        return np.ones(shape, dtype=np.float32)
    log_b = _separable_apply(coef, [_legendre_matrix(n, degree) for n in shape])
    log_b -= log_b.mean()
    peak = np.abs(log_b).max()
    if peak > 0:
        log_b *= strength / peak
    b = np.exp(log_b)
    b /= b.mean()
    return b.astype(np.float32)


def _robust_range(img: np.ndarray) -> tuple[float, float]:
    """0.5 and 99.5 percentiles (on a regular subsample of at most ~200k voxels)."""
    flat = np.asarray(img).reshape(-1)
    lo, hi = np.percentile(flat[:: max(1, flat.size // 200_000)], [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(img.min()), float(img.max())
    return float(lo), float(hi)


def random_gamma(img: np.ndarray, rng: np.random.Generator, log_gamma_max: float = 0.3) -> np.ndarray:
    """Random gamma curve ``gamma = exp(U(-g, g))`` applied on the robust range.

    Intensities are mapped to [0, 1] using the 0.5/99.5 percentiles (values
    outside are clipped only for the power, then mapped back linearly), raised
    to ``gamma`` and mapped back to the original range.  Changes grey/white
    contrast while leaving the intensity range unchanged.
    """
    gamma = float(np.exp(rng.uniform(-log_gamma_max, log_gamma_max)))
    lo, hi = _robust_range(img)
    x = (np.asarray(img, dtype=np.float32) - lo) / (hi - lo)
    inside = np.clip(x, 0.0, 1.0)
    y = np.power(inside, gamma, dtype=np.float32) + (x - inside)
    return (y * (hi - lo) + lo).astype(np.float32)


def random_contrast(
    img: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.85, 1.2),
    shift_frac: float = 0.05,
) -> np.ndarray:
    """Random linear intensity change ``a * (img - m) + m + s``.

    ``a ~ U(scale_range)`` (contrast about the mean ``m``) and
    ``s ~ U(-shift_frac, shift_frac) * (robust range)`` (brightness offset).
    """
    a = float(rng.uniform(*scale_range))
    lo, hi = _robust_range(img)
    s = float(rng.uniform(-shift_frac, shift_frac)) * (hi - lo)
    x = np.asarray(img, dtype=np.float32)
    m = float(x.mean())
    return (a * (x - m) + m + s).astype(np.float32)


def add_gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Additive white Gaussian noise with standard deviation ``sigma`` (image units)."""
    x = np.asarray(img, dtype=np.float32)
    if sigma <= 0:
        return x.copy()
    return x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(sigma)


def add_rician_noise(img: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Rician noise, the noise of magnitude MR images.

    ``sqrt((img + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, sigma^2)``: Gaussian-like in
    bright tissue, and a positive bias (Rayleigh) in dark background.  Negative
    input values are treated as zero signal.
    """
    x = np.maximum(np.asarray(img, dtype=np.float32), 0.0)
    if sigma <= 0:
        return x.copy()
    s = np.float32(sigma)
    n1 = rng.standard_normal(x.shape, dtype=np.float32) * s
    n2 = rng.standard_normal(x.shape, dtype=np.float32) * s
    return np.sqrt((x + n1) ** 2 + n2**2)


def _resample_axis_linear(arr: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``arr`` along ``axis`` at (clamped) ``positions``."""
    n = arr.shape[axis]
    p = np.clip(positions, 0.0, n - 1.0)
    i0 = np.floor(p).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (p - i0).astype(np.float32)
    bshape = [1] * arr.ndim
    bshape[axis] = -1
    w = w.reshape(bshape)
    return np.take(arr, i0, axis=axis) * (1.0 - w) + np.take(arr, i1, axis=axis) * w


def simulate_low_resolution(
    img: np.ndarray,
    spacing: Spacing,
    rng: np.random.Generator,
    factor: float | None = None,
    axis: int | None = None,
    factor_range: tuple[float, float] = (1.5, 3.0),
) -> np.ndarray:
    """Simulate a thick-slice acquisition along one axis, keeping the grid.

    The slice profile is a Gaussian whose FWHM is ``factor`` times the voxel
    size (minus the resolution already present:
    ``sigma = sqrt(factor^2 - 1) * 1 / 2.355`` voxels), then the volume is
    sampled every ``factor`` voxels along ``axis`` and linearly interpolated
    back to the original grid.  ``axis`` (0, 1, 2 = z, y, x) and ``factor`` are
    drawn uniformly when not given.  ``spacing`` only caps the simulated slice
    thickness (``factor * spacing[axis]``) at 10 mm.  ``factor <= 1`` returns a
    copy.
    """
    x = np.asarray(img, dtype=np.float32)
    ax = int(rng.integers(0, 3)) if axis is None else int(axis)
    f = float(rng.uniform(*factor_range)) if factor is None else float(factor)
    f = min(f, max(1.0, 10.0 / float(spacing[ax])))
    if f <= 1.0:
        return x.copy()
    sigma = math.sqrt(f * f - 1.0) / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    blurred = ndimage.gaussian_filter1d(x, sigma=sigma, axis=ax, mode="nearest", truncate=3.0)
    n = x.shape[ax]
    # Low-resolution sample positions, centred so that both ends are covered.
    n_low = max(2, int(math.floor((n - 1) / f)) + 1)
    offset = ((n - 1) - (n_low - 1) * f) / 2.0
    low = _resample_axis_linear(blurred, ax, offset + f * np.arange(n_low))
    # Back to the original grid: position of original voxel i in low-res index units.
    back = (np.arange(n) - offset) / f
    return _resample_axis_linear(low, ax, back).astype(np.float32)


# --------------------------------------------------------------------------- #
# Variants and cohorts
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class VariantParams:
    """Ranges used by :func:`make_variant` (see the presets in :data:`PRESETS`)."""

    min_displacement_mm: float = 2.0
    max_displacement_mm: float = 5.0
    control_spacing_mm: float = 32.0
    affine: bool = True
    max_rotation_deg: float = 10.0
    max_scale: float = 0.08
    max_translation_mm: float = 5.0
    bias_strength: tuple[float, float] = (0.05, 0.3)
    log_gamma_max: float = 0.3
    contrast_scale: tuple[float, float] = (0.85, 1.2)
    contrast_shift: float = 0.05
    noise_frac: tuple[float, float] = (0.005, 0.03)  # sigma / robust intensity range
    lowres_prob: float = 0.3
    lowres_factor: tuple[float, float] = (1.5, 3.0)

    def __post_init__(self) -> None:
        if not 0 < self.min_displacement_mm <= self.max_displacement_mm:
            raise ValueError("variants need 0 < min_displacement_mm <= max_displacement_mm")


#: ``light``: small changes (e.g. validation look-alikes); ``train``: the default
#: training distribution; ``shift``: stronger intensity/resolution changes, a
#: simulated scanner/protocol shift for robustness and label-free-estimation tests.
PRESETS: dict[str, VariantParams] = {
    "light": VariantParams(
        min_displacement_mm=1.0,
        max_displacement_mm=3.0,
        max_rotation_deg=5.0,
        max_scale=0.04,
        max_translation_mm=3.0,
        bias_strength=(0.0, 0.15),
        log_gamma_max=0.1,
        contrast_scale=(0.95, 1.05),
        contrast_shift=0.02,
        noise_frac=(0.0, 0.01),
        lowres_prob=0.0,
    ),
    "train": VariantParams(),
    "shift": VariantParams(
        min_displacement_mm=2.0,
        max_displacement_mm=6.0,
        bias_strength=(0.25, 0.5),
        log_gamma_max=0.5,
        contrast_scale=(0.7, 1.4),
        contrast_shift=0.1,
        noise_frac=(0.03, 0.07),
        lowres_prob=0.7,
        lowres_factor=(2.0, 4.0),
    ),
}


def make_variant(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Spacing,
    seed: int | np.random.SeedSequence,
    strength: str | VariantParams = "train",
    return_info: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One synthetic subject derived from ``(image, labels)``.

    Steps, all drawn from ``numpy.random.default_rng(seed)``:

    1. geometry: smooth elastic deformation with peak displacement
       ``U(min, max)`` mm (``min > 0``, so a variant never equals the source)
       plus a global affine (rotation, anisotropic scale, translation); image
       warped trilinearly, labels with :func:`warp_labels`;
    2. with probability ``lowres_prob``: :func:`simulate_low_resolution` along
       a random axis (the labels keep the full resolution, as ground truth would);
    3. multiplicative :func:`bias_field`;
    4. :func:`random_gamma` and :func:`random_contrast`;
    5. :func:`add_rician_noise` with sigma a random fraction of the source's
       robust intensity range.

    ``strength`` is a preset name from :data:`PRESETS` or a :class:`VariantParams`.
    Returns ``(image float32, labels same dtype)``, plus a dict of the drawn
    parameters when ``return_info`` is true.
    """
    p = PRESETS[strength] if isinstance(strength, str) else strength
    if image.shape != labels.shape:
        raise ValueError(f"image {image.shape} and labels {labels.shape} differ in shape")
    rng = np.random.default_rng(seed)
    src = np.asarray(image, dtype=np.float32)
    lo, hi = _robust_range(src)

    disp, info = random_smooth_deformation(
        src.shape,
        spacing,
        rng,
        max_displacement_mm=p.max_displacement_mm,
        min_displacement_mm=p.min_displacement_mm,
        control_spacing_mm=p.control_spacing_mm,
        affine=p.affine,
        max_rotation_deg=p.max_rotation_deg,
        max_scale=p.max_scale,
        max_translation_mm=p.max_translation_mm,
        return_params=True,
    )
    img = warp_image(src, disp, order=1)
    lab = warp_labels(labels, disp)

    # Draw all remaining parameters up front so the stream layout is fixed.
    do_lowres = bool(rng.random() < p.lowres_prob)
    lowres_axis = int(rng.integers(0, 3))
    lowres_factor = float(rng.uniform(*p.lowres_factor))
    bias_strength = float(rng.uniform(*p.bias_strength))
    noise_sigma = float(rng.uniform(*p.noise_frac)) * (hi - lo)

    if do_lowres:
        img = simulate_low_resolution(img, spacing, rng, factor=lowres_factor, axis=lowres_axis)
    img = img * bias_field(img.shape, rng, strength=bias_strength)
    img = random_gamma(img, rng, log_gamma_max=p.log_gamma_max)
    img = random_contrast(img, rng, scale_range=p.contrast_scale, shift_frac=p.contrast_shift)
    img = add_rician_noise(img, rng, noise_sigma)

    if not return_info:
        return img, lab
    info.update(
        lowres=(lowres_axis, lowres_factor) if do_lowres else None,
        bias_strength=bias_strength,
        noise_sigma=noise_sigma,
    )
    return img, lab, info


def make_cohort(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Spacing,
    n: int,
    seed0: int = 0,
    strength: str | VariantParams = "train",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``n`` variants; variant ``i`` is ``make_variant(..., seed=seed0 + i)``.

    Cohorts with non-overlapping seed ranges (e.g. train ``seed0=0``, validation
    ``seed0=10_000``) share no variants.  Nothing is cached: each item is
    computed when requested.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    for i in range(n):
        yield make_variant(image, labels, spacing, seed0 + i, strength=strength)


def with_overrides(preset: str, **changes: Any) -> VariantParams:
    """A copy of a preset with some fields changed, e.g. ``with_overrides("train", lowres_prob=0)``."""
    return replace(PRESETS[preset], **changes)
