"""Evaluation module: hand-computed values, MONAI cross-checks, every edge-case policy, calibration, CLI."""

import csv
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib import evaluation as ev
from imbalanceseglib.cli import main as cli_main
from imbalanceseglib.metrics import calibration as cm
from imbalanceseglib.metrics import overlap_metrics, surface

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, HealthCheck  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

monai_metrics = pytest.importorskip("monai.metrics")


# --- MONAI reference values -------------------------------------------------------------------

def _t(m):
    return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]


def monai_values(pred, ref, spacing, tol=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(include_background=True, spacing=tuple(float(s) for s in spacing))
        out = {
            "hd": monai_metrics.compute_hausdorff_distance(_t(pred), _t(ref), **kw).item(),
            "hd95": monai_metrics.compute_hausdorff_distance(_t(pred), _t(ref), percentile=95, **kw).item(),
            "assd": monai_metrics.compute_average_surface_distance(_t(pred), _t(ref), symmetric=True, **kw).item(),
        }
        if tol is not None:  # MONAI's sub-voxel surface Dice implements DeepMind's surfel definition
            out["nsd"] = monai_metrics.compute_surface_dice(_t(pred), _t(ref), [tol], use_subvoxels=True,
                                                            **kw).item()
    return out


def assert_matches_monai(res, pred, ref, spacing, tol=None):
    m = monai_values(pred, ref, spacing, tol)
    # MONAI keeps distances in float32; agreement is to float32 precision.
    assert res.hd_mm == pytest.approx(m["hd"], rel=2e-6, abs=1e-5)
    # HD95: MONAI interpolates the percentile with float32 torch.quantile; hypothesis found a case
    # 2.4e-6 relative off the exact value (which numpy and torch in float64 both give).
    assert res.hd95_mm == pytest.approx(m["hd95"], rel=1e-5, abs=1e-5)
    assert res.assd_mm == pytest.approx(m["assd"], rel=2e-6, abs=1e-5)
    if tol is not None:
        assert res.nsd == pytest.approx(m["nsd"], rel=1e-5, abs=1e-6)


# --- hand-computed cases with anisotropic spacing ----------------------------------------------

def test_two_single_voxels_anisotropic():
    sp = (2.0, 0.5, 1.5)  # (z, y, x) mm
    ref = np.zeros((5, 6, 8), bool)
    pred = np.zeros_like(ref)
    ref[2, 2, 2] = True
    pred[2, 2, 4] = True  # two voxels apart along x: 3.0 mm
    r = ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=1.0)
    assert r.policy == "single_voxel"
    assert (r.dice, r.iou, r.sensitivity, r.precision) == (0.0, 0.0, 0.0, 0.0)
    assert r.hd_mm == r.hd95_mm == r.assd_mm == pytest.approx(3.0)
    assert r.reference_volume_mm3 == r.predicted_volume_mm3 == pytest.approx(1.5)
    assert r.relative_volume_error == 0.0
    assert r.detected is False and r.false_positive_components == 1 and r.reference_components == 1
    assert r.nsd == 0.0
    # Surfels sit at cube centres: the near half of each voxel's 8 equal surfels is 1.5 mm from the
    # other surface, the far half 3.0 mm.
    assert ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=1.5).nsd == pytest.approx(0.5)
    assert ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=3.0).nsd == pytest.approx(1.0)
    assert_matches_monai(r, pred, ref, sp)


def test_blocks_shifted_along_the_thick_axis():
    sp = (2.5, 1.0, 1.0)
    ref = np.zeros((8, 8, 8), bool)
    ref[2:5, 2:6, 2:6] = True  # 3 x 4 x 4 voxels; 4 interior voxels at z=3
    pred = np.roll(ref, 1, axis=0)
    r = ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=1.0)
    # 44 border voxels each side: 16 at 2.5 mm (the shifted cap), 4 at 1.0 mm (face centre over the
    # other's interior), 24 at 0 -> ASSD = (40 + 4) / 44 = 1.0; HD95 = 2.5 (order statistics 40, 41).
    assert r.policy == "normal"
    assert r.dice == pytest.approx(64 / 96) and r.iou == pytest.approx(0.5)
    assert r.hd_mm == pytest.approx(2.5) and r.hd95_mm == pytest.approx(2.5)
    assert r.assd_mm == pytest.approx(1.0)
    assert r.reference_volume_mm3 == pytest.approx(48 * 2.5)
    assert r.detected is True and r.false_positive_components == 0
    assert_matches_monai(r, pred, ref, sp, tol=1.0)


