"""A model trained on non-consecutive label values (0, 2, 5) in the module (issue #20 item 1):
the result segmentation's segments carry those values, so the scene's .seg.nrrd (and
``imbalanceseg predict --scene``'s) agrees with ``imbalanceseg predict``'s labels; reviewing
(thresholds) still works by class name. (Slicer's "Export to labelmap" numbers segments 1, 2, ...
unless a colour table is chosen; that is Slicer's own rule.)"""

import copy

import numpy as np
import SimpleITK as sitk

from imbalanceseglib.bundle import ModelBundle

from ImbalanceSegSlicer import scene as sc
from ImbalanceSegSlicer.logic import ImbalanceSegLogic
from test_logic import _bundle


def _mapped_bundle():
    plain = _bundle(seed=4)
    card = copy.deepcopy(plain.card)
    for c, lv in zip(card["classes"], (0, 2, 5)):
        c["label_value"] = lv
    return plain, ModelBundle(card=card, network=plain.network)


def test_segments_keep_the_training_label_values(scene, synthetic, tmp_path):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    plain_bundle, mapped_bundle = _mapped_bundle()
    plain = logic.process(volume, plain_bundle, baseName="plain")
    mapped = logic.process(volume, mapped_bundle, baseName="mapped")
    seg = mapped.segmentationNode.GetSegmentation()
    values = {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetLabelValue()
              for i in range(seg.GetNumberOfSegments())}
    names = [c["name"] for c in plain_bundle.card["classes"]]
    assert values == {names[1]: 2, names[2]: 5}
    # the same voxels as the model on indices, with the user's values
    assert sc.segment_voxel_counts(mapped.segmentationNode) == sc.segment_voxel_counts(plain.segmentationNode)
    # the saved .seg.nrrd (what Slicer writes and reads back) holds the user's values
    saved = {}
    for key, result in (("plain", plain), ("mapped", mapped)):
        path = sc.save_node(scene, result.segmentationNode, str(tmp_path / f"{key}.seg.nrrd"))
        saved[key] = sitk.ReadImage(str(path))
    assert {saved["mapped"].GetMetaData(f"Segment{i}_LabelValue") for i in range(2)} == {"2", "5"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(saved["mapped"]),
                                  np.array([0, 2, 5], np.uint8)[sitk.GetArrayFromImage(saved["plain"])])
    # review by name still works: a lower threshold grows the class
    counts = sc.segment_voxel_counts(mapped.segmentationNode)
    logic.setClassThreshold(mapped.segmentationNode, names[1], 0.05)
    assert sc.segment_voxel_counts(mapped.segmentationNode)[names[1]] >= counts[names[1]]
