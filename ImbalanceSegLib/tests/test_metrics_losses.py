import math

import numpy as np
import pytest
import torch

from imbalanceseglib.losses import build_loss
from imbalanceseglib.metrics import confusion_counts, overlap_metrics


def test_confusion_counts_by_hand():
    ref = np.array([0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 2, 2, 2, 0])
    # class 1: tp 1, fp 0, fn 1; class 2: tp 2, fp 1, fn 1; class 0: tp 1, fp 1, fn 0
    assert confusion_counts(pred, ref, 3).tolist() == [[1, 1, 0], [1, 0, 1], [2, 1, 1]]
    m = overlap_metrics(pred, ref, 3)
    assert m[1]["dice"] == pytest.approx(2 / 3)
    assert m[2]["dice"] == pytest.approx(4 / 6)  # 2*tp / (2*tp + fp + fn)
    assert m[2]["sensitivity"] == pytest.approx(2 / 3)
    assert m[2]["precision"] == pytest.approx(2 / 3)


def test_empty_structure_policy():
    ref = np.zeros(10, int)
    pred = np.zeros(10, int)
    pred[3] = 2  # class 2 hallucinated, class 1 absent from both
    m = overlap_metrics(pred, ref, 3)
    assert m[1]["dice"] is None and m[1]["sensitivity"] is None and m[1]["precision"] is None
    assert m[2]["dice"] == 0.0 and m[2]["precision"] == 0.0 and m[2]["sensitivity"] is None


def test_dice_ce_value_by_hand():
    # One voxel pair, two classes, logits chosen so softmax is easy to write down.
    logits = torch.tensor([[[[[0.0, math.log(3.0)]]], [[[math.log(3.0), 0.0]]]]])  # (1, 2, 1, 1, 2)
    target = torch.tensor([[[[[1, 0]]]]])
    p1 = torch.tensor([0.75, 0.25])  # prob of class 1 per voxel
    ce = -(math.log(0.75) + math.log(0.75)) / 2
    # Dice of class 1 (background excluded), batch reduction, smooth 1e-5
    inter = (p1 * torch.tensor([1.0, 0.0])).sum()
    dice = 1 - (2 * inter + 1e-5) / (p1.sum() + 1 + 1e-5)
    loss = build_loss({"name": "dice_ce"})(logits, target)
    assert loss.item() == pytest.approx(ce + dice.item(), rel=1e-5)


def test_batch_vs_image_dice_differ_when_class_missing_from_one_image():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 4, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, :2] = 1  # class 1 only in the first image
    lb = build_loss({"name": "dice", "dice_reduction": "batch"})(logits, target)
    li = build_loss({"name": "dice", "dice_reduction": "image"})(logits, target)
    assert abs(lb.item() - li.item()) > 0.05
    lb.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_perfect_prediction_has_low_loss():
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[0, 0, 1:3, 1:3, 1:3] = 1
    logits = torch.stack([(target[:, 0] == 0).float(), (target[:, 0] == 1).float()], 1) * 20
    assert build_loss({})(logits, target).item() < 1e-3


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        build_loss({"name": "hinge"})
