"""The end-of-training summary of classes never learned, and the named class weights of the
progress line (issue #20, item 3)."""

import re

import numpy as np
import pytest
import torch

from imbalanceseglib import events as ev
from imbalanceseglib import training_loop
from imbalanceseglib.bundle import load_bundle
from imbalanceseglib.presets import METHOD_PRESETS
from imbalanceseglib.training import TrainConfig, make_case, train
from imbalanceseglib.training_loop import learning_check

from libtest_helpers import sphere_case

# the sphere cases' labels (1: a large ball, 2: a small bead) under names with a space
CLASSES = [{"value": 0, "name": "Background", "color": [0, 0, 0]},
           {"value": 1, "name": "Liver", "color": [1, 0, 0]},
           {"value": 2, "name": "Right kidney", "color": [0, 1, 0]}]


def _config(**changes):
    d = dict(name="summary", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
             features=[4, 8], iterations=2, batch_size=2, learning_rate=1e-2, val_every=1000,
             checkpoint_every=1000, log_every=1, normalization={"scheme": "none"}, seed=3)
    d.update(changes)
    return TrainConfig.from_dict(d)


@pytest.fixture
def cases():
    return [make_case(*sphere_case(s), name=f"c{s}") for s in range(3)]


@pytest.fixture
def liver_only_network(monkeypatch):
    """Validation sees a "network" that finds the liver (intensity 1, and the kidney's 2, as
    liver) and never predicts the right kidney, whatever the training did: one class learned,
    one never learned, deterministically."""
    def logits(network, image, patch_size, overlap=0.5):
        out = torch.zeros((1, len(CLASSES)) + image.shape)
        out[0, 1] = torch.from_numpy((image > 0.5).astype(np.float32)) * 10.0
        return out
    monkeypatch.setattr(training_loop, "sliding_window_logits", logits)


def _weights_of(line):
    match = re.search(r"  weights (.*)$", line)
    assert match, line
    return match.group(1)


def _named(weights):
    return f"Background={weights[0]:.2f} Liver={weights[1]:.2f} Right kidney={weights[2]:.2f}"


# --------------------------------------------------------------------------- progress line


def test_progress_line_names_each_class_weight(tmp_path, cases):
    logs = []
    card = load_bundle(train(_config(method="disw"), cases, [], tmp_path, log=logs.append)).card
    lines = [m for m in logs if m.startswith("iter ")]
    history = [h["class_weights"] for h in card["training"]["history"] if "class_weights" in h]
    assert len(lines) == len(history) == 2
    for line, weights in zip(lines, history):
        assert _weights_of(line) == _named(weights)
    assert re.fullmatch(r"Background=\d+\.\d\d Liver=\d+\.\d\d Right kidney=\d+\.\d\d", _weights_of(lines[0]))
    # DisW starts from the training voxel counts: the rarest class weighs most
    assert history[0][2] > history[0][1] > history[0][0]


def test_semi_supervised_line_names_both_networks_weights_and_the_summary_names_the_unlearned_class(
        tmp_path, cases, liver_only_network):
    unlabelled = [make_case(sphere_case(100 + s)[0], np.zeros((32, 32, 32), np.uint8), name=f"u{s}")
                  for s in range(2)]
    logs, got = [], []
    path = train(_config(method="cps_weighted_floor"), cases[:2], cases[2:], tmp_path, log=logs.append,
                 unlabeled_cases=unlabelled, events=got.append)
    card = load_bundle(path).card
    lines = [m for m in logs if m.startswith("iter ")]
    history = [h for h in card["training"]["history"] if "loss" in h]
    assert len(lines) == len(history) == 2
    for line, h in zip(lines, history):
        assert _weights_of(line) == f"A {_named(h['class_weights_a'])}; B {_named(h['class_weights_b'])}"
    # the summary is the supervised one, with the semi-supervised methods to try
    never = [m for m in logs if m.startswith("[train] never learned:")]
    assert len(never) == 1 and never[0].startswith("[train] never learned: Right kidney (validation Dice 0.000 "
                                                   "at iteration 2; never predicted; ")
    # cps_weighted_floor is the one semi-supervised method suggested; it is this run's, so no method is suggested
    assert "rare-class method" not in never[0] and "more iterations (this run: 2)" in never[0]
    assert [e for e in got if e["event"] == "warning"] == [ev.warning("never_learned", never[0], ["Right kidney"])]
    assert card["training"]["never_learned"] == ["Right kidney"]


# --------------------------------------------------------------------------- end-of-training summary


def test_summary_names_exactly_the_class_never_learned_also_when_resumed_after_the_end(
        tmp_path, cases, liver_only_network):
    logs, got = [], []
    path = train(_config(method="dice_ce"), cases[:2], cases[2:], tmp_path, log=logs.append, events=got.append)
    card = load_bundle(path).card
    val = card["validation"]["per_class"]
    assert val["Liver"]["dice"] > 0.5 and val["Right kidney"]["dice"] == 0.0
    kidney_share = card["training"]["class_voxel_fractions"]["Right kidney"]
    expected = ("[train] never learned: Right kidney (validation Dice 0.000 at iteration 2; never predicted; "
                f"{100 * kidney_share:.2g}% of the training voxels). Try: a rare-class method (method "
                '"disw_floor" or "asym_large_margin"), more iterations (this run: 2), a larger foreground_fraction '
                "(now 0.67), or check that it is labelled the same way in the training and the validation cases.")
    assert [m for m in logs if m.startswith("[train]")] == [expected]
    warnings = [e for e in got if e["event"] == "warning"]
    assert warnings == [{"event": "warning", "kind": "never_learned", "message": expected,
                         "classes": ["Right kidney"]}]
    assert got.index(warnings[0]) == len(got) - 1 and got[-2] == ev.artifact("bundle", path)  # after the bundle
    assert card["training"]["never_learned"] == ["Right kidney"]
    assert val["Right kidney"]["predicted_voxels"] == 0 and val["Right kidney"]["reference_voxels"] > 0
    # a resumed run that had nothing left to do says it again
    logs, got = [], []
    train(_config(method="dice_ce"), cases[:2], cases[2:], tmp_path, log=logs.append, events=got.append)
    assert any(m.startswith("resuming from") and "at iteration 2/2" in m for m in logs)
    assert not any(m.startswith("iter ") for m in logs)
    assert [m for m in logs if m.startswith("[train]")] == [expected]
    assert [e for e in got if e["event"] == "warning"] == warnings


