"""Segmentation losses selectable by name from a training config.

Papers and equations: soft Dice + cross-entropy (nnU-Net's default pair), the
Dice reduction of Tilborghs, Bertels et al. (2022, below), and the asymmetric
focal / large-margin losses of Li, Kamnitsas & Glocker (IEEE TMI 2021), whose
equations are in :class:`RareClassFocalLoss` and :class:`RareClassLargeMarginLoss`.

Every loss built here is called as ``loss(logits, target, class_weights=None, mask=None)``:

* ``logits``: (N, C, ...) raw network outputs;
* ``target``: integer labels (N, 1, ...) or soft / one-hot labels (N, C, ...)
  (asymmetric mixup produces soft labels);
* ``class_weights``: optional (C,) weights for this call (the DisW/DifW/CDifW
  weights that follow training); they multiply the static ``class_weights`` of
  the settings and enter weighted cross-entropy and weighted Dice (a weighted
  mean of the per-class Dice losses);
* ``mask``: optional boolean (N, 1, ...) or (N, ...) voxel mask: voxels where it
  is False contribute nothing to the loss (cross-entropy, focal and margin terms
  are means over the kept voxels; the Dice term sums probabilities and targets
  over the kept voxels only).  Asymmetric mixup with ``soft_targets`` false uses
  it to drop the voxels whose mixed target is not one-hot.  ``ce``, ``dice``,
  ``dice_ce`` and the asymmetric losses take it; the MONAI losses refuse it.

Names (:data:`LOSS_NAMES`):

* ``ce``, ``dice``, ``dice_ce`` - cross-entropy, soft Dice, and their sum
  (``lambda_ce``, ``lambda_dice``);
* ``generalized_dice``, ``focal``, ``tversky``, ``soft_dice`` - MONAI's
  GeneralizedDiceLoss, FocalLoss (softmax, ``gamma``), TverskyLoss (``alpha``,
  ``beta``) and DiceLoss; the overlap losses with ``soft_label=True`` (the same
  values for one-hot targets, smallest at ``p = t`` for soft ones, as ``dice``
  here: :func:`per_class_dice_loss`); they take no per-call class weights;
* ``asym_focal`` and ``asym_large_margin`` - the asymmetric losses of Li,
  Kamnitsas & Glocker ("Analyzing overfitting under class imbalance in neural
  networks for image segmentation", IEEE TMI 40(3), 2021, early access 2020):
  :class:`RareClassFocalLoss` and :class:`RareClassLargeMarginLoss`, which treat
  the rare classes (:mod:`imbalanceseglib.rare`) differently from the others.
  They are *not* MONAI's ``AsymmetricFocalLoss`` / ``AsymmetricUnifiedFocalLoss``
  (Yeung et al., "Unified Focal loss", 2021/2022), a different method.  The
  names in configs and model cards stay ``asym_focal`` / ``asym_large_margin``.

How the Dice part reduces decides what empty or missing labels do (Tilborghs,
Bertels et al., "The Dice loss in the context of missing or empty labels",
2022): ``dice_reduction="batch"`` (default, as nnU-Net) computes one Dice per
class over the whole batch, so a class absent from one patch but present in
another adds no term of its own; ``"image"`` computes one Dice per image and
class, and for a class absent from an image's label the term is
``1 - smooth_nr / (sum of its predicted probability + smooth_dr)``, which with
a small ``smooth_nr`` pushes every predicted voxel of that class towards zero
(the behaviour wanted for truly empty labels, harmful for missing ones).
``test_losses.py`` checks both numerically.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss, GeneralizedDiceLoss, TverskyLoss
from torch import nn

from .rare import RARE_FRACTION, resolve_rare_mask

LOSS_NAMES = ("ce", "dice", "dice_ce", "generalized_dice", "focal", "tversky", "soft_dice",
              "asym_focal", "asym_large_margin")
#: The losses that take a voxel ``mask`` (the others are MONAI's and refuse one).
MASKABLE_LOSS_NAMES = ("ce", "dice", "dice_ce", "asym_focal", "asym_large_margin")

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
_EXTRA_KEYS = {"gamma", "margin", "rare_classes", "rare_threshold", "alpha", "beta"}


def soft_target(target: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    """(N, C, ...) float target from integer labels (N, 1, ...) or soft labels (N, C, ...)."""
    if target.shape[1] == num_classes and target.is_floating_point() and num_classes > 1:
        return target.to(like.dtype)
    if target.shape[1] != 1:
        raise ValueError(f"target must be labels (N, 1, ...) or soft labels (N, {num_classes}, ...), "
                         f"got shape {tuple(target.shape)}")
    lab = target[:, 0].long()
    if lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"target labels must lie in 0..{num_classes - 1}")
    return F.one_hot(lab, num_classes).movedim(-1, 1).to(like.dtype)


def _weights(static: Optional[torch.Tensor], dynamic: Optional[torch.Tensor], c: int,
             like: torch.Tensor) -> Optional[torch.Tensor]:
    w = None
    for part in (static, dynamic):
        if part is None:
            continue
        part = torch.as_tensor(part, dtype=like.dtype, device=like.device).reshape(-1)
        if part.numel() != c:
            raise ValueError(f"class weights have {part.numel()} values for {c} classes")
        w = part if w is None else w * part
    return w


def voxel_mask(mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """``mask`` as a boolean (N, 1, ...) tensor matching ``like`` (N, C, ...); None stays None."""
    if mask is None:
        return None
    m = torch.as_tensor(mask, device=like.device)
    if m.dim() == like.dim() - 1:
        m = m.unsqueeze(1)
    if m.dim() != like.dim() or m.shape[0] != like.shape[0] or m.shape[1] != 1 \
            or tuple(m.shape[2:]) != tuple(like.shape[2:]):
        raise ValueError(f"mask must be (N, 1, ...) or (N, ...) like the logits {tuple(like.shape)}, "
                         f"got shape {tuple(m.shape)}")
    return m if m.dtype == torch.bool else m != 0


def weighted_ce(logits: torch.Tensor, target: torch.Tensor, weights: Optional[torch.Tensor] = None,
                modulation: Optional[torch.Tensor] = None, margin_shift: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over voxels of ``-m(x) * sum_c w_c t_c log softmax(z - shift)_c``.

    ``modulation`` (N, 1, ...): per-voxel factor (focal term); ``margin_shift``
    (N, C, ...): subtracted from the logits before the softmax (large margin);
    ``mask`` (boolean (N, 1, ...)): the mean runs over the voxels where it is
    True only (0 when there are none).
    """
    z = logits if margin_shift is None else logits - margin_shift
    logp = F.log_softmax(z, dim=1)
    per_class = -target * logp
    if weights is not None:
        per_class = per_class * weights.view(1, -1, *([1] * (logits.ndim - 2)))
    per_voxel = per_class.sum(1, keepdim=True)
    if modulation is not None:
        per_voxel = per_voxel * modulation
    m = voxel_mask(mask, logits)
    if m is None:
        return per_voxel.mean()
    kept = torch.where(m, per_voxel, torch.zeros_like(per_voxel))
    return kept.sum() / m.sum().clamp_min(1).to(per_voxel.dtype)


