"""Deep supervision: auxiliary outputs at the U-Net's coarser decoder levels, trained with
down-weighted losses and dropped at inference.

Dou et al., "3D deeply supervised network for automated segmentation of volumetric medical
images" (MedIA 41, 2017), supervise hidden layers of a 3D network through auxiliary
classifiers so that the early layers get a direct gradient; nnU-Net (Isensee et al., Nature
Methods 2021) does this for every decoder level of its U-Net with weights halving from level to
level.  Here (``TrainConfig.deep_supervision``, settings and the exact weights in
:data:`imbalanceseglib.train_config.DEEP_SUPERVISION_DEFAULTS`):

* :class:`AuxiliaryHeads`: one 1x1x1 convolution (decoder features -> class logits) per
  supervised decoder level ``k`` (``2**k`` times coarser than the input).  The heads belong to
  the trainer, not to the network: they are optimised with it and saved in the training
  checkpoint (``deep_supervision`` entry, :mod:`imbalanceseglib.checkpoints`), never in the model
  bundle, whose network, parameters and state-dict keys are those of a run without deep
  supervision; inference never computes an auxiliary output.
* :func:`deep_outputs`: the network's logits and the auxiliary outputs of one forward pass; the
  decoder features come from the ``on_decoder`` hook of
  :meth:`UNet3D.walk <imbalanceseglib.networks.UNet3D.walk>`, through the module or the CPU
  training path (:mod:`imbalanceseglib.training_engine`), whose backward functions carry the
  auxiliary gradients.
* :class:`DeepSupervisionLoss`: ``sum_k w_k * loss(output_k, target_k, class_weights, mask_k)``
  for any loss built by :func:`imbalanceseglib.losses.build_loss`.  Output 0 (full resolution)
  gets the target and mask as given; each auxiliary output is compared at its own resolution
  with :func:`downsample_target` (the one-hot or soft target averaged over each block of
  ``2**k`` voxels a side: a coarse voxel's class fractions, so a structure smaller than a block
  stays present as a fraction instead of vanishing as with nearest-neighbour subsampling; the
  losses take soft targets) and :func:`downsample_mask` (a coarse voxel is kept only where all
  its fine voxels are).  Class weights (DisW/DifW/CDifW) are the same for every output and
  keep following the full-resolution output.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .losses import soft_target, voxel_mask

__all__ = ["AuxiliaryHeads", "DeepSupervisionLoss", "card_entry", "deep_outputs", "downsample_mask",
           "downsample_target", "halving_weights", "output_weights"]


def halving_weights(outputs: int) -> List[float]:
    """nnU-Net's weights for ``outputs`` outputs, full resolution first: ``1, 1/2, 1/4, ...``
    divided by their sum (3 outputs: 4/7, 2/7, 1/7; 4 outputs: 8/15, 4/15, 2/15, 1/15)."""
    if outputs < 1:
        raise ValueError(f"deep supervision needs at least one output, got {outputs}")
    raw = [0.5 ** k for k in range(outputs)]
    total = sum(raw)
    return [w / total for w in raw]


def output_weights(settings: Dict[str, Any]) -> List[float]:
    """The weight of each output, full resolution first, summing to 1, from the filled-in settings
    (``TrainConfig.deep_supervision_settings``)."""
    if settings["weights"] == "halving":
        return halving_weights(int(settings["levels"]) + 1)
    raw = [float(w) for w in settings["weights"]]
    total = sum(raw)
    return [w / total for w in raw]


def card_entry(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The model card's ``training.deep_supervision``: the settings, each output's resolution
    (level ``k``: 1/2**k) and weight, and what inference uses."""
    weights = output_weights(settings)
    return {"enabled": True, "levels": int(settings["levels"]), "weights": settings["weights"],
            "outputs": [{"level": k, "scale": 0.5 ** k, "weight": w} for k, w in enumerate(weights)],
            "inference": "full-resolution output only (the auxiliary heads are not in the bundle)"}


class AuxiliaryHeads(nn.Module):
    """1x1x1 convolutions from the decoder features of levels ``1 .. levels`` (``features[k]``
    channels at level ``k``) to ``out_channels`` class logits; called with ``{level: features}``,
    returns the auxiliary logits, level 1 first."""

    def __init__(self, features: Sequence[int], out_channels: int, levels: int):
        super().__init__()
        features = [int(f) for f in features]
        if not 1 <= int(levels) <= len(features) - 2:
            raise ValueError(f"a U-Net of features {features} has 1..{len(features) - 2} decoder levels below the "
                             f"full resolution, got levels {levels!r}")
        self.levels = list(range(1, int(levels) + 1))
        self.heads = nn.ModuleList(nn.Conv3d(features[k], int(out_channels), 1) for k in self.levels)

    def forward(self, decoder: Dict[int, torch.Tensor]) -> List[torch.Tensor]:
        return [head(decoder[k]) for k, head in zip(self.levels, self.heads)]


