"""Inputs the model was not made for (issue #22, items 1 and 3).

The training data's profile in the card (intensity quantiles after normalisation, spacing,
field of view, class volumes) with hand-checked values; each check on an input that differs in
one way only; a constant volume refused before any work; predicted volumes outside the
training range; the estimate's classes marked "unreliable" and flagged, in ``predict`` (CLI and
library) and ``estimate``; the review order with its ties broken and its reasons.
"""

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib import input_checks as ic
from imbalanceseglib.bundle import BundleError, load_bundle, save_bundle
from imbalanceseglib.cli import main as cli_main, rank_key
from imbalanceseglib.estimation import review_flag
from imbalanceseglib.images import ImageError
from imbalanceseglib.inference import predict
from imbalanceseglib.networks import build_network

NAMES = ["Background", "Ball", "Bead"]


def _image(arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.float32))
    img.SetSpacing(spacing)
    return img


def _labels(arr, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(arr, dtype=np.uint8))
    img.SetSpacing(spacing)
    return img


def _profile():
    """Two training cases whose numbers can be checked by hand."""
    a = np.zeros((10, 20, 30), np.uint8)  # z, y, x: field of view 30 x 20 x 10 voxels
    a[0:2, 0:5, 0:10] = 1   # 100 voxels of Ball at 2 mm^3 (spacing 2 x 1 x 1) = 0.2 ml
    a[5, 5, 5:7] = 2        # 2 voxels of Bead = 0.004 ml
    b = np.zeros((12, 20, 30), np.uint8)
    b[0:3, 0:10, 0:10] = 1  # 300 voxels at 1.5 mm^3 = 0.45 ml (b has no Bead)
    norm_a = np.linspace(-1.0, 1.0, 101)    # quantiles at p: -1 + 2p
    norm_b = np.linspace(-1.0, 1.0, 101) + 0.1
    images = [_image(np.ones(a.shape), (2.0, 1.0, 1.0)), _image(np.ones(b.shape), (1.5, 1.0, 1.0))]
    return ic.input_profile(images, [norm_a, norm_b], [_labels(a, (2.0, 1.0, 1.0)), _labels(b, (1.5, 1.0, 1.0))],
                            NAMES)


def test_the_profile_holds_hand_checked_numbers():
    p = _profile()
    levels = np.array(ic.QUANTILE_LEVELS)
    # median of the two quantile curves (-1 + 2p and -0.9 + 2p): -0.95 + 2p; each case 0.05 away
    assert p["intensity"]["median_quantiles"] == pytest.approx(list(-0.95 + 2 * levels), abs=1e-9)
    assert p["intensity"]["max_distance"] == pytest.approx(0.05, abs=1e-9)
    assert p["spacing_mm"] == {"min": [1.5, 1.0, 1.0], "max": [2.0, 1.0, 1.0]}
    assert p["extent_mm"] == {"min": [45.0, 20.0, 10.0], "max": [60.0, 20.0, 12.0]}
    assert p["class_volume_ml"]["Ball"] == {"min": pytest.approx(0.2), "max": pytest.approx(0.45),
                                            "present_fraction": 1.0}
    assert p["class_volume_ml"]["Bead"] == {"min": pytest.approx(0.004), "max": pytest.approx(0.004),
                                            "present_fraction": 0.5}
    assert ic.validate_profile(json.loads(json.dumps(p)), NAMES)


def test_each_check_fires_on_its_own_difference_only():
    p = _profile()
    like = np.linspace(-1.0, 1.0, 101) + 0.05
    inside = _image(np.ones((11, 20, 25)), (1.8, 1.0, 1.0))   # 45 x 20 x 11 mm, spacing within range
    assert ic.check_input(inside, p, like) == []
    shifted = ic.check_input(inside, p, like + 0.2)  # 0.2 from the median curve: above 1.5 x 0.05
    assert [f.kind for f in shifted] == ["intensity"]
    assert shifted[0].values["distance"] == pytest.approx(0.2) and shifted[0].values["limit"] == pytest.approx(0.075)
    coarse = ic.check_input(_image(np.ones((11, 20, 6)), (5.0, 1.0, 1.0)), p, like)  # 30 mm: extent in range
    assert [f.kind for f in coarse] == ["spacing"] and "5 x 1 x 1 mm" in coarse[0].message
    huge = ic.check_input(_image(np.ones((11, 20, 130)), (1.0, 1.0, 1.0)), p, like)  # 130 mm > 2 x 60
    assert [f.kind for f in huge] == ["field_of_view"] and "larger" in huge[0].message
    tiny = ic.check_input(_image(np.ones((11, 20, 20)), (1.0, 1.0, 1.0)), p, like)   # 20 mm < 45 / 2
    assert [f.kind for f in tiny] == ["field_of_view"] and "smaller" in tiny[0].message
    assert all(f.classes is None and f.severity == "warning" for f in coarse + huge + tiny)
    assert shifted[0].classes is None and shifted[0].severity == "caution"  # said, marks nothing on its own
    none = ic.check_input(inside, None, like)
    assert [(f.kind, f.severity) for f in none] == [("no_profile", "info")]


