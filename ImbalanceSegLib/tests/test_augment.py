"""Tests for imbalanceseglib.augment: policies, class-specific augmentation and GIN."""

from __future__ import annotations

import json

import numpy as np
import pytest

from imbalanceseglib import augment as A

from libtest_helpers import sphere_case


def _cube_patch(shape=(20, 24, 28), values=(0.0, 3.0, 5.0), ramp=0.5):
    """An off-centre labelled cube (label 2, intensity 5) and a bar (label 1, intensity 3) on a
    background ramp along x, so that no flip or rotation maps the patch onto itself."""
    labels = np.zeros(shape, np.uint8)
    labels[3:8, 4:10, 5:12] = 2
    labels[12:16, 15:18, 2:20] = 1
    ramp = np.linspace(0.0, ramp, shape[2], dtype=np.float32)[None, None, :]
    image = (np.choose(labels, values).astype(np.float32) + ramp).astype(np.float32)
    return image, labels


def _sphere_patch(seed=1, shape=(32, 32, 32)):
    image, labels = sphere_case(seed, shape=shape, noise=0.1)
    return ((image - image.mean()) / image.std()).astype(np.float32), labels


def _grad_mag(a):
    return np.sqrt(sum(g ** 2 for g in np.gradient(a.astype(np.float64))))


# --------------------------------------------------------------------------- #
# Policy construction
# --------------------------------------------------------------------------- #


def test_policy_from_dict_rejects_unknown_keys_and_lists_known_ones():
    with pytest.raises(ValueError) as err:
        A.AugmentationPolicy.from_dict({"gamma_prob": 0.5, "flip_probability": 0.5, "elastic": 1})
    msg = str(err.value)
    assert "elastic" in msg and "flip_probability" in msg
    assert "flip_prob" in msg and "gin_prob" in msg and "noise_sigma" in msg  # the known keys
    with pytest.raises(ValueError, match="known keys"):
        A.PRESETS["default"].with_overrides(gama_prob=1.0)
    with pytest.raises(ValueError, match="known keys"):
        A.ClassSpecificAugmenter.from_dict({"default": "none", "rare": "rare", "rare_class": [2]})


@pytest.mark.parametrize("bad", [
    {"gamma_prob": 1.5},
    {"noise_prob": -0.1},
    {"flip_prob": [0.5, 0.5]},
    {"flip_prob": 0.5},
    {"noise_sigma": [0.2, 0.1]},
    {"scale_range": [0.0, 1.1]},
    {"gin_kernel_sizes": [2]},
    {"gin_kernel_sizes": []},
    {"gin_layers": 0},
    {"gin_alpha": [0.0, 1.5]},
    {"lowres_factor": [0.5, 2.0]},
    {"lowres_axes": [3]},
    {"rotation_deg": [10, 10]},
    {"bias_degree": 1.5},
    {"gamma_prob": "often"},
    {"gamma_prob": True},
    {"gamma_prob": float("nan")},
])
def test_policy_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        A.AugmentationPolicy.from_dict(bad)


def test_policy_json_round_trip_and_presets():
    for name, policy in A.PRESETS.items():
        back = A.AugmentationPolicy.from_dict(json.loads(json.dumps(policy.to_dict())))
        assert back == policy, name
    assert A.PRESETS["none"].is_identity
    assert not any(A.PRESETS[n].is_identity for n in ("default", "rare", "shift_robust"))
    # The rare preset augments more often than the default one; no preset mirrors (lateralised labels).
    for field in ("affine_prob", "gin_prob", "bias_prob", "gamma_prob", "noise_prob"):
        assert getattr(A.PRESETS["rare"], field) >= getattr(A.PRESETS["default"], field)
    assert all(p.flip_prob == (0.0, 0.0, 0.0) and p.rot90_prob == 0 for p in A.PRESETS.values())
    p = A.policy_from_config({"preset": "rare", "flip_prob": [0, 0, 1]})
    assert p.flip_prob == (0.0, 0.0, 1.0) and p.gin_prob == A.PRESETS["rare"].gin_prob
    assert A.policy_from_config("shift_robust") is A.PRESETS["shift_robust"]
    with pytest.raises(ValueError, match="presets"):
        A.policy_from_config("strong")


