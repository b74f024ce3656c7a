"""Asymmetric mixup and asymmetric adversarial inputs: regularisers that act on rare classes only.

Paper: Li, Kamnitsas & Glocker, "Analyzing overfitting under class imbalance in
neural networks for image segmentation", IEEE TMI 40(3), 2021 (early access
2020; MICCAI 2019 version: "Overfitting of neural nets under class imbalance:
analysis and improvements for segmentation").  Networks overfit the few voxels
of rare classes, whose logits then shift towards the decision boundary on
unseen images; the paper's asymmetric variants of mixup and adversarial
training (its section on the asymmetric modifications of regularisers)
regularise the rare classes only.  In our notation (``R`` the rare classes,
``margin`` the paper's mixup margin):

* :func:`asymmetric_mixup` (asymmetric mixup)::

      x~ = lam * x_a + (1 - lam) * x_b,          lam ~ Beta(alpha, alpha)
      y~ = onehot(y_a)                            where y_a in R and lam > margin
           onehot(y_b)                            where y_b in R and 1 - lam > margin
           lam * onehot(y_a) + (1 - lam) * onehot(y_b)   elsewhere

  (the labels of rare classes stay hard, so their logits are not pulled
  towards the boundary by soft targets);

* :func:`asymmetric_adversarial_input` (asymmetric adversarial training)::

      g     = grad_d  sum_{i : y_i in R} loss(f(x + d)_i, y_i),   |d| = xi (random start)
      x_adv = x + epsilon * g / ||g||_2

  (the input is perturbed in the direction that hurts the rare-class voxels
  most, and the network is then trained on ``x_adv``).

Which classes are rare is decided once, by :func:`imbalanceseglib.rare.resolve_rare_mask`;
the functions here take its result, ``rare_mask``: a length-``C`` sequence (or
tensor) of booleans.  Logits are ``(N, C, *spatial)``, integer labels
``(N, 1, *spatial)`` (``(N, *spatial)`` is accepted too), class 0 the background.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .class_weights import label_indices

__all__ = [
    "asymmetric_adversarial_input",
    "asymmetric_mixup",
    "mixup_lambda",
    "one_hot_voxels",
]


# --------------------------------------------------------------------------- #
# Asymmetric mixup (Li, Kamnitsas & Glocker)
# --------------------------------------------------------------------------- #


def _rare_tensor(rare_mask: Any, device: torch.device) -> torch.Tensor:
    if isinstance(rare_mask, torch.Tensor):
        r = rare_mask.detach().reshape(-1)
    else:
        r = torch.as_tensor(np.asarray(rare_mask)).reshape(-1)
    if r.numel() < 2:
        raise ValueError("rare_mask must have one boolean per class (at least 2 classes)")
    if r.dtype != torch.bool:
        if not bool(((r == 0) | (r == 1)).all()):
            raise ValueError(f"rare_mask must hold booleans, got {r.tolist()}")
        r = r != 0
    return r.to(device)


def mixup_lambda(alpha: float = 0.3, rng: np.random.Generator | int | None = None, scale: float = 1.0) -> float:
    """``scale * lam`` with ``lam ~ Beta(alpha, alpha)`` drawn once from ``rng`` (a Generator or a seed).

    ``scale`` 1 is plain mixup (what :func:`asymmetric_mixup` draws by itself); the reference
    code of Li, Kamnitsas & Glocker uses 0.8, so the second image always weighs at least 0.2
    (``TrainConfig.mixup["lambda_scale"]``).
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    scale = float(scale)
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return scale * float(gen.beta(alpha, alpha))


