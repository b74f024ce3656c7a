"""Issue #24, items 5 and 7: inputs that used to give a traceback or an unhelpful message.

5. card values inside the schema that cannot work (patch sizes the U-Net cannot take) are
   refused when the card is read; non-finite weights are found when the bundle loads.
7. (a) an image and its label map on different grids: the message names the case, both files
   and every differing property with both values; (b) a training checkpoint passed where a
   bundle is expected: the message says so and points at the bundle training wrote next to it.
"""

import copy
import inspect
import itertools
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib import card as card_mod
from imbalanceseglib import container
from imbalanceseglib.bundle import BundleError, load_bundle, load_bundle_from_bytes, read_card, save_bundle
from imbalanceseglib.data import folder_pairs, load_training_data, synthetic_pairs
from imbalanceseglib.networks import UNet3D, UNet3DEnsemble, build_network

from libtest_helpers import CLASSES

DEMO = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_brain.imbseg"


def _card(features=(4, 8), patch=(16, 16, 16), arch="UNet3D", members=None):
    params = {"in_channels": 1, "out_channels": 3}
    if features is not None:
        params["features"] = list(features)
    if members is not None:
        params["members"] = members
    pre = {"target_spacing": [1.0, 1.0, 1.0], "normalization": {"scheme": "none"}}
    if patch is not None:
        pre["patch_size"] = list(patch)
    return {"name": "t", "network": {"arch": arch, "params": params}, "classes": copy.deepcopy(CLASSES),
            "preprocessing": pre}


def _accepts(card):
    try:
        card_mod.validate_card(card)
        return True
    except BundleError:
        return False


# --- item 5: patch sizes the network cannot take ------------------------------------------------

@pytest.mark.parametrize("features, patch, why", [
    ((4, 8), (1, 1, 1), r"multiple of 2"),
    ((4, 8, 16), (18, 16, 16), r"multiple of 4"),
    ((4, 8, 16), (16, 16, 6), r"multiple of 4"),
    (None, (12, 16, 16), r"multiple of 8"),            # UNet3D's default features: 4 levels
    ((4, 8), (2, 2, 2), r"1x1x1"),                      # divisible, but one voxel at the deepest level
    ((4, 8, 16, 32), (8, 8, 8), r"1x1x1"),
])
def test_card_refuses_patch_sizes_the_unet_cannot_take(features, patch, why):
    card = _card(features, patch)
    with pytest.raises(BundleError, match=why) as info:
        card_mod.validate_card(card)
    msg = str(info.value)
    assert "patch_size" in msg and str(list(patch)) in msg
    assert "tensor" not in msg.lower()


def test_card_refuses_unfit_patch_for_the_ensemble_too():
    with pytest.raises(BundleError, match=r"patch_size \[6, 8, 8\].*multiple of 4"):
        card_mod.validate_card(_card((4, 8, 16), (6, 8, 8), arch="UNet3DEnsemble", members=2))
    assert _accepts(_card((4, 8, 16), (8, 8, 4), arch="UNet3DEnsemble", members=3))


def test_saving_and_reading_a_card_with_an_unfit_patch_is_refused(tmp_path):
    good = _card((4, 8), (16, 16, 16))
    net = build_network("UNet3D", good["network"]["params"])
    path = save_bundle(tmp_path / "m.imbseg", good, net)
    bad = _card((4, 8), (15, 16, 16))
    with pytest.raises(BundleError, match="patch_size"):
        save_bundle(tmp_path / "bad.imbseg", bad, net)
    # A card written by an older version (re-signed): refused when read, naming the bundle.
    import hashlib
    import zipfile
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members["card.json"] = json.dumps(bad).encode()
    members["manifest.json"] = json.dumps({"format": "imbalanceseg-bundle", "format_version": 1, "sha256": {
        n: hashlib.sha256(members[n]).hexdigest() for n in ("card.json", "weights.safetensors")}}).encode()
    old = tmp_path / "old.imbseg"
    with zipfile.ZipFile(old, "w") as zf:
        for n in ("manifest.json", "card.json", "weights.safetensors"):
            zf.writestr(n, members[n])
    with pytest.raises(BundleError, match=r"old\.imbseg: invalid model card: .*patch_size \[15, 16, 16\]"):
        read_card(old)
    with pytest.raises(BundleError, match=r"old\.imbseg: invalid model card: .*multiple of 2"):
        load_bundle(old)


@pytest.mark.parametrize("features", [None, [], [4], "x", {"a": 1}, [4.5, 8], [True, 8]])
def test_patch_rule_on_odd_features_gives_only_bundle_errors(features):
    card = _card((4, 8), (3, 16, 16))
    card["network"]["params"]["features"] = features
    with pytest.raises(BundleError):
        card_mod.validate_card(card)


def test_card_default_features_match_the_networks():
    """card.py cannot import networks.py (torch-free); its copy of the default must agree."""
    for cls in (UNet3D, UNet3DEnsemble):
        assert tuple(inspect.signature(cls).parameters["features"].default) == card_mod.DEFAULT_FEATURES


