"""Users' data folders (issue #20 item 1): the plain, nnU-Net v2 and MSD layouts, classes in both
forms, non-consecutive and float-coded label values, the errors, and a short training run whose
predictions carry the original label values. Tiny synthetic data only (16^3 volumes)."""

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from imbalanceseglib.card import validate_card
from imbalanceseglib.container import BundleError
from imbalanceseglib.data import config_classes_from_data, load_training_data
from imbalanceseglib.datasets import (DatasetError, indices_to_label_values, label_values_to_indices,
                                      open_dataset, parse_classes)


def _volume(seed, values=(1, 2), dtype=np.uint8, shape=(16, 16, 16)):
    """(image, label) arrays: a ball of values[0] and a small cube of values[1]."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    c = rng.integers(6, 10, 3)
    lab = np.zeros(shape, dtype)
    lab[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < 16] = values[0]
    lab[1:4, 1:4, 1:4] = values[1]
    img = (lab > 0).astype(np.float32) + (lab == values[1]) + rng.normal(0, 0.1, shape).astype(np.float32)
    return img.astype(np.float32), lab


def _write(arr, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))


def _plain(root, classes, values=(1, 2), n=2, dtype=np.uint8):
    for i in range(n):
        img, lab = _volume(i, values, dtype)
        _write(img, root / "images" / f"case{i}.nrrd")
        _write(lab, root / "labels" / f"case{i}.nrrd")
    (root / "classes.json").write_text(json.dumps(classes))
    return root


def _nnunet(root, labels, values=(1, 2), channels=None, n=2, test=1):
    for i in range(n):
        img, lab = _volume(i, values)
        _write(img, root / "imagesTr" / f"hippo_{i:03d}_0000.nii.gz")
        _write(lab, root / "labelsTr" / f"hippo_{i:03d}.nii.gz")
    for i in range(test):
        _write(_volume(10 + i, values)[0], root / "imagesTs" / f"hippo_{100 + i:03d}_0000.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "channel_names": channels or {"0": "MRI"}, "labels": labels, "file_ending": ".nii.gz", "numTraining": n}))
    return root


def _msd(root, labels, values=(1, 2), modality=None, n=2):
    training = []
    for i in range(n):
        img, lab = _volume(i, values)
        _write(img, root / "imagesTr" / f"liver_{i}.nii.gz")
        _write(lab, root / "labelsTr" / f"liver_{i}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    _write(_volume(9, values)[0], root / "imagesTs" / "liver_9.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Liver", "modality": modality or {"0": "CT"}, "labels": labels, "numTraining": n,
        "training": training, "test": ["./imagesTs/liver_9.nii.gz"]}))
    return root


# --------------------------------------------------------------------------- the layouts


def test_plain_layout_with_a_list_and_with_a_mapping(tmp_path):
    ds = open_dataset(_plain(tmp_path / "a", [{"value": 1, "name": "ball", "color": [1, 0, 0]},
                                              {"value": 2, "name": "cube"}]))
    assert ds.layout == "plain" and ds.modality == ""
    assert [(c.index, c.name, c.label_value) for c in ds.classes] == [(0, "Background", 0), (1, "ball", 1),
                                                                     (2, "cube", 2)]
    assert ds.classes[1].color == (1.0, 0.0, 0.0) and not ds.needs_mapping
    assert [c.case_id for c in ds.cases] == ["case0", "case1"]
    assert all(c.label is not None for c in ds.cases)
    assert "label_value" not in ds.config_classes()[1]
    ds = open_dataset(_plain(tmp_path / "b", {"0": "background", "1": "anterior hippocampus", "2": "posterior"}))
    assert [c.name for c in ds.classes] == ["background", "anterior hippocampus", "posterior"]


def test_nnunet_v2_layout(tmp_path):
    ds = open_dataset(_nnunet(tmp_path, {"background": 0, "anterior": 1, "posterior": 2}))
    assert ds.layout == "nnunet_v2" and ds.modality == "MRI"
    assert [c.case_id for c in ds.cases] == ["hippo_000", "hippo_001"]
    assert ds.cases[0].label.name == "hippo_000.nii.gz"
    assert [c.case_id for c in ds.test_cases] == ["hippo_100"] and ds.test_cases[0].label is None
    assert [c.name for c in ds.classes] == ["background", "anterior", "posterior"]


def test_nnunet_multichannel_is_refused_naming_the_channels(tmp_path):
    _nnunet(tmp_path, {"background": 0, "tumour": 1}, values=(1, 1), channels={"0": "T1", "1": "FLAIR"})
    with pytest.raises(DatasetError, match="2 channels \\(T1, FLAIR\\)"):
        open_dataset(tmp_path)


def test_msd_layout(tmp_path):
    ds = open_dataset(_msd(tmp_path, {"0": "background", "1": "liver", "2": "tumour"}))
    assert ds.layout == "msd" and ds.modality == "CT"
    assert [c.case_id for c in ds.cases] == ["liver_0", "liver_1"]
    assert ds.cases[1].label.name == "liver_1.nii.gz"
    assert [c.case_id for c in ds.test_cases] == ["liver_9"]
    assert [c.name for c in ds.classes] == ["background", "liver", "tumour"]
    with pytest.raises(DatasetError, match="2 channels \\(T2, ADC\\)"):
        _msd(tmp_path / "p", {"0": "background", "1": "prostate"}, modality={"0": "T2", "1": "ADC"})
        open_dataset(tmp_path / "p")


def test_not_a_data_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a data folder"):
        open_dataset(tmp_path)
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="needs classes.json"):
        open_dataset(tmp_path)


# --------------------------------------------------------------------------- label values


def test_non_consecutive_labels_map_to_indices_and_back(tmp_path):
    ds = open_dataset(_plain(tmp_path, {"0": "background", "2": "ball", "5": "cube"}, values=(2, 5)))
    assert ds.label_values == [0, 2, 5] and ds.needs_mapping
    classes = ds.config_classes()
    assert [(c["value"], c["label_value"]) for c in classes] == [(0, 0), (1, 2), (2, 5)]
    lab = ds.read_labels(ds.cases[0])
    arr = sitk.GetArrayFromImage(lab)
    assert set(np.unique(arr)) == {0, 1, 2}
    original = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.cases[0].label)))
    assert np.array_equal(indices_to_label_values(arr, ds.label_values), original)
    train, val = load_training_data({"kind": "dataset", "folder": str(tmp_path)}, tmp_path, classes=classes)
    assert len(train) == 2 and not val and sitk.GetArrayFromImage(train[0][1]).max() == 2
    # a config whose classes name other label values is refused
    with pytest.raises(DatasetError, match="differ from the data folder"):
        load_training_data({"kind": "dataset", "folder": str(tmp_path)}, tmp_path,
                           classes=[{"value": 0, "name": "b"}, {"value": 1, "name": "x"}, {"value": 2, "name": "y"}])
    # the card records the mapping; it is validated
    card = {"name": "m", "network": {"arch": "UNet3D", "params": {"features": [4, 8], "out_channels": 3}},
            "classes": classes, "preprocessing": {}}
    validate_card(card)
    bad = json.loads(json.dumps(card))
    bad["classes"][2]["label_value"] = 2
    with pytest.raises(BundleError, match="label_value 2 appears twice"):
        validate_card(bad)
    bad["classes"][2]["label_value"] = 2.5
    with pytest.raises(BundleError, match="label_value must be an integer"):
        validate_card(bad)
    del bad["classes"][2]["label_value"]
    with pytest.raises(BundleError, match="every class or for none"):
        validate_card(bad)


def test_float_coded_labels_are_accepted(tmp_path):
    ds = open_dataset(_plain(tmp_path, {"0": "background", "1": "a", "2": "b"}, dtype=np.float64))
    assert set(np.unique(sitk.GetArrayFromImage(ds.read_labels(ds.cases[0])))) == {0, 1, 2}


def test_bad_label_values_name_the_case_file_and_values():
    where = "case 'c7' (/data/labels/c7.nii.gz)"
    with pytest.raises(DatasetError, match=r"case 'c7' \(/data/labels/c7.nii.gz\): label values must be integers, "
                                           r"found \[2.5\]"):
        label_values_to_indices(np.array([0, 1, 2.5]), [0, 1, 2], where)
    with pytest.raises(DatasetError, match=r"c7.*must be integers, found \[nan\]"):
        label_values_to_indices(np.array([0, np.nan]), [0, 1], where)
    with pytest.raises(DatasetError, match=r"c7.*label values \[3, 7\] are not among the classes' values \[0, 1, 2\]"):
        label_values_to_indices(np.array([0, 3, 7], np.uint8), [0, 1, 2], where)


def test_unknown_value_in_a_case_names_it(tmp_path):
    ds = open_dataset(_plain(tmp_path, {"0": "background", "1": "a", "2": "b"}, values=(1, 4)))
    with pytest.raises(DatasetError, match=r"case 'case0' \(.*case0.nrrd\): label values \[4\]"):
        ds.read_labels(ds.cases[0])


def test_classes_parsing_errors():
    with pytest.raises(DatasetError, match="listed twice"):
        parse_classes([{"value": 1, "name": "a"}, {"value": 1, "name": "b"}], "x")
    with pytest.raises(DatasetError, match="region"):
        parse_classes({"background": 0, "whole": [1, 2]}, "x", name_to_value=True)
    with pytest.raises(DatasetError, match="not a non-negative integer"):
        parse_classes({"0": "bg", "1.5": "a"}, "x")


def test_config_without_classes_takes_them_from_the_folder(tmp_path):
    _nnunet(tmp_path / "nn", {"background": 0, "left": 3, "right": 8}, values=(3, 8))
    classes, modality = config_classes_from_data({"kind": "dataset", "folder": "nn"}, tmp_path)
    assert [c["name"] for c in classes] == ["background", "left", "right"] and modality == "MRI"
    assert [c["label_value"] for c in classes] == [0, 3, 8]
    with pytest.raises(ValueError, match="no 'classes'"):
        config_classes_from_data({"kind": "synthetic_cohort"}, tmp_path)
    from imbalanceseglib.train_config import TrainConfig
    with pytest.raises(ValueError, match=r"lacks the required field\(s\) \['classes'\]"):
        TrainConfig.from_dict({"name": "x", "target_spacing": [1, 1, 1]})


# --------------------------------------------------------------------------- train -> predict


def test_cli_trains_on_non_consecutive_labels_and_predicts_original_values(tmp_path, capsys):
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.cli import main
    data = _nnunet(tmp_path / "Dataset001", {"background": 0, "ball": 2, "cube": 5}, values=(2, 5), n=2, test=1)
    cfg = {"train": dict(name="nc", target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16], features=[4, 8],
                         iterations=3, batch_size=1, val_every=1000, checkpoint_every=3, log_every=1,
                         normalization={"scheme": "none"}, seed=1)}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert main(["train", str(tmp_path / "config.json"), "--data", str(data), "--out", str(tmp_path / "out")]) == 0
    log = capsys.readouterr().out
    assert "ball (label value 2), cube (label value 5)" in log and "modality: MRI" in log
    card = load_bundle(tmp_path / "out" / "nc.imbseg").card
    assert [c.get("label_value") for c in card["classes"]] == [0, 2, 5]
    assert card["preprocessing"]["modality"] == "MRI"
    profile = card["input_profile"]  # recorded by train() from the prepared training cases
    assert profile["cases"] == 2 and set(profile["class_volume_ml"]) == {"ball", "cube"}
    assert all(v["present_fraction"] == 1.0 for v in profile["class_volume_ml"].values())
    out = tmp_path / "pred"
    assert main(["predict", "--model", str(tmp_path / "out" / "nc.imbseg"),
                 "--input", str(data / "imagesTs" / "hippo_100_0000.nii.gz"), "--output", str(out)]) == 0
    labels = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd"))))) - {0}
    assert labels <= {2, 5}
    seg = sitk.ReadImage(str(next(out.glob("*.seg.nrrd"))))
    assert {seg.GetMetaData(f"Segment{i}_LabelValue") for i in range(2)} == {"2", "5"}
    assert set(np.unique(sitk.GetArrayFromImage(seg))) <= {0, 2, 5}
    written = json.loads((out / "classes.json").read_text())
    assert [(c["value"], c["index"]) for c in written] == [(0, 0), (2, 1), (5, 2)]

    # calibrate on the data folder (original label values mapped to the model's classes), estimate on it
    assert main(["calibrate", "--model", str(tmp_path / "out" / "nc.imbseg"), "--data", str(data),
                 "--method", "ts", "--out", str(tmp_path / "cal.imbseg")]) == 0
    assert load_bundle(tmp_path / "cal.imbseg").card["calibration"]["fitted_on"]["case_ids"] == ["hippo_000",
                                                                                               "hippo_001"]
    assert main(["estimate", "--model", str(tmp_path / "cal.imbseg"), "--images", str(data),
                 "--csv", str(tmp_path / "est.csv")]) == 0
    assert {"hippo_000", "hippo_001", "hippo_100"} <= {line.split(",")[0] for line in
                                                      (tmp_path / "est.csv").read_text().splitlines()[1:]}
    # evaluate a prediction in original values against an original reference (same grid; a pipeline
    # check, not an accuracy one), classes as a {value: name} mapping
    (tmp_path / "p").mkdir()
    (tmp_path / "r").mkdir()
    sitk.WriteImage(sitk.ReadImage(str(out / "labels.nrrd")), str(tmp_path / "p" / "hippo_000.nrrd"))
    sitk.WriteImage(sitk.ReadImage(str(data / "labelsTr" / "hippo_000.nii.gz")), str(tmp_path / "r" / "hippo_000.nrrd"))
    (tmp_path / "classes.json").write_text(json.dumps({"0": "background", "2": "ball", "5": "cube"}))
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--ref", str(tmp_path / "r"), "--out",
                 str(tmp_path / "ev"), "--classes", str(tmp_path / "classes.json"), "--metrics", "overlap"]) == 0
    summary = (tmp_path / "ev" / "summary.csv").read_text()
    assert "ball" in summary and "cube" in summary


def test_shared_chaos_data_reads_when_present():
    """Reads ../shared/data/chaos_mr_t2 (float-coded labels) when this checkout has it."""
    root = Path(__file__).resolve().parents[3] / "shared" / "data" / "chaos_mr_t2"
    if not root.is_dir():
        pytest.skip(f"{root} is absent (the shared data sets sit beside the checkout): the synthetic float-coded "
                    "label test covers the rule")
    ds = open_dataset(root)
    labelled = ds.labelled_cases()
    assert labelled
    assert sitk.GetArrayFromImage(ds.read_labels(labelled[0])).max() < len(ds.classes)


def test_a_config_without_modality_assumes_none():
    """Issue #20: the modality is never silently assumed (it was "MR T1" by default)."""
    from imbalanceseglib.train_config import TrainConfig
    cfg = TrainConfig.from_dict({"name": "m", "classes": [{"value": 0, "name": "bg"}, {"value": 1, "name": "a"}],
                                 "target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                                 "features": [4, 8]})
    assert cfg.modality == ""


def test_evaluate_takes_a_data_folder_as_reference(tmp_path, capsys):
    """--ref may be the data folder itself: its label maps, and its classes (original values)."""
    import csv as _csv
    from imbalanceseglib.cli import main
    data = tmp_path / "plain"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    (data / "classes.json").write_text(json.dumps({"0": "background", "2": "ball", "5": "cube"}))
    (tmp_path / "pred").mkdir()
    for i in range(2):
        lab = np.zeros((8, 9, 10), np.uint8)
        lab[1:4, 1:4, 1:4] = 2
        lab[5:7, 5:8, 5 + i:9] = 5
        img = sitk.GetImageFromArray(lab.astype(np.float32))
        sitk.WriteImage(img, str(data / "images" / f"c{i}.nii.gz"))
        ref = sitk.GetImageFromArray(lab)
        sitk.WriteImage(ref, str(data / "labels" / f"c{i}.nii.gz"))
        pred = lab.copy()
        pred[1, 1, 1] = 0  # one voxel of the ball missed: Dice 2*26/(26+27)
        sitk.WriteImage(sitk.GetImageFromArray(pred), str(tmp_path / "pred" / f"c{i}.nii.gz"))
    assert main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(data), "--out", str(tmp_path / "ev"),
                 "--metrics", "overlap"]) == 0
    assert f"[evaluate] references: {data / 'labels'}" in capsys.readouterr().out
    rows = {r["name"]: r for r in _csv.DictReader((tmp_path / "ev" / "summary.csv").open())}
    assert set(rows) == {"ball", "cube"}
    assert float(rows["ball"]["dice_mean"]) == pytest.approx(2 * 26 / 53)
    assert float(rows["cube"]["dice_mean"]) == pytest.approx(1.0)
