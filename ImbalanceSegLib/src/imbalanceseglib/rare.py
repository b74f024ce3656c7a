"""Which classes count as rare: the one rule every part of the library uses.

The methods for class imbalance in this library act on the *under-represented*
classes only: the asymmetric losses (:mod:`imbalanceseglib.losses`) and the
asymmetric mixup and adversarial inputs (:mod:`imbalanceseglib.perturbations`)
of Li, Kamnitsas & Glocker ("Analyzing overfitting under class imbalance in
neural networks for image segmentation", IEEE TMI 2021), and the stronger
augmentation of patches around rare classes (Li et al., class-specific
augmentation, IEEE TMI 2023; :mod:`imbalanceseglib.augment`).  The papers pick
those classes by hand (the foreground of a binary task); no paper equation is
implemented here.  This library's rule, with ``f_c`` the fraction of the
training voxels labelled ``c``::

    c is rare  <=>  c >= 1  and  f_c < threshold          (threshold: RARE_FRACTION = 0.01)

unless the rare classes are named explicitly (``TrainConfig.rare_classes``, the
loss setting ``rare_classes``).  The background (class 0) is never rare.  One
switch, ``absent_is_rare``, says what a class with no training voxel at all
(``f_c = 0``) is: rare (the default, used by training and the losses) or not
(used by :func:`imbalanceseglib.augment.rare_classes_by_fraction`, which works
from counts where a zero means "not in this data set").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # torch is imported when a mask is built, so that importing this module needs no torch
    import torch

__all__ = ["RARE_FRACTION", "resolve_rare_mask"]

#: Default voxel-fraction threshold under which a foreground class is rare.
RARE_FRACTION = 0.01


def resolve_rare_mask(class_names: Optional[Sequence[str]] = None,
                      voxel_fractions: Optional[Sequence[float]] = None,
                      rare_classes: Optional[Sequence[Any]] = None, threshold: float = RARE_FRACTION, *,
                      voxel_counts: Optional[Sequence[float]] = None,
                      absent_is_rare: bool = True) -> torch.Tensor:
    """Boolean (C,) mask of the classes treated as rare (under-represented).

    ``rare_classes`` (names, which need ``class_names``, or foreground indices)
    chooses them explicitly; an unknown name or the background raises
    ``ValueError``.  Otherwise every foreground class whose voxel fraction is
    below ``threshold`` (the module's rule), from ``voxel_fractions`` or from
    ``voxel_counts`` (turned into fractions of their sum; counts summing to zero
    give all fractions 0).  With ``absent_is_rare=False`` a class with fraction 0
    is not rare.  The number of classes ``C`` is ``len(class_names)``, or the
    number of fractions/counts when no names are given.
    """
    import torch

    if voxel_counts is not None:
        if voxel_fractions is not None:
            raise ValueError("pass voxel_fractions or voxel_counts, not both")
        counts = np.asarray(voxel_counts, dtype=np.float64).reshape(-1)
        total = counts.sum()
        voxel_fractions = counts / total if total > 0 else np.zeros_like(counts)
    if class_names is not None:
        names = list(class_names)
    elif voxel_fractions is not None:
        names = [str(i) for i in range(len(voxel_fractions))]
    else:
        raise ValueError("the rare-class mask needs the class names or the classes' voxel fractions")
    mask = torch.zeros(len(names), dtype=torch.bool)
    if rare_classes is not None:
        unknown = []
        for item in rare_classes:
            if isinstance(item, str):
                if item not in names[1:]:
                    unknown.append(item)
                else:
                    mask[names.index(item)] = True
            elif isinstance(item, int) and not isinstance(item, bool) and 0 < item < len(names):
                mask[item] = True
            else:
                unknown.append(item)
        if unknown:
            raise ValueError(f"rare_classes {unknown} are not foreground classes; known: {names[1:]}")
        return mask
    if voxel_fractions is None:
        raise ValueError("the rare-class mask needs the classes' voxel fractions or explicit rare_classes")
    if len(voxel_fractions) != len(names):
        raise ValueError(f"{len(voxel_fractions)} voxel fractions for {len(names)} classes")
    for k in range(1, len(names)):
        fraction = float(voxel_fractions[k])
        mask[k] = fraction < float(threshold) and (absent_is_rare or fraction > 0)
    return mask
