import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import ModelBundle
from imbalanceseglib.images import ImageError, resample_to_spacing
from imbalanceseglib.inference import apply_calibration, count_windows, normalised_entropy, predict
from imbalanceseglib.networks import build_network

from libtest_helpers import CLASSES


def _bundle(target_spacing=(1.0, 1.0, 1.0)):
    torch.manual_seed(1)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]}).eval()
    card = {"name": "t", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3, "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"target_spacing": list(target_spacing), "patch_size": [16, 16, 16],
                                                   "normalization": {"scheme": "none"}}}
    return ModelBundle(card=card, network=net)


def _image(shape=(20, 18, 22), spacing=(1.0, 1.0, 1.0), direction=None, seed=0):
    arr = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -5.0, 3.0))
    if direction is not None:
        img.SetDirection(direction)
    return img


def test_probabilities_sum_to_one_and_labels_are_argmax():
    pred = predict(_image(), _bundle())
    assert pred.probabilities.shape == (3, 20, 18, 22)
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)
    assert (pred.labels == pred.probabilities.argmax(0)).all()
    np.testing.assert_allclose(pred.uncertainty, normalised_entropy(pred.probabilities))


def test_normalised_entropy_extremes():
    uniform = np.full((4, 2, 2, 2), 0.25, np.float32)
    onehot = np.zeros((4, 2, 2, 2), np.float32)
    onehot[2] = 1
    np.testing.assert_allclose(normalised_entropy(uniform), 1.0, atol=1e-6)
    np.testing.assert_allclose(normalised_entropy(onehot), 0.0, atol=1e-6)


def test_axis_flip_gives_the_same_physical_answer():
    """A volume stored with flipped axes (same physical content) must give the same result per point."""
    img = _image()
    flipped = sitk.Flip(img, [True, False, True])  # same physical image, different storage order
    b = _bundle()
    p1 = predict(img, b).probability_image(1)
    p2 = predict(flipped, b).probability_image(1)
    assert p2.GetDirection() == flipped.GetDirection()
    back = sitk.Resample(p2, p1, sitk.Transform(), sitk.sitkNearestNeighbor)
    np.testing.assert_allclose(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(p1), atol=1e-5)


def test_oblique_anisotropic_input_returns_on_input_grid():
    c, s = np.cos(0.3), np.sin(0.3)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    img = _image(shape=(10, 18, 22), spacing=(0.9, 0.8, 2.5), direction=direction)
    pred = predict(img, _bundle(target_spacing=(1.0, 1.0, 1.0)))
    prob = pred.probability_image(0)
    assert prob.GetSize() == img.GetSize()
    assert prob.GetDirection() == pytest.approx(img.GetDirection())
    assert prob.GetSpacing() == pytest.approx(img.GetSpacing())
    np.testing.assert_allclose(pred.probabilities.sum(0), 1.0, atol=1e-5)


def test_resample_to_spacing_keeps_extent_and_centre():
    img = _image(shape=(10, 20, 30), spacing=(1.0, 1.0, 2.0))
    out = resample_to_spacing(img, (2.0, 2.0, 1.0))
    assert out.GetSize() == (15, 10, 20)
    centre_in = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    centre_out = out.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in out.GetSize()])
    assert centre_out == pytest.approx(centre_in)


def test_temperature_calibration():
    logits = torch.tensor([[[2.0], [0.0]]])  # (1, 2, 1)
    p = apply_calibration(logits, {"method": "temperature", "temperature": 2.0})
    assert p[0, 0, 0].item() == pytest.approx(1 / (1 + np.exp(-1.0)), rel=1e-6)
    p = apply_calibration(logits, {"method": "temperature", "temperature": [1.0, 1.0]})
    assert p[0, 0, 0].item() == pytest.approx(1 / (1 + np.exp(-2.0)), rel=1e-6)


def test_count_windows_matches_monai_scan():
    assert count_windows([64, 64, 64], [32, 32, 32], 0.5) == 27
    assert count_windows([20, 20, 20], [32, 32, 32], 0.5) == 1


def test_bad_inputs_are_named():
    b = _bundle()
    with pytest.raises(ImageError, match="2-D"):
        predict(sitk.Image(10, 10, sitk.sitkFloat32), b)
    arr = np.zeros((8, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    with pytest.raises(ImageError, match="1 NaN or infinite"):
        predict(sitk.GetImageFromArray(arr), b)


def test_progress_reports_reach_completion():
    seen = []
    predict(_image(shape=(40, 40, 40)), _bundle(), progress=lambda s, f: seen.append((s, f)))
    stages = [s for s, _ in seen]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess"
    assert max(f for s, f in seen if s == "network") == 1.0


def test_tta_identity_equals_plain_prediction_and_flips_are_mapped_back():
    bundle = _bundle()
    img = _image(shape=(16, 16, 16))
    plain = predict(img, bundle)
    same = predict(img, bundle, tta=["identity"])
    np.testing.assert_allclose(same.probabilities, plain.probabilities, atol=1e-5)
    flipped = predict(img, bundle, tta=["identity", "flip_x", "flip_z"], tta_merge="mean")
    np.testing.assert_allclose(flipped.probabilities.sum(0), 1.0, atol=1e-5)
    # by hand: mean of the three views' probabilities, each mapped back to the input grid
    arr = sitk.GetArrayFromImage(img)
    views = []
    for axis in (None, 2, 0):
        a = arr if axis is None else np.flip(arr, axis).copy()
        im = sitk.GetImageFromArray(a)
        im.CopyInformation(img)
        p = predict(im, bundle).probabilities
        views.append(p if axis is None else np.flip(p, axis + 1))
    np.testing.assert_allclose(flipped.probabilities, np.mean(views, axis=0), atol=1e-4)
    assert flipped.performance is not None