def test_the_field_of_view_is_measured_along_the_world_axes():
    img = _image(np.ones((11, 20, 130)), (1.0, 1.0, 1.0))
    img.SetDirection((0, 0, 1, 0, 1, 0, 1, 0, 0))  # image x runs along world z
    assert ic.geometry(img) == ([1.0, 1.0, 1.0], [11.0, 20.0, 130.0])


def test_a_constant_volume_is_refused_before_any_work():
    with pytest.raises(ImageError, match=r"input volume is constant \(every voxel is 0\)"):
        ic.refuse_blank(_image(np.zeros((4, 5, 6))))
    ic.refuse_blank(_image(np.eye(4)[None].repeat(3, 0)))  # two values: not refused


def test_predicted_volumes_outside_the_training_range():
    p = _profile()
    assert ic.check_prediction({"Ball": 0.3, "Bead": 0.0}, p) == []  # Bead absent in half the training cases
    big = ic.check_prediction({"Ball": 0.95, "Bead": 0.004}, p)        # above 2 x 0.45
    assert [(f.kind, f.classes) for f in big] == [("volume", ("Ball",))] and "0.95 ml" in big[0].message
    small = ic.check_prediction({"Ball": 0.09, "Bead": 0.009}, p)      # below 0.2 / 2; Bead 0.009 > 2 x 0.004
    assert [f.classes for f in small] == [("Ball",), ("Bead",)]
    missing = ic.check_prediction({"Ball": 0.0, "Bead": 0.004}, p)     # every training case has a Ball
    assert [f.classes for f in missing] == [("Ball",)] and "nothing predicted" in missing[0].message


def test_warnings_mark_classes_unreliable_and_flag_them():
    rows = [{"state": "predicted", "dice": 0.9}, {"state": "predicted", "dice": 0.95},
            {"state": "predicted", "dice": 0.92}]
    findings = [ic.Finding("volume", "m", "too big", classes=("Bead",)),
                ic.Finding("no_profile", "n", "not checked", severity="info")]
    ic.mark_unreliable(rows, NAMES, findings)
    assert [r["state"] for r in rows] == ["predicted", "predicted", "unreliable: too big"]
    assert review_flag(rows[2]["state"], 0.92) == "review" and review_flag(rows[1]["state"], 0.95) == ""
    ic.mark_unreliable(rows, NAMES, [ic.Finding("spacing", "m", "coarse spacing")])
    assert rows[1]["state"] == "unreliable: coarse spacing"
    assert rows[2]["state"] == "unreliable: coarse spacing" and rows[0]["state"] == "predicted"
    # a caution is listed with the rows it concerns and marks nothing
    rows = [{"state": "predicted", "dice": 0.9}, {"state": "predicted", "dice": 0.95},
            {"state": "absent", "dice": None}]
    ic.mark_unreliable(rows, NAMES, [ic.Finding("intensity", "m", "odd intensities", severity="caution")])
    assert [r["state"] for r in rows] == ["predicted", "predicted", "absent"]
    assert rows[1]["cautions"] == rows[2]["cautions"] == ["odd intensities"] and "cautions" not in rows[0]
    assert review_flag(rows[1]["state"], 0.95) == ""


@pytest.mark.parametrize("field,value,message", [
    ("intensity", {"levels": [0.5], "median_quantiles": [0.0], "max_distance": 0.1}, "levels must be 13"),
    ("spacing_mm", {"min": [1.0, "1", 1.0], "max": [1, 1, 1]}, "spacing_mm.min must be 3 finite"),
    ("extent_mm", {"min": [0.0, 1.0, 1.0], "max": [1, 1, 1]}, "extent_mm.min must be positive"),
    ("class_volume_ml", {"Liver": {"min": 1, "max": 2, "present_fraction": 1}}, "'Liver', which is not a class"),
])
def test_a_damaged_profile_is_refused_naming_the_field(tmp_path, field, value, message):
    p = json.loads(json.dumps(_profile()))
    p[field] = value
    model = _bundle(tmp_path, p)
    with pytest.raises(BundleError, match=message):
        predict(_image(np.random.default_rng(0).normal(size=(16, 16, 16))), load_bundle(model))