def per_class_dice_loss(probs: torch.Tensor, target: torch.Tensor, batch: bool, smooth_nr: float,
                        smooth_dr: float, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 - soft Dice per class: (C,) with ``batch``, else (N, C).  With a voxel ``mask``
    (boolean (N, 1, ...)) the probabilities and targets of the voxels where it is False are
    left out of every sum (a zero target alone would still count their probabilities).

    The overlap is the Dice semimetric's ``(sum p + sum t - sum |p - t|) / 2`` (Wang & Blaschko,
    "Dice semimetric losses: optimizing the Dice score with soft labels", MICCAI 2023; MONAI's
    ``DiceLoss(soft_label=True)``), not ``sum p * t``: for a one-hot target the two are equal
    (``|p - t| = p + t - 2 p t``), value and gradient, but for a soft target (deep supervision's
    block-averaged targets, context labels, mixup) the product form is not smallest at ``p = t``
    (one voxel half of class c: its Dice is 1/2 at ``p = 1/2`` and 2/3 at ``p = 1``), which pushes
    the outputs away from the fractions they are given; the semimetric form is smallest there
    (Dice 1, loss 0 up to the smoothing terms)."""
    m = voxel_mask(mask, probs)
    if m is not None:
        probs = torch.where(m, probs, torch.zeros_like(probs))
        target = torch.where(m, target, torch.zeros_like(target))
    dims = tuple(range(2, probs.ndim))
    if batch:
        dims = (0,) + dims
    denom = probs.sum(dims) + target.sum(dims)
    inter = 0.5 * (denom - (probs - target).abs().sum(dims))
    return 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)


class _SegLoss(nn.Module):
    """Common settings handling for the losses implemented here."""

    def __init__(self, cfg: Dict[str, Any]):
        super().__init__()
        self.batch = cfg["dice_reduction"] == "batch"
        self.smooth_nr, self.smooth_dr = float(cfg["smooth_nr"]), float(cfg["smooth_dr"])
        self.include_background = bool(cfg["include_background"])
        self.lambda_dice, self.lambda_ce = float(cfg["lambda_dice"]), float(cfg["lambda_ce"])
        w = cfg.get("class_weights")
        self.static_weights = None if w is None else torch.tensor(w, dtype=torch.float32)

    def dice_term(self, probs, target, weights, per_class_power=None, mask=None):
        loss = per_class_dice_loss(probs, target, self.batch, self.smooth_nr, self.smooth_dr, mask)
        if per_class_power is not None:  # asymmetric focal modulation of frequent classes' Dice terms
            loss = loss * per_class_power
        start = 0 if self.include_background else 1
        loss = loss[..., start:]
        if weights is not None:
            w = weights[start:]
            return (loss * w).sum(-1).mean() / w.sum().clamp_min(1e-12)
        return loss.mean()


class DiceCE(_SegLoss):
    """``lambda_ce * CE + lambda_dice * Dice`` with optional class weights (``ce`` and
    ``dice`` are the special cases with one lambda at zero)."""

    def forward(self, logits, target, class_weights=None, mask=None):
        c = logits.shape[1]
        t = soft_target(target, c, logits)
        w = _weights(self.static_weights, class_weights, c, logits)
        m = voxel_mask(mask, logits)
        total = logits.new_zeros(())
        if self.lambda_ce:
            total = total + self.lambda_ce * weighted_ce(logits, t, w, mask=m)
        if self.lambda_dice:
            total = total + self.lambda_dice * self.dice_term(torch.softmax(logits, 1), t, w, mask=m)
        return total


class _RareClassLoss(_SegLoss):
    """Cross-entropy + Dice that treat rare voxels and classes asymmetrically (Li, Kamnitsas & Glocker).

    Shared implementation of :class:`RareClassFocalLoss` (``asym_focal``) and
    :class:`RareClassLargeMarginLoss` (``asym_large_margin``), which differ only
    in their default ``gamma``, ``margin`` and ``lambda_dice``
    (:attr:`defaults`, applied by :func:`build_loss`).  ``rare_mask``: (C,)
    booleans from :func:`imbalanceseglib.rare.resolve_rare_mask`.

    A voxel ``i`` is *rare* (``r_i = 1``) when its target puts more than half its
    mass on rare classes (for integer labels: its label is rare).  With logits
    ``z_i``, target ``t_i`` (one-hot or soft), class weights ``w_c``, rare-class
    indicator ``R_c`` and ``p_t,i = sum_c t_ic softmax(z_i)_c``::

        CE   = mean_i  m_i * sum_c -w_c t_ic log softmax(z_i - s_i)_c
        m_i  = 1 if r_i else (1 - p_t,i) ** gamma          (focal factor on frequent voxels only)
        s_ic = margin * t_ic * R_c * r_i                   (additive margin on rare voxels' rare logits)
        Dice = weighted mean_c  L_c * (L_c ** gamma if not R_c else 1),   L_c = 1 - Dice_c
        loss = lambda_ce * CE + lambda_dice * Dice

    So the network is not allowed to stop learning from rare examples it
    already fits (no focal down-weighting there), rare voxels must beat the
    other classes by ``margin`` in logit space (large-margin softmax), and
    well-segmented frequent classes contribute less to the Dice part (the focal
    factor ``L_c ** gamma`` is detached: a weight).  ``gamma = 0`` and
    ``margin = 0`` give exactly ``lambda_ce * CE + lambda_dice * Dice``.
    With a voxel ``mask`` the mean over ``i`` and the Dice sums run over the kept
    voxels only (also for the focal factor ``L_c ** gamma``).
    """

    #: Settings :func:`build_loss` fills in when the config leaves them out.
    defaults: Dict[str, float] = {}

    def __init__(self, cfg: Dict[str, Any], rare_mask: torch.Tensor):
        super().__init__(cfg)
        self.gamma = float(cfg.get("gamma", 0.0))
        self.margin = float(cfg.get("margin", 0.0))
        if self.gamma < 0 or self.margin < 0:
            raise ValueError("gamma and margin must be >= 0")
        self.register_buffer("rare", rare_mask.clone().to(torch.bool), persistent=False)

    def forward(self, logits, target, class_weights=None, mask=None):
        c = logits.shape[1]
        if self.rare.numel() != c:
            raise ValueError(f"rare mask has {self.rare.numel()} classes, the logits {c}")
        t = soft_target(target, c, logits)
        w = _weights(self.static_weights, class_weights, c, logits)
        shape = (1, c) + (1,) * (logits.ndim - 2)
        rare_f = self.rare.to(logits.dtype).view(shape)
        rare_voxel = ((t * rare_f).sum(1, keepdim=True) > 0.5).to(logits.dtype)
        m = voxel_mask(mask, logits)
        total = logits.new_zeros(())
        if self.lambda_ce:
            modulation = None
            if self.gamma:
                p_t = (torch.softmax(logits, 1) * t).sum(1, keepdim=True).clamp(0.0, 1.0)
                modulation = rare_voxel + (1.0 - rare_voxel) * (1.0 - p_t) ** self.gamma
            shift = self.margin * t * rare_f * rare_voxel if self.margin else None
            total = total + self.lambda_ce * weighted_ce(logits, t, w, modulation, shift, mask=m)
        if self.lambda_dice:
            power = None
            if self.gamma:
                loss = per_class_dice_loss(torch.softmax(logits, 1), t, self.batch, self.smooth_nr, self.smooth_dr,
                                           m)
                frequent = (~self.rare).to(logits.dtype)
                power = frequent * loss.detach().clamp_min(0.0) ** self.gamma + (1.0 - frequent)
                # multiply inside dice_term by the same per-class factor (detached: a focal weight)
            total = total + self.lambda_dice * self.dice_term(torch.softmax(logits, 1), t, w, power, mask=m)
        return total


class RareClassFocalLoss(_RareClassLoss):
    """``asym_focal``: the asymmetric focal loss of Li, Kamnitsas & Glocker (IEEE TMI 2021).

    The focal factor ``(1 - p_t) ** gamma`` (and ``L_c ** gamma`` in the Dice
    part) acts on frequent voxels and classes only; rare ones keep the plain
    loss (equations in :class:`_RareClassLoss`).  Defaults as the authors' reference code,
    ``gamma=4``, ``margin=0``, with the Dice term of Dice + CE (``lambda_dice`` as configured,
    1), the settings measured on real patients in ``Testing/Benchmarks/reports/real_imbalance.md``.
    Not MONAI's ``AsymmetricFocalLoss`` (Yeung et al.), a different method.
    """

    defaults = {"gamma": 4.0, "margin": 0.0}


class RareClassLargeMarginLoss(_RareClassLoss):
    """``asym_large_margin``: the asymmetric large-margin loss of Li, Kamnitsas & Glocker (IEEE TMI 2021).

    At rare voxels the true (rare) class's logit is lowered by ``margin`` before
    the softmax, ``softmax(z - margin * t)``, so those voxels must be classified
    with a margin; frequent voxels keep the plain cross-entropy (equations in
    :class:`_RareClassLoss`).  Defaults as the authors' reference code, ``margin=1``,
    ``gamma=0``, with the Dice term of Dice + CE (``lambda_dice`` as configured, 1), so that
    only the margin differs from ``dice_ce``: the settings measured on real patients in
    ``Testing/Benchmarks/reports/real_imbalance.md``.
    """

    defaults = {"margin": 1.0, "gamma": 0.0}


class _MonaiWrapped(nn.Module):
    """A MONAI loss on one-hot/soft targets; per-call class weights are not supported."""

    def __init__(self, name: str, loss: nn.Module):
        super().__init__()
        self.name, self.loss = name, loss

    def forward(self, logits, target, class_weights=None, mask=None):
        if class_weights is not None:
            raise ValueError(f"loss {self.name!r} takes no per-call class weights; use ce, dice, dice_ce or "
                             "an asymmetric loss with DisW/DifW/CDifW")
        if mask is not None:
            raise ValueError(f"loss {self.name!r} takes no voxel mask (mixup.soft_targets false); use ce, dice, "
                             "dice_ce or an asymmetric loss")
        return self.loss(logits, soft_target(target, logits.shape[1], logits))


def build_loss(settings: Optional[Dict[str, Any]] = None, class_names: Optional[Sequence[str]] = None,
               voxel_fractions: Optional[Sequence[float]] = None) -> nn.Module:
    """Build a loss from JSON settings (see the module docstring).

    The asymmetric losses need the rare-class mask: ``settings["rare_classes"]``
    (names; needs ``class_names``) or the classes' ``voxel_fractions`` with
    ``settings["rare_threshold"]`` (default :data:`imbalanceseglib.rare.RARE_FRACTION`, 0.01).
    """
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(DEFAULT_LOSS) - _EXTRA_KEYS)
    if unknown:
        raise ValueError(f"unknown loss settings {unknown}; known: {sorted(set(DEFAULT_LOSS) | _EXTRA_KEYS)}")
    cfg = dict(DEFAULT_LOSS)
    cfg.update(settings)
    name = cfg["name"]
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSS_NAMES)}")
    if cfg["dice_reduction"] not in ("batch", "image"):
        raise ValueError(f"dice_reduction must be 'batch' or 'image', got {cfg['dice_reduction']!r}")
    batch = cfg["dice_reduction"] == "batch"
    common = dict(include_background=cfg["include_background"], smooth_nr=cfg["smooth_nr"],
                  smooth_dr=cfg["smooth_dr"], batch=batch)
    if name == "ce":
        return DiceCE(dict(cfg, lambda_dice=0.0, lambda_ce=1.0))
    if name == "dice":
        return DiceCE(dict(cfg, lambda_ce=0.0, lambda_dice=1.0))
    if name == "dice_ce":
        return DiceCE(cfg)
    if name == "generalized_dice":
        return _MonaiWrapped(name, GeneralizedDiceLoss(softmax=True, soft_label=True, **common))
    if name == "focal":
        return _MonaiWrapped(name, FocalLoss(include_background=cfg["include_background"], use_softmax=True,
                                             gamma=float(cfg.get("gamma", 2.0))))
    if name == "tversky":
        return _MonaiWrapped(name, TverskyLoss(softmax=True, alpha=float(cfg.get("alpha", 0.3)),
                                               beta=float(cfg.get("beta", 0.7)), soft_label=True, **common))
    if name == "soft_dice":
        return _MonaiWrapped(name, DiceLoss(softmax=True, soft_label=True, **common))
    # asymmetric losses
    if class_names is None:
        if isinstance(cfg.get("rare_classes"), list) and all(isinstance(i, int) for i in cfg["rare_classes"]) \
                and voxel_fractions is not None:
            class_names = [str(i) for i in range(len(voxel_fractions))]
        else:
            raise ValueError(f"loss {name!r} needs the class names (and voxel fractions) to know the rare classes")
    rare = resolve_rare_mask(class_names, voxel_fractions, cfg.get("rare_classes"),
                             float(cfg.get("rare_threshold", RARE_FRACTION)))
    loss_class = RareClassFocalLoss if name == "asym_focal" else RareClassLargeMarginLoss
    return loss_class(dict(cfg, **{k: settings.get(k, v) for k, v in loss_class.defaults.items()}), rare)
