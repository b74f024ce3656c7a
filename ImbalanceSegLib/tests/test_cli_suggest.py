"""``imbalanceseg suggest`` (issue #23 item 3): which unlabelled scans of a folder to annotate next,
on tiny synthetic volumes; the ranking is the library's (:func:`rank_for_annotation`), the
uncertainty of a hand-made model worked out by hand."""

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import load_bundle, save_bundle
from imbalanceseglib.cli import SUGGEST_COLUMNS, SUGGEST_STRATEGIES
from imbalanceseglib.cli import main as cli_main
from imbalanceseglib.images import read_image
from imbalanceseglib.networks import build_network
from imbalanceseglib.suggestive import STRATEGIES, LazyScans, rank_for_annotation, scan_uncertainty

from libtest_helpers import CLASSES, sphere_case

NAMES = [c["name"] for c in CLASSES]
PARAMS = {"in_channels": 1, "out_channels": 3, "features": [4, 8]}


def _write(arr, path):
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(arr, dtype=np.float32)), str(path))


def _save(tmp_path, net, name, normalization="percentile_zscore"):
    card = {"name": name, "network": {"arch": "UNet3D", "params": PARAMS}, "classes": CLASSES,
            "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": normalization}}}
    path = tmp_path / f"{name}.imbseg"
    save_bundle(path, card, net.eval())
    return path


def _random_model(tmp_path):
    """A real (random) network: different scans get different uncertainties and descriptors."""
    torch.manual_seed(0)
    return _save(tmp_path, build_network("UNet3D", PARAMS), "random")


GAIN, THRESHOLD, LIFT, BEAD = 6.0, 1.0, 20.0, -10.0


def _zscore_model(tmp_path):
    """A U-Net whose Ball logit is ``GAIN * (z - THRESHOLD)``, ``z`` the z-score of the image over
    its (single, 16^3) window; Background 0, Bead ``BEAD``. One path through the network: the
    first encoder block and the last decoder block pass channel 0 on (centre tap 1), their instance
    norms z-score it and lift it by ``LIFT`` so the leaky ReLUs leave it alone, and the head reads it
    (a z-score of a z-score is itself); every other weight is 0 (the deeper level adds nothing)."""
    net = build_network("UNet3D", PARAMS)
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        for block, channel in ((net.encoders[0], 0), (net.decoders[0], 4)):  # decoder input: [up, skip]
            block[0].weight[0, channel, 1, 1, 1] = 1.0
            block[3].weight[0, 0, 1, 1, 1] = 1.0
            for norm in (block[1], block[4]):
                norm.weight[0], norm.bias[0] = 1.0, LIFT
        net.head.weight[1, 0, 0, 0, 0] = GAIN
        net.head.bias.copy_(torch.tensor([0.0, -GAIN * (LIFT + THRESHOLD), BEAD]))
    return _save(tmp_path, net, "zscore", normalization="none")


def _by_hand(arr):
    """The z-score model's probabilities, from the image alone."""
    z = (arr - arr.mean()) / arr.std()
    logits = np.stack([np.zeros_like(z), GAIN * (z - THRESHOLD), np.full_like(z, BEAD)]).astype(np.float64)
    p = np.exp(logits - logits.max(0))
    return p / p.sum(0)


def _ball(radius):
    z, y, x = np.mgrid[:16, :16, :16]
    return (((z - 8) ** 2 + (y - 8) ** 2 + (x - 8) ** 2) < radius ** 2).astype(np.float32)


def _pool(tmp_path, n=4, labelled=1):
    pool, lab = tmp_path / "pool", tmp_path / "labelled"
    pool.mkdir()
    lab.mkdir()
    for i in range(n):
        _write(sphere_case(i, shape=(16, 16, 16))[0], pool / f"case{i}.nrrd")
    for i in range(labelled):
        _write(sphere_case(10 + i, shape=(16, 16, 16))[0], lab / f"old{i}.nrrd")
    return pool, lab


def _read_folder(folder):
    return {p.name[:-len(".nrrd")]: read_image(p) for p in sorted(folder.glob("*.nrrd"))}


def test_strategies_are_the_librarys():
    assert SUGGEST_STRATEGIES == STRATEGIES


