"""The review flag of the performance table: one rule, used by every table that shows it.

A class is flagged "review" when the label-free estimate says it may have been missed (no
voxel predicted, but an expected volume of at least half a voxel: the state "possibly missed"
of :mod:`.estimator`), when the input checks found the estimate unreliable for it (state
"unreliable: <reasons>", :mod:`imbalanceseglib.input_checks`: an input unlike the training data,
or a predicted volume outside the training range) or its estimated Dice is below the flag
threshold (``REVIEW_THRESHOLD`` unless the user sets another). Standard library only: 3D Slicer's module applies it to a
loaded result before PyTorch is installed.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["REVIEW_THRESHOLD", "review_flag"]

#: Default flag threshold: classes whose estimated Dice is below it are flagged for review.
REVIEW_THRESHOLD = 0.7


def review_flag(state: str, dice: Optional[float], threshold: float = REVIEW_THRESHOLD) -> str:
    """``"review"`` when the class is possibly missed, its estimate is unreliable, or its
    estimated Dice (``None``: undefined, never flagged for it) is below ``threshold``; ``""`` otherwise."""
    if state == "possibly missed" or state.startswith("unreliable"):
        return "review"
    return "review" if dice is not None and dice < threshold else ""
