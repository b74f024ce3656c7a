"""Tests for imbalanceseglib.synth on small synthetic volumes (spheres)."""

from __future__ import annotations

import numpy as np
import pytest

from imbalanceseglib import synth

SHAPE = (32, 36, 40)
SPACING = (2.0, 1.5, 1.0)


def _grid_mm(shape=SHAPE, spacing=SPACING):
    return [
        ((np.arange(n) - (n - 1) / 2.0) * s).reshape([-1 if i == ax else 1 for i in range(3)])
        for ax, (n, s) in enumerate(zip(shape, spacing))
    ]


def _phantom(shape=SHAPE, spacing=SPACING):
    """Big sphere (label 1, r = 14 mm) containing a small one (label 2, r = 5 mm),
    on a background; image = tissue intensities + a little texture."""
    z, y, x = _grid_mm(shape, spacing)
    r_big = np.sqrt(z**2 + y**2 + x**2)
    r_small = np.sqrt((z - 2.0) ** 2 + (y + 3.0) ** 2 + (x - 4.0) ** 2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[r_big < 14.0] = 1
    labels[r_small < 5.0] = 2
    rng = np.random.default_rng(123)
    image = np.choose(labels, [10.0, 100.0, 60.0]).astype(np.float32)
    image += rng.normal(0, 2.0, shape).astype(np.float32)
    return image, labels


def test_zero_deformation_is_identity():
    rng = np.random.default_rng(0)
    disp = synth.random_smooth_deformation(SHAPE, SPACING, rng, max_displacement_mm=0.0, affine=False)
    assert disp.shape == (3, *SHAPE)
    assert not np.any(disp)
    image, labels = _phantom()
    np.testing.assert_array_equal(synth.warp_image(image, disp), image)
    np.testing.assert_array_equal(synth.warp_labels(labels, disp), labels)
    # Identity affine is a zero field too.
    aff = synth.affine_displacement(SHAPE, SPACING)
    assert np.abs(aff).max() < 1e-5


def test_deformation_magnitude_bounds_and_smoothness():
    rng = np.random.default_rng(1)
    disp, info = synth.random_smooth_deformation(
        SHAPE, SPACING, rng, max_displacement_mm=3.0, min_displacement_mm=2.0, control_spacing_mm=16.0,
        return_params=True,
    )
    mag = synth.displacement_magnitude_mm(disp, SPACING)
    assert 2.0 <= info["elastic_max_mm"] <= 3.0
    assert mag.max() == pytest.approx(info["elastic_max_mm"], rel=1e-4)
    # Smooth: neighbouring voxels differ by far less than the peak displacement
    # (cubic spline through control points 16 mm apart).
    for ax in range(3):
        step = np.abs(np.diff(disp * np.reshape(SPACING, (3, 1, 1, 1)), axis=ax + 1)).max()
        assert step < 0.25 * info["elastic_max_mm"]


def test_warped_labels_match_analytic_warp():
    """Elastic warp of a sphere vs. the exact answer |x + d(x) - c| < r."""
    image, labels = _phantom()
    rng = np.random.default_rng(2)
    disp = synth.random_smooth_deformation(SHAPE, SPACING, rng, max_displacement_mm=3.0, control_spacing_mm=20.0)
    warped = synth.warp_labels(labels, disp)
    assert set(np.unique(warped)) == {0, 1, 2}
    assert warped.dtype == labels.dtype

    z, y, x = _grid_mm()
    s = np.reshape(SPACING, (3, 1, 1, 1))
    dz, dy, dx = disp * s
    zz, yy, xx = z + dz, y + dy, x + dx
    truth = np.zeros(SHAPE, dtype=np.uint8)
    truth[np.sqrt(zz**2 + yy**2 + xx**2) < 14.0] = 1
    truth[np.sqrt((zz - 2) ** 2 + (yy + 3) ** 2 + (xx - 4) ** 2) < 5.0] = 2
    for k in (1, 2):
        a, b = warped == k, truth == k
        dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
        # Only voxels cut by the boundary can disagree. Measured: Dice 0.975 (big)
        # and 0.925 (small: r = 5 mm is only 2.5 voxels along z, most of its ~140
        # voxels touch the boundary).
        assert dice > (0.95 if k == 1 else 0.88), (k, dice)
    # Big sphere volume vs the exact warped volume: measured 1.8 %, 3 % allowed.
    assert (warped == 1).sum() == pytest.approx((truth == 1).sum(), rel=0.03)


def _iso_spheres(shape=(40, 40, 40)):
    """1 mm isotropic phantom: sphere r = 12 mm (label 1) holding a sphere r = 5 mm
    (label 2), centres off the voxel grid so that the voxelisation is generic."""
    z, y, x = _grid_mm(shape, (1.0, 1.0, 1.0))
    labels = np.zeros(shape, dtype=np.uint8)
    labels[np.sqrt((z - 0.3) ** 2 + (y + 0.2) ** 2 + (x - 0.45) ** 2) < 12.0] = 1
    labels[np.sqrt((z - 3.3) ** 2 + (y + 4.1) ** 2 + (x - 2.7) ** 2) < 5.0] = 2
    return labels


# Volume tolerances for label warps (trilinear one-hot + argmax):
# * label 1 (~6200 voxels, r = 12 voxels): boundary voxels change class at random,
#   so the volume error is a fraction of a percent (measured <= 0.5 %); 2 % allowed.
# * label 2 (~525 voxels, r = 5 voxels): linear interpolation + argmax slightly
#   erodes convex objects with radius of a few voxels (curvature effect, measured
#   0.5-5.4 % smaller over random affines); 8 % allowed.
TOL = {1: 0.02, 2: 0.08}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_affine_scaling_changes_volume_as_expected(seed):
    labels = _iso_spheres()
    rng = np.random.default_rng(seed)
    scale = tuple(1.0 + rng.uniform(-0.1, 0.1, 3))
    rot = tuple(rng.uniform(-10, 10, 3))
    disp = synth.affine_displacement(labels.shape, (1.0, 1.0, 1.0), rotation_deg=rot, scale=scale)
    warped = synth.warp_labels(labels, disp)
    for k in (1, 2):
        expected = (labels == k).sum() * np.prod(scale)
        assert (warped == k).sum() == pytest.approx(expected, rel=TOL[k])


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_elastic_warp_keeps_volumes(seed):
    labels = _iso_spheres()
    rng = np.random.default_rng(seed)
    disp = synth.random_smooth_deformation(labels.shape, (1.0, 1.0, 1.0), rng, max_displacement_mm=3.0,
                                           control_spacing_mm=16.0)
    # Output voxel q samples the source at phi(q) = q + d(q), so the warped
    # structure is phi^-1(S) and, by change of variables,
    # vol(S) = integral over phi^-1(S) of det(D phi) = vol_out * mean(det D phi).
    # Hence vol_out = vol(S) / mean(det D phi over the warped structure).
    warped = synth.warp_labels(labels, disp)
    grads = np.stack([np.stack(np.gradient(disp[i]), 0) for i in range(3)], 0) + np.eye(3)[:, :, None, None, None]
    det = np.linalg.det(np.moveaxis(grads, (0, 1), (-2, -1)))
    assert det.min() > 0  # no folding
    for k in (1, 2):
        expected = (labels == k).sum() / np.mean(det[warped == k])
        assert (warped == k).sum() == pytest.approx(expected, rel=TOL[k])
    assert set(np.unique(warped)) == {0, 1, 2}


def test_pure_rotation_preserves_volume():
    labels = _iso_spheres()
    disp = synth.affine_displacement(labels.shape, (1.0, 1.0, 1.0), rotation_deg=(10.0, 0.0, -8.0))
    warped = synth.warp_labels(labels, disp)
    for k in (1, 2):
        assert (warped == k).sum() == pytest.approx((labels == k).sum(), rel=TOL[k])


def test_warp_labels_nonconsecutive_values():
    labels = np.zeros((12, 12, 12), dtype=np.int16)
    labels[3:9, 3:9, 3:9] = 7
    labels[5:7, 5:7, 5:7] = 300
    disp = synth.affine_displacement(labels.shape, (1.0, 1.0, 1.0), translation_mm=(0.4, -0.3, 0.6))
    out = synth.warp_labels(labels, disp)
    assert out.dtype == np.int16
    assert set(np.unique(out)) <= {0, 7, 300}
    assert 300 in out


def test_bias_field_smooth_positive_mean_one():
    rng = np.random.default_rng(3)
    b = synth.bias_field(SHAPE, rng, strength=0.3)
    assert b.shape == SHAPE and b.dtype == np.float32
    assert b.min() > 0
    assert b.mean() == pytest.approx(1.0, abs=1e-5)
    # Log range is set by `strength` (<= 2 * 0.3 peak to peak) and not trivial.
    lr = np.log(b.max()) - np.log(b.min())
    assert 0.3 <= lr <= 0.6 + 1e-5
    # Smooth: relative change between neighbouring voxels is tiny.
    for ax in range(3):
        assert np.abs(np.diff(np.log(b), axis=ax)).max() < 0.06
    # strength 0 -> exactly one
    assert np.all(synth.bias_field(SHAPE, rng, strength=0.0) == 1.0)


def test_same_seed_identical_different_seed_different():
    image, labels = _phantom()
    a_img, a_lab = synth.make_variant(image, labels, SPACING, seed=42)
    b_img, b_lab = synth.make_variant(image, labels, SPACING, seed=42)
    c_img, c_lab = synth.make_variant(image, labels, SPACING, seed=43)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_img, c_img)
    assert not np.array_equal(a_lab, c_lab)
    assert a_img.dtype == np.float32 and a_lab.dtype == labels.dtype
    assert a_img.shape == image.shape