def deep_outputs(forward: Callable[..., torch.Tensor], heads: AuxiliaryHeads, x: torch.Tensor,
                 rows: Optional[slice] = None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``(logits, auxiliary outputs)`` of one training forward pass: ``forward`` is the network or
    :func:`imbalanceseglib.training_engine.training_forward`'s function (both take the
    ``on_decoder`` hook); ``rows`` (default all) picks the samples the heads run on, e.g. the
    labelled ones of a semi-supervised batch (the logits keep every sample)."""
    found: Dict[int, torch.Tensor] = {}
    wanted = set(heads.levels)

    def keep(level: int, features: torch.Tensor) -> None:
        if level in wanted:
            found[level] = features if rows is None else features[rows]

    logits = forward(x, on_decoder=keep)
    missing = wanted - set(found)
    if missing:
        raise ValueError(f"the network gave no decoder features at levels {sorted(missing)}")
    return logits, heads(found)


def _factors(fine: Sequence[int], coarse: Sequence[int]) -> List[int]:
    if len(fine) != len(coarse) or any(c < 1 or f % c for f, c in zip(fine, coarse)):
        raise ValueError(f"an auxiliary output of spatial shape {tuple(coarse)} does not divide the target's "
                         f"{tuple(fine)}")
    return [f // c for f, c in zip(fine, coarse)]


def _blocks(t: torch.Tensor, factors: Sequence[int]) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """(N, C, D, H, W) as (N, C, D/f, f, H/f, f, W/f, f) (a view) and the block axes."""
    shape = list(t.shape[:2])
    for size, f in zip(t.shape[2:], factors):
        shape += [size // f, f]
    return t.reshape(shape), tuple(range(3, 2 + 2 * len(factors), 2))


def downsample_target(target: torch.Tensor, num_classes: int, shape: Sequence[int],
                      like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The (N, C, *shape) soft target of a coarser output: the one-hot (from labels (N, 1, ...))
    or soft (N, C, ...) target averaged over each block of fine voxels (its class fractions).
    A 4x4x4 label map with one voxel of class 1 gives, at 2x2x2, ``1/8`` of class 1 and ``7/8``
    of class 0 in the coarse voxel that holds it."""
    t = soft_target(target, num_classes, like if like is not None else torch.empty((), dtype=torch.float32))
    factors = _factors(t.shape[2:], shape)
    if all(f == 1 for f in factors):
        return t
    blocks, axes = _blocks(t, factors)
    return blocks.mean(axes)


def downsample_mask(mask: Optional[torch.Tensor], like: torch.Tensor, shape: Sequence[int]) -> Optional[torch.Tensor]:
    """A voxel mask (boolean (N, 1, ...) or (N, ...) like the full-resolution output ``like``) at
    spatial ``shape``: a coarse voxel is kept only where all its fine voxels are (min-pooling)."""
    m = voxel_mask(mask, like)
    if m is None:
        return None
    factors = _factors(m.shape[2:], shape)
    blocks, axes = _blocks(m, factors)
    return blocks.amin(axes) if any(f > 1 for f in factors) else m


class DeepSupervisionLoss(nn.Module):
    """``sum_k weights[k] * loss(outputs[k], target_k, class_weights, mask_k)`` (see the module
    docstring); ``outputs[0]`` is the full-resolution output and gets ``target`` and ``mask`` as
    given, the others the downsampled ones of their own resolution."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], target: torch.Tensor, class_weights=None,
                mask=None) -> torch.Tensor:
        if len(outputs) != len(self.weights):
            raise ValueError(f"deep supervision weighs {len(self.weights)} outputs, got {len(outputs)}")
        main = outputs[0]
        total = self.weights[0] * self.loss(main, target, class_weights=class_weights, mask=mask)
        fine: Optional[torch.Tensor] = None
        for w, out in zip(self.weights[1:], outputs[1:]):
            if not w:
                continue
            if fine is None:  # the full-resolution soft target, made once
                fine = soft_target(target, main.shape[1], main)
            shape = out.shape[2:]
            total = total + w * self.loss(out, downsample_target(fine, main.shape[1], shape, main),
                                          class_weights=class_weights, mask=downsample_mask(mask, main, shape))
        return total
