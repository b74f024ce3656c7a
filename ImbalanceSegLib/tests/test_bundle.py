import json
import zipfile

import pytest
import torch

from imbalanceseglib.bundle import BundleError, load_bundle, read_card, save_bundle, update_card
from imbalanceseglib.networks import build_network

from libtest_helpers import CLASSES


def _card(out_channels=3):
    return {"name": "t", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": out_channels,
                                                                  "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"target_spacing": [1.0, 1.0, 2.0], "patch_size": [16, 16, 16],
                                                   "normalization": {"scheme": "none"}},
            "calibration": {"method": "none"}, "validation": {"per_class": {"Ball": {"dice": 0.9}}}}


@pytest.fixture
def bundle_path(tmp_path):
    torch.manual_seed(0)
    net = build_network("UNet3D", _card()["network"]["params"])
    return save_bundle(tmp_path / "m.imbseg", _card(), net), net


def test_round_trip_keeps_card_and_outputs(bundle_path):
    path, net = bundle_path
    b = load_bundle(path)
    assert b.card["classes"] == CLASSES
    assert b.card["preprocessing"]["target_spacing"] == [1.0, 1.0, 2.0]
    assert b.card["validation"]["per_class"]["Ball"]["dice"] == 0.9
    assert b.card["format_version"] == 1
    x = torch.randn(1, 1, 8, 8, 8)
    net.eval()
    with torch.no_grad():
        assert torch.equal(b.network(x), net(x))
    assert read_card(path) == b.card
    assert not list(path.parent.glob(".*tmp*")), "no temporary files left behind"


def test_update_card_rewrites_atomically(bundle_path):
    path, _ = bundle_path
    update_card(path, {"demo_case": {"per_class": {"Ball": {"dice": 0.5}}}})
    assert read_card(path)["demo_case"]["per_class"]["Ball"]["dice"] == 0.5


def _rewrite(src, dst, members):
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _members(path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def test_truncated_bundle_is_refused(bundle_path, tmp_path):
    path, _ = bundle_path
    data = path.read_bytes()
    bad = tmp_path / "trunc.imbseg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="not a ZIP archive or truncated|damaged"):
        load_bundle(bad)


def test_bit_flip_in_weights_is_refused(bundle_path, tmp_path):
    path, _ = bundle_path
    m = _members(path)
    w = bytearray(m["weights.safetensors"])
    w[len(w) // 2] ^= 0x01
    m["weights.safetensors"] = bytes(w)
    bad = tmp_path / "flip.imbseg"
    _rewrite(path, bad, m)
    with pytest.raises(BundleError, match="checksum of weights.safetensors does not match"):
        load_bundle(bad)


def test_raw_bit_flip_is_refused(bundle_path, tmp_path):
    path, _ = bundle_path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    bad = tmp_path / "raw.imbseg"
    bad.write_bytes(bytes(data))
    with pytest.raises(BundleError):
        load_bundle(bad)


def test_tampered_card_is_refused(bundle_path, tmp_path):
    path, _ = bundle_path
    m = _members(path)
    card = json.loads(m["card.json"])
    card["classes"][1]["name"] = "Tumour"
    m["card.json"] = json.dumps(card).encode()
    bad = tmp_path / "tamper.imbseg"
    _rewrite(path, bad, m)
    with pytest.raises(BundleError, match="checksum of card.json"):
        load_bundle(bad)


def test_pickle_member_is_refused_without_reading_it(bundle_path, tmp_path):
    path, _ = bundle_path
    m = _members(path)
    m["payload.pkl"] = b"cos\nsystem\n(S'echo pwned'\ntR."
    bad = tmp_path / "pickle.imbseg"
    _rewrite(path, bad, m)
    with pytest.raises(BundleError, match="unexpected members \\['payload.pkl'\\]"):
        load_bundle(bad)


def test_wrong_format_version_is_named(bundle_path, tmp_path):
    path, _ = bundle_path
    m = _members(path)
    man = json.loads(m["manifest.json"])
    man["format_version"] = 99
    m["manifest.json"] = json.dumps(man).encode()
    bad = tmp_path / "v99.imbseg"
    _rewrite(path, bad, m)
    with pytest.raises(BundleError, match="format version 99"):
        load_bundle(bad)


def test_card_class_count_must_match_network(tmp_path):
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 4, "features": [4, 8]})
    with pytest.raises(BundleError, match="predicts 4 channels but the card lists 3 classes"):
        save_bundle(tmp_path / "x.imbseg", _card(out_channels=4), net)


def test_weights_that_do_not_fit_are_named(tmp_path):
    big = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [8, 16]})
    card = _card()
    path = save_bundle(tmp_path / "x.imbseg", card, big)  # card says features [4, 8]
    with pytest.raises(BundleError, match="weights do not fit the network"):
        load_bundle(path)


def test_missing_file_and_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "nope.imbseg")
    p = tmp_path / "text.imbseg"
    p.write_text("hello")
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(p)


def test_failed_save_leaves_existing_bundle_untouched(bundle_path):
    path, net = bundle_path
    before = path.read_bytes()
    bad = _card()
    bad["classes"] = bad["classes"][:1]
    with pytest.raises(BundleError):
        save_bundle(path, bad, net)
    assert path.read_bytes() == before