def test_cohort_matches_make_variant():
    image, labels = _phantom()
    cohort = list(synth.make_cohort(image, labels, SPACING, n=3, seed0=10))
    assert len(cohort) == 3
    img, lab = synth.make_variant(image, labels, SPACING, seed=11)
    np.testing.assert_array_equal(cohort[1][0], img)
    np.testing.assert_array_equal(cohort[1][1], lab)


def _hf_energy(vol, axis):
    """Energy in the upper half of the spectrum along `axis`."""
    spec = np.abs(np.fft.rfft(vol - vol.mean(axis=axis, keepdims=True), axis=axis)) ** 2
    n = spec.shape[axis]
    return float(np.take(spec, np.arange(n // 2, n), axis=axis).sum())


def test_low_resolution_reduces_high_frequencies():
    rng = np.random.default_rng(4)
    image, _ = _phantom()
    for axis in range(3):
        low = synth.simulate_low_resolution(image, SPACING, rng, factor=2.5, axis=axis)
        assert low.shape == image.shape
        ratio = _hf_energy(low, axis) / _hf_energy(image, axis)
        assert ratio < 0.2, (axis, ratio)
        # Other axes are untouched apart from the mixing along `axis`: their
        # high-frequency energy drops much less.
        other = (axis + 1) % 3
        assert _hf_energy(low, other) / _hf_energy(image, other) > ratio
        # Mean intensity is preserved (blur + linear resampling).
        assert low.mean() == pytest.approx(image.mean(), rel=0.02)
    # factor 1 -> unchanged
    np.testing.assert_array_equal(synth.simulate_low_resolution(image, SPACING, rng, factor=1.0, axis=0), image)


def test_noise_and_intensity_changes():
    rng = np.random.default_rng(5)
    flat = np.full((20, 20, 20), 100.0, dtype=np.float32)
    noisy = synth.add_rician_noise(flat, rng, sigma=5.0)
    # At SNR 20 Rician noise is close to Gaussian: std ~ sigma, mean ~ A + sigma^2/(2A).
    assert noisy.std() == pytest.approx(5.0, rel=0.1)
    assert noisy.mean() == pytest.approx(100.125, abs=0.5)
    zero = synth.add_rician_noise(np.zeros((20, 20, 20), np.float32), rng, sigma=5.0)
    # Rayleigh mean = sigma * sqrt(pi/2)
    assert zero.mean() == pytest.approx(5.0 * np.sqrt(np.pi / 2), rel=0.05)
    image, _ = _phantom()
    g = synth.random_gamma(image, rng, log_gamma_max=0.5)
    assert g.shape == image.shape and np.isfinite(g).all()
    # Monotone mapping: the order of the tissue means is kept.
    assert np.median(g[image > 80]) > np.median(g[(image > 40) & (image < 80)])


def test_variants_never_equal_original():
    image, labels = _phantom()
    for preset in ("light", "train", "shift"):
        for seed in range(3):
            img, lab, info = synth.make_variant(image, labels, SPACING, seed, strength=preset, return_info=True)
            assert info["elastic_max_mm"] >= synth.PRESETS[preset].min_displacement_mm > 0
            assert not np.array_equal(lab, labels)
            assert np.abs(img - image).mean() > 0.5
            # every label survives
            assert set(np.unique(lab)) == {0, 1, 2}
    with pytest.raises(ValueError):
        synth.VariantParams(min_displacement_mm=0.0)