def _bundle(tmp_path, profile):
    torch.manual_seed(0)
    params = {"in_channels": 1, "out_channels": 3, "features": [4, 8]}
    net = build_network("UNet3D", params).eval()
    card = {"name": "t", "network": {"arch": "UNet3D", "params": params},
            "classes": [{"value": i, "name": n, "color": [0, 0, 0]} for i, n in enumerate(NAMES)],
            "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "percentile_zscore", "lower_percentile": 0.5,
                                                "upper_percentile": 99.5}}}
    if profile is not None:
        card["input_profile"] = profile
    return save_bundle(tmp_path / "m.imbseg", card, net)


def _training_like_profile(shape=(16, 16, 16), n=4):
    """A profile from noise volumes of one size (what the test inputs are compared with)."""
    rng = np.random.default_rng(5)
    images, norms, labels = [], [], []
    for _ in range(n):
        arr = rng.normal(size=shape).astype(np.float32)
        images.append(_image(arr))
        norms.append((arr - arr.mean()) / arr.std())
        lab = np.zeros(shape, np.uint8)
        lab[:4] = 1
        lab[8:10] = 2
        labels.append(_labels(lab))
    return ic.input_profile(images, norms, labels, NAMES)


def test_predict_refuses_blank_and_marks_an_unlike_input(tmp_path, capsys):
    model = _bundle(tmp_path, _training_like_profile())
    bundle = load_bundle(model)
    with pytest.raises(ImageError, match="constant"):
        predict(_image(np.full((16, 16, 16), 7.0)), bundle)
    rng = np.random.default_rng(9)
    like = predict(_image(rng.normal(size=(16, 16, 16))), bundle)
    assert [f.kind for f in like.findings if f.kind != "volume"] == []
    # a field of view four times larger and a skewed intensity distribution
    skewed = rng.exponential(size=(16, 16, 64)).astype(np.float32) ** 3
    odd = predict(_image(skewed), bundle)
    kinds = {f.kind for f in odd.findings}
    assert {"intensity", "field_of_view"} <= kinds
    assert all(row["state"].startswith("unreliable") for row in odd.performance.classes[1:])
    assert not odd.performance.classes[0]["state"].startswith("unreliable")  # background is not estimated
    # the CLI prints the warnings and the estimate table, and writes them beside the outputs
    sitk.WriteImage(_image(skewed), str(tmp_path / "odd.nrrd"))
    assert cli_main(["predict", "--model", str(model), "--input", str(tmp_path / "odd.nrrd"),
                     "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "[predict] warning: the field of view 64 x 16 x 16 mm is much larger than any training case's" in printed
    assert "[predict] caution: the intensity distribution (after the model's normalisation) is unlike" in printed
    assert "label-free performance estimate" in printed and "review unreliable: field of view 64 x 16 x 16 mm" in printed
    assert "unreliable: intensities" not in printed
    written = json.loads((tmp_path / "out" / "input_checks.json").read_text())
    assert {f["kind"] for f in written} == kinds
    head, *rows = [line.split("\t") for line in (tmp_path / "out" / "performance_estimate.tsv").read_text().splitlines()]
    assert [r[head.index("Flag")] for r in rows] == ["review", "review"]
    assert all(r[head.index("State")].startswith("unreliable: ") for r in rows)


def test_an_old_model_without_profile_says_so_and_marks_nothing(tmp_path):
    bundle = load_bundle(_bundle(tmp_path, None))
    pred = predict(_image(np.random.default_rng(1).normal(size=(16, 16, 16))), bundle)
    assert [(f.kind, f.severity) for f in pred.findings] == [("no_profile", "info")]
    assert not any(r["state"].startswith("unreliable") for r in pred.performance.classes)


def _row(dice, n_pred, g, tp, state="predicted"):
    return {"dice": dice, "predicted_voxels": n_pred, "expected_voxels": g, "expected_tp": tp, "state": state}


def test_the_review_order_breaks_ties_by_expected_error_and_says_why():
    # two cases tie at estimated Dice 0: the one with more expected mislabelled volume goes first
    a = rank_key({"Ball": _row(0.0, 10, 5, 0.0), "Bead": _row(0.8, 10, 10, 8.0)}, "worst", 0.001)
    b = rank_key({"Ball": _row(0.0, 100, 50, 0.0), "Bead": _row(0.9, 10, 10, 9.0)}, "worst", 0.001)
    assert sorted([("a", a), ("b", b)], key=lambda x: x[1]["key"])[0][0] == "b"
    assert b["why"] == "Ball: estimated Dice 0.000, expected 0.15 ml mislabelled"
    # an unreliable class ranks before any reliable one, whatever its Dice
    c = rank_key({"Ball": _row(0.95, 10, 10, 9.5, "unreliable: odd intensities"), "Bead": _row(0.1, 10, 10, 1.0)},
                 "worst", 0.001)
    assert sorted([("a", a), ("c", c)], key=lambda x: x[1]["key"])[0][0] == "c"
    assert c["class"] == "Ball" and c["why"].endswith("; unreliable: odd intensities")
    # by one class: that class's numbers; an undefined Dice goes last
    d = rank_key({"Ball": _row(None, 0, 0.1, 0.0, "absent"), "Bead": _row(0.5, 10, 10, 5.0)}, "Ball", 0.001)
    assert d["why"].startswith("Ball: Dice undefined (absent)")
    assert sorted([("d", d), ("a", rank_key({"Ball": _row(0.7, 10, 10, 7.0), "Bead": _row(0.7, 1, 1, 0.7)},
                                            "Ball", 0.001))], key=lambda x: x[1]["key"])[0][0] == "a"


def test_estimate_ranks_an_unlike_case_first_and_names_the_reason(tmp_path, capsys):
    model = _bundle(tmp_path, _training_like_profile())
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(3)
    sitk.WriteImage(_image(rng.normal(size=(16, 16, 16))), str(folder / "a_like.nrrd"))
    sitk.WriteImage(_image(rng.exponential(size=(16, 16, 64)) ** 3), str(folder / "b_odd.nrrd"))
    assert cli_main(["estimate", "--model", str(model), "--images", str(folder), "--csv", str(tmp_path / "e.csv")]) == 0
    out = capsys.readouterr().out
    assert "[estimate] b_odd: warning: the field of view 64 x 16 x 16 mm is much larger" in out
    assert not re.search(r"a_like: warning: the (intensity|field)", out)  # like the training cases
    # (the random network's Bead volumes are outside the training range in both: both unreliable)
    ranked = dict((cid, line) for cid, line in re.findall(r"^\s+\d+\. (\S+) (.*)$", out, flags=re.M))
    assert set(ranked) == {"a_like", "b_odd"}
    assert "; unreliable: field of view 64 x 16 x 16 mm" in ranked["b_odd"]
    assert "[estimate] b_odd: caution: the intensity distribution" in out
    assert "field of view 64 x 16 x 16 mm" in ranked["b_odd"] and "field of view" not in ranked["a_like"]


def test_the_python_training_api_records_the_input_profile(tmp_path):
    """train() records the card's input profile from cases made by prepare_case (as `imbalanceseg
    train` does), equal to input_profile() of the same images; cases from bare arrays give none."""
    from imbalanceseglib.training import TrainConfig, make_case, prepare_case, train
    from libtest_helpers import sphere_case
    classes = [{"value": i, "name": n, "color": [0, 0, 0]} for i, n in enumerate(NAMES)]
    cfg = TrainConfig.from_dict(dict(name="profiled", classes=classes, target_spacing=[1.0, 1.0, 1.0],
                                     patch_size=[16, 16, 16], features=[4, 8], iterations=2, batch_size=2,
                                     val_every=1000, checkpoint_every=1000, log_every=1, seed=1))
    images, labels = [], []
    for s in range(2):
        img, lab = sphere_case(s)
        images.append(_image(img * (3.0 + s)))
        labels.append(sitk.GetImageFromArray(lab.astype(np.uint8)))
    cases = [prepare_case(i, lab, cfg, f"c{k}") for k, (i, lab) in enumerate(zip(images, labels))]
    card = load_bundle(train(cfg, cases, [], tmp_path / "a", log=lambda s: None)).card
    want = ic.input_profile(images, [c.image for c in cases], labels, NAMES)
    assert card["input_profile"] == json.loads(json.dumps(want))
    assert card["input_profile"]["class_volume_ml"]["Ball"]["present_fraction"] == 1.0
    bare = [make_case(c.image, c.labels, c.name) for c in cases]
    card = load_bundle(train(cfg, bare, [], tmp_path / "b", log=lambda s: None)).card
    assert "input_profile" not in card
    given = {"version": 1, "cases": 7}  # a profile the caller gives is kept as given
    card = load_bundle(train(cfg, cases, [], tmp_path / "c", log=lambda s: None,
                             extra_card={"input_profile": want | given})).card
    assert card["input_profile"]["cases"] == 7
