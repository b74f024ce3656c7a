"""Issue #24 sharp edges: file modes of written outputs, position-independent surface Dice,
and what ``imbalanceseg evaluate`` says about labels it skips or cannot find."""

import contextlib
import csv
import json
import os
import stat
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib import evaluation as ev
from imbalanceseglib.metrics import surface
from imbalanceseglib.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from imbalanceseglib.bundle import save_bundle
from imbalanceseglib.cli import main as cli_main
from imbalanceseglib.images import write_image
from imbalanceseglib.networks import build_network

from libtest_helpers import CLASSES

UMASKS = [0o022, 0o077, 0o002, 0o027]


@contextlib.contextmanager
def _umask(value):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# --- 1. written files respect the umask -----------------------------------------------------------

@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_atomic_writes_get_the_umask_mode(tmp_path, umask):
    with _umask(umask):
        a = atomic_write_bytes(tmp_path / "a.bin", b"data")
        b = atomic_write_text(tmp_path / "sub" / "b.csv", "x\n")
        with atomic_path(tmp_path / "checkpoint.pt", suffix=".pt") as tmp:  # as training writes checkpoints
            torch.save({"w": torch.zeros(2)}, tmp)
        (tmp_path / "old.csv").write_text("old")
        os.chmod(tmp_path / "old.csv", 0o600)
        c = atomic_write_text(tmp_path / "old.csv", "new")  # replacing a file gives the umask mode too
    for p in (a, b, tmp_path / "checkpoint.pt", c):
        assert _mode(p) == 0o666 & ~umask, (p, oct(_mode(p)))
    assert c.read_text() == "new"
    assert not [p for p in tmp_path.rglob(".*tmp*")], "no temporary files left behind"


def test_failed_atomic_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    (tmp_path / "keep.csv").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep.csv") as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    with pytest.raises(OSError, match="no data"):
        with atomic_path(tmp_path / "empty.csv"):
            pass
    assert (tmp_path / "keep.csv").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.csv"]


def test_umask_is_read_without_changing_it(tmp_path):
    with _umask(0o027):
        atomic_write_text(tmp_path / "x.txt", "x")
        assert os.umask(0o027) == 0o027  # still what the caller set


@pytest.mark.parametrize("umask", UMASKS, ids=oct)
def test_bundle_image_and_evaluate_csv_get_the_umask_mode(tmp_path, umask):
    card = {"name": "t", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                  "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"target_spacing": [1.0, 1.0, 2.0], "patch_size": [16, 16, 16],
                                                   "normalization": {"scheme": "none"}},
            "calibration": {"method": "none"}}
    net = build_network("UNet3D", card["network"]["params"])
    lab = np.zeros((4, 6, 6), np.uint8)
    lab[1:3, 2:5, 2:5] = 1
    img = sitk.GetImageFromArray(lab)
    for d in ("ref", "pred"):
        (tmp_path / d).mkdir()
        sitk.WriteImage(img, str(tmp_path / d / "c0.nrrd"))
    with _umask(umask):
        bundle = save_bundle(tmp_path / "m.imbseg", card, net)
        label_map = write_image(img, tmp_path / "labels.nrrd")
        nifti = write_image(sitk.Cast(img, sitk.sitkFloat32), tmp_path / "probability_00.nii.gz")
        assert cli_main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(tmp_path / "ref"),
                         "--out", str(tmp_path / "out"), "--metrics", "overlap"]) == 0
    written = [bundle, label_map, nifti] + sorted((tmp_path / "out").glob("*.csv"))
    assert len(written) == 6
    for p in written:
        assert _mode(p) == 0o666 & ~umask, (p, oct(_mode(p)))


# --- 2. surface Dice does not depend on where the structure sits ------------------------------------

SPACING = (0.4, 0.6, 1.2)  # 3 x 0.4 = 1.2000000000000002 in binary floating point


def _monai_nsd(pred, ref, spacing, tol):
    from monai.metrics import compute_surface_dice

    def t(m):
        return torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compute_surface_dice(t(pred), t(ref), [tol], spacing=tuple(spacing), use_subvoxels=True,
                                    include_background=True).item()


