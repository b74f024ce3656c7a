"""Agreement of a segmentation with itself under test-time views, or between the networks of an
ensemble (issue #22 item 2: what the confidence alone cannot see), with hand-checked values."""

import csv

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import BundleError, load_bundle, save_bundle
from imbalanceseglib.cli import main as cli_main, parse_agreement
from imbalanceseglib.inference import AGREEMENT_THRESHOLD, predict
from imbalanceseglib.networks import build_network
from imbalanceseglib.tta import AGREEMENT_VIEWS, segmentation_agreement, view_labels

NAMES = ["Background", "Ball", "Bead"]


def test_agreement_is_the_mean_dice_over_views_by_hand():
    labels = np.zeros((1, 1, 8), np.uint8)
    labels[0, 0, :4] = 1                      # Ball: 4 voxels
    v1 = np.zeros_like(labels)
    v1[0, 0, 2:6] = 1                         # overlap 2 -> Dice 2*2/(4+4) = 0.5
    v2 = labels.copy()                        # Dice 1
    v2[0, 0, 7] = 2                           # Bead only here: Dice 0 with the prediction
    agree = segmentation_agreement(labels, [v1, v2], 3)
    assert agree[0] is None
    assert agree[1] == pytest.approx(0.75)
    assert agree[2] == pytest.approx(0.0)     # absent in the prediction and v1, present in v2
    assert segmentation_agreement(labels, [labels], 4)[3] is None  # absent everywhere


def _onehot(labels, n=3):
    return torch.from_numpy(np.eye(n, dtype=np.float32)[labels].transpose(3, 0, 1, 2))


def test_views_are_mapped_back_to_the_input_grid():
    vol = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)

    def by_intensity(v):  # mirror-equivariant: the label depends on the voxel only
        return _onehot((v > 0.5).astype(np.int64))

    for view in ("flip_z", "flip_y", "flip_x", "flip_zyx", "rot90"):
        if view == "rot90":
            vol_sq = vol[:, :7, :7]
            np.testing.assert_array_equal(view_labels(by_intensity, vol_sq, view), vol_sq > 0.5)
        else:
            np.testing.assert_array_equal(view_labels(by_intensity, vol, view), vol > 0.5)

    def left_half(v):  # not equivariant: class 1 in the first 3 x-columns of whatever it is given
        lab = np.zeros(v.shape, np.int64)
        lab[..., :3] = 1
        return _onehot(lab)

    back = view_labels(left_half, vol, "flip_x")
    assert back[..., 5:].all() and not back[..., :5].any()     # the mirrored columns
    agree = segmentation_agreement(np.argmax(left_half(vol).numpy(), 0), [back], 3)
    assert agree[1] == 0.0
    # shift by a quarter window (here 4 // 4 = 1 voxel per axis): moved back onto the grid, the
    # voxels moved out of the volume take the fallback labels
    fallback = np.full(vol.shape, 2, np.uint8)
    shifted = view_labels(by_intensity, vol, "shift", window=(4, 4, 4), fallback=fallback)
    np.testing.assert_array_equal(shifted[:-1, :-1, :-1], (vol > 0.5)[:-1, :-1, :-1])
    assert (shifted[-1] == 2).all() and (shifted[:, -1] == 2).all() and (shifted[..., -1] == 2).all()
    np.testing.assert_array_equal(view_labels(left_half, vol, "shift", window=(4, 4, 4))[:-1, :-1, :2], 1)
    # a monotone contrast change keeps the order of intensities: a rank-based predictor agrees
    def above_median(v):
        return _onehot((v > np.median(v)).astype(np.int64))
    for view in ("gamma_low", "gamma_high"):
        np.testing.assert_array_equal(view_labels(above_median, vol, view), vol > np.median(vol))