def _forward_works(net, patch):
    try:
        with torch.no_grad():
            net(torch.empty(1, 1, *patch, device="meta"))
        return True
    except (RuntimeError, ValueError):
        return False


@pytest.mark.parametrize("arch, features", [
    ("UNet3D", (4, 8)), ("UNet3D", (4, 8, 16)), ("UNet3D", (2, 2, 2, 2)), ("UNet3D", None),
    ("UNet3DEnsemble", (4, 8, 16)),
])
def test_card_patch_rule_agrees_with_the_network(arch, features):
    """The card's torch-free rule accepts exactly the patches the network's forward takes
    (checked on the meta device: shapes only, no memory or compute)."""
    params = {"in_channels": 1, "out_channels": 3}
    if features is not None:
        params["features"] = list(features)
    with torch.device("meta"):
        net = build_network(arch, params).eval()
    d = net.size_divisor
    members = 2 if arch == "UNet3DEnsemble" else None
    edges = range(1, 2 * d + 2)
    patches = [p for p in itertools.product(edges, repeat=3)]
    if len(patches) > 400:  # 4 levels: a sample of cubes and near-misses around the divisor
        patches = ([(e, e, e) for e in edges] + [(d, d, 2 * d), (d, 2 * d, d), (2 * d, d, d), (d, d, d + 1),
                                                (d, d, d - 1), (2 * d, 2 * d, d - 2), (3 * d, d, d)])
    smallest = None
    for patch in patches:
        accepted = _accepts(_card(features, patch, arch=arch, members=members))
        assert accepted == _forward_works(net, patch), (arch, features, patch, accepted)
        if accepted and (smallest is None or math.prod(patch) < math.prod(smallest)):
            smallest = patch
    assert smallest is not None and math.prod(smallest) == 2 * d ** 3
    assert _forward_works(net, smallest)
    assert not _accepts(_card(features, (1, 1, 1), arch=arch, members=members))
    assert not _forward_works(net, (1, 1, 1))


def test_card_schema_stays_standard_library_only():
    text = Path(card_mod.__file__).read_text()
    assert "import torch" not in text and "from .networks" not in text and "import numpy" not in text


# --- item 5: non-finite weights ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_when_the_bundle_loads(tmp_path, bad):
    card = _card((4, 8), (16, 16, 16))
    net = build_network("UNet3D", card["network"]["params"])
    with torch.no_grad():
        net.decoders[0][0].weight[0, 0, 1, 1, 1] = bad
    path = save_bundle(tmp_path / "diverged.imbseg", card, net)
    with pytest.raises(BundleError, match=r"^diverged\.imbseg: weights contain non-finite values in tensor "
                                          r"decoders\.0\.0\.weight"):
        load_bundle(path)
    with pytest.raises(BundleError, match=r"^x\.imbseg: weights contain non-finite values in tensor "
                                          r"decoders\.0\.0\.weight"):
        load_bundle_from_bytes(path.read_bytes(), "x.imbseg")
    assert read_card(path)["name"] == "t"  # the card alone is fine (listing models needs no weights)


def test_demo_bundle_still_loads():
    if not DEMO.is_file():
        pytest.skip("demo bundle not present")
    b = load_bundle(DEMO)
    assert b.num_classes >= 2
    assert all(torch.isfinite(t).all() for t in b.network.state_dict().values() if t.is_floating_point())


# --- item 7a: image / label geometry mismatch -----------------------------------------------------