def _shifted_pair(shape, z, y, x, speck):
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    ref[z:z + 6, y:y + 7, x:x + 4] = True
    pred[z + 3:z + 9, y + 2:y + 8, x + 1:x + 5] = True  # moved by 3 x 0.4, 2 x 0.6 and 1 x 1.2 mm
    if speck:  # far-apart specks make the box sparse, so the k-d tree (not the EDT) finds neighbours
        pred[z + 28, y + 30, x + 18] = True
        ref[z + 28 + 6, y + 30, x + 18] = True  # 6 x 0.4 = 2.4 mm away (2.4000000000000004 in binary)
    return pred, ref


POSITIONS = [(z, y, x) for z in (0, 1, 2, 5) for y in (0, 1, 4) for x in (0, 1, 3)]


@pytest.mark.parametrize("tol", [1.2, 2.4])
@pytest.mark.parametrize("speck", [False, True])
@pytest.mark.parametrize("path", ["auto", "edt", "kdtree"])
def test_surface_dice_is_the_same_at_every_position_and_equals_monai(monkeypatch, tol, speck, path):
    if path != "auto":
        monkeypatch.setattr(surface, "_use_edt", lambda box, n: path == "edt")
    shape = (42, 44, 26)
    values = {}
    for z, y, x in POSITIONS:
        pred, ref = _shifted_pair(shape, z, y, x, speck)
        values.setdefault(ev.evaluate_binary(pred, ref, SPACING, nsd_tolerance_mm=tol, metrics=["nsd"]).nsd,
                          []).append((z, y, x))
    assert len(values) == 1, {k: v[:3] for k, v in values.items()}
    nsd = next(iter(values))
    pred, ref = _shifted_pair(shape, 5, 4, 3, speck)
    assert nsd == pytest.approx(_monai_nsd(pred, ref, SPACING, tol), rel=1e-6, abs=1e-7)


def test_distances_on_exact_multiples_count_as_within_the_tolerance():
    # A box moved by 3 voxels of 0.4 mm: its top and bottom surfels are 3 x 0.4 = 1.2 mm from the other's.
    ref = np.zeros((12, 5, 5), bool)
    ref[2:4, 1:4, 1:4] = True
    pred = np.roll(ref, 3, axis=0)
    sp = (0.4, 1.0, 1.0)
    got = ev.evaluate_binary(pred, ref, sp, nsd_tolerance_mm=1.2, metrics=["nsd"]).nsd
    assert got == pytest.approx(_monai_nsd(pred, ref, sp, 1.2), rel=1e-6)
    # float32 spacing headers (NIfTI) hold 0.4 as 0.4000000059604645: still within 1.2 mm
    sp32 = tuple(float(np.float32(s)) for s in sp)
    assert ev.evaluate_binary(pred, ref, sp32, nsd_tolerance_mm=1.2, metrics=["nsd"]).nsd == got


def test_distances_do_not_depend_on_the_box(monkeypatch):
    monkeypatch.setattr(surface, "_use_edt", lambda box, n: False)
    shape = (42, 44, 26)
    hd = set()
    for z, y, x in POSITIONS:
        pred, ref = _shifted_pair(shape, z, y, x, True)
        r = ev.evaluate_binary(pred, ref, SPACING, metrics=["distance"])
        hd.add((r.hd_mm, r.hd95_mm, r.assd_mm))
    assert len(hd) == 1, hd


# --- 3. evaluate names skipped and absent labels, and the case of every error -----------------------

