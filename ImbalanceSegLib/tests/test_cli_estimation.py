"""``imbalanceseg calibrate`` and ``imbalanceseg estimate`` on tiny folders (issue #4)."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import load_bundle, read_card, save_bundle
from imbalanceseglib.cli import ESTIMATE_COLUMNS
from imbalanceseglib.cli import main as cli_main
from imbalanceseglib.networks import build_network

from libtest_helpers import CLASSES, sphere_case


def _write(arr, path, spacing=(1.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))


def _model(tmp_path, bias):
    """A network whose output is a fixed per-class bias plus a channel that follows the image."""
    torch.manual_seed(0)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]})
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        net.head.bias.copy_(torch.tensor(bias))
    card = {"name": "tiny", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                     "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"patch_size": [16, 16, 16],
                                                  "normalization": {"scheme": "none"}}}
    path = tmp_path / "tiny.imbseg"
    save_bundle(path, card, net.eval())
    return path


def _folders(tmp_path, n=3):
    img_dir, lab_dir = tmp_path / "images", tmp_path / "labels"
    img_dir.mkdir()
    lab_dir.mkdir()
    for i in range(n):
        img, lab = sphere_case(i, shape=(16, 16, 16))
        _write(img, img_dir / f"case{i}.nrrd")
        _write(lab, lab_dir / f"case{i}.nrrd")
    return img_dir, lab_dir


def test_calibrate_writes_a_new_calibrated_bundle_and_leaves_the_input_alone(tmp_path, capsys):
    model = _model(tmp_path, [0.0, 0.5, -1.0])
    before = model.read_bytes()
    img_dir, lab_dir = _folders(tmp_path)
    out = tmp_path / "calibrated.imbseg"
    rc = cli_main(["calibrate", "--model", str(model), "--images", str(img_dir), "--labels", str(lab_dir),
                   "--method", "ts", "--out", str(out)])
    assert rc == 0
    assert model.read_bytes() == before
    card = read_card(out)
    cal = card["calibration"]
    assert cal["method"] == "ts" and cal["class_specific"] is True and len(cal["temperature"]) == 3
    assert cal["fitted_on"]["cases"] == 3 and cal["fitted_on"]["case_ids"] == ["case0", "case1", "case2"]
    assert set(card["calibration_validation"]["per_class_dice_mae"]) == {"Background", "Ball", "Bead"}
    assert load_bundle(out).card["calibration"] == cal
    assert "wrote" in capsys.readouterr().out
    # refusing to overwrite the input
    assert cli_main(["calibrate", "--model", str(model), "--images", str(img_dir), "--labels", str(lab_dir),
                     "--out", str(model)]) == 2
    assert model.read_bytes() == before


def test_calibrate_ts_atc_away_from_temperature_one(tmp_path):
    """Regression: the CLI reduced cases to T = 1 statistics, so a TS-ATC fit whose temperatures
    were not 1 failed ("no histograms at the fitted temperatures")."""
    from imbalanceseglib import estimation as pe
    model = _model(tmp_path, [0.0, 0.5, -1.0])
    img_dir, lab_dir = _folders(tmp_path)
    out = tmp_path / "ts_atc.imbseg"
    assert cli_main(["calibrate", "--model", str(model), "--images", str(img_dir), "--labels", str(lab_dir),
                     "--method", "ts-atc", "--out", str(out)]) == 0
    cal = read_card(out)["calibration"]
    assert cal["method"] == "ts-atc" and any(abs(t - 1.0) > 1e-6 for t in cal["temperature"])
    assert all(t in pe.TEMPERATURE_GRID for t in cal["temperature"])


def test_calibrate_errors_name_the_problem(tmp_path, capsys):
    model = _model(tmp_path, [0.0, 0.5, -1.0])
    img_dir, lab_dir = _folders(tmp_path, n=2)
    (lab_dir / "case1.nrrd").unlink()
    out = tmp_path / "c.imbseg"
    assert cli_main(["calibrate", "--model", str(model), "--images", str(img_dir), "--labels", str(lab_dir),
                     "--out", str(out)]) == 2
    assert "no label map for case(s) case1" in capsys.readouterr().err
    assert cli_main(["calibrate", "--model", str(model), "--images", str(tmp_path / "nope"), "--labels",
                     str(lab_dir), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    _write(np.full((16, 16, 16), 7, np.uint8), lab_dir / "case1.nrrd")
    assert cli_main(["calibrate", "--model", str(model), "--images", str(img_dir), "--labels", str(lab_dir),
                     "--out", str(out)]) == 2
    assert "holds value 7" in capsys.readouterr().err
    assert not out.exists()


def test_estimate_writes_csv_and_ranks_worst_first(tmp_path, capsys):
    # Logits are constant per class; the image adds nothing (all weights zero), so every
    # case gets the same estimate; make the cases differ through their image size instead:
    # a constant model predicts 'Ball' everywhere with p = e^1/(1+e^1+e^-1).
    model = _model(tmp_path, [0.0, 1.0, -1.0])
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    for name, shape in (("small", (8, 8, 8)), ("large", (16, 16, 16))):  # not constant: that is refused
        _write(np.random.default_rng(0).normal(size=shape).astype(np.float32), img_dir / f"{name}.nrrd")
    out_csv = tmp_path / "est.csv"
    assert cli_main(["estimate", "--model", str(model), "--images", str(img_dir), "--csv", str(out_csv),
                     "--rank-by", "Ball", "--flag-threshold", "0.9"]) == 0
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0].keys()) == ESTIMATE_COLUMNS
    p = np.exp([0.0, 1.0, -1.0]) / np.exp([0.0, 1.0, -1.0]).sum()
    ball = [r for r in rows if r["class"] == "Ball" and r["case"] == "large"][0]
    # TP = p1 N, predicted N, expected reference p1 N -> Dice 2 p1 / (1 + p1)
    assert float(ball["estimated_dice"]) == pytest.approx(2 * p[1] / (1 + p[1]), abs=1e-4)
    assert float(ball["predicted_ml"]) == pytest.approx(16 ** 3 / 1000.0)
    assert ball["flag"] == "review"
    bead = [r for r in rows if r["class"] == "Bead" and r["case"] == "large"][0]
    assert bead["state"] == "possibly missed" and bead["estimated_precision"] == ""
    assert "nan" not in out_csv.read_text().lower()
    cohort = [r for r in rows if r["case"] == "(cohort mean)"]
    assert [r["class"] for r in cohort] == ["Ball", "Bead"]
    text = capsys.readouterr().out
    assert "then the lowest estimated Dice of Ball, ties broken by the expected mislabelled volume" in text


def test_estimate_ranks_by_the_worst_class(tmp_path, capsys):
    torch.manual_seed(0)
    # A real (random) network: cases with different images get different estimates.
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]})
    card = {"name": "rnd", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                    "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"patch_size": [16, 16, 16], "normalization": {"scheme": "none"}}}
    model = tmp_path / "rnd.imbseg"
    save_bundle(model, card, net.eval())
    img_dir, _ = _folders(tmp_path, n=3)
    out_csv = tmp_path / "e.csv"
    assert cli_main(["estimate", "--model", str(model), "--images", str(img_dir), "--csv", str(out_csv)]) == 0
    rows = [r for r in csv.DictReader(out_csv.open()) if not r["case"].startswith("(")]
    worst = {}
    for r in rows:
        if r["estimated_dice"]:
            worst[r["case"]] = min(worst.get(r["case"], 2.0), float(r["estimated_dice"]))
    order = [line.split(".", 1)[1].split()[0] for line in capsys.readouterr().out.splitlines()
             if line.strip()[:1].isdigit() and ". case" in line]
    assert order == sorted(worst, key=worst.get)
    assert cli_main(["estimate", "--model", str(model), "--images", str(img_dir), "--rank-by", "Liver"]) == 2
