"""Class-specific calibration and label-free per-class performance estimation.

The idea (Li, Kamnitsas, Islam, Chen and Glocker, "Estimating model performance under domain
shifts with class-specific confidence scores", MICCAI 2022, arXiv:2207.09957; the method the
MOVAL package implements): calibrate a per-voxel confidence score on labelled validation cases
so that it predicts how often the predicted class is right, then, on a new unlabelled case,
read Dice, sensitivity and precision off the calibrated scores. Our own implementation (no code
taken from MOVAL); ``Testing/Benchmarks/performance_estimation_differences.md`` lists where our
definitions knowingly differ from MOVAL's and why. One module per concept:

* :mod:`.scores`     confidence scores (MCP, entropy, energy, DOCTOR) and their doubt ``1 - s``;
* :mod:`.statistics` cases reduced once to histograms, and the calibration maps of the
  methods (plain, TS, DoC, ATC, TS-ATC; global or class-specific) on them;
* :mod:`.case_estimate` the estimate of one case from expected counts (Dice ``2 TP / (N + G)``),
  and of a cohort;
* :mod:`.accumulate` the expected counts summed piece by piece over a volume (streaming);
* :mod:`.estimator`  :class:`PerformanceEstimator` (the fitted parameters applied to logits) and
  :func:`estimator_from_card`: the one place a model card's ``calibration`` entry is read;
* :mod:`.fitting`    the global and class-specific fits on labelled cases;
* :mod:`.review`     the review flag of the performance table.

The public names are re-exported here. The torch-backed modules are imported on first use, so
``REVIEW_THRESHOLD``, ``review_flag`` and the card's method names can be used without PyTorch
(3D Slicer's module panel before the deep-learning packages are installed).
"""

from __future__ import annotations

import importlib
from typing import Any, List

from ..card import CONFIDENCE_SCORES
from ..card import ESTIMATION_METHODS as METHODS
from .review import REVIEW_THRESHOLD, review_flag

# public name -> the module that defines it (imported on first use: these need torch)
_LAZY = {
    "TEMPERATURE_GRID": "scores", "EstimationError": "scores", "energy_range": "scores",
    "CaseStatistics": "statistics", "case_statistics": "statistics", "add_binned_temperatures": "statistics",
    "CaseEstimate": "case_estimate", "cohort_estimate": "case_estimate",
    "PerformanceEstimator": "estimator", "estimator_from_card": "estimator",
    "EstimateAccumulator": "accumulate",
    "fit_estimator": "fitting",
}

__all__ = ["CONFIDENCE_SCORES", "METHODS", "REVIEW_THRESHOLD", "review_flag", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
