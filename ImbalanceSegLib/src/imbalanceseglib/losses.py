"""Segmentation losses selectable by name from a training config.

The standard losses come from MONAI; this module only builds them from JSON
settings and documents the choices that matter for rare and empty classes.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

DEFAULT_LOSS: Dict[str, Any] = {
    "name": "dice_ce",
    # "batch": one Dice over the whole batch per class (nnU-Net's default; a class
    # absent from one patch does not produce a 0/0 term). "image": one Dice per image.
    "dice_reduction": "batch",
    "smooth_nr": 1e-5,
    "smooth_dr": 1e-5,
    "include_background": False,
    "lambda_dice": 1.0,
    "lambda_ce": 1.0,
    "class_weights": None,
}


def build_loss(settings: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Build a loss taking (logits (N,C,...), integer labels (N,1,...))."""
    cfg = dict(DEFAULT_LOSS)
    cfg.update(settings or {})
    name = cfg["name"]
    reduction = cfg["dice_reduction"]
    if reduction not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {reduction!r}")
    weights = cfg.get("class_weights")
    weight_t = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    common = dict(to_onehot_y=True, softmax=True, include_background=cfg["include_background"],
                  smooth_nr=cfg["smooth_nr"], smooth_dr=cfg["smooth_dr"], batch=reduction == "batch")
    if name == "dice_ce":
        return DiceCELoss(**common, lambda_dice=cfg["lambda_dice"], lambda_ce=cfg["lambda_ce"],
                          weight=weight_t)
    if name == "dice":
        return DiceLoss(**common, weight=weight_t)
    if name == "ce":
        return _CrossEntropy(weight_t)
    raise ValueError(f"unknown loss {name!r}; known: dice_ce, dice, ce")


class _CrossEntropy(nn.Module):
    def __init__(self, weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.register_buffer("weight", weight if weight is not None else None, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, target[:, 0].long(), weight=self.weight)