def test_suggest_is_the_librarys_ranking_and_writes_csv_and_json(tmp_path, capsys):
    model = _random_model(tmp_path)
    pool, lab = _pool(tmp_path, n=3)
    # a copy of the labelled scan in the pool: covered by it (similarity 1), it adds nothing
    _write(sphere_case(10, shape=(16, 16, 16))[0], pool / "copy_of_old0.nrrd")
    out_csv, out_json = tmp_path / "ranking.csv", tmp_path / "ranking.json"
    assert cli_main(["suggest", "--model", str(model), "--images", str(pool), "--labelled", str(lab), "-n", "2",
                     "--candidates-factor", "2.5", "--out", str(out_csv), "--out", str(out_json)]) == 0
    text = capsys.readouterr().out
    want = rank_for_annotation(load_bundle(model), _read_folder(pool), 2, annotated=_read_folder(lab),
                               candidates_factor=2.5)
    doc = json.loads(out_json.read_text())
    assert doc["strategy"] == "suggestive" and doc["n"] == 2 and doc["labelled"] == ["old0"]
    assert doc["classes"] == NAMES[1:]
    assert [r["name"] for r in doc["rows"]] == [r.name for r in want]
    for got, r in zip(doc["rows"], want):
        assert got["rank"] == r.rank and got["chosen"] == r.chosen and got["reason"] == r.reason
        assert got["uncertainty"] == pytest.approx(r.uncertainty, rel=1e-6)
        assert got["gain"] == pytest.approx(r.gain, rel=1e-5, abs=1e-9)
        assert got["per_class"] == pytest.approx(r.per_class, rel=1e-6)
    rows = list(csv.DictReader(out_csv.open()))
    assert list(rows[0]) == SUGGEST_COLUMNS + ["uncertainty Ball", "uncertainty Bead", "reason"]
    assert [r["scan"] for r in rows] == [r.name for r in want]
    assert [r["chosen"] for r in rows] == ["yes", "yes", "no", "no"]
    assert [float(r["uncertainty"]) for r in rows] == pytest.approx([r.uncertainty for r in want], rel=1e-5)
    copy = next(r for r in rows if r["scan"] == "copy_of_old0")
    assert copy["chosen"] == "no" and copy["similar_to"] == "old0"
    assert float(copy["similarity"]) == pytest.approx(1.0, abs=1e-9)
    assert float(copy["representativeness_gain"]) == pytest.approx(0.0, abs=1e-9)
    # the printed table: one line per scan, by rank, the chosen ones marked
    lines = [ln.split() for ln in text.splitlines() if ln[:6].strip().isdigit()]
    assert [ln[0] for ln in lines] == ["1", "2", "3", "4"]
    assert [ln[1] == "yes" for ln in lines] == [True, True, False, False]
    assert [ln[2] if ln[1] == "yes" else ln[1] for ln in lines] == [r.name for r in want]
    assert "4 unlabelled scan(s)" in text and "1 labelled" in text and "the 4 most uncertain are candidates" in text
    assert f"wrote {out_csv}" in text and f"wrote {out_json}" in text