def asymmetric_mixup(x_a: torch.Tensor, y_a: torch.Tensor, x_b: torch.Tensor, y_b: torch.Tensor,
                     rare_mask: Sequence[bool] | torch.Tensor, alpha: float = 0.3, margin: float = 0.5,
                     rng: np.random.Generator | int | None = None, *,
                     lam: float | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup that keeps the labels of rare classes hard (Li, Kamnitsas & Glocker, TMI).

    ``lam ~ Beta(alpha, alpha)`` is drawn once for the batch from ``rng`` (a
    ``numpy.random.Generator``, or a seed; pass ``lam`` to set it yourself).
    ``lam`` is used as drawn (image a is *not* forced to dominate: neither the
    paper's code nor plain mixup takes ``max(lam, 1 - lam)``; the authors'
    released code instead draws ``0.8 * Beta(alpha, alpha)``, so that image b
    always keeps some weight: pass ``lam`` for that, as the trainer does with
    ``TrainConfig.mixup["lambda_scale"]``).

    * image: ``x_mix = lam * x_a + (1 - lam) * x_b``
    * target, per voxel, with ``w_a = lam`` and ``w_b = 1 - lam``:

      - if ``y_a`` is a rare class and ``w_a > margin`` (and not also ``y_b``
        rare with ``w_b > margin``): ``onehot(y_a)``, the hard rare label;
      - symmetrically, if ``y_b`` is rare and ``w_b > margin`` (and not ``y_a``
        likewise): ``onehot(y_b)``;
      - otherwise (non-rare voxels, rare voxels whose image weighs ``<= margin``,
        and the case where both qualify, possible only for ``margin < 0.5``):
        the usual soft target ``w_a * onehot(y_a) + w_b * onehot(y_b)``.

      The strict ``>`` follows the authors' code.  Every target sums to 1.  (The
      authors' code drops every voxel whose mixed target is not one-hot from
      the loss; here they keep the soft mixup target, and
      :func:`one_hot_voxels` gives the mask of the voxels to keep for the
      authors' rule, which the trainer passes to the loss with
      ``TrainConfig.mixup["soft_targets"]`` false.)

    ``x_a``/``x_b``: float ``(N, Cin, *spatial)``; ``y_a``/``y_b``: integer
    labels ``(N, 1, *spatial)`` or ``(N, *spatial)``; ``rare_mask``: one boolean
    per class (its length is the number of classes C).  Returns ``(x_mix,
    y_soft (N, C, *spatial) in x's float dtype, lam)``.
    """
    if x_a.shape != x_b.shape:
        raise ValueError(f"x_a and x_b must have the same shape, got {tuple(x_a.shape)} and {tuple(x_b.shape)}")
    if not x_a.is_floating_point() or not x_b.is_floating_point():
        raise TypeError("images must be floating point tensors")
    if x_a.dim() < 3:
        raise ValueError("images must be (N, Cin, *spatial)")
    margin = float(margin)
    if not 0.0 <= margin <= 1.0:
        raise ValueError(f"margin must be in [0, 1], got {margin!r}")
    rare = _rare_tensor(rare_mask, x_a.device)
    c = rare.numel()
    la = label_indices(y_a, x_a, c, "y_a").to(x_a.device)
    lb = label_indices(y_b, x_b, c, "y_b").to(x_a.device)
    if lam is None:
        lam = mixup_lambda(alpha, rng)
    lam = float(lam)
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")
    wa, wb = lam, 1.0 - lam
    x_mix = wa * x_a + wb * x_b
    dtype = x_a.dtype
    oh_a = F.one_hot(la, c).movedim(-1, 1).to(dtype)
    oh_b = F.one_hot(lb, c).movedim(-1, 1).to(dtype)
    soft = wa * oh_a + wb * oh_b
    keep_a = rare[la] & (wa > margin)
    keep_b = rare[lb] & (wb > margin)
    only_a = (keep_a & ~keep_b).unsqueeze(1)
    only_b = (keep_b & ~keep_a).unsqueeze(1)
    y_soft = torch.where(only_a, oh_a, torch.where(only_b, oh_b, soft))
    return x_mix, y_soft, lam


def one_hot_voxels(target: torch.Tensor) -> torch.Tensor:
    """Boolean ``(N, 1, *spatial)`` mask of the voxels whose (soft) target ``(N, C, *spatial)``
    is one-hot: exactly one class has a non-zero entry.

    Decided by the count of non-zero entries, not by comparing with 1, so a voxel whose
    two mixed images agree (``lam * onehot(k) + (1 - lam) * onehot(k)``, which rounding may
    leave one unit in the last place away from 1) counts as one-hot, and every voxel that
    mixes two classes does not.  With :func:`asymmetric_mixup` these are the voxels the
    authors' code keeps in the loss (the others get ``mask`` False in
    :mod:`imbalanceseglib.losses`).
    """
    if target.dim() < 3 or not target.is_floating_point():
        raise ValueError(f"target must be a float (N, C, *spatial) tensor, got {target.dtype} {tuple(target.shape)}")
    return (target != 0).sum(1, keepdim=True) == 1


# --------------------------------------------------------------------------- #
# Asymmetric adversarial training (Li, Kamnitsas & Glocker)
# --------------------------------------------------------------------------- #


def _unit_per_sample(d: torch.Tensor) -> torch.Tensor:
    """``d / ||d||_2`` per sample (over all non-batch dims), in float64; zero stays zero."""
    flat = d.detach().to(torch.float64).reshape(d.shape[0], -1)
    scale = flat.abs().amax(1, keepdim=True)          # rescale first: no under/overflow in the squares
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    flat = flat / scale
    norm = flat.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, flat / torch.where(norm > 0, norm, torch.ones_like(norm)), torch.zeros_like(flat))
    return unit.reshape(d.shape)


def asymmetric_adversarial_input(network: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                 rare_mask: Sequence[bool] | torch.Tensor, epsilon: float = 10.0,
                                 xi: float = 1e-6, loss: str = "ce", *,
                                 generator: torch.Generator | None = None,
                                 network_mode: str = "eval") -> torch.Tensor:
    """One-step adversarial input that targets the rare classes only (Li, Kamnitsas & Glocker, TMI).

    As in the authors' code, a random direction ``d`` (standard normal, scaled
    to L2 norm ``xi`` per sample) is added to the input, the loss on the
    **voxels whose label is a rare class** is evaluated at ``x + d``, and its
    gradient ``g`` with respect to the input gives the perturbation::

        r_adv = epsilon * g / ||g||_2        (per sample, over channels and voxels)
        x_adv = x + r_adv                    (detached)

    so each sample's perturbation has L2 norm ``epsilon``, in units of the
    (normalised) image intensities; the per-voxel size is about
    ``epsilon / sqrt(voxels per sample)`` (the authors' 3D U-Net used
    ``epsilon=10``, the default, on whole patches).  Train on ``x_adv`` with
    the usual loss in a following step.

    ``loss="ce"`` (default, the paper's choice): cross-entropy against the true
    labels, summed over rare-class voxels.  ``loss="kl"``: virtual adversarial
    (VAT-like) KL divergence between the predictions at ``x`` and ``x + d``,
    summed over rare-class voxels; it needs ``xi`` large enough that ``x + d``
    differs from ``x`` in the network's precision (e.g. ``xi`` about
    ``1e-3 * sqrt(voxels per sample)`` for float32), else the gradient is zero.

    Samples whose gradient is zero get no perturbation; in
    ``network_mode="eval"`` that includes every sample without rare voxels
    (with batch statistics such a sample can still be reached through the
    others).  A batch without any rare voxel is returned unchanged (a detached
    copy of ``x``), without running the network.

    ``network_mode="eval"`` (default) runs the network in eval mode (no dropout,
    per-sample batch-norm statistics, so each sample's direction depends on that
    sample only); ``"train"`` runs it in train mode as the authors did (batch
    statistics), restoring every buffer afterwards so batch-norm running
    statistics do not move.  The network's train/eval mode is restored, and no
    gradient is left in (or added to) its parameters' ``.grad``: the input
    gradient comes from :func:`torch.autograd.grad`.  ``generator`` seeds the
    random start.
    """
    if loss not in ("ce", "kl"):
        raise ValueError(f"loss must be 'ce' or 'kl', got {loss!r}")
    if network_mode not in ("eval", "train"):
        raise ValueError(f"network_mode must be 'eval' or 'train', got {network_mode!r}")
    if not x.is_floating_point() or x.dim() < 3:
        raise ValueError("x must be a floating point tensor (N, Cin, *spatial)")
    epsilon, xi = float(epsilon), float(xi)
    if not epsilon >= 0 or not xi >= 0:
        raise ValueError("epsilon and xi must be >= 0")
    rare = _rare_tensor(rare_mask, x.device)
    c = rare.numel()
    lab = label_indices(y, x, c, "y").to(x.device)
    rare_vox = rare[lab]
    x = x.detach()
    if not bool(rare_vox.any()) or epsilon == 0.0:
        return x.clone()

    was_training = network.training
    saved = [b.detach().clone() for b in network.buffers()] if network_mode == "train" else None
    try:
        network.train(network_mode == "train")
        d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if generator is not None \
            else torch.randn(x.shape, device=x.device, dtype=x.dtype)
        d = (xi * _unit_per_sample(d)).to(x.dtype).requires_grad_(True)
        with torch.enable_grad():
            if loss == "kl":
                with torch.no_grad():
                    logp_clean = torch.log_softmax(network(x).float(), dim=1)
            logits = network(x + d).float()
            if logits.shape[1] != c or tuple(logits.shape[2:]) != tuple(lab.shape[1:]):
                raise ValueError(f"network output {tuple(logits.shape)} does not match {c} classes and the "
                                 f"label shape {tuple(lab.shape)}")
            if loss == "ce":
                per_voxel = F.cross_entropy(logits, lab, reduction="none")
            else:
                logq = torch.log_softmax(logits, dim=1)
                per_voxel = (logp_clean.exp() * (logp_clean - logq)).sum(1)
            objective = (per_voxel * rare_vox.to(per_voxel.dtype)).sum()
            (grad,) = torch.autograd.grad(objective, d)
    finally:
        network.train(was_training)
        if saved is not None:
            with torch.no_grad():
                for b, s in zip(network.buffers(), saved):
                    b.copy_(s)
    r_adv = (epsilon * _unit_per_sample(grad)).to(x.dtype)
    return (x + r_adv).detach()
