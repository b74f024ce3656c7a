"""Losses by name (issue #3): hand-computed values on tiny tensors."""

import math

import pytest
import torch

from imbalanceseglib.losses import LOSS_NAMES, build_loss
from imbalanceseglib.rare import resolve_rare_mask

NAMES = ["bg", "big", "tiny"]


def _logits(vals):
    """(1, C, V, 1, 1) from a C x V nested list."""
    return torch.tensor(vals, dtype=torch.float32).view(1, len(vals), len(vals[0]), 1, 1)


def _labels(vals):
    return torch.tensor(vals).view(1, 1, len(vals), 1, 1)


def test_cross_entropy_by_hand_and_soft_targets_equal_integer_targets():
    z = _logits([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    y = _labels([0, 1, 2])
    loss = build_loss({"name": "ce"})
    p0 = math.exp(2) / (math.exp(2) + 2)
    p1 = math.e / (math.e + 2)
    p2 = math.exp(3) / (math.exp(3) + 2)
    expected = -(math.log(p0) + math.log(p1) + math.log(p2)) / 3
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-5)
    onehot = torch.nn.functional.one_hot(y[:, 0], 3).movedim(-1, 1).float()
    assert loss(z, onehot).item() == pytest.approx(expected, rel=1e-5)
    # per-call class weights: w = (1, 2, 0.5) -> mean of w_t * (-log p_t)
    w = torch.tensor([1.0, 2.0, 0.5])
    expected_w = -(math.log(p0) + 2 * math.log(p1) + 0.5 * math.log(p2)) / 3
    assert loss(z, y, class_weights=w).item() == pytest.approx(expected_w, rel=1e-5)


def test_dice_batch_versus_image_reduction_for_a_class_absent_from_one_image():
    # two images of 2 voxels; class 1 present in image 0 only; probabilities given directly
    z = torch.log(torch.tensor([[[0.5, 0.5], [0.5, 0.5]], [[0.8, 0.8], [0.2, 0.2]]]))  # (N=2, C=2, V=2)
    z = z.view(2, 2, 2, 1, 1)
    y = torch.tensor([[1, 0], [0, 0]]).view(2, 1, 2, 1, 1)
    s = 1e-5
    batch = build_loss({"name": "dice", "dice_reduction": "batch", "smooth_nr": s, "smooth_dr": s})(z, y).item()
    image = build_loss({"name": "dice", "dice_reduction": "image", "smooth_nr": s, "smooth_dr": s})(z, y).item()
    # batch: class 1 (background excluded): inter 0.5, sums 0.5+0.5+0.2+0.2=1.4 pred, 1 ref
    assert batch == pytest.approx(1 - (2 * 0.5 + s) / (1.4 + 1 + s), rel=1e-4)
    # image: image 0 -> 1 - (1 + s)/(1 + 1 + s); image 1 (class absent) -> 1 - s/(0.4 + s) ~ 1
    img0 = 1 - (1 + s) / (2 + s)
    img1 = 1 - s / (0.4 + s)
    assert image == pytest.approx((img0 + img1) / 2, rel=1e-4)
    assert image > batch + 0.15  # the absent class is pushed to zero only with per-image reduction


def test_dice_of_a_soft_target_is_smallest_where_the_prediction_equals_it():
    dice = build_loss({"name": "dice", "smooth_nr": 0.0, "smooth_dr": 1e-12})
    # one voxel, half of class 1: the product form's Dice would be 2*(1/2*1/2)/(1/2+1/2) = 1/2 at p = 1/2
    # and 2*(1*1/2)/(1+1/2) = 2/3 at p = 1; the semimetric overlap (sum p + sum t - sum |p - t|)/2 gives
    # 1/2 and 1/2 -> Dice 1 and 2/3
    half = torch.tensor([0.5, 0.5]).view(1, 2, 1, 1, 1)
    at_t = dice(torch.zeros(1, 2, 1, 1, 1), half).item()
    sure = dice(torch.tensor([-30.0, 30.0]).view(1, 2, 1, 1, 1), half).item()
    assert at_t == pytest.approx(0.0, abs=1e-6)
    assert sure == pytest.approx(1 - 2 / 3, rel=1e-5)
    # a random soft target over 4x4x4 voxels and 3 classes: any move of p away from t costs Dice
    g = torch.Generator().manual_seed(0)
    t = torch.softmax(3 * torch.randn(2, 3, 4, 4, 4, generator=g), 1)
    best = dice(torch.log(t), t).item()
    assert best == pytest.approx(0.0, abs=1e-5)
    for _ in range(5):
        moved = torch.log(t) + 0.3 * torch.randn(t.shape, generator=g)
        assert dice(moved, t).item() > best + 1e-3


@pytest.mark.parametrize("name", ["generalized_dice", "tversky", "soft_dice"])
def test_monai_overlap_losses_are_smallest_at_a_soft_target(name):
    g = torch.Generator().manual_seed(2)
    t = torch.softmax(3 * torch.randn(2, 3, 4, 4, 4, generator=g), 1)
    loss = build_loss({"name": name})
    best = loss(torch.log(t), t).item()
    assert best == pytest.approx(0.0, abs=1e-4)
    for _ in range(5):
        assert loss(torch.log(t) + 0.3 * torch.randn(t.shape, generator=g), t).item() > best + 1e-3


def test_dice_of_a_one_hot_target_is_the_product_form_value_and_gradient():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 3, 3, 3, 3, generator=g, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 3, 3, 3), generator=g)
    s = 1e-5
    loss = build_loss({"name": "dice", "smooth_nr": s, "smooth_dr": s})(z, y)
    p = torch.softmax(z, 1)
    t = torch.nn.functional.one_hot(y[:, 0], 3).permute(0, 4, 1, 2, 3).float()
    dims = (0, 2, 3, 4)
    product = (1 - (2 * (p * t).sum(dims) + s) / (p.sum(dims) + t.sum(dims) + s))[1:].mean()
    assert loss.item() == pytest.approx(product.item(), rel=1e-6)
    (g1,) = torch.autograd.grad(loss, z)
    (g2,) = torch.autograd.grad(product, z)
    assert torch.allclose(g1, g2, atol=1e-7)


