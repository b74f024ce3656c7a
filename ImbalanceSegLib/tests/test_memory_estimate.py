"""The memory estimate covers the network's activations (window and width) (issue #19 item 3).

The coefficient comes from measurement (Testing/Benchmarks/memory_estimate.py, report in
reports/memory_estimate.md: the estimate covered every run, used/estimated 0.59-0.76); these
tests pin the formula with hand-computed values and its use by predict.
"""

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib import inference
from imbalanceseglib.images import ImageError
from imbalanceseglib.inference import ACTIVATION_BYTES, estimate_memory_bytes, network_memory_bytes


def test_network_term_by_hand():
    # 64^3 window, 2 windows a batch, 16 first-level channels, 3 classes
    assert network_memory_bytes([64, 64, 64], [16, 32, 64, 128], 3, 2) == 64 ** 3 * 2 * (ACTIVATION_BYTES * 16 + 4 * 4)
    assert ACTIVATION_BYTES == 32


def test_the_estimate_grows_with_window_and_width():
    base = estimate_memory_bytes([100, 100, 50], [1, 1, 1], None, 3)
    n = 100 * 100 * 50
    assert base == 4 * (n * (3 + 8) + n * (3 * 3 + 6))  # the volume terms alone
    with_net = estimate_memory_bytes([100, 100, 50], [1, 1, 1], None, 3, patch_size=[64, 64, 64],
                                     features=[16, 32, 64, 128])
    assert with_net - base == network_memory_bytes([64, 64, 64], [16, 32, 64, 128], 3)
    wider = estimate_memory_bytes([100, 100, 50], [1, 1, 1], None, 3, patch_size=[64, 64, 64],
                                  features=[32, 64, 128, 256])
    assert wider - with_net == 64 ** 3 * 2 * ACTIVATION_BYTES * 16
    bigger = estimate_memory_bytes([100, 100, 50], [1, 1, 1], None, 3, patch_size=[128, 128, 128],
                                   features=[16, 32, 64, 128])
    assert bigger - base == 8 * (with_net - base)


def test_predict_counts_the_network_when_it_refuses(monkeypatch):
    """A small volume with a huge window: the volume terms fit, the activations do not."""
    from imbalanceseglib.bundle import ModelBundle
    from imbalanceseglib.networks import build_network
    params = {"in_channels": 1, "out_channels": 2, "features": [64, 128]}
    card = {"name": "wide", "network": {"arch": "UNet3D", "params": params},
            "classes": [{"value": 0, "name": "bg", "color": [0, 0, 0]}, {"value": 1, "name": "fg", "color": [1, 0, 0]}],
            "preprocessing": {"patch_size": [256, 256, 256], "normalization": {"scheme": "none"}}}
    bundle = ModelBundle(card=card, network=build_network("UNet3D", params).eval())
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    volume_only = estimate_memory_bytes(img.GetSize(), img.GetSpacing(), None, 2)
    network = network_memory_bytes([256, 256, 256], [64, 128], 2)
    with pytest.raises(ImageError, match="needs about"):
        inference.predict(img, bundle, memory_limit_bytes=volume_only + network // 2)


def test_the_uncertainty_is_computed_one_class_at_a_time_with_the_same_values():
    rng = np.random.default_rng(1)
    p = rng.dirichlet([1.0, 0.5, 2.0], size=(6, 5, 4)).transpose(3, 0, 1, 2).astype(np.float32)
    p[:, 0, 0, 0] = [1.0, 0.0, 0.0]  # certain: entropy 0
    p[:, 0, 0, 1] = 1.0 / 3          # uniform: 1
    expected = -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(0) / np.log(3)
    got = inference.normalised_entropy(p)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got[0, 0, 0] == pytest.approx(0.0, abs=1e-6) and got[0, 0, 1] == pytest.approx(1.0, abs=1e-6)


def test_labels_are_the_argmax_slab_by_slab():
    p = np.random.default_rng(2).random((4, 70, 300, 300)).astype(np.float32)  # several slabs
    got = inference.argmax_labels(p)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.argmax(p, axis=0))
