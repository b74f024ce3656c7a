"""Segmentation metrics, one module per family; the public names are re-exported here.

* :mod:`.overlap` — confusion counts, Dice, IoU, sensitivity, precision
  (Metrics Reloaded, Maier-Hein et al., Nature Methods 2024), with the
  empty-structure policy.
* :mod:`.surface` — border-voxel distances, HD, HD95 and ASSD (Metrics Reloaded),
  normalised surface Dice on surface elements (Nikolov et al., J Med Internet
  Res 2021).
* :mod:`.calibration` — expected calibration error and reliability diagrams
  (Guo et al., ICML 2017), class-wise ECE (Kull et al., NeurIPS 2019),
  probability volumes and the QU-BraTS uncertainty score (Mehta et al., MELBA
  2022).

Per-case and per-folder evaluation, with the edge-case policies for empty and
image-wide structures, is :mod:`imbalanceseglib.evaluation`, built on these.
"""

from .calibration import (DEFAULT_BINS, DEFAULT_NEAR_RADIUS_MM, ReliabilityBins, calibration_report,
                          classwise_bins, global_bins, near_structure_region, probability_volumes, qubrats_score,
                          reliability_bins, render_reliability_diagram, write_reliability_diagram)
from .overlap import confusion_counts, dice_per_class, overlap_from_counts, overlap_metrics
from .surface import TOLERANCE_RELATIVE_SLACK, assd, hausdorff, surface_dice_from_masks, surface_distances

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_NEAR_RADIUS_MM",
    "ReliabilityBins",
    "TOLERANCE_RELATIVE_SLACK",
    "assd",
    "calibration_report",
    "classwise_bins",
    "confusion_counts",
    "dice_per_class",
    "global_bins",
    "hausdorff",
    "near_structure_region",
    "overlap_from_counts",
    "overlap_metrics",
    "probability_volumes",
    "qubrats_score",
    "reliability_bins",
    "render_reliability_diagram",
    "surface_dice_from_masks",
    "surface_distances",
    "write_reliability_diagram",
]
