"""The Logic's label-free performance table on a slicer-core scene (issue #4)."""

import math

import pytest

from ImbalanceSeg import PERFORMANCE_KEYS, ImbalanceSegLogic
from ImbalanceSegSlicer import scene as sc
from test_logic import _bundle, _node_ids

N_VOX = 40 * 30 * 20
VOXEL_ML = 0.8 * 0.9 * 2.5 / 1000.0


def _cell(table, row, name):
    return table.GetValueByName(row, name).ToString()


def test_constant_model_gives_hand_computed_estimates_and_flags(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    logic = ImbalanceSegLogic(scene)
    # softmax([0, log 2, 0]) = [1/4, 1/2, 1/4] everywhere: every voxel is Sphere A with p = 1/2.
    result = logic.process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]), flagThreshold=0.7)
    a, b = result.performanceRows
    # Sphere A: TP = N/2, predicted N, expected reference N/2 -> Dice 2(N/2)/(N + N/2) = 2/3
    assert a["Estimated Dice"] == pytest.approx(2 / 3, abs=1e-5)
    assert a["Estimated sensitivity"] == pytest.approx(1.0, abs=1e-5)
    assert a["Estimated precision"] == pytest.approx(0.5, abs=1e-5)
    assert a["Volume"] == pytest.approx(N_VOX * VOXEL_ML)
    assert a["Expected volume"] == pytest.approx(N_VOX * VOXEL_ML / 2, rel=1e-5)
    assert a["Mean confidence"] == pytest.approx(0.5, abs=1e-5)
    assert a["State"] == "predicted" and a["Flag"] == "review"          # 0.667 < 0.7
    # Sphere B: never predicted, but a quarter of every voxel's probability -> possibly missed
    assert b["State"] == "possibly missed" and b["Estimated Dice"] == 0.0 and b["Flag"] == "review"
    assert b["Expected volume"] == pytest.approx(N_VOX * VOXEL_ML / 4, rel=1e-5)
    assert b["Estimated precision"] is None
    table = result.performanceTableNode.GetTable()
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())] == PERFORMANCE_KEYS
    assert table.GetValueByName(0, "Estimated Dice").ToDouble() == pytest.approx(2 / 3, abs=1e-5)
    assert _cell(table, 0, "Flag") == "review" and _cell(table, 1, "State") == "possibly missed"
    assert result.performanceTableNode.GetAttribute("ImbalanceSeg.Calibration") == "uncalibrated (plain confidence)"
    assert result.performanceTableNode in result.nodes()

    lower = logic.process(volume, _bundle(bias=[0.0, math.log(2.0), 0.0]), flagThreshold=0.6, baseName="second")
    assert [r["Flag"] for r in lower.performanceRows] == ["", "review"]
    assert lower.performanceTableNode.GetAttribute("ImbalanceSeg.FlagThreshold") == "0.6"


def test_card_calibration_changes_the_estimate(scene, synthetic):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    bundle = _bundle(bias=[0.0, math.log(2.0), 0.0])
    # Class-specific TS with a huge temperature for Sphere A's voxels: the calibrated
    # distribution there is (almost) uniform, q = 1/3 -> Dice 2(N/3)/(N + N/3) = 1/2.
    bundle.card["calibration"] = {"method": "ts", "class_specific": True, "temperature": [1.0, 1e5, 1.0]}
    result = ImbalanceSegLogic(scene).process(volume, bundle)
    assert result.performanceRows[0]["Estimated Dice"] == pytest.approx(0.5, abs=1e-4)
    assert result.calibration == "TS (class-specific, mcp confidence)"
    assert result.performanceTableNode.GetAttribute("ImbalanceSeg.Calibration") == result.calibration
    # the confidence maps are the calibrated probabilities
    from test_logic import _array
    assert float(_array(result.probabilityNodes[1]).mean()) == pytest.approx(1 / 3, abs=1e-4)


@pytest.mark.parametrize("bad", [1.5, -0.1, "high", True, None])
def test_invalid_flag_threshold_is_refused_and_scene_unchanged(scene, synthetic, bad):
    volume = sc.volume_node_from_sitk(scene, synthetic["image"], "Input")
    before = _node_ids(scene)
    with pytest.raises(ValueError, match="flagThreshold"):
        ImbalanceSegLogic(scene).process(volume, _bundle(), flagThreshold=bad)
    assert _node_ids(scene) == before