def test_rare_mask_by_threshold_and_by_name():
    assert resolve_rare_mask(NAMES, [0.9, 0.099, 0.001]).tolist() == [False, False, True]
    assert resolve_rare_mask(NAMES, [0.9, 0.099, 0.001], threshold=0.1).tolist() == [False, True, True]
    assert resolve_rare_mask(NAMES, None, rare_classes=["big"]).tolist() == [False, True, False]
    assert resolve_rare_mask(NAMES, [0.0, 0.5, 0.5], threshold=0.9).tolist() == [False, True, True]  # bg never
    with pytest.raises(ValueError, match="liver"):
        resolve_rare_mask(NAMES, None, rare_classes=["liver"])
    with pytest.raises(ValueError, match="bg"):
        resolve_rare_mask(NAMES, None, rare_classes=["bg"])


def test_asymmetric_focal_applies_only_to_frequent_voxels():
    z = _logits([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # voxel 0 labelled big, voxel 1 labelled tiny
    y = _labels([1, 2])
    p = math.e / (math.e + 2)                          # both voxels give their target probability p
    gamma = 2.0
    loss = build_loss({"name": "asym_focal", "gamma": gamma, "lambda_dice": 0.0, "rare_classes": ["tiny"]}, NAMES)
    expected = ((1 - p) ** gamma * -math.log(p) + -math.log(p)) / 2   # focal at 'big', plain CE at 'tiny'
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-5)
    neutral = build_loss({"name": "asym_focal", "gamma": 0.0, "rare_classes": ["tiny"]}, NAMES)
    plain = build_loss({"name": "dice_ce"})
    z2 = torch.randn(2, 3, 4, 4, 4)
    y2 = torch.randint(0, 3, (2, 1, 4, 4, 4))
    assert neutral(z2, y2).item() == pytest.approx(plain(z2, y2).item(), rel=1e-6)


def test_asymmetric_large_margin_subtracts_the_margin_at_rare_voxels_only():
    z = _logits([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    y = _labels([1, 2])
    loss = build_loss({"name": "asym_large_margin", "margin": 2.0, "lambda_dice": 0.0, "rare_classes": ["tiny"]},
                      NAMES)
    p = math.e / (math.e + 2)
    p_margin = math.exp(-1) / (math.exp(-1) + 2)       # rare voxel: true logit 1 - 2 = -1
    assert loss(z, y).item() == pytest.approx((-math.log(p) - math.log(p_margin)) / 2, rel=1e-5)
    zero = build_loss({"name": "asym_large_margin", "margin": 0.0, "lambda_dice": 0.0, "rare_classes": ["tiny"]},
                      NAMES)
    assert zero(z, y).item() == pytest.approx(build_loss({"name": "ce"})(z, y).item(), rel=1e-6)
    # by default (the reference code's margin 1, on top of Dice + CE): exactly Dice + CE plus the margin
    z2 = torch.randn(2, 3, 4, 4, 4)
    y2 = torch.randint(0, 3, (2, 1, 4, 4, 4))
    default = build_loss({"name": "asym_large_margin", "rare_classes": ["tiny"]}, NAMES)
    assert default.margin == 1.0 and default.lambda_dice == 1.0 and default.gamma == 0.0
    no_margin = build_loss({"name": "asym_large_margin", "margin": 0.0, "rare_classes": ["tiny"]}, NAMES)
    assert no_margin(z2, y2).item() == pytest.approx(build_loss({"name": "dice_ce"})(z2, y2).item(), rel=1e-6)
    assert default(z2, y2).item() > no_margin(z2, y2).item()


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_builds_by_name_and_gives_gradients(name):
    loss = build_loss({"name": name}, NAMES, [0.9, 0.09, 0.01])
    z = torch.randn(2, 3, 6, 6, 6, requires_grad=True)
    y = torch.randint(0, 3, (2, 1, 6, 6, 6))
    value = loss(z, y)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_bad_settings_name_the_problem():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss({"name": "hinge"})
    with pytest.raises(ValueError, match="gama"):
        build_loss({"name": "asym_focal", "gama": 2})
    with pytest.raises(ValueError, match="class names"):
        build_loss({"name": "asym_focal"})
    with pytest.raises(ValueError, match="no per-call class weights"):
        build_loss({"name": "tversky"})(torch.randn(1, 3, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4, dtype=torch.long),
                                        class_weights=torch.ones(3))
