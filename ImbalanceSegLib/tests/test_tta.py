"""Tests for imbalanceseglib.tta: test-time augmentation with per-class merging."""

import numpy as np
import pytest
import torch

from imbalanceseglib import tta as T


def _pointwise_logits(v: np.ndarray) -> torch.Tensor:
    """A flip- and rotation-equivariant predictor (voxel-wise)."""
    t = torch.from_numpy(v)
    return torch.stack([-t, t, 0.5 * t ** 2 - 1.0])


def test_tta_identity_equals_the_prediction():
    volume = np.random.default_rng(0).standard_normal((5, 6, 7)).astype(np.float32)
    out = T.tta_logits(_pointwise_logits, volume, transforms=("identity",))
    torch.testing.assert_close(out, torch.softmax(_pointwise_logits(volume), 0))
    probs = torch.softmax(_pointwise_logits(volume), 0)
    out_p = T.tta_logits(lambda v: torch.softmax(_pointwise_logits(v), 0)[None], volume, transforms=("identity",),
                         merge=["max", "mean", "max"], outputs="probabilities")
    torch.testing.assert_close(out_p, probs)


def test_tta_inverts_flips_and_rotations():
    volume = np.random.default_rng(1).standard_normal((5, 6, 6)).astype(np.float32)
    plain = torch.softmax(_pointwise_logits(volume), 0)
    out = T.tta_logits(_pointwise_logits, volume, transforms=T.TTA_TRANSFORMS)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    out_max = T.tta_logits(_pointwise_logits, volume, merge="max")
    torch.testing.assert_close(out_max, plain, rtol=1e-5, atol=1e-6)
    # A predictor that is not equivariant (it sees the z index): the flip_z view is mapped back by hand.
    zramp = torch.arange(5, dtype=torch.float32).view(5, 1, 1)

    def positional(v):
        t = torch.from_numpy(v)
        return torch.stack([t, t * 0 + zramp, -t])

    both = T.tta_logits(positional, volume, transforms=("identity", "flip_z"))
    view_flip = torch.softmax(positional(np.ascontiguousarray(volume[::-1])), 0).flip(1)
    expected = (torch.softmax(positional(volume), 0) + view_flip) / 2
    torch.testing.assert_close(both, expected)
    # Non-square in-plane: a quarter turn changes the predicted shape and is turned back.
    vol = np.random.default_rng(2).standard_normal((3, 4, 7)).astype(np.float32)
    out = T.tta_logits(_pointwise_logits, vol, transforms=("rot90", "rot270", "flip_zyx"))
    torch.testing.assert_close(out, torch.softmax(_pointwise_logits(vol), 0), rtol=1e-5, atol=1e-6)


def test_tta_per_class_max_and_mean_by_hand():
    # Two voxels; the identity view and the x-flipped view predict these probabilities
    # (given on the input grid: the flipped view's output is mapped back by flipping).
    p_id = np.array([[0.6, 0.2], [0.3, 0.5], [0.1, 0.3]], np.float32)  # (C=3, 2 voxels along x)
    p_fl = np.array([[0.4, 0.7], [0.5, 0.2], [0.1, 0.1]], np.float32)

    def predict(v):
        if v[0, 0, 0] == 0.0:  # identity view (volume = [0, 1])
            p = p_id
        else:  # x-flipped view, the prediction is in the flipped frame
            p = p_fl[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(p)).view(3, 1, 1, 2)

    volume = np.array([[[0.0, 1.0]]], np.float32)
    mean = T.tta_logits(predict, volume, ("identity", "flip_x"), merge="mean", outputs="probabilities")
    np.testing.assert_allclose(mean[:, 0, 0].numpy(), (p_id + p_fl) / 2, rtol=1e-6)

    # Class 2 rare (max), classes 0 and 1 mean, then renormalised:
    # voxel 0: [0.5, 0.4, max(0.1, 0.1) = 0.1] sums to 1.0   -> unchanged
    # voxel 1: [0.45, 0.35, max(0.3, 0.1) = 0.3] sums to 1.1 -> divided by 1.1
    merged = T.tta_logits(predict, volume, ("identity", "flip_x"), merge=T.rare_class_merge(3, {2}),
                          outputs="probabilities")
    expected = np.array([[0.5, 0.45 / 1.1], [0.4, 0.35 / 1.1], [0.1, 0.3 / 1.1]])
    np.testing.assert_allclose(merged[:, 0, 0].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(merged.sum(0).numpy(), 1.0, rtol=1e-6)

    # Max on a class can change the argmax.
    m1 = T.tta_logits(predict, volume, ("identity", "flip_x"), merge=["mean", "max", "mean"],
                      outputs="probabilities")[:, 0, 0].numpy()
    # voxel 1: [0.45, max(0.5, 0.2) = 0.5, 0.2] / 1.15 -> class 1 wins, where mean picked class 0.
    np.testing.assert_allclose(m1[:, 1], np.array([0.45, 0.5, 0.2]) / 1.15, rtol=1e-6)
    assert int(np.argmax(mean[:, 0, 0].numpy()[:, 1])) == 0 and int(np.argmax(m1[:, 1])) == 1


def test_tta_outputs_sum_to_one_and_bad_arguments():
    volume = np.random.default_rng(3).standard_normal((4, 5, 6)).astype(np.float32)

    def logits(v):
        t = torch.from_numpy(v)
        return torch.stack([t, torch.roll(t, 1, 2), t.flip(0) * 2])

    out = T.tta_logits(logits, volume, merge=["mean", "max", "max"])
    assert out.shape == (3, 4, 5, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out.sum(0), torch.ones(4, 5, 6))
    assert (out >= 0).all()
    with pytest.raises(ValueError, match="rules"):
        T.tta_logits(logits, volume, merge=["mean", "max"])
    with pytest.raises(ValueError, match="merge"):
        T.tta_logits(logits, volume, merge=["mean", "median", "max"])
    with pytest.raises(ValueError, match="unknown test-time transform"):
        T.tta_logits(logits, volume, transforms=("identity", "flip_w"))
    with pytest.raises(ValueError, match="unknown test-time transform"):
        T.tta_logits(logits, volume, transforms=("flip_xx",))
    with pytest.raises(ValueError, match="shape"):
        T.tta_logits(lambda v: torch.zeros(3, 2, 2, 2), volume)
    with pytest.raises(ValueError, match="outputs"):
        T.tta_logits(logits, volume, outputs="scores")