def _write(arr, path, spacing=(1.0, 1.0, 1.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    sitk.WriteImage(im, str(path))


def _folders(tmp_path, cases):
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir(exist_ok=True)
    pred_dir.mkdir(exist_ok=True)
    for cid, (pred, ref) in cases.items():
        _write(ref, ref_dir / f"{cid}.nrrd")
        _write(pred, pred_dir / f"{cid}.nrrd")
    return pred_dir, ref_dir


def _base():
    a = np.zeros((4, 8, 8), np.uint8)
    a[1:3, 2:6, 2:6] = 1
    return a


def _classes(tmp_path, values):
    path = tmp_path / "classes.json"
    path.write_text(json.dumps([{"value": v, "name": n} for v, n in values]))
    return path


def _evaluate(*args):
    return cli_main(["evaluate", *map(str, args)])


def test_evaluate_warns_about_labels_in_the_maps_that_classes_leaves_out(tmp_path, capsys):
    ref0, pred1 = _base(), _base()
    ref0[3, 7, 7] = 2          # an extra structure in case0's reference
    pred1[0, 0, 0] = 3         # and a label the classes file does not know in case1's prediction
    pred_dir, ref_dir = _folders(tmp_path, {"case0": (_base(), ref0), "case1": (pred1, _base())})
    classes = _classes(tmp_path, [(0, "Background"), (1, "Liver")])
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "out", "--classes", classes) == 0
    err = capsys.readouterr().err
    assert "warning" in err
    line2 = next(line for line in err.splitlines() if "label 2" in line)
    assert "case0" in line2 and "reference" in line2 and "not evaluated" in line2
    line3 = next(line for line in err.splitlines() if "label 3" in line)
    assert "case1" in line3 and "prediction" in line3
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_case.csv")))
    assert {r["label"] for r in rows} == {"1"}
    # the same with an explicit --labels subset
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "out", "--labels", "1") == 0
    err = capsys.readouterr().err
    assert "label 2" in err and "label 3" in err and "--labels" in err
    # nothing is said when every label in the maps is evaluated
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "out") == 0
    assert "warning" not in capsys.readouterr().err


def test_evaluate_warns_about_a_requested_label_found_in_no_case(tmp_path, capsys):
    pred_dir, ref_dir = _folders(tmp_path, {"case0": (_base(), _base())})
    classes = _classes(tmp_path, [(0, "Background"), (1, "Liver"), (4, "Tumour")])
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "out", "--classes", classes) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "Tumour" in line)
    assert "warning" in line and "4" in line and "no case" in line
    rows = list(csv.DictReader(open(tmp_path / "out" / "per_case.csv")))
    assert [(r["label"], r["policy"]) for r in rows] == [("1", "normal"), ("4", "both_empty")]


def test_evaluate_refuses_labels_that_cannot_be_meant(tmp_path, capsys):
    pred_dir, ref_dir = _folders(tmp_path, {"case0": (_base(), _base())})
    classes = _classes(tmp_path, [(0, "Background"), (1, "Liver")])
    out = tmp_path / "out"
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", out, "--classes", classes,
                     "--labels", "1", "5") == 2
    err = capsys.readouterr().err
    assert "5" in err and "classes.json" in err
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", out, "--labels", "-1") == 2
    assert "-1" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", out, "--classes", tmp_path / "bad.json") == 2
    assert "bad.json" in capsys.readouterr().err
    assert not out.exists()


def test_evaluate_help_documents_the_label_rules(capsys):
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "warning" in text and "found in no case" in text and "error" in text


@pytest.mark.parametrize("problem", ["size", "spacing", "float_labels", "negative_labels", "unreadable"])
def test_every_evaluation_error_names_the_case_and_file(tmp_path, capsys, problem):
    good = _base()
    pred_dir, ref_dir = _folders(tmp_path, {"case0": (good, good), "caseB": (good, good)})
    bad = pred_dir / "caseB.nrrd"
    if problem == "size":
        _write(np.zeros((4, 8, 9), np.uint8), bad)
    elif problem == "spacing":
        _write(good, bad, spacing=(1.0, 1.0, 2.0))
    elif problem == "float_labels":
        _write(good.astype(np.float32) * 0.5, bad)
    elif problem == "negative_labels":
        _write(good.astype(np.int16) * -1, bad)
    else:
        bad.write_bytes(b"NRRD0004\nthis is not an image\n")
    with pytest.raises(ValueError) as info:
        ev.evaluate_folders(pred_dir, ref_dir, tmp_path / "out")
    assert "caseB" in str(info.value) and "caseB.nrrd" in str(info.value), str(info.value)
    assert _evaluate("--pred", pred_dir, "--ref", ref_dir, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "caseB" in err and "caseB.nrrd" in err, err