def _bundle(tmp_path, arch="UNet3D", members=None):
    torch.manual_seed(0)
    params = {"in_channels": 1, "out_channels": 3, "features": [4, 8]}
    if members:
        params["members"] = members
    net = build_network(arch, params).eval()
    card = {"name": "t", "network": {"arch": arch, "params": params},
            "classes": [{"value": i, "name": n, "color": [0, 0, 0]} for i, n in enumerate(NAMES)],
            "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "none"}}}
    return save_bundle(tmp_path / f"{arch}.imbseg", card, net)


def _image(seed=1):
    return sitk.GetImageFromArray(np.random.default_rng(seed).normal(size=(16, 16, 16)).astype(np.float32))


def test_predict_records_agreement_and_marks_unstable_classes(tmp_path):
    bundle = load_bundle(_bundle(tmp_path))
    pred = predict(_image(), bundle, agreement=AGREEMENT_VIEWS)
    rows = pred.performance.classes
    for c in (1, 2):
        a = rows[c]["agreement"]
        unstable = a is not None and a < AGREEMENT_THRESHOLD
        assert any(f.kind == "agreement" and f.classes == (NAMES[c],) for f in pred.findings) == unstable
        assert ("unstable across its views" in rows[c]["state"]) == unstable
    # a random network is not contrast- or shift-invariant: at least one class must show it
    assert any(rows[c]["agreement"] is not None and rows[c]["agreement"] < 1.0 for c in (1, 2))
    # the agreement is recomputable from the views themselves
    plain = predict(_image(), bundle)
    assert np.array_equal(plain.labels, pred.labels)


def test_members_need_an_ensemble_and_agree_between_its_networks(tmp_path):
    with pytest.raises(BundleError, match="has one network: 'members' agreement needs an ensemble"):
        predict(_image(), load_bundle(_bundle(tmp_path)), agreement=["members"])
    ens = load_bundle(_bundle(tmp_path, "UNet3DEnsemble", members=2))
    pred = predict(_image(), ens, agreement=["members"])
    # by hand: each member's own argmax against the ensemble's
    from imbalanceseglib.inference import sliding_window_logits
    vol = sitk.GetArrayFromImage(_image())
    mean = sliding_window_logits(ens.network, vol, [16, 16, 16])[0].argmax(0).numpy()
    each = [sliding_window_logits(m, vol, [16, 16, 16])[0].argmax(0).numpy() for m in ens.network.members]
    want = segmentation_agreement(mean, each, 3)
    got = [r.get("agreement") for r in pred.performance.classes]
    assert got[0] is None and got[1:] == pytest.approx(want[1:])


def test_the_cli_takes_agreement_for_predict_and_estimate(tmp_path, capsys):
    assert parse_agreement("default,members") == ["shift", "gamma_low", "gamma_high", "members"]
    assert parse_agreement("flip_x") == ["flip_x"]
    with pytest.raises(ValueError, match="--agreement 'identity'"):
        parse_agreement("identity")
    model = _bundle(tmp_path)
    folder = tmp_path / "images"
    folder.mkdir()
    sitk.WriteImage(_image(2), str(folder / "a.nrrd"))
    assert cli_main(["estimate", "--model", str(model), "--images", str(folder), "--agreement", "default",
                     "--csv", str(tmp_path / "e.csv")]) == 0
    rows = [r for r in csv.DictReader((tmp_path / "e.csv").open()) if r["case"] == "a"]
    pred = predict(_image(2), load_bundle(model), agreement=AGREEMENT_VIEWS)
    for r in rows:
        want = pred.performance.classes[NAMES.index(r["class"])]["agreement"]
        assert (r["agreement"] == "") if want is None else float(r["agreement"]) == pytest.approx(want, abs=1e-5)
    capsys.readouterr()
    assert cli_main(["predict", "--model", str(model), "--input", str(folder / "a.nrrd"), "--output",
                     str(tmp_path / "o"), "--agreement", "default", "--tta", "identity,flip_x"]) == 2
    assert "--agreement compares the plain prediction with its views" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_mirrored_views_only_for_a_model_trained_with_them(tmp_path):
    path = _bundle(tmp_path)
    with pytest.raises(BundleError, match="was not trained with mirroring along x, so its segmentation"):
        predict(_image(), load_bundle(path), agreement=["flip_x"])
    bundle = load_bundle(path)
    card = dict(bundle.card)
    card["training"] = {"config": {"augmentation": {"default": {"preset": "none", "flip_prob": [0.0, 0.0, 0.5]},
                                                    "rare": "none"}}}
    flipped = save_bundle(tmp_path / "flipped.imbseg", card, bundle.network)
    pred = predict(_image(), load_bundle(flipped), agreement=["flip_x"])
    assert pred.performance.classes[1]["agreement"] is not None
    with pytest.raises(BundleError, match="mirroring along y"):
        predict(_image(), load_bundle(flipped), agreement=["flip_y"])


def test_the_bounded_memory_path_gives_the_same_agreement_as_predict(tmp_path):
    """predict_streaming(agreement=...) (the panel's background job) runs each view as one more
    streaming pass: the same agreement values, findings and states as the in-memory predict."""
    from imbalanceseglib.streaming import predict_streaming
    for arch, members, views in (("UNet3D", None, AGREEMENT_VIEWS), ("UNet3DEnsemble", 2, ["members", "shift"])):
        bundle = load_bundle(_bundle(tmp_path, arch, members=members))
        image = sitk.GetImageFromArray(np.random.default_rng(3).normal(size=(20, 24, 18)).astype(np.float32))
        want = predict(image, bundle, agreement=views)
        got = predict_streaming(image, bundle, agreement=views, storage="float32")
        w = [r.get("agreement") for r in want.performance.classes]
        g = [r.get("agreement") for r in got.performance.classes]
        assert g[0] is None and g[1:] == pytest.approx(w[1:], abs=1e-6), arch
        assert any(a is not None and a < 1.0 for a in g[1:])  # the views did change something
        assert [r["state"] for r in got.performance.classes] == [r["state"] for r in want.performance.classes]
        assert sorted(f.kind for f in got.findings) == sorted(f.kind for f in want.findings)
        assert "agreement" in got.timings
        plain = predict_streaming(image, bundle, storage="float32")
        assert all("agreement" not in r for r in plain.performance.classes)


def test_predict_stream_writes_the_agreement_column(tmp_path, capsys):
    model = _bundle(tmp_path)
    sitk.WriteImage(_image(2), str(tmp_path / "a.nrrd"))
    assert cli_main(["predict", "--model", str(model), "--input", str(tmp_path / "a.nrrd"), "--output",
                     str(tmp_path / "o"), "--stream", "--agreement", "default"]) == 0
    printed = capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "o" / "performance_estimate.tsv").open(), delimiter="\t"))
    want = predict(_image(2), load_bundle(model), agreement=AGREEMENT_VIEWS).performance.classes
    assert [r["Segment"] for r in rows] == NAMES[1:]
    for r in rows:
        a = want[NAMES.index(r["Segment"])]["agreement"]
        assert (r["Agreement"] == "") if a is None else float(r["Agreement"]) == pytest.approx(a, abs=1e-6)
        if a is not None:
            assert f"{a:.3f}" in printed
    assert "agreement" in printed.splitlines()[[i for i, ln in enumerate(printed.splitlines())
                                                 if "label-free performance estimate" in ln][0] + 1]