def _validation(liver, kidney, predicted_kidney=0):
    def entry(dice, predicted):
        return {"dice": dice, "sensitivity": dice, "precision": dice, "cases_defined": 0 if dice is None else 1,
                "reference_voxels": 0 if dice is None else 50, "predicted_voxels": predicted}
    return {"cases": 1, "per_class": {"Liver": entry(liver, 900 if liver else 0),
                                      "Right kidney": entry(kidney, predicted_kidney)}}


COUNTS = np.array([9000, 900, 100])


def test_learning_check_says_what_it_saw_and_only_suggests_real_options():
    assert set(training_loop._SUGGESTED_SUPERVISED + training_loop._SUGGESTED_SEMI_SUPERVISED) <= set(METHOD_PRESETS)
    # every class learned, a poorly learned one too (Dice 0.3): nothing to warn about
    check = learning_check(_config(), _validation(0.9, 0.3), [], [], COUNTS)
    assert check == {"never_learned": [], "barely_learned": [], "warnings": [],
                     "message": "[train] every class was learned (validation Dice at least 0.05 at iteration 2)."}
    # found but under 0.05 (0.010): barely learned, said with what it had before and what to try
    history = [{"iteration": 1, "val": {"Liver": {"dice": 0.5}, "Right kidney": {"dice": 0.2}}}]
    check = learning_check(_config(), _validation(0.9, 0.01, predicted_kidney=7), history, [], COUNTS)
    assert (check["never_learned"], check["barely_learned"], check["message"]) == ([], ["Right kidney"], None)
    assert check["warnings"] == [{"kind": "barely_learned", "classes": ["Right kidney"], "message": (
        "[train] barely learned: Right kidney (validation Dice 0.010 at iteration 2, under 0.05; it had Dice 0.200 "
        'at iteration 1; 1% of the training voxels). Try: a rare-class method (method "disw_floor" or "asym_large_margin"), '
        "more iterations (this run: 2), a larger foreground_fraction (now 0.67), or check that it is labelled the "
        "same way in the training and the validation cases.")}]
    assert training_loop.BARELY_LEARNED_DICE == 0.05
    # exactly at the threshold counts as learned
    assert learning_check(_config(), _validation(0.9, 0.05), [], [], COUNTS)["barely_learned"] == []
    # an asymmetric method that does not treat the class as rare; learned earlier, then lost
    cfg = _config(method="asym_focal", rare_classes=["Liver"], foreground_fraction=1.0, iterations=300)
    history = [{"iteration": 100, "val": {"Liver": {"dice": 0.5}, "Right kidney": {"dice": 0.0}}},
               {"iteration": 200, "val": {"Liver": {"dice": 0.7}, "Right kidney": {"dice": 0.25}}}]
    check = learning_check(cfg, _validation(0.8, 0.0, predicted_kidney=12), history, ["Liver"], COUNTS)
    assert check["never_learned"] == ["Right kidney"] and check["message"] is None
    assert check["warnings"] == [{"kind": "never_learned", "classes": ["Right kidney"], "message": (
        "[train] never learned: Right kidney (validation Dice 0.000 at iteration 300; predicted only outside its "
        "reference (12 voxels); it had Dice 0.250 at iteration 200; 1% of the training voxels). Try: another "
        'rare-class method (method "disw_floor" or "asym_large_margin"), naming Right kidney in rare_classes (the rare '
        "classes now: Liver), more iterations (this run: 300), or check that it is labelled the same way in the "
        "training and the validation cases.")}]
    # a class in no validation case cannot be checked: said so, not called learned or unlearned
    check = learning_check(_config(), _validation(0.6, None), [], [], COUNTS)
    assert check["never_learned"] == []
    assert check["message"] == "[train] learned: Liver (validation Dice at least 0.05 at iteration 2)."
    assert check["warnings"] == [{"kind": "not_checked", "classes": ["Right kidney"], "message": (
        "[train] not checked whether Right kidney was learned: in no validation case (and never predicted "
        "there). Add validation cases that contain it.")}]
    # no validation cases: nothing can be checked, and the card says so with null
    check = learning_check(_config(), {"per_class": {}, "cases": 0}, [], [], COUNTS)
    assert check["never_learned"] is None and check["barely_learned"] is None and check["message"] is None
    assert [(w["kind"], w["classes"]) for w in check["warnings"]] == [("not_checked", ["Liver", "Right kidney"])]
    assert "there were no validation cases" in check["warnings"][0]["message"]
    # two classes never learned, semi-supervised without class weights
    check = learning_check(_config(method="cps"), _validation(0.0, 0.0), [], [], COUNTS)
    assert check["never_learned"] == ["Liver", "Right kidney"]
    message = check["warnings"][0]["message"]
    assert message.startswith("[train] never learned: Liver (validation Dice 0.000 at iteration 2; never "
                              "predicted; 9% of the training voxels), Right kidney (")
    assert 'a rare-class method (method "cps_weighted_floor")' in message
    assert message.endswith("or check that they are labelled the same way in the training and the validation cases.")