def test_hd95_interpolates_like_monai():
    # Directed distances with a long tail: the 95th percentile falls between order statistics.
    sp = (1.0, 0.7, 0.9)
    ref = np.zeros((6, 40, 6), bool)
    ref[2:4, 2:30, 2:4] = True
    pred = ref.copy()
    pred[2:4, 30:37, 2:4] = True
    r = ev.evaluate_binary(pred, ref, sp)
    d_pr, d_rp = surface.surface_distances(pred, ref, sp)
    assert r.hd95_mm == pytest.approx(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assert r.hd95_mm < r.hd_mm
    assert_matches_monai(r, pred, ref, sp, tol=2.0)


# --- edge-case policies -------------------------------------------------------------------------

SHAPE = (6, 7, 8)
SP = (2.0, 0.8, 0.8)
DIAG = math.sqrt((6 * 2.0) ** 2 + (7 * 0.8) ** 2 + (8 * 0.8) ** 2)


def test_both_empty_is_undefined_not_perfect():
    z = np.zeros(SHAPE, bool)
    r = ev.evaluate_binary(z, z, SP)
    assert r.policy == "both_empty"
    assert r.dice is r.iou is r.sensitivity is r.precision is r.relative_volume_error is None
    assert r.hd_mm is r.hd95_mm is r.assd_mm is r.nsd is None
    assert r.detected is None and r.false_positive_components == 0 and not r.distance_penalty


def test_reference_empty_false_positive_structure():
    ref = np.zeros(SHAPE, bool)
    pred = np.zeros(SHAPE, bool)
    pred[1, 1, 1] = True
    pred[4, 5, 5:7] = True
    r = ev.evaluate_binary(pred, ref, SP)
    assert r.policy == "reference_empty"
    assert r.dice == 0.0 and r.iou == 0.0 and r.precision == 0.0
    assert r.sensitivity is None and r.relative_volume_error is None and r.detected is None
    assert r.hd_mm == r.hd95_mm == r.assd_mm == pytest.approx(DIAG) and r.distance_penalty
    assert r.nsd == 0.0
    assert r.predicted_components == 2 and r.false_positive_components == 2


def test_prediction_empty_missed_structure_is_never_hd95_zero():
    ref = np.zeros(SHAPE, bool)
    ref[2:4, 2:4, 2:4] = True
    r = ev.evaluate_binary(np.zeros(SHAPE, bool), ref, SP)
    assert r.policy == "prediction_empty"
    assert r.dice == 0.0 and r.sensitivity == 0.0 and r.precision is None
    assert r.relative_volume_error == -1.0 and r.detected is False
    assert r.hd95_mm == pytest.approx(DIAG) and r.hd95_mm > 0 and math.isfinite(r.hd95_mm)
    assert r.nsd == 0.0 and r.reference_components == 1 and r.detected_components == 0


def test_image_wide_class_uses_the_image_edge_as_surface():
    ref = np.ones(SHAPE, bool)
    r = ev.evaluate_binary(ref, ref, SP)
    assert r.policy == "image_wide"
    assert r.dice == 1.0 and r.hd_mm == 0.0 and r.hd95_mm == 0.0 and r.assd_mm == 0.0 and r.nsd == 1.0
    pred = ref.copy()
    pred[:2] = False
    r = ev.evaluate_binary(pred, ref, SP, nsd_tolerance_mm=1.0)
    assert r.policy == "image_wide"
    assert r.hd_mm == pytest.approx(4.0)  # the bottom face moved up by two 2 mm slices
    assert_matches_monai(r, pred, ref, SP, tol=1.0)


def test_single_voxel_matches_monai_and_is_flagged():
    ref = np.zeros(SHAPE, bool)
    ref[3, 3, 3] = True
    pred = np.zeros(SHAPE, bool)
    pred[3, 3:5, 3] = True
    r = ev.evaluate_binary(pred, ref, SP, nsd_tolerance_mm=0.5)
    assert r.policy == "single_voxel" and r.detected is True
    assert r.hd_mm == pytest.approx(0.8) and r.assd_mm == pytest.approx(0.8 / 3)
    assert_matches_monai(r, pred, ref, SP, tol=0.5)


def test_label_map_policies_and_summary_counts():
    ref = np.zeros((10, 12, 14), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:6, 2:6, 2:6] = 1
    pred[2:6, 3:7, 2:6] = 1     # normal
    ref[7:9, 8:10, 8:10] = 2    # missed
    pred[0, 11, 13] = 3         # hallucinated
    ref[9, 0, 0] = 4
    pred[9, 0, 0] = 4           # single voxel, exact
    sp = (3.0, 0.9, 0.9)
    case = ev.evaluate_labels(pred, ref, sp, labels=[1, 2, 3, 4, 5], class_names={1: "a", 2: "b"})
    got = {c.label: c.policy for c in case.classes}
    assert got == {1: "normal", 2: "prediction_empty", 3: "reference_empty", 4: "single_voxel", 5: "both_empty"}
    by = case.by_label()
    assert by[1].name == "a" and by[5].name == "label_5"
    assert by[4].dice == 1.0 and by[4].hd95_mm == 0.0
    for lab in (1, 4):
        assert_matches_monai(by[lab], pred == lab, ref == lab, sp, tol=2.0)
    # the existing overlap metrics (training, module) agree on Dice, sensitivity and precision
    legacy = overlap_metrics(pred, ref, 6)
    for lab in range(1, 6):
        assert legacy[lab]["dice"] == by[lab].dice
        assert legacy[lab]["sensitivity"] == by[lab].sensitivity
        assert legacy[lab]["precision"] == by[lab].precision
    summary = ev.summarize([case, case])
    row = {r["label"]: r for r in summary}
    assert row[2]["policy_prediction_empty"] == 2 and row[2]["n_distance_penalty"] == 2
    assert row[5]["policy_both_empty"] == 2 and row[5]["dice_n"] == 0 and row[5]["dice_mean"] is None
    assert row[1]["dice_mean"] == pytest.approx(by[1].dice)


def test_evaluate_images_takes_spacing_from_itk_order():
    ref = np.zeros((6, 8, 10), np.uint8)
    ref[2:4, 3:5, 3:6] = 1
    pred = np.roll(ref, 1, axis=2)  # shift along x
    ri, pi = sitk.GetImageFromArray(ref), sitk.GetImageFromArray(pred)
    for im in (ri, pi):
        im.SetSpacing((0.7, 1.1, 3.0))  # (x, y, z)
    case = ev.evaluate_images(pi, ri)
    assert case.classes[0].hd_mm == pytest.approx(0.7)
    pi.SetSpacing((0.7, 1.1, 2.0))
    with pytest.raises(ValueError, match="spacing"):
        ev.evaluate_images(pi, ri)


def test_metric_groups_inputs_and_2d():
    ref = np.zeros((9, 11), np.uint8)
    ref[2:6, 3:8] = 1
    pred = np.zeros_like(ref)
    pred[3:7, 3:9] = 1
    r = ev.evaluate_binary(pred, ref, (2.0, 0.6), metrics=("overlap", "distance"))
    assert r.nsd is None and r.reference_components is None and r.dice is not None
    assert_matches_monai(r, pred, ref, (2.0, 0.6))
    with pytest.raises(ValueError, match="3-D"):
        ev.evaluate_binary(pred, ref, (2.0, 0.6), metrics=("nsd",))
    with pytest.raises(ValueError, match="unknown metric"):
        ev.evaluate_binary(pred, ref, metrics=("hausdorff",))
    with pytest.raises(ValueError, match="spacing"):
        ev.evaluate_binary(pred, ref, (0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        ev.evaluate_binary(pred, ref[:-1])
    with pytest.raises(ValueError, match="integer"):
        ev.evaluate_labels(pred + 0.5, ref)
    with pytest.raises(ValueError, match="negative"):
        ev.evaluate_labels(pred.astype(int) - 1, ref)
    # float label maps with integral values and background as an explicit label both work
    case = ev.evaluate_labels(pred.astype(np.float32), ref, (2.0, 0.6), labels=[0, 1], metrics=("overlap",))
    assert [c.label for c in case.classes] == [0, 1]
    assert case.classes[0].dice == overlap_metrics(pred, ref, 2)[0]["dice"]


def test_connected_components_detection_view():
    ref = np.zeros((5, 20, 20), np.uint8)
    ref[2, 2:4, 2:4] = 1        # small lesion, found
    ref[2, 10:12, 10:12] = 1    # small lesion, missed
    ref[2, 15, 15] = 1          # single-voxel lesion, found
    pred = np.zeros_like(ref)
    pred[2, 3, 3] = 1
    pred[2, 15, 15] = 1
    pred[2, 17:19, 2:4] = 1     # false-positive structure
    r = ev.evaluate_binary(pred, ref, (3.0, 1.0, 1.0))
    assert (r.reference_components, r.detected_components) == (3, 2)
    assert (r.predicted_components, r.false_positive_components) == (3, 1)
    assert r.detected is True
    # 6-connectivity splits diagonal neighbours
    diag = np.zeros((3, 3, 3), bool)
    diag[0, 0, 0] = diag[1, 1, 1] = True
    assert ev.evaluate_binary(diag, diag, connectivity=1).reference_components == 2
    assert ev.evaluate_binary(diag, diag).reference_components == 1


# --- property-based cross-check against MONAI ----------------------------------------------------

@st.composite
def mask_pairs(draw):
    shape = tuple(draw(st.integers(3, 11)) for _ in range(3))
    spacing = tuple(draw(st.sampled_from([0.5, 0.8, 1.0, 1.7, 2.5, 5.0])) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kinds = [draw(st.sampled_from(["blob", "noise", "empty", "full", "voxel"])) for _ in range(2)]
    out = []
    for kind in kinds:
        m = np.zeros(shape, bool)
        if kind == "blob":
            c = rng.uniform(0, shape)
            r = rng.uniform(0.8, max(shape) / 2)
            g = np.indices(shape).astype(float)
            m = (((g - c.reshape(3, 1, 1, 1)) ** 2) * rng.uniform(0.5, 2, (3, 1, 1, 1))).sum(0) < r * r
        elif kind == "noise":
            m = rng.random(shape) < rng.uniform(0.02, 0.5)
        elif kind == "full":
            m[:] = True
            if rng.random() < 0.5:
                m[tuple(rng.integers(0, shape))] = False
        elif kind == "voxel":
            m[tuple(rng.integers(0, shape))] = True
        out.append(m)
    return out[0], out[1], spacing


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask_pairs(), st.sampled_from([0.5, 1.0, 2.5]), st.booleans())
def test_property_matches_monai_and_policies_hold(pair, tol, force_edt):
    pred, ref, sp = pair
    saved = surface._use_edt
    surface._use_edt = (lambda box, n: True) if force_edt else (lambda box, n: False)
    try:
        r = ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=tol)
    finally:
        surface._use_edt = saved
    n_p, n_r = int(pred.sum()), int(ref.sum())
    for v in (r.hd_mm, r.hd95_mm, r.assd_mm, r.nsd, r.dice):
        assert v is None or math.isfinite(v)
    if n_p == 0 and n_r == 0:
        assert r.policy == "both_empty" and r.hd95_mm is None and r.dice is None
    elif n_p == 0 or n_r == 0:
        assert r.policy == ("prediction_empty" if n_p == 0 else "reference_empty")
        assert r.hd95_mm == pytest.approx(ev.max_distance_mm(pred.shape, sp)) and r.hd95_mm > 0
        assert r.dice == 0.0 and r.nsd == 0.0
    else:
        expected = ("image_wide" if pred.size in (n_p, n_r) else "single_voxel" if 1 in (n_p, n_r) else "normal")
        assert r.policy == expected
        assert r.dice == pytest.approx(2 * np.count_nonzero(pred & ref) / (n_p + n_r))
        assert_matches_monai(r, pred, ref, sp, tol=tol)


# --- calibration --------------------------------------------------------------------------------

def _two_class_probs():
    # 60 voxels at p = (0.8, 0.2), 45 of them class 0; 40 voxels at p = (0.35, 0.65), all class 1.
    probs = np.zeros((2, 100))
    probs[:, :60] = [[0.8], [0.2]]
    probs[:, 60:] = [[0.35], [0.65]]
    ref = np.ones(100, np.int64)
    ref[:45] = 0
    return probs.reshape(2, 4, 25), ref.reshape(4, 25)


def test_ece_known_answer():
    probs, ref = _two_class_probs()
    g = cm.global_bins(probs, ref, n_bins=15)
    # |0.75 - 0.8| * 0.6 + |1.0 - 0.65| * 0.4
    assert g.ece() == pytest.approx(0.17)
    cw = cm.classwise_bins(probs, ref, n_bins=15)
    assert [b.ece() for b in cw] == pytest.approx([0.17, 0.17])
    pooled = g + g
    assert pooled.total == 200 and pooled.ece() == pytest.approx(0.17)
    assert cm.reliability_bins(np.array([1.0, 0.0]), np.array([1, 0]), 10).counts.tolist() == [1] + [0] * 8 + [1]


def test_ece_near_structures_exposes_what_the_background_hides():
    ref = np.zeros((1, 1, 100), np.int64)
    ref[..., :10] = 1
    probs = np.zeros((2, 1, 1, 100))
    probs[1, ..., :10] = 0.7
    probs[0, ..., :10] = 0.3
    probs[0, ..., 10:] = 1.0
    rep = cm.calibration_report(probs, ref, spacing=(1.0, 1.0, 1.0), radius_mm=5.0, n_bins=10)
    assert rep["ece"] == pytest.approx(0.03)           # 10 voxels off by 0.3 among 100
    assert rep["ece_near"] == pytest.approx(0.2)       # ... among the 15 within 5 mm
    assert rep["voxels_near"] == 15
    vol = rep["volumes"][1]
    assert vol["probability_volume_mm3"] == pytest.approx(7.0)
    assert vol["thresholded_volume_mm3"] == vol["reference_volume_mm3"] == 10.0
    empty = cm.calibration_report(np.stack([np.ones((2, 2, 2)), np.zeros((2, 2, 2))]), np.zeros((2, 2, 2), int))
    assert empty["policy"] == "no_foreground" and empty["ece_near"] is None and empty["ece"] == 0.0


def test_near_region_honours_spacing():
    ref = np.zeros((5, 5, 40), np.int64)
    ref[2, 2, 20] = 1
    region = cm.near_structure_region(ref, None, spacing=(10.0, 10.0, 0.5), radius_mm=5.0)
    assert region.sum() == 21 and region[2, 2, 10:31].all()


def test_reliability_diagram_png(tmp_path):
    probs, ref = _two_class_probs()
    path = cm.write_reliability_diagram(cm.global_bins(probs, ref), tmp_path / "rel.png", title="ECE")
    img = sitk.ReadImage(str(path))
    assert img.GetNumberOfComponentsPerPixel() == 3 and img.GetSize() == (420, 420)
    arr = sitk.GetArrayFromImage(img)
    assert (arr == [60, 110, 200]).all(axis=-1).any()  # accuracy bars drawn
    assert not list(tmp_path.glob(".*tmp*"))


# --- QU-BraTS -------------------------------------------------------------------------------------

def _qu_case():
    ref = np.zeros((4, 10, 10), bool)
    ref[1:3, 2:8, 2:8] = True
    pred = np.zeros_like(ref)
    pred[1:3, 3:9, 2:8] = True
    return pred, ref


def test_qubrats_constant_uncertainty():
    pred, ref = _qu_case()
    d = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    out = cm.qubrats_score(pred, ref, np.zeros(ref.shape), num_points=4)
    assert out["thresholds"].tolist() == [100, 75, 50, 25, 0]
    assert out["auc_dice"] == pytest.approx(d) and out["auc_ftp"] == 0.0 and out["auc_ftn"] == 0.0
    assert out["score"] == pytest.approx((d + 2) / 3)


def test_qubrats_uncertain_errors_and_uncertain_true_positives():
    pred, ref = _qu_case()
    d = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    u = np.where(pred ^ ref, 100.0, 0.0)  # only the errors are uncertain
    out = cm.qubrats_score(pred, ref, u, num_points=4)
    assert out["dice"].tolist() == pytest.approx([d, 1, 1, 1, 1])
    assert out["auc_dice"] == pytest.approx(0.75 + 0.125 * (1 + d))
    assert out["score"] == pytest.approx((0.75 + 0.125 * (1 + d) + 2) / 3)
    u = np.where(pred & ref, 0.6, 0.0)  # true positives uncertain, on a 0..1 scale
    out = cm.qubrats_score(pred, ref, u, num_points=4, max_uncertainty=1.0)
    assert out["ftp_ratio"].tolist() == [0, 0, 1, 1, 1]
    assert out["auc_ftp"] == pytest.approx(0.625) and out["auc_ftn"] == 0.0
    assert out["dice"][2:].tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        cm.qubrats_score(pred, ref, u, max_uncertainty=0.5)


# --- CLI ---------------------------------------------------------------------------------------

def test_cli_evaluates_a_folder(tmp_path, capsys):
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref_dir.mkdir()
    pred_dir.mkdir()
    arrays = {}
    for i in range(2):
        ref = np.zeros((6, 9, 9), np.uint8)
        ref[1:4, 2:6, 2:6] = 1
        if i == 0:
            ref[5, 7, 7] = 2
        pred = np.roll(ref, i + 1, axis=2)
        arrays[f"case{i}"] = (pred, ref)
        for arr, d in ((ref, ref_dir), (pred, pred_dir)):
            im = sitk.GetImageFromArray(arr)
            im.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(im, str(d / f"case{i}.nrrd"))
    rc = cli_main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
                   "--nsd-tolerance", "1.0"])
    assert rc == 0
    assert "case(s)" in capsys.readouterr().out
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert [(r["case"], r["label"], r["policy"]) for r in rows] == [
        ("case0", "1", "normal"), ("case0", "2", "single_voxel"),
        ("case1", "1", "normal"), ("case1", "2", "both_empty")]
    api = ev.evaluate_labels(*arrays["case1"], (2.5, 0.8, 0.8), nsd_tolerance_mm=1.0).classes[0]
    assert float(rows[2]["hd95_mm"]) == pytest.approx(api.hd95_mm) and float(rows[2]["nsd"]) == pytest.approx(api.nsd)
    assert rows[3]["dice"] == "" and rows[3]["hd95_mm"] == ""
    pol = {r["label"]: r for r in csv.DictReader(open(out / "policies.csv"))}
    assert pol["2"]["both_empty"] == "1" and pol["2"]["single_voxel"] == "1"
    summary = {r["label"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert summary["2"]["dice_n"] == "1"
    # a missing prediction stops the run unless allowed
    (pred_dir / "case1.nrrd").unlink()
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out)]) == 2
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
                     "--allow-missing", "--metrics", "overlap,distance"]) == 0
    rows = list(csv.DictReader(open(out / "per_case.csv")))
    assert rows[2]["policy"] == "prediction_empty" and rows[2]["nsd"] == ""