def _write(path, size=(8, 9, 10), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None, label=False):
    arr = np.zeros(tuple(reversed(size)), np.uint8 if label else np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("label_geometry, expect", [
    (dict(size=(8, 9, 12)), [r"size \(8, 9, 10\) vs \(8, 9, 12\)", r"extent"]),
    (dict(spacing=(1.0, 1.0, 2.5)), [r"spacing \(1(\.0)?, 1(\.0)?, 1(\.0)?\) vs \(1(\.0)?, 1(\.0)?, 2\.5\)",
                                     r"extent"]),
    (dict(origin=(0.0, 5.0, 0.0)), [r"origin \(0(\.0)?, 0(\.0)?, 0(\.0)?\) vs \(0(\.0)?, 5(\.0)?, 0(\.0)?\)"]),
    (dict(direction=FLIP_X), [r"direction \(1(\.0)?, 0(\.0)?.*\) vs \(-1(\.0)?, 0(\.0)?"]),
    (dict(size=(8, 9, 12), origin=(3.0, 0.0, 0.0)), [r"size .* vs .*", r"origin .* vs .*"]),
])
def test_geometry_mismatch_names_case_files_and_differences(tmp_path, label_geometry, expect):
    img = _write(tmp_path / "images" / "case7.nrrd")
    lab = _write(tmp_path / "labels" / "case7.nrrd", label=True, **label_geometry)
    with pytest.raises(ValueError) as info:
        folder_pairs(tmp_path / "images", tmp_path / "labels")
    msg = str(info.value)
    assert "case7" in msg and str(img) in msg and str(lab) in msg, msg
    for pattern in expect:
        assert __import__("re").search(pattern, msg), (pattern, msg)
    # every property that agrees is left out
    for prop in ("size", "spacing", "origin", "direction"):
        if not any(prop in p for p in expect) and not (prop in ("size", "spacing") and "extent" in str(expect)):
            assert f" {prop} (" not in msg, (prop, msg)
    # the same through the config's data section
    with pytest.raises(ValueError, match="case7"):
        load_training_data({"kind": "folders", "images": "images", "labels": "labels"}, tmp_path)


def test_geometry_within_tolerance_is_accepted(tmp_path):
    _write(tmp_path / "images" / "a.nii.gz", spacing=(1.0, 1.0, 2.0), origin=(10.0, -5.0, 3.0))
    _write(tmp_path / "labels" / "a.nii.gz", label=True, spacing=(1.0 + 1e-6, 1.0, 2.0), origin=(10.0002, -5.0, 3.0))
    pairs = folder_pairs(tmp_path / "images", tmp_path / "labels")
    assert [p[2] for p in pairs] == ["a"]


def test_synthetic_cohort_source_geometry_mismatch_names_both_files(tmp_path):
    img = _write(tmp_path / "src" / "image.nrrd", size=(12, 12, 12))
    lab = _write(tmp_path / "src" / "labels.nrrd", size=(12, 12, 10), label=True)
    with pytest.raises(ValueError) as info:
        synthetic_pairs(img, lab, 1, seed=0)
    msg = str(info.value)
    assert str(img) in msg and str(lab) in msg and "(12, 12, 12) vs (12, 12, 10)" in msg, msg


# --- item 7b: a training checkpoint where a bundle is expected ------------------------------------

def _checkpoint(folder, legacy=False):
    folder.mkdir(parents=True, exist_ok=True)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]})
    path = folder / "checkpoint.pt"
    state = {"iteration": 4, "network": net.state_dict(), "optimizer": {}, "config": {"name": "tiny"}}
    if legacy:
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        torch.save(state, path)
    return path, net


@pytest.mark.parametrize("legacy", [False, True])
def test_checkpoint_instead_of_bundle_points_at_the_bundle_next_to_it(tmp_path, legacy):
    ckpt, net = _checkpoint(tmp_path / "run", legacy)
    save_bundle(tmp_path / "run" / "tiny.imbseg", _card((4, 8), (16, 16, 16)), net)
    for reader in (load_bundle, read_card, container.read_card):
        with pytest.raises(BundleError) as info:
            reader(ckpt)
        msg = str(info.value)
        assert msg.startswith("checkpoint.pt is a training checkpoint"), msg
        assert str(tmp_path / "run" / "tiny.imbseg") in msg, msg


def test_checkpoint_without_a_bundle_says_where_training_writes_it(tmp_path):
    ckpt, _ = _checkpoint(tmp_path / "unfinished")
    with pytest.raises(BundleError) as info:
        load_bundle(ckpt)
    msg = str(info.value)
    assert "training checkpoint" in msg and f"no .imbseg bundle in {tmp_path / 'unfinished'}" in msg, msg
    with pytest.raises(BundleError, match=r"^<bytes> is a training checkpoint"):
        load_bundle_from_bytes(ckpt.read_bytes())


def test_checkpoint_detection_never_unpickles(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil()}, protocol=4))
    torch.save({"x": 1}, tmp_path / "zip.pt")

    def boom(*a, **k):
        raise AssertionError("unpickled while checking for a checkpoint")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    for f in (evil, tmp_path / "zip.pt"):
        with pytest.raises(BundleError, match="training checkpoint"):
            load_bundle(f)
    assert not marker.exists()


def test_other_non_bundle_messages_are_unchanged(tmp_path):
    import zipfile
    z = tmp_path / "other.imbseg"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("data.pkl", b"x")
        zf.writestr("readme.txt", b"x")
    with pytest.raises(BundleError, match=r"^other\.imbseg holds unexpected members \['data\.pkl', 'readme\.txt'\]"):
        load_bundle(z)
    txt = tmp_path / "notes.imbseg"
    txt.write_bytes(b"\x80" + b"hello world" * 10)
    with pytest.raises(BundleError, match=r"^notes\.imbseg is not a model bundle \(not a ZIP archive"):
        load_bundle(txt)


def test_missing_label_map_message_still_names_the_labels_folder(tmp_path):
    _write(tmp_path / "images" / "a.nrrd")
    _write(tmp_path / "labels" / "a.nrrd", label=True)
    _write(tmp_path / "images" / "b.nrrd")
    with pytest.raises(FileNotFoundError, match=f"no label map in {tmp_path / 'labels'} for image b.nrrd"):
        folder_pairs(tmp_path / "images", tmp_path / "labels")