def test_uncertainty_puts_the_ambiguous_scan_first_with_its_value_by_hand(tmp_path, capsys):
    # Two sharp balls: the z-score takes two values, both far from THRESHOLD, so the model is sure
    # everywhere. A ramp along x: z spreads evenly over [-1.65, 1.65] and the voxels near
    # THRESHOLD are in doubt.
    model = _zscore_model(tmp_path)
    folder = tmp_path / "pool"
    folder.mkdir()
    arrays = {"ball_small": _ball(3), "ball_large": _ball(6),
              "ramp": np.broadcast_to(np.arange(16, dtype=np.float32), (16, 16, 16))}
    for name, arr in arrays.items():
        _write(arr, folder / f"{name}.nrrd")
    out = tmp_path / "u.json"
    assert cli_main(["suggest", "--model", str(model), "--images", str(folder), "-n", "1",
                     "--strategy", "uncertainty", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows][0] == "ramp" and [r["chosen"] for r in rows] == [True, False, False]
    by_hand = {n: scan_uncertainty(_by_hand(a), NAMES).score for n, a in arrays.items()}
    got = {r["name"]: r["uncertainty"] for r in rows}
    assert got == pytest.approx(by_hand, abs=1e-5)
    assert got["ramp"] > 0.1 and got["ball_small"] < 0.01 and got["ball_large"] < 0.01
    assert all(r["per_class"]["Bead"] == 0.0 for r in rows)  # p(Bead) < 0.25 everywhere: sure it is absent
    assert all(r["gain"] is None for r in rows)  # no descriptors for this strategy
    assert rows[0]["reason"].startswith("chosen: among the 1 most uncertain, uncertainty 0.")
    assert "strategy uncertainty: 1 chosen, the most uncertain" in capsys.readouterr().out


def test_random_is_seeded_runs_no_network_and_takes_the_pool_of_a_data_folder(tmp_path, capsys, monkeypatch):
    # a data folder: the images without a label map are the pool, the others labelled
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.json").write_text(json.dumps(CLASSES))
    for i in range(5):
        img, lab = sphere_case(i, shape=(16, 16, 16))
        _write(img, data / "images" / f"case{i}.nrrd")
        if i in (1, 3):
            sitk.WriteImage(sitk.GetImageFromArray(lab), str(data / "labels" / f"case{i}.nrrd"))
    import imbalanceseglib.inference as inference
    monkeypatch.setattr(inference, "predict", lambda *a, **k: pytest.fail("random runs no network"))
    out = tmp_path / "r.json"
    argv = ["suggest", "--model", str(_random_model(tmp_path)), "--images", str(data), "-n", "2",
            "--strategy", "random", "--seed", "7", "--out", str(out)]
    assert cli_main(argv) == 0
    first = json.loads(out.read_text())["rows"]
    assert sorted(r["name"] for r in first) == ["case0", "case2", "case4"]
    assert cli_main(argv) == 0
    assert json.loads(out.read_text())["rows"] == first
    pool = {n: read_image(data / "images" / f"{n}.nrrd") for n in ("case0", "case2", "case4")}
    want = rank_for_annotation(load_bundle(tmp_path / "random.imbseg"), pool, 2, strategy="random", seed=7)
    assert [r["name"] for r in first] == [r.name for r in want]
    assert all(r["uncertainty"] is None for r in first) and [r["chosen"] for r in first] == [True, True, False]
    text = capsys.readouterr().out
    assert "3 unlabelled scan(s)" in text and "2 labelled (only the suggestive strategy uses them)" in text


@pytest.mark.parametrize("case, message", [
    ("empty", "--images folder '{pool}' holds no images"),
    ("missing", "--images folder '{tmp}/nowhere' does not exist"),
    ("n_large", "-n 5: choose between 1 and the 3 unlabelled scan(s) of folder {pool}"),
    ("n_zero", "-n 0: choose between 1 and the 3"),
    ("overlap", "scan(s) case0 are both in the pool"),
    ("suffix", "--out {tmp}/r.txt: write .csv or .json"),
    ("out_folder", "--out {tmp}/nowhere/r.csv: folder {tmp}/nowhere does not exist"),
    ("labelled_file", "--labelled {tmp}/old.nrrd: no such file or folder"),
    ("not_a_model", "notes.imbseg"),
    ("unreadable", "image case1 ({pool}/case1.nrrd): cannot be read as an image"),
    ("flat", "image case2 ({pool}/case2.nrrd) is 2-D"),
])
def test_errors_name_the_problem_and_write_nothing(tmp_path, capsys, case, message):
    pool, lab = _pool(tmp_path, n=3, labelled=0)
    model = tmp_path / "model.imbseg"
    out = tmp_path / "r.csv"
    n = {"n_large": "5", "n_zero": "0"}.get(case, "1")
    images, labelled = str(pool), None
    if case == "empty":
        for p in pool.iterdir():
            p.unlink()
    elif case == "missing":
        images = str(tmp_path / "nowhere")
    elif case == "overlap":
        _write(sphere_case(0, shape=(16, 16, 16))[0], lab / "case0.nrrd")
        labelled = str(lab)
    elif case == "suffix":
        out = tmp_path / "r.txt"
    elif case == "out_folder":
        out = tmp_path / "nowhere" / "r.csv"
    elif case == "labelled_file":
        labelled = str(tmp_path / "old.nrrd")
    elif case == "unreadable":
        (pool / "case1.nrrd").write_bytes(b"NRRD0004\ntype: float\ndimension: 3\nsizes: 16 16\n\n")
    elif case == "flat":
        _write(np.random.default_rng(0).normal(size=(16, 16)), pool / "case2.nrrd")
    if case == "not_a_model":
        model = tmp_path / "notes.imbseg"
        model.write_text("not a bundle")
    else:
        _random_model(tmp_path).rename(model)
    argv = ["suggest", "--model", str(model), "--images", images, "-n", n, "--out", str(out)]
    if labelled:
        argv += ["--labelled", labelled]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("imbalanceseg: error: ")
    assert message.format(pool=pool, tmp=tmp_path) in err
    assert not out.exists()


def test_lazy_scans_read_each_scan_when_needed_one_at_a_time():
    reads = []

    def loader(name):
        def read():
            reads.append(name)
            return sitk.GetImageFromArray(sphere_case(int(name[-1]), shape=(8, 8, 8))[0])
        return read

    scans = LazyScans({f"s{i}": loader(f"s{i}") for i in range(3)})
    assert list(scans) == ["s0", "s1", "s2"] and len(scans) == 3 and reads == []
    a = scans["s1"]
    assert scans["s1"] is a and reads == ["s1"]          # the last scan is kept
    scans["s0"]
    scans["s1"]
    assert reads == ["s1", "s0", "s1"] and scans.reads == 3  # only the last one
    with pytest.raises(KeyError):
        scans["s9"]