def test_cli_reads_predict_folders_with_probabilities(tmp_path):
    ref_dir, pred_dir, out = tmp_path / "ref", tmp_path / "pred", tmp_path / "out"
    ref_dir.mkdir()
    ref = np.zeros((1, 4, 25), np.uint8)
    ref[0, :, :5] = 1
    probs, _ = _two_class_probs()
    probs = probs.reshape(2, 1, 4, 25)
    pred = probs.argmax(axis=0).astype(np.uint8)
    unc = np.where(pred != ref, 0.9, 0.1).astype(np.float32)

    def write(arr, path):
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing((1.0, 2.0, 3.0))
        sitk.WriteImage(im, str(path))

    write(ref, ref_dir / "c1.nii.gz")
    case = pred_dir / "c1"
    case.mkdir(parents=True)
    write(pred, case / "labels.nrrd")
    for i in range(2):
        write(probs[i].astype(np.float32), case / f"probability_{i:02d}.nrrd")
    write(unc, case / "uncertainty.nrrd")
    assert cli_main(["evaluate", "--pred", str(pred_dir), "--ref", str(ref_dir), "--out", str(out),
                     "--near-radius", "4"]) == 0
    rep = cm.calibration_report(probs, ref, spacing=(3.0, 2.0, 1.0), pred=pred, radius_mm=4.0)
    cal = list(csv.DictReader(open(out / "calibration.csv")))
    assert float(cal[0]["ece"]) == pytest.approx(rep["ece"])
    assert float(cal[0]["ece_near"]) == pytest.approx(rep["ece_near"])
    assert (out / "reliability.png").exists() and (out / "reliability_near.png").exists()
    qu = list(csv.DictReader(open(out / "qubrats.csv")))
    expected = cm.qubrats_score(pred == 1, ref == 1, unc, max_uncertainty=1.0)["score"]
    assert len(qu) == 1 and float(qu[0]["score"]) == pytest.approx(expected)
    vols = list(csv.DictReader(open(out / "volumes.csv")))
    assert float(vols[1]["reference_volume_mm3"]) == pytest.approx(20 * 6.0)
