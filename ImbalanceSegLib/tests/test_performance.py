"""Calibration and label-free performance estimation (imbalanceseglib.estimation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from imbalanceseglib import estimation as pe
from imbalanceseglib.bundle import BundleError, load_bundle, save_bundle, validate_card
from imbalanceseglib.inference import apply_calibration
from imbalanceseglib.metrics import overlap_metrics
from imbalanceseglib.networks import build_network


def _sample_labels(prob: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per voxel drawn from the per-voxel distribution prob (C, V)."""
    cum = prob.cumsum(0)
    u = rng.random(prob.shape[1])
    return np.minimum((u[None] > cum).sum(0), prob.shape[0] - 1)


def _case(temperature, seed, c=4, v=60000, shape=(30, 40, 50)):
    """Logits (C, *shape) and labels drawn from softmax(z / T_pred): a model whose
    calibration is known exactly (T = 1: perfectly calibrated by construction)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 3.0, (c, v)).astype(np.float32)
    z[0] += 3.0  # background dominates, like in segmentation
    temps = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (c,))
    t_vox = temps[z.argmax(0)]
    prob = torch.softmax(torch.from_numpy(z / t_vox[None].astype(np.float32)), 0).numpy()
    lab = _sample_labels(prob, rng)
    return z.reshape((c,) + shape), lab.reshape(shape)


def _true(logits, labels):
    return np.array([np.nan if m["dice"] is None else m["dice"]
                     for m in overlap_metrics(logits.argmax(0), labels, logits.shape[0])])


# ----------------------------------------------------------------------------- worked by hand

def test_estimate_matches_hand_computation_with_expected_false_negatives():
    # Four voxels, two classes.  Softmax probabilities of class 1: 0.8, 0.6 (predicted 1)
    # and 0.1, 0.3 (predicted background).
    p1 = np.array([0.8, 0.6, 0.1, 0.3])
    z = np.stack([np.zeros(4), np.log(p1 / (1 - p1))]).astype(np.float32)
    est = pe.PerformanceEstimator(method="none", num_classes=2).estimate(z)
    row = est.classes[1]
    # TP = 0.8 + 0.6; N = 2; expected reference G = TP + 0.1 + 0.3 (false negatives in
    # the voxels predicted background) = 1.8.
    assert row["expected_tp"] == pytest.approx(1.4, abs=1e-6)
    assert row["expected_voxels"] == pytest.approx(1.8, abs=1e-6)
    assert row["dice"] == pytest.approx(2 * 1.4 / (2 + 1.8), abs=1e-6)
    assert row["sensitivity"] == pytest.approx(1.4 / 1.8, abs=1e-6)
    assert row["precision"] == pytest.approx(0.7, abs=1e-6)
    bg = est.classes[0]
    assert bg["expected_tp"] == pytest.approx(0.9 + 0.7, abs=1e-6)
    assert bg["dice"] == pytest.approx(2 * 1.6 / (2 + 1.6 + 0.2 + 0.4), abs=1e-6)


def test_doc_and_atc_by_hand():
    p1 = np.array([0.8, 0.6, 0.1, 0.3])
    z = np.stack([np.zeros(4), np.log(p1 / (1 - p1))]).astype(np.float32)
    doc = pe.PerformanceEstimator(method="doc", offset=[0.0, 0.1], num_classes=2).estimate(z)
    # class 1 voxels: q = 0.7, 0.5 -> TP 1.2; background voxels keep 0.9, 0.7 -> leak 0.4
    assert doc.classes[1]["expected_tp"] == pytest.approx(1.2, abs=1e-6)
    assert doc.classes[1]["expected_voxels"] == pytest.approx(1.6, abs=1e-6)
    atc = pe.PerformanceEstimator(method="atc", threshold=[0.8, 0.7], num_classes=2).estimate(z)
    # class 1: 0.8 > 0.7 counts as correct, 0.6 does not; background: 0.9 > 0.8 correct,
    # 0.7 not -> its whole mass goes to class 1 (the only other class).
    assert atc.classes[1]["expected_tp"] == pytest.approx(1.0)
    assert atc.classes[1]["expected_voxels"] == pytest.approx(2.0)
    assert atc.classes[1]["dice"] == pytest.approx(0.5)
    assert atc.classes[0]["expected_tp"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- recovery

def test_global_temperature_scaling_recovers_the_true_temperature():
    cases = [_case(2.0, seed) for seed in range(3)]
    est = pe.fit_estimator(cases, method="ts", class_specific=False)
    assert est.temperature[0] == pytest.approx(2.0, rel=0.03)
    assert len(set(est.temperature)) == 1


def test_class_specific_temperatures_follow_each_class():
    temps = [1.0, 0.5, 2.0, 3.0]
    cases = [_case(temps, seed, v=120000, shape=(40, 50, 60)) for seed in range(3)]
    est = pe.fit_estimator(cases, method="ts", class_specific=True)
    fitted = np.asarray(est.temperature)
    glob = pe.fit_estimator(cases, method="ts", class_specific=False)
    # each class gets its own temperature, ordered like the truth and close to it
    assert list(np.argsort(fitted[1:])) == list(np.argsort(temps[1:]))
    np.testing.assert_allclose(fitted[1:], temps[1:], rtol=0.2)
    assert len(set(glob.temperature)) == 1


def test_atc_recovers_a_known_threshold():
    # Voxels are right exactly when their max-probability exceeds 0.8.
    rng = np.random.default_rng(3)
    c, v = 3, 90000
    z = rng.normal(0, 2.0, (c, v)).astype(np.float32)
    p = torch.softmax(torch.from_numpy(z), 0).numpy()
    pred = z.argmax(0)
    wrong = (pred + 1 + rng.integers(0, c - 1, v)) % c
    lab = np.where(p.max(0) > 0.8, pred, wrong)
    est = pe.fit_estimator([(z.reshape(c, 30, 30, 100), lab.reshape(30, 30, 100))], method="atc",
                           class_specific=False)
    assert est.threshold[0] == pytest.approx(0.8, abs=1 / 64)


def test_doc_recovers_a_known_offset():
    # Voxels are right with probability s - 0.15 (an over-confident model).
    rng = np.random.default_rng(4)
    c, v = 3, 150000
    z = rng.normal(0, 2.5, (c, v)).astype(np.float32)
    s = torch.softmax(torch.from_numpy(z), 0).numpy().max(0)
    pred = z.argmax(0)
    right = rng.random(v) < np.clip(s - 0.15, 0, 1)
    lab = np.where(right, pred, (pred + 1 + rng.integers(0, c - 1, v)) % c)
    est = pe.fit_estimator([(z.reshape(c, 50, 30, 100), lab.reshape(50, 30, 100))], method="doc",
                           class_specific=False)
    assert est.offset[0] == pytest.approx(0.15, abs=0.01)


def test_perfectly_calibrated_model_gives_the_true_metrics():
    z, lab = _case(1.0, 7, v=240000, shape=(60, 40, 100))
    est = pe.PerformanceEstimator(method="none", num_classes=4).estimate(z)
    truth = overlap_metrics(z.argmax(0), lab, 4)
    for k in range(4):
        for metric in ("dice", "sensitivity", "precision"):
            assert est.classes[k][metric] == pytest.approx(truth[k][metric], abs=0.01), (k, metric)
        # the expected reference volume includes the false negatives from other classes
        assert est.classes[k]["expected_voxels"] == pytest.approx(truth[k]["reference_voxels"], rel=0.02)


def test_ignoring_false_negatives_from_other_classes_would_overestimate_sensitivity():
    # A rare class mostly hidden in background-predicted voxels: its sensitivity is low.
    z, lab = _case(1.0, 8, v=240000, shape=(60, 40, 100))
    z[3] -= 2.0
    prob = torch.softmax(torch.from_numpy(z.reshape(4, -1)), 0).numpy()
    lab = _sample_labels(prob, np.random.default_rng(9)).reshape(lab.shape)
    truth = overlap_metrics(z.argmax(0), lab, 4)[3]
    est = pe.PerformanceEstimator(method="none", num_classes=4).estimate(z).classes[3]
    assert est["sensitivity"] == pytest.approx(truth["sensitivity"], abs=0.02)
    precision_only = est["expected_tp"] / est["predicted_voxels"]  # what TP/N would claim
    assert precision_only > truth["sensitivity"] + 0.1


# ----------------------------------------------------------------------------- consistency

@pytest.mark.parametrize("method", pe.METHODS)
@pytest.mark.parametrize("class_specific", [False, True])
def test_fitted_estimate_from_statistics_equals_estimate_from_logits(method, class_specific):
    temps = [1.0, 0.7, 1.5, 2.5]
    val = [_case(temps, seed) for seed in range(2)]
    est = pe.fit_estimator(val, method=method, class_specific=class_specific)
    z, _ = _case(temps, 11)
    direct = est.estimate(z).metric_array("dice")
    from_stats = est.estimate_stats(pe.case_statistics(z, binned_temperatures="all")).metric_array("dice")
    np.testing.assert_allclose(direct, from_stats, atol=2e-3)
    assert np.isfinite(direct).all()
    if method == "ts-atc":  # histograms only at T = 1 and totals elsewhere are not enough for TS-ATC
        with pytest.raises(pe.EstimationError, match="add_binned_temperatures"):
            est.estimate_stats(pe.case_statistics(z))
    if method == "ts":      # the cheap totals give the same TS fit as full histograms
        full = pe.fit_estimator([pe.case_statistics(lg, lab, binned_temperatures="all") for lg, lab in val],
                                method="ts", class_specific=class_specific)
        np.testing.assert_allclose(full.temperature, est.temperature, rtol=1e-6)
    assert est.fit_seconds > 0 and est.fitted_on["cases"] == 2


def test_class_specific_fit_beats_global_on_classes_with_different_calibration():
    temps = [1.0, 0.4, 1.0, 4.0]
    val = [_case(temps, seed) for seed in range(3)]
    test = [_case(temps, seed) for seed in (20, 21)]
    err = {}
    for cs in (False, True):
        est = pe.fit_estimator(val, method="ts", class_specific=cs)
        err[cs] = np.mean([np.abs(est.estimate(z).metric_array("dice") - _true(z, lab))[1:].mean()
                           for z, lab in test])
    assert err[True] < 0.5 * err[False]


@pytest.mark.parametrize("confidence", pe.CONFIDENCE_SCORES)
def test_every_confidence_score_fits_and_estimates(confidence):
    val = [_case(1.5, seed) for seed in range(2)]
    est = pe.fit_estimator(val, method="ts", class_specific=True, confidence=confidence)
    z, lab = _case(1.5, 30)
    dice = est.estimate(z).metric_array("dice")
    assert np.abs(dice - _true(z, lab)).max() < 0.08
    if confidence == "energy":
        assert est.score_range is not None and est.score_range[0] < est.score_range[1]


def test_calibrated_probabilities_are_distributions_and_match_softmax_for_ts():
    z, _ = _case(1.0, 12)
    logits = torch.from_numpy(z)[None]
    est = pe.PerformanceEstimator(method="ts", temperature=[2.0, 0.5, 1.0, 3.0], num_classes=4)
    q = est.calibrated_probabilities(logits)
    assert q.shape == logits.shape
    np.testing.assert_allclose(q.sum(1).numpy(), 1.0, atol=1e-5)
    pred = z.argmax(0)
    t = np.array([2.0, 0.5, 1.0, 3.0])[pred]
    expected = torch.softmax(torch.from_numpy(z / t[None].astype(np.float32)), 0).numpy()
    np.testing.assert_allclose(q[0].numpy(), expected, atol=1e-5)
    assert (q[0].numpy().argmax(0) == pred).all()  # calibration never changes the segmentation
    doc = pe.PerformanceEstimator(method="doc", offset=[0.1] * 4, num_classes=4).calibrated_probabilities(logits)
    np.testing.assert_allclose(doc.sum(1).numpy(), 1.0, atol=1e-5)


# ----------------------------------------------------------------------------- absent classes

def test_absent_and_possibly_missed_classes_are_explicit_never_nan():
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1, (4, 10, 10, 10)).astype(np.float32)
    z[0] += 20.0            # everything predicted background, very confidently
    z[3, 0, 0, :5] = z[0, 0, 0, :5] - 0.7  # class 3 never predicted, ~1.6 voxels of expected volume
    est = pe.PerformanceEstimator(method="none", num_classes=4).estimate(z)
    absent = est.classes[1]
    assert absent["state"] == "absent"
    assert absent["dice"] is None and absent["sensitivity"] is None and absent["precision"] is None
    missed = est.classes[3]
    assert missed["state"] == "possibly missed"
    assert missed["dice"] == 0.0 and missed["sensitivity"] == 0.0 and missed["precision"] is None
    arr = est.metric_array("dice")
    assert np.isnan(arr[1]) and arr[3] == 0.0
    cohort = pe.cohort_estimate([est, est])
    assert cohort[1]["dice"] is None and cohort[1]["cases_defined"] == 0
    assert cohort[3]["dice"] == 0.0


def test_fitting_ignores_classes_absent_from_validation_cases():
    z, lab = _case(1.0, 13)
    lab[lab == 2] = 0  # class 2 predicted but never in the reference: Dice 0 (defined)
    est = pe.fit_estimator([(z, lab)], method="ts", class_specific=True)
    assert all(math.isfinite(t) for t in est.temperature)


# ----------------------------------------------------------------------------- errors

def test_bad_inputs_are_named():
    z, lab = _case(1.0, 14)
    bad = z.copy()
    bad[1, 0, 0, 0] = np.nan
    with pytest.raises(pe.EstimationError, match="NaN"):
        pe.case_statistics(bad)
    with pytest.raises(pe.EstimationError, match="outside"):
        pe.case_statistics(z, lab + 7)
    with pytest.raises(pe.EstimationError, match="shape"):
        pe.case_statistics(z, lab[:-1])
    with pytest.raises(pe.EstimationError, match="unknown method"):
        pe.fit_estimator([(z, lab)], method="platt")
    with pytest.raises(pe.EstimationError, match="no labels"):
        pe.fit_estimator([pe.case_statistics(z)], method="ts")
    with pytest.raises(pe.EstimationError, match="T = 1 only"):
        pe.fit_estimator([pe.case_statistics(z, lab, temperatures=False)], method="ts")
    est = pe.fit_estimator([(z, lab)], method="atc")
    with pytest.raises(pe.EstimationError, match="fitted for 4 classes"):
        est.estimate(z[:3])


# ----------------------------------------------------------------------------- model bundle

def _card(cal):
    return {"name": "t", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 4,
                                                                  "features": [4, 8]}},
            "classes": [{"name": n, "value": i} for i, n in enumerate(["bg", "a", "b", "c"])],
            "preprocessing": {"patch_size": [16, 16, 16]}, "calibration": cal}


@pytest.mark.parametrize("method", ["ts", "doc", "atc", "ts-atc"])
def test_fitted_parameters_survive_the_bundle_round_trip(tmp_path, method):
    val = [_case([1.0, 0.7, 1.5, 2.5], seed) for seed in range(2)]
    est = pe.fit_estimator(val, method=method, class_specific=True,
                           confidence="energy" if method == "doc" else "mcp")
    card = _card(est.to_card())
    net = build_network(card["network"]["arch"], card["network"]["params"])
    path = tmp_path / "m.imbseg"
    save_bundle(path, card, net)
    loaded = load_bundle(path)
    back = pe.estimator_from_card(loaded.card["calibration"], 4)
    z, _ = _case([1.0, 0.7, 1.5, 2.5], 40)
    np.testing.assert_array_equal(back.estimate(z).metric_array("dice"), est.estimate(z).metric_array("dice"))
    probs = apply_calibration(torch.from_numpy(z)[None], loaded.card["calibration"])
    np.testing.assert_allclose(probs.sum(1).numpy(), 1.0, atol=1e-5)


@pytest.mark.parametrize("cal, message", [
    ({"method": "atc"}, "needs 'threshold'"),
    ({"method": "atc", "threshold": 1.5}, "threshold"),
    ({"method": "doc", "offset": [0.1, 0.1]}, "offset"),
    ({"method": "ts", "temperature": [1, 1, 1, float("inf")]}, "temperature"),
    ({"method": "ts", "temperature": 1.0, "confidence": "energy"}, "score_range"),
    ({"method": "ts", "temperature": 1.0, "confidence": "margin"}, "confidence"),
    ({"method": "ts", "temperature": 1.0, "class_specific": "yes"}, "class_specific"),
])
def test_invalid_calibration_entries_are_refused(cal, message):
    with pytest.raises(BundleError, match=message):
        validate_card(_card(cal))


def _two_pass(est, logits):
    acc = est.accumulator(logits.shape[0])
    acc.add(logits)
    p = est.calibrated_probabilities(logits[None])[0]
    return acc, p


@pytest.mark.parametrize("method", ["none", "ts", "atc", "ts-atc"])
def test_fused_maps_and_estimate_equal_the_two_pass_path(method):
    import torch
    from imbalanceseglib.estimation import TEMPERATURE_GRID, PerformanceEstimator
    c = 4
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(c, 6, 20, 30, generator=gen) * 3
    logits[:, 0, 0, :4] = torch.tensor([200.0, -200.0, -200.0, -200.0])[:, None]  # others underflow: o = 0
    est = PerformanceEstimator(method=method, class_specific=True, num_classes=c,
                               temperature=[float(TEMPERATURE_GRID[k]) for k in (12, 14, 9, 16)]
                               if method in ("ts", "ts-atc") else None,
                               threshold=[0.6, 0.75, 0.9, 0.5] if method in ("atc", "ts-atc") else None)
    ref_acc, ref_p = _two_pass(est, logits)
    acc = est.accumulator(c)
    # split in two pieces and small chunks: the sums must not depend on how the voxels are split
    p1, lab1, u1 = acc.add_with_maps(logits[:, :3].contiguous(), chunk=777)
    p2, lab2, u2 = acc.add_with_maps(logits[:, 3:].contiguous(), chunk=1 << 16)
    p = torch.cat([p1, p2], dim=1)
    torch.testing.assert_close(p, ref_p, atol=3e-7, rtol=0)
    assert torch.equal(torch.cat([lab1, lab2]), torch.argmax(logits, dim=0))
    ent = -(ref_p * torch.log(ref_p.clamp_min(1e-12))).sum(0) / np.log(c)
    torch.testing.assert_close(torch.cat([u1, u2]), ent.clamp(0, 1), atol=1e-6, rtol=0)
    np.testing.assert_allclose(acc.tp.numpy(), ref_acc.tp.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(acc.n.numpy(), ref_acc.n.numpy())
    np.testing.assert_allclose(acc.g.numpy(), ref_acc.g.numpy(), rtol=1e-6)
    for a, e in zip(acc.result().as_rows(), ref_acc.result().as_rows()):
        assert a["state"] == e["state"]
        for key in ("dice", "sensitivity", "precision"):
            assert (a[key] is None) == (e[key] is None)
            if e[key] is not None:
                assert a[key] == pytest.approx(e[key], rel=1e-6)


def test_fused_path_declines_what_it_does_not_cover():
    import torch
    from imbalanceseglib.estimation import PerformanceEstimator
    z = torch.randn(3, 5, 5, 5)
    doc = PerformanceEstimator(method="doc", num_classes=3, offset=[0.1, 0.0, 0.2])
    assert doc.accumulator(3).add_with_maps(z) is None
    ent = PerformanceEstimator(method="none", confidence="entropy", num_classes=3)
    assert ent.accumulator(3).add_with_maps(z) is None
    off_grid = PerformanceEstimator(method="ts-atc", num_classes=3, temperature=[1.1, 1.0, 1.0],
                                    threshold=[0.5, 0.5, 0.5])
    assert off_grid.accumulator(3).add_with_maps(z) is None
    bad = torch.tensor([[float("nan")] * 8, [0.0] * 8, [0.0] * 8]).reshape(3, 2, 2, 2)
    with pytest.raises(Exception, match="NaN"):
        PerformanceEstimator(method="none", num_classes=3).accumulator(3).add_with_maps(bad)