def test_identity_policy_returns_equal_copies():
    image, labels = _cube_patch()
    out_img, out_lab = A.PRESETS["none"].apply(image, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(out_img, image)
    np.testing.assert_array_equal(out_lab, labels)
    assert out_img is not image and out_lab is not labels
    assert out_img.dtype == np.float32 and out_lab.dtype == np.uint8


def test_same_generator_state_same_output_and_fixed_stream_use():
    image, labels = _sphere_patch()
    policy = A.PRESETS["rare"].with_overrides(flip_prob=(0.5, 0.5, 0.5), gin_prob=0.5)
    a = policy.apply(image, labels, np.random.default_rng(42))
    b = policy.apply(image, labels, np.random.default_rng(42))
    c = policy.apply(image, labels, np.random.default_rng(43))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    # Every call draws the same amount from the generator, whatever the policy.
    r1, r2 = np.random.default_rng(7), np.random.default_rng(7)
    A.PRESETS["none"].apply(image, labels, r1)
    A.PRESETS["shift_robust"].with_overrides(gin_prob=1.0, lowres_prob=1.0).apply(image, labels, r2)
    assert r1.random() == r2.random()


# --------------------------------------------------------------------------- #
# Geometry: image and labels move together
# --------------------------------------------------------------------------- #


def test_flips_move_image_and_labels_together():
    image, labels = _cube_patch()
    for axes in [(0,), (1,), (2,), (0, 1, 2)]:
        probs = tuple(1.0 if ax in axes else 0.0 for ax in range(3))
        policy = A.AugmentationPolicy(flip_prob=probs)
        img, lab, params = policy.apply(image, labels, np.random.default_rng(1), return_params=True)
        assert params["flip"] == list(axes)
        np.testing.assert_array_equal(lab, np.flip(labels, axes))
        np.testing.assert_array_equal(img, np.flip(image, axes))
        assert img.flags.c_contiguous and lab.flags.c_contiguous  # torch.from_numpy needs this
        # The cube's intensity is where its label is.
        np.testing.assert_array_equal(lab == 2, img > 4.9)
    # The cube moved: flipping along z puts it at z = 12..16 of 20.
    _, lab = A.AugmentationPolicy(flip_prob=(1, 0, 0)).apply(image, labels, np.random.default_rng(1))
    zz = np.nonzero(lab == 2)[0]
    assert (zz.min(), zz.max()) == (20 - 8, 20 - 4)


def test_rot90_in_plane_keeps_alignment_and_shape():
    image, labels = _cube_patch(shape=(20, 24, 24))
    seen = set()
    for seed in range(12):
        img, lab, params = A.AugmentationPolicy(rot90_prob=1.0).apply(
            image, labels, np.random.default_rng(seed), return_params=True)
        k = params["rot90"]
        seen.add(k)
        np.testing.assert_array_equal(lab, np.rot90(labels, k, axes=(1, 2)))
        np.testing.assert_array_equal(lab == 2, img > 4.9)
    assert seen == {1, 2, 3}
    # A patch that is not square in-plane is only turned by 180 degrees, keeping its shape.
    image, labels = _cube_patch(shape=(20, 24, 28))
    img, lab, params = A.AugmentationPolicy(rot90_prob=1.0).apply(image, labels, np.random.default_rng(0),
                                                                    return_params=True)
    assert params["rot90"] == 2 and img.shape == image.shape
    np.testing.assert_array_equal(lab, labels[:, ::-1, ::-1])


def test_affine_moves_the_labelled_cube_with_its_intensity():
    # Cube +4, bar -4 on 0: after linear interpolation, the one-hot-interpolated labels change
    # class where the image crosses the midpoints +2 and -2.
    image, labels = _cube_patch(shape=(24, 24, 24), values=(0.0, -4.0, 4.0), ramp=0.0)
    policy = A.AugmentationPolicy(affine_prob=1.0, rotation_deg=(20, 20, 20), scale_range=(1.15, 1.15))
    img, lab, params = policy.apply(image, labels, np.random.default_rng(3), return_params=True)
    assert params["affine"]["scale"] == pytest.approx(1.15)
    assert max(abs(a) for a in params["affine"]["rotation_deg"]) > 5
    assert lab.dtype == np.uint8 and set(np.unique(lab)) <= {0, 1, 2}
    assert not np.array_equal(lab, labels)
    for cls, mask_img in ((2, img > 2.0), (1, img < -2.0)):
        mask_lab = lab == cls
        dice = 2 * np.sum(mask_lab & mask_img) / (mask_lab.sum() + mask_img.sum())
        assert dice > 0.95, (cls, dice)
        # Centroids agree to within a voxel.
        np.testing.assert_allclose(np.argwhere(mask_lab).mean(0), np.argwhere(mask_img).mean(0), atol=1.0)
    # The scale enlarges the anatomy (volume ~ 1.15^3 for the cube, which stays inside the patch).
    assert (lab == 2).sum() / (labels == 2).sum() == pytest.approx(1.15 ** 3, rel=0.15)


# --------------------------------------------------------------------------- #
# Intensity: image only, as specified
# --------------------------------------------------------------------------- #


def test_intensity_operations_leave_labels_untouched():
    image, labels = _sphere_patch()
    policy = A.AugmentationPolicy(gin_prob=1, lowres_prob=1, bias_prob=1, gamma_prob=1, contrast_prob=1,
                                  noise_prob=1, bias_strength=(0.2, 0.3), noise_sigma=(0.05, 0.1))
    img, lab, params = policy.apply(image, labels, np.random.default_rng(5), return_params=True)
    assert set(params) == {"gin", "lowres", "bias", "gamma", "contrast", "noise"}
    np.testing.assert_array_equal(lab, labels)
    assert np.abs(img - image).mean() > 0.05
    assert img.dtype == np.float32 and np.isfinite(img).all()


def test_gamma_on_known_values():
    # 0.5/99.5 percentiles are exactly 0 and 1 (many voxels at both), so gamma acts on [0, 1].
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(1000), np.ones(1000), [0.25, 0.5, 0.75], rng.uniform(0, 1, 16 ** 3 - 2003)])
    image = x.astype(np.float32).reshape(16, 16, 16)
    labels = np.zeros(image.shape, np.uint8)
    img, lab, _ = A.AugmentationPolicy(gamma_prob=1.0, log_gamma_max=0.5).apply(
        image, labels, np.random.default_rng(2), return_params=True)
    flat = img.reshape(-1)
    gamma = np.log(flat[2001]) / np.log(0.5)
    assert np.exp(-0.5) <= gamma <= np.exp(0.5) and abs(np.log(gamma)) > 0.02
    np.testing.assert_allclose(flat[2000], 0.25 ** gamma, rtol=1e-5)
    np.testing.assert_allclose(flat[2002], 0.75 ** gamma, rtol=1e-5)
    np.testing.assert_allclose(flat, np.power(x, gamma), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(lab, labels)


def test_bias_field_is_multiplicative_smooth_with_mean_one():
    policy = A.AugmentationPolicy(bias_prob=1.0, bias_strength=(0.3, 0.3))
    shape = (24, 24, 24)
    labels = np.zeros(shape, np.uint8)
    flat = np.full(shape, 2.0, np.float32)
    out, _, params = policy.apply(flat, labels, np.random.default_rng(4), background=0.0, return_params=True)
    field = out / 2.0
    assert params["bias"]["strength"] == pytest.approx(0.3)
    assert field.mean() == pytest.approx(1.0, abs=1e-4)
    assert field.min() > 0 and 0.05 < field.std() < 0.3
    assert np.exp(-0.65) < field.min() and field.max() < np.exp(0.65)
    spread = field.max() - field.min()
    for ax in range(3):  # smooth: neighbouring voxels differ by far less than the field's spread
        assert np.abs(np.diff(field, axis=ax)).max() < 0.15 * spread
        assert np.abs(np.diff(field, 2, axis=ax)).max() < 0.05 * spread
    # Multiplicative about the zero-signal intensity: the same draw on any image scales (x - background).
    image, _ = _sphere_patch(shape=shape)
    out2 = policy.apply(image, labels, np.random.default_rng(4), background=-1.5)[0]
    np.testing.assert_allclose(out2 + 1.5, (image + 1.5) * field, rtol=1e-4, atol=1e-5)
    # Default zero-signal intensity: the patch minimum, which stays put.
    out3 = policy.apply(image, labels, np.random.default_rng(4))[0]
    m = image.min()
    np.testing.assert_allclose(out3 - m, (image - m) * field, rtol=1e-4, atol=1e-5)


def test_noise_has_the_drawn_standard_deviation():
    image, labels = _sphere_patch()
    policy = A.AugmentationPolicy(noise_prob=1.0, noise_sigma=(0.2, 0.2))
    img, lab, params = policy.apply(image, labels, np.random.default_rng(6), return_params=True)
    noise = img - image
    assert params["noise"]["sigma"] == pytest.approx(0.2)
    assert noise.std() == pytest.approx(0.2, rel=0.02)
    assert abs(noise.mean()) < 0.01
    np.testing.assert_array_equal(lab, labels)
    # Drawn within the range.
    sigmas = [A.AugmentationPolicy(noise_prob=1.0, noise_sigma=(0.05, 0.1)).apply(
        image, labels, np.random.default_rng(s), return_params=True)[2]["noise"]["sigma"] for s in range(5)]
    assert all(0.05 <= s <= 0.1 for s in sigmas) and len(set(sigmas)) == 5


def test_low_resolution_blurs_along_its_axis_only():
    shape = (24, 24, 24)
    labels = np.zeros(shape, np.uint8)
    stripes = (np.arange(24) % 4 < 2).astype(np.float32)
    policy = A.AugmentationPolicy(lowres_prob=1.0, lowres_axes=(0,), lowres_factor=(3.0, 3.0))
    # Constant along z: a thick-slice acquisition along z changes nothing.
    along_x = np.broadcast_to(stripes[None, None, :], shape).copy()
    out, _, params = policy.apply(along_x, labels, np.random.default_rng(0), return_params=True)
    assert params["lowres"] == {"axis": 0, "factor": 3.0}
    np.testing.assert_allclose(out, along_x, atol=1e-5)
    # Stripes along z (2 voxels wide, thinner than the 3-voxel slices) are mostly averaged away.
    along_z = np.broadcast_to(stripes[:, None, None], shape).copy()
    out = policy.apply(along_z, labels, np.random.default_rng(0))[0]
    assert out.std() < 0.3 * along_z.std()
    np.testing.assert_allclose(out.mean(), along_z.mean(), atol=0.05)


# --------------------------------------------------------------------------- #
# GIN
# --------------------------------------------------------------------------- #


def test_gin_keeps_mean_and_std_changes_contrast_and_keeps_edges():
    image, labels = _sphere_patch()
    ball, bead, bg = labels == 1, labels == 2, labels == 0
    grad_in = _grad_mag(image).ravel()
    edge_corr, contrast_change = [], []
    for seed in range(8):
        out, params = A.gin_augment(image, np.random.default_rng(seed), return_params=True)
        assert out.shape == image.shape and out.dtype == np.float32
        assert out.mean() == pytest.approx(image.mean(), abs=1e-4)
        assert out.std() == pytest.approx(image.std(), rel=1e-4)
        assert 0.0 <= params["alpha"] <= 1.0 and set(params["kernel_sizes"]) <= {1, 3}
        assert np.abs(out - image).mean() > 0.02
        edge_corr.append(np.corrcoef(grad_in, _grad_mag(out).ravel())[0, 1])
        # Tissue contrast (bead vs ball, relative to ball vs background) is remapped.
        rel = lambda a: (a[bead].mean() - a[ball].mean()) / (a[ball].mean() - a[bg].mean())  # noqa: E731
        contrast_change.append(abs(rel(out) - rel(image)))
    # Shapes survive: the output's edges are where the input's are (typical draws well above 0.3;
    # a draw that makes two tissues isointense can lose one of the boundaries).
    assert np.median(edge_corr) > 0.45 and min(edge_corr) > 0.1, edge_corr
    assert max(contrast_change) > 0.2, contrast_change


def test_gin_is_deterministic_and_seed_dependent():
    image, _ = _sphere_patch()
    a = A.gin_augment(image, np.random.default_rng(11))
    b = A.gin_augment(image, np.random.default_rng(11))
    c = A.gin_augment(image, np.random.default_rng(12))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # alpha = 0 keeps the input (up to rounding); a constant image is left alone.
    np.testing.assert_allclose(A.gin_augment(image, np.random.default_rng(1), alpha_range=(0.0, 0.0)), image,
                               atol=1e-5)
    flat = np.full((8, 8, 8), 3.0, np.float32)
    np.testing.assert_array_equal(A.gin_augment(flat, np.random.default_rng(1)), flat)


def test_gin_single_pointwise_layer_is_a_linear_map_up_to_sign():
    # One 1x1x1 layer: g = w * x + b; standardised to x's mean/std with alpha = 1 this is x itself
    # (w > 0) or x mirrored about its mean (w < 0, inverted contrast).
    x = np.random.default_rng(0).standard_normal((6, 6, 6)).astype(np.float32) * 2 + 1
    signs = set()
    for seed in range(8):
        out = A.gin_augment(x, np.random.default_rng(seed), n_layers=1, kernel_sizes=(1,), alpha_range=(1.0, 1.0))
        if np.allclose(out, x, atol=1e-4):
            signs.add(1)
        else:
            np.testing.assert_allclose(out, 2 * x.mean() - x, atol=1e-4)
            signs.add(-1)
    assert signs == {1, -1}


# --------------------------------------------------------------------------- #
# Class-specific augmentation
# --------------------------------------------------------------------------- #


def test_class_specific_augmenter_uses_rare_policy_iff_chosen_class_is_rare():
    image, labels = _cube_patch()
    always_flip = A.AugmentationPolicy(flip_prob=(1.0, 0.0, 0.0))
    aug = A.ClassSpecificAugmenter(default=A.PRESETS["none"], rare=always_flip, rare_classes={2})
    flipped = np.flip(labels, 0)
    for chosen, rare in [(2, True), (1, False), (None, False), (0, False), (np.int64(2), True)]:
        img, lab, params = aug(image, labels, chosen, np.random.default_rng(0), return_params=True)
        assert params["policy"] == ("rare" if rare else "default")
        np.testing.assert_array_equal(lab, flipped if rare else labels)
        np.testing.assert_array_equal(img, np.flip(image, 0) if rare else image)
        img2, lab2 = aug(image, labels, chosen, np.random.default_rng(0))
        np.testing.assert_array_equal(lab2, lab)
    assert aug.policy_for(2) is always_flip and aug.policy_for(None) is A.PRESETS["none"]


def test_class_specific_augmenter_from_config_and_with_sampler_patches():
    from imbalanceseglib.training import PatchSampler, make_case

    aug = A.ClassSpecificAugmenter.from_dict({"default": "default", "rare": {"preset": "rare", "gin_prob": 1.0},
                                              "rare_classes": [2]}, spacing=(1.0, 1.0, 1.0))
    assert aug.rare.gin_prob == 1.0 and aug.default == A.PRESETS["default"]
    again = A.ClassSpecificAugmenter.from_dict(json.loads(json.dumps(aug.to_dict())))
    assert again.default == aug.default and again.rare == aug.rare and again.rare_classes == {2}
    with pytest.raises(ValueError):
        A.ClassSpecificAugmenter(A.PRESETS["none"], A.PRESETS["rare"], {-1})
    # Patches from the training sampler go through unchanged in shape and dtype.
    sampler = PatchSampler([make_case(*sphere_case(0), name="c0")], (16, 16, 16), foreground_fraction=1.0)
    rng = np.random.default_rng(0)
    for _ in range(4):
        img, lab, chosen, _ = sampler.sample(rng)
        out_img, out_lab, params = aug(img, lab, chosen, rng, return_params=True)
        assert out_img.shape == img.shape and out_img.dtype == np.float32 and out_lab.dtype == np.uint8
        assert params["policy"] == ("rare" if chosen == 2 else "default")
        if chosen == 2:
            assert "gin" in params


def test_rare_classes_by_fraction():
    counts = [9000, 850, 140, 10, 0]  # fractions 0.9, 0.085, 0.014, 0.001 and an absent class
    assert A.rare_classes_by_fraction(counts, max_fraction=0.01) == {3}
    assert A.rare_classes_by_fraction(counts, max_fraction=0.05) == {2, 3}
    assert A.rare_classes_by_fraction([0, 0]) == set()
