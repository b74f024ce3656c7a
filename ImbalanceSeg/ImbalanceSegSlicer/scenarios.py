"""The demo scenario, shared by the demo command, pytest and Slicer's test runner.

Loads the bundled demo volume and its reference labels into ``scene``, runs the
module Logic with the bundled demo model and returns what the tests assert.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional


#: The demo cases that ship with the extension. ``hippocampus`` is the main job's: a model
#: trained on 200 real patients (MSD Task04) and a held-out patient it never saw.
#: ``brain`` is a whole-head example with a very rare class (amygdala, 0.04 % of the voxels)
#: whose model was trained on synthetic variants of that one subject only.
DEMO_CASES: Dict[str, Dict[str, str]] = {
    "hippocampus": {"volume": "demo_hippocampus_image.nii.gz", "labels": "demo_hippocampus_labels.nii.gz",
                    "classes": "demo_hippocampus_classes.json", "model": "demo_hippocampus.imbseg",
                    "node": "DemoHippocampus"},
    "brain": {"volume": "demo_t1.nrrd", "labels": "demo_labels.nrrd", "classes": "classes.json",
              "model": "demo_brain.imbseg", "node": "DemoBrainT1"},
}
DEFAULT_DEMO_CASE = "hippocampus"
DEMO_MODEL_NAME = DEMO_CASES[DEFAULT_DEMO_CASE]["model"]


def repository_paths(case: str = DEFAULT_DEMO_CASE) -> Dict[str, Any]:
    """Files of one demo case (volume, labels, classes, model) and its volume node's name."""
    from ImbalanceSegSlicer.paths import bundled_models_dir, demo_data_dir
    if case not in DEMO_CASES:
        raise ValueError(f"unknown demo case {case!r}; demo cases: {', '.join(DEMO_CASES)}")
    files, demo = DEMO_CASES[case], demo_data_dir()
    return {"volume": demo / files["volume"], "labels": demo / files["labels"], "classes": demo / files["classes"],
            "model": bundled_models_dir() / files["model"], "node_name": files["node"], "case": case}


def load_demo_case(scene, paths: Optional[Dict[str, Any]] = None):
    """Add the demo volume and its reference segmentation to ``scene``; return both nodes."""
    from imbalanceseglib.images import read_image
    from ImbalanceSegSlicer import scene as sc

    paths = paths or repository_paths()
    name = paths.get("node_name", "DemoVolume")
    volume = sc.volume_node_from_sitk(scene, read_image(paths["volume"], "demo volume"), name)
    classes = json.loads(Path(paths["classes"]).read_text())
    fg = [c for c in classes if c["value"] > 0]
    reference = sc.segmentation_from_labelmap(scene, read_image(paths["labels"], "demo labels"), volume, fg,
                                              f"{name} reference")
    return volume, reference


def run_demo_scenario(scene, device: str = "cpu", progress=None, case: str = DEFAULT_DEMO_CASE) -> Dict[str, Any]:
    from ImbalanceSegSlicer.logic import ImbalanceSegLogic

    paths = repository_paths(case)
    volume, reference = load_demo_case(scene, paths)
    logic = ImbalanceSegLogic(scene)
    bundle = logic.loadModel(paths["model"])
    result = logic.process(volume, bundle, reference, device=device, progress=progress)
    seg = result.segmentationNode.GetSegmentation()
    names = [seg.GetSegment(seg.GetNthSegmentID(i)).GetName() for i in range(seg.GetNumberOfSegments())]
    recorded = bundle.card.get("demo_case", {}).get("per_class", {})
    dice = {r["Segment"]: r["Dice"] for r in result.rows}
    # The card records the Dice the model reached on the demo case when it was trained;
    # a run must reproduce it (small tolerance for floating point differences between builds).
    min_dice = {k: (recorded[k]["dice"] - 0.02 if k in recorded and recorded[k].get("dice") is not None else 0.0)
                for k in dice}
    estimated = {r["Segment"]: r["Estimated Dice"] for r in result.performanceRows}
    return {"volume": volume, "reference": reference, "result": result, "bundle": bundle,
            "segment_names": names, "class_names": result.classNames, "dice": dice, "min_dice": min_dice,
            "estimated_dice": estimated,
            # label-free estimate vs the reference: the calibrated demo model stays within 0.05 here
            "estimate_tolerance": 0.05}


def run_review_scenario(scene, demo: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Review the demo result: the least confident region of the smallest class, a lower
    threshold for it (more sensitive), the comparison with the reference before and after,
    and the way back to argmax. Returns what the tests assert."""
    from ImbalanceSegSlicer.logic import ImbalanceSegLogic
    from ImbalanceSegSlicer import scene as sc

    demo = demo or run_demo_scenario(scene)
    logic = ImbalanceSegLogic(scene)
    seg = demo["result"].segmentationNode
    fractions = demo["bundle"].card["training"]["class_voxel_fractions"]
    smallest = min(demo["class_names"][1:], key=lambda n: (fractions[n], n))  # the rarest class in training
    regions = logic.leastConfidentRegions(seg, smallest, count=3)
    before = {r["Segment"]: r for r in logic.compareWithReference(seg, demo["reference"])}
    counts_before = sc.segment_voxel_counts(seg)
    from ImbalanceSegSlicer import review
    c = review.class_index(seg, smallest)
    probs = review.probabilities_from_nodes(seg)
    at_argmax = review.expected_metrics(probs[c], probs.argmax(axis=0) == c)
    lowered = logic.setClassThreshold(seg, smallest, 0.2)
    after = {r["Segment"]: r for r in logic.compareWithReference(seg, demo["reference"])}
    counts_lowered = sc.segment_voxel_counts(seg)
    restored = logic.setClassThreshold(seg, smallest, None)
    counts_restored = sc.segment_voxel_counts(seg)
    return {"class": smallest, "regions": regions, "at_argmax": at_argmax, "before": before, "after": after, "lowered": lowered,
            "restored": restored, "counts_before": counts_before, "counts_lowered": counts_lowered,
            "counts_restored": counts_restored, "segment_id": smallest}
