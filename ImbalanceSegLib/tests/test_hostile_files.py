"""Hostile or damaged files (issue #9): model bundles and images.

Every hostile bundle must give :class:`BundleError` (a ``ValueError``) with a
message naming the problem -- never another exception type, never a hang, never
code execution and never a file written. Image files must give ``ImageError``.
The bounded hypothesis fuzzers here run in seconds; the long run is
``Testing/Benchmarks/fuzz_loaders.py``. Cases and outcomes are listed in
``Testing/Benchmarks/reports/reliability_hostile_files.md``.
"""

import ast
import builtins
import hashlib
import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imbalanceseglib import bundle as bundle_mod
from imbalanceseglib import container as container_mod
from imbalanceseglib import images as images_mod
from imbalanceseglib.bundle import BundleError, load_bundle, load_bundle_from_bytes, read_card, save_bundle
from imbalanceseglib.images import ImageError, read_image
from imbalanceseglib.networks import build_network

from libtest_helpers import CLASSES

SRC = Path(__file__).resolve().parents[1] / "src"
FUZZ = dict(deadline=5000, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
UNEXPECTED = container_mod._UNEXPECTED


# --- a valid bundle, built once -------------------------------------------------------

def _card():
    return {"name": "tiny", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                     "features": [4, 8]}},
            "classes": CLASSES,
            "preprocessing": {"target_spacing": [1.0, 1.0, 2.0], "patch_size": [16, 16, 16],
                              "normalization": {"scheme": "none"}},
            "calibration": {"method": "none"}, "validation": {"per_class": {"Ball": {"dice": 0.9}}}}


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("UNet3D", _card()["network"]["params"])
    path = save_bundle(tmp_path_factory.mktemp("valid") / "m.imbseg", _card(), net)
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    state = {k: v.clone() for k, v in net.state_dict().items()}
    return {"path": path, "bytes": data, "members": members, "state": state,
            "card": json.loads(members["card.json"])}


def _zip(entries, compression=zipfile.ZIP_STORED):
    """entries: list of (name or ZipInfo, data)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # duplicate names
        with zipfile.ZipFile(buf, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return buf.getvalue()


def _signed(members, card=None, weights=None, manifest=None):
    """What an attacker can build: altered members with *recomputed* checksums and CRCs."""
    m = dict(members)
    if card is not None:
        m["card.json"] = card if isinstance(card, bytes) else json.dumps(card).encode()
    if weights is not None:
        m["weights.safetensors"] = weights
    man = {"format": "imbalanceseg-bundle", "format_version": 1,
           "sha256": {n: hashlib.sha256(m[n]).hexdigest() for n in ("card.json", "weights.safetensors")}}
    if manifest is not None:
        man.update(manifest)
    m["manifest.json"] = json.dumps(man).encode()
    return _zip([(n, m[n]) for n in ("manifest.json", "card.json", "weights.safetensors")])


def _log(msg):
    """With HOSTILE_LOG=file set, record (test id, message) for the report's table."""
    if os.environ.get("HOSTILE_LOG"):
        with open(os.environ["HOSTILE_LOG"], "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0],
                                 "msg": msg}) + "\n")


def _refused(data, match=None):
    with pytest.raises(BundleError) as info:
        load_bundle_from_bytes(data, "hostile.imbseg")
    msg = str(info.value)
    _log(msg)
    assert UNEXPECTED not in msg, f"only the safety net caught it: {msg}"
    if match is not None:
        import re
        assert re.search(match, msg), f"message {msg!r} does not match {match!r}"
    return msg


def _outcome_ok(data, valid):
    """Fuzz oracle: BundleError (not via the safety net), or a load identical to the original."""
    try:
        b = load_bundle_from_bytes(data, "fuzz.imbseg")
    except BundleError as exc:
        assert UNEXPECTED not in str(exc), str(exc)
        return "BundleError"
    return "loaded"


def _central_entries(data):
    """(offset of each central-directory entry, its name) in a ZIP."""
    (sig, _, _, _, n, cd_size, cd_off, _) = struct.unpack("<4s4H2LH", data[-22:])
    out, pos = [], cd_off
    for _ in range(n):
        nlen, elen, clen = struct.unpack("<3H", data[pos + 28:pos + 34])
        out.append((pos, data[pos + 46:pos + 46 + nlen].decode("latin1")))
        pos += 46 + nlen + elen + clen
    return out


def _patch_central(data, name, fmt, offset, value):
    data = bytearray(data)
    for pos, n in _central_entries(bytes(data)):
        if n == name:
            struct.pack_into(fmt, data, pos + offset, value)
    return bytes(data)


# --- no code execution, no files written ------------------------------------------------

def test_loading_never_unpickles(valid, monkeypatch):
    import pickle

    def boom(*a, **k):
        raise AssertionError("pickle/torch.load used while loading a bundle")

    class NoUnpickler:
        def __init__(self, *a, **k):
            boom()

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", NoUnpickler)
    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(torch.serialization, "load", boom)
    b = load_bundle(valid["path"])
    assert b.card["classes"] == CLASSES
    for k, v in b.network.state_dict().items():
        assert torch.equal(v, valid["state"][k])
    assert load_bundle_from_bytes(valid["bytes"]).num_classes == 3
    assert read_card(valid["path"])["name"] == "tiny"


def test_bundle_module_has_no_code_execution_or_extraction_paths():
    tree = ast.parse((SRC / "imbalanceseglib" / "bundle.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                     if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "_pickle", "marshal", "dill", "shelve", "importlib", "runpy"}
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    names = {f.id for f in calls if isinstance(f, ast.Name)}
    methods = {f.attr for f in calls if isinstance(f, ast.Attribute)}  # (nn.Module.eval() is fine)
    assert not names & {"eval", "exec", "__import__", "compile"}
    assert not methods & {"extract", "extractall", "load_file", "mkstemp", "NamedTemporaryFile",
                          "TemporaryDirectory", "write_bytes", "write_text", "unlink", "rename"}
    assert "torch.load" not in (SRC / "imbalanceseglib" / "bundle.py").read_text()


def test_loading_writes_no_file(valid, tmp_path, monkeypatch):
    """Members are read into memory: no extraction, no temporary file, nothing opened for writing."""
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir(), tmp.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    real_open, real_os_open = builtins.open, os.open

    def ro_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+"):
            raise AssertionError(f"opened {file} for writing ({mode})")
        return real_open(file, mode, *a, **k)

    def ro_os_open(p, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND):
            raise AssertionError(f"os.open({p}) for writing")
        return real_os_open(p, flags, *a, **k)

    def no_extract(*a, **k):
        raise AssertionError("zip member extracted")

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(io, "open", ro_open)
    monkeypatch.setattr(os, "open", ro_os_open)
    monkeypatch.setattr(zipfile.ZipFile, "extract", no_extract)
    monkeypatch.setattr(zipfile.ZipFile, "extractall", no_extract)
    before = sorted(p.name for p in valid["path"].parent.iterdir())
    assert load_bundle(valid["path"]).num_classes == 3
    assert read_card(valid["path"])["name"] == "tiny"
    assert load_bundle_from_bytes(valid["bytes"], "m.imbseg").num_classes == 3
    evil = _zip([("manifest.json", b"{}"), ("../evil", b"x"), ("/tmp/evil2", b"x")])
    with pytest.raises(BundleError):
        load_bundle_from_bytes(evil)
    monkeypatch.undo()
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []
    assert sorted(p.name for p in valid["path"].parent.iterdir()) == before
    assert not (tmp_path / "evil").exists()


# --- archive member names and entry kinds -----------------------------------------------

def _with_extra(valid, name, data=b"x"):
    return _zip([(n, valid["members"][n]) for n in ("manifest.json", "card.json", "weights.safetensors")]
                + [(name, data)])


def _renamed(valid, old, new):
    """A member whose name is set byte-for-byte in the local and central headers (names that
    zipfile itself would not write, e.g. with NUL); CRCs untouched."""
    placeholder = "Q" * len(new)
    data = _zip([(placeholder if n == old else n, valid["members"][n])
                 for n in ("manifest.json", "card.json", "weights.safetensors")])
    assert data.count(placeholder.encode()) == 2
    return data.replace(placeholder.encode(), new.encode("latin1"))


@pytest.mark.parametrize("name, why", [
    ("../evil", "climbs out"),
    ("../../../../tmp/evil", "climbs out"),
    ("..\\..\\evil.bat", "climbs out"),
    ("/etc/passwd", "absolute path"),
    ("\\\\server\\share", "absolute path"),
    ("C:\\Windows\\evil.dll", "absolute path"),
    ("sub/card.json", "is a path"),
    ("models/", "folder entry"),
])
def test_member_names_are_never_paths(valid, name, why):
    _refused(_with_extra(valid, name), f"archive member name .* {why}.*; refusing it")


@pytest.mark.parametrize("old, new, why", [
    ("card.json", "../c.json", "climbs out"),
    ("card.json", "/card.jso", "absolute path"),
    ("card.json", "card\x00json", "NUL character"),
    ("card.json", "card\njson", "control characters"),
])
def test_renamed_members_are_refused_by_name(valid, old, new, why):
    _refused(_renamed(valid, old, new), why)


def test_duplicate_member_is_refused(valid):
    data = _with_extra(valid, "card.json", json.dumps({"name": "evil"}).encode())
    _refused(data, r"duplicate members \['card.json'\]")


@pytest.mark.parametrize("target", ["card.json", "evil_link"])
def test_symlink_entry_is_refused(valid, target):
    info = zipfile.ZipInfo(target)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    members = {n: valid["members"][n] for n in ("manifest.json", "weights.safetensors")}
    entries = [("manifest.json", members["manifest.json"]), ("weights.safetensors", members["weights.safetensors"])]
    if target == "card.json":
        entries.append((info, b"/etc/passwd"))
        _refused(_zip(entries), "member card.json is a symbolic link")
    else:
        entries += [("card.json", valid["members"]["card.json"]), (info, b"/etc/passwd")]
        _refused(_zip(entries), r"unexpected members \['evil_link'\]")


def test_device_file_entry_is_refused(valid):
    info = zipfile.ZipInfo("card.json")
    info.external_attr = (stat.S_IFCHR | 0o666) << 16
    data = _zip([("manifest.json", valid["members"]["manifest.json"]), (info, valid["members"]["card.json"]),
                 ("weights.safetensors", valid["members"]["weights.safetensors"])])
    _refused(data, "card.json is not a regular file")


def test_pickle_member_is_refused(valid):
    _refused(_with_extra(valid, "payload.pkl", b"cos\nsystem\n(S'echo pwned'\ntR."), "unexpected members")


# --- damage: truncation, bit flips, stale checksums ---------------------------------------

def test_truncated_at_40_cut_points_is_refused(valid):
    data = valid["bytes"]
    for cut in np.linspace(0, len(data) - 1, 40).astype(int):
        _refused(data[:cut], r"not a model bundle|truncated|damaged")


def test_appended_or_prepended_data_is_refused(valid):
    _refused(valid["bytes"] + b"\0" * 100, "not a ZIP archive or truncated")
    _refused(b"#!/bin/sh\necho hi\n" + valid["bytes"], "central directory does not end where")
    buf = bytearray(valid["bytes"])
    struct.pack_into("<H", buf, len(buf) - 2, 5)
    _refused(bytes(buf) + b"hello", "no ZIP end record")  # archive comment


def test_bit_flips_at_300_positions_never_load_silently_damaged(valid):
    """A flip either gives BundleError or hits bytes that carry no content (e.g. a timestamp)."""
    data, rng = valid["bytes"], random.Random(9)
    outcomes = {"BundleError": 0, "loaded": 0}
    for _ in range(300):
        buf = bytearray(data)
        pos = rng.randrange(len(buf))
        buf[pos] ^= 1 << rng.randrange(8)
        try:
            b = load_bundle_from_bytes(bytes(buf))
        except BundleError as exc:
            assert UNEXPECTED not in str(exc)
            outcomes["BundleError"] += 1
            continue
        outcomes["loaded"] += 1
        assert b.card == valid["card"]
        assert all(torch.equal(v, valid["state"][k]) for k, v in b.network.state_dict().items())
    assert outcomes["BundleError"] > 250


@pytest.mark.parametrize("member", ["card.json", "weights.safetensors"])
def test_tampered_member_with_fresh_crc_but_stale_checksum(valid, member):
    m = dict(valid["members"])
    if member == "card.json":
        card = json.loads(m["card.json"])
        card["classes"][1]["name"] = "Tumour"
        m[member] = json.dumps(card).encode()
    else:
        w = bytearray(m[member])
        w[-5] ^= 0x40
        m[member] = bytes(w)
    data = _zip([(n, m[n]) for n in ("manifest.json", "card.json", "weights.safetensors")])
    _refused(data, f"checksum of {member} does not match the manifest")


@pytest.mark.parametrize("manifest, why", [
    ({"format": "something-else"}, "not an ImbalanceSeg model bundle"),
    ({"format_version": True}, "format version True"),
    ({"format_version": 2}, "format version 2"),
    ({"sha256": ["x"]}, "SHA-256"),
    ({"sha256": {"card.json": "0" * 64}}, "SHA-256"),
])
def test_manifest_schema(valid, manifest, why):
    _refused(_signed(valid["members"], manifest=manifest), why)


def test_manifest_not_json(valid):
    m = dict(valid["members"])
    m["manifest.json"] = b"\xff\xfe not json"
    _refused(_zip(list(m.items())), "manifest.json is not valid JSON")


# --- attacker re-signs the bundle: card schema must hold ---------------------------------------

def _card_with(path, value):
    card = json.loads(json.dumps(_card()))
    node = card
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return card


BAD_CARDS = [
    ("class_value_string", _card_with(["classes", 1, "value"], "1"), "must have value 1"),
    ("class_value_bool", _card_with(["classes", 1, "value"], True), "must have value 1"),
    ("class_name_int", _card_with(["classes", 1, "name"], 7), "needs a non-empty 'name'"),
    ("class_name_control", _card_with(["classes", 1, "name"], "a\x1b[2Jb"), "printable characters"),
    ("class_name_huge", _card_with(["classes", 1, "name"], "x" * 100000), "at most 200"),
    ("colour_out_of_range", _card_with(["classes", 1, "color"], [2, 0, 0]), "colour must be three numbers"),
    ("colour_bool", _card_with(["classes", 1, "color"], [True, 0, 0]), "colour must be three numbers"),
    ("classes_not_list", _card_with(["classes"], {"a": 1}), "at least two classes"),
    ("thousand_classes", _card_with(["classes"], [{"name": f"c{i}", "value": i} for i in range(1000)]),
     "lists 1000 classes; at most 256"),
    ("card_is_list", [1, 2, 3], "must hold a JSON object"),
    ("card_lacks_network", {"name": "x", "classes": CLASSES, "preprocessing": {}}, "lacks the required field 'network'"),
    ("name_not_string", _card_with(["name"], ["x"]), "'name' must be a non-empty string"),
    ("arch_unknown", _card_with(["network", "arch"], "os.system"), "unknown network architecture 'os.system'"),
    ("arch_not_string", _card_with(["network", "arch"], {"__class__": "x"}), "must be {'arch': str"),
    ("param_unknown", _card_with(["network", "params", "cls"], "subprocess.Popen"), "'cls' is not accepted"),
    ("in_channels_huge", _card_with(["network", "params", "in_channels"], 10 ** 9), "in_channels must be"),
    ("in_channels_bool", _card_with(["network", "params", "in_channels"], True), "in_channels must be"),
    ("features_huge", _card_with(["network", "params", "features"], [4096] * 100), "features must be"),
    ("features_float", _card_with(["network", "params", "features"], [4.5, 8]), "features must be"),
    ("out_channels_mismatch", _card_with(["network", "params", "out_channels"], 300), "predicts 300 channels"),
    ("spacing_zero", _card_with(["preprocessing", "target_spacing"], [0, 1, 1]), "target_spacing"),
    ("spacing_tiny", _card_with(["preprocessing", "target_spacing"], [1e-300, 1, 1]), "target_spacing"),
    ("spacing_huge", _card_with(["preprocessing", "target_spacing"], [1e300, 1, 1]), "target_spacing"),
    ("spacing_strings", _card_with(["preprocessing", "target_spacing"], ["1", "1", "1"]), "target_spacing"),
    ("patch_huge", _card_with(["preprocessing", "patch_size"], [10 ** 9, 16, 16]), "patch_size"),
    ("patch_volume", _card_with(["preprocessing", "patch_size"], [512, 512, 512]), "patch_size"),
    ("patch_bool", _card_with(["preprocessing", "patch_size"], [True, 16, 16]), "patch_size"),
    ("preprocessing_list", _card_with(["preprocessing"], []), "'preprocessing' must be an object"),
    ("norm_unknown", _card_with(["preprocessing", "normalization"], {"scheme": "rm -rf"}), "normalisation scheme"),
    ("norm_fixed_no_std", _card_with(["preprocessing", "normalization"],
                                     {"scheme": "fixed_zscore", "clip_min": 0, "clip_max": 1, "mean": 0}),
     "needs a finite number 'std'"),
    ("norm_fixed_std_zero", _card_with(["preprocessing", "normalization"],
                                       {"scheme": "fixed_zscore", "clip_min": 0, "clip_max": 1, "mean": 0,
                                        "std": 0}), "std > 0"),
    ("norm_percentiles", _card_with(["preprocessing", "normalization"],
                                    {"scheme": "percentile_zscore", "lower_percentile": 90,
                                     "upper_percentile": 10}), "percentiles"),
    ("modality_not_string", _card_with(["preprocessing", "modality"], 5), "modality must be a string"),
    ("calibration_method", _card_with(["calibration"], {"method": "exec"}), "unknown calibration method"),
    ("temperature_zero", _card_with(["calibration"], {"method": "temperature", "temperature": 0}), "temperature"),
    ("temperature_list", _card_with(["calibration"], {"method": "temperature", "temperature": [1, 1]}),
     "temperature"),
    ("card_format_version", _card_with(["format_version"], 7), "format_version 7"),
]


@pytest.mark.parametrize("card, why", [c[1:] for c in BAD_CARDS], ids=[c[0] for c in BAD_CARDS])
def test_resigned_card_with_invalid_schema(valid, card, why):
    _refused(_signed(valid["members"], card=card), __import__("re").escape(why))


def test_million_classes(valid):
    """10**6 classes: the member-size cap refuses the bundle before parsing; the schema caps classes too."""
    card = _card_with(["classes"], [{"name": f"c{i}", "value": i} for i in range(10 ** 6)])
    _refused(_signed(valid["members"], card=card), "member card.json declares an implausible size")
    with pytest.raises(BundleError, match="lists 1000000 classes; at most 256") as info:
        bundle_mod.validate_card(card)
    _log("validate_card: " + str(info.value))


RAW_CARDS = [
    ("nan", lambda c: c.replace(b'"dice": 0.9', b'"dice": NaN'), "NaN is not allowed"),
    ("infinity", lambda c: c.replace(b'"dice": 0.9', b'"dice": -Infinity'), "-Infinity is not allowed"),
    ("float_overflow", lambda c: c.replace(b'"dice": 0.9', b'"dice": 1e999'), "out of range"),
    ("huge_int", lambda c: c.replace(b'"dice": 0.9', b'"dice": ' + b"9" * 100000), "digits is implausibly large"),
    ("deep_nesting_100k", lambda c: c.replace(b'"dice": 0.9', b'"dice": ' + b"[" * 100000 + b"]" * 100000),
     "nested too deeply"),
    ("deep_nesting_40", lambda c: c.replace(b'"dice": 0.9', b'"dice": ' + b"[" * 40 + b"]" * 40),
     "nested too deeply"),
    ("duplicate_key", lambda c: c.replace(b'"name": "tiny"', b'"name": "tiny", "name": "other"'),
     "key 'name' appears twice"),
    ("invalid_utf8", lambda c: c.replace(b'"tiny"', b'"ti\xffy"'), "not valid JSON"),
    ("utf16", lambda c: c.decode().encode("utf-16"), "not valid JSON"),
    ("truncated_json", lambda c: c[:-10], "not valid JSON"),
    ("empty", lambda c: b"", "not valid JSON"),
]


@pytest.mark.parametrize("mutate, why", [c[1:] for c in RAW_CARDS], ids=[c[0] for c in RAW_CARDS])
def test_resigned_card_with_hostile_json(valid, mutate, why):
    raw = json.dumps(_card()).encode()
    bad = mutate(raw)
    assert bad != raw or why == "not valid JSON"
    _refused(_signed(valid["members"], card=bad), "card.json .*" + __import__("re").escape(why))


def test_oversized_card_is_refused_before_reading(valid):
    card = _card_with(["description"], "x" * (9 << 20))
    _refused(_signed(valid["members"], card=card), r"member card.json declares an implausible size")


# --- zip bombs and archive structure -----------------------------------------------------------

def test_compressed_member_is_refused_zip_bomb(valid):
    """100 MB of zeros deflates to ~100 kB; compressed members are refused before inflating."""
    bomb = _zip([("manifest.json", valid["members"]["manifest.json"]), ("card.json", b" " * (100 << 20)),
                 ("weights.safetensors", valid["members"]["weights.safetensors"])], compression=zipfile.ZIP_DEFLATED)
    assert len(bomb) < 1 << 20
    _refused(bomb, "member .* is compressed .*zip-bomb guard")


def test_valid_bundle_recompressed_is_refused(valid):
    data = _zip([(n, valid["members"][n]) for n in ("manifest.json", "card.json", "weights.safetensors")],
                compression=zipfile.ZIP_DEFLATED)
    _refused(data, "is compressed")


@pytest.mark.parametrize("size", [1 << 31, (1 << 32) - 1])
def test_member_declaring_huge_size_is_refused(valid, size):
    data = _patch_central(valid["bytes"], "weights.safetensors", "<L", 24, size)  # uncompressed size
    data = _patch_central(data, "weights.safetensors", "<L", 20, size)  # compressed size
    _refused(data, "declares an implausible size")


def test_member_declaring_more_than_the_file_is_refused(valid):
    n = len(valid["members"]["weights.safetensors"]) + 5000  # last member
    data = _patch_central(valid["bytes"], "weights.safetensors", "<L", 24, n)
    data = _patch_central(data, "weights.safetensors", "<L", 20, n)
    _refused(data, "more than the file holds")
    n = len(valid["members"]["card.json"]) + 5000  # a middle member runs into the next one
    data = _patch_central(valid["bytes"], "card.json", "<L", 24, n)
    data = _patch_central(data, "card.json", "<L", 20, n)
    _refused(data, "overlaps another member")


def test_overlapping_members_are_refused(valid):
    """Members sharing bytes (the 'overlapping files' zip bomb construction)."""
    entries = _central_entries(valid["bytes"])
    manifest_offset = struct.unpack("<L", valid["bytes"][entries[0][0] + 42:entries[0][0] + 46])[0]
    data = _patch_central(valid["bytes"], "card.json", "<L", 42, manifest_offset)
    _refused(data, "overlaps another member")


def test_many_entries_are_refused_cheaply(valid):
    data = _zip([(f"f{i}", b"") for i in range(5000)])
    _refused(data, "holds 5000 archive entries")


def test_encrypted_flag_and_unknown_method_are_refused(valid):
    _refused(_patch_central(valid["bytes"], "card.json", "<H", 8, 1), "card.json is encrypted")
    _refused(_patch_central(valid["bytes"], "card.json", "<H", 10, 99), r"compressed \(method 99\)")


def test_zip64_and_multidisk_are_refused(valid):
    buf = bytearray(valid["bytes"])
    struct.pack_into("<H", buf, len(buf) - 22 + 4, 1)
    _refused(bytes(buf), "multi-part")
    locator = b"PK\x06\x07" + b"\0" * 16
    cd = len(buf) - 22
    eocd = bytearray(buf[cd:])
    _refused(bytes(buf[:cd]) + locator + bytes(eocd), "ZIP64")


def test_files_that_are_not_bundles(valid, tmp_path):
    for data in [b"", b"PK", b"x" * 21, b"PK\x05\x06" + b"\0" * 18, _zip([])]:
        _refused(data, "not a model bundle|lacks the members")
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(tmp_path)
    fifo = tmp_path / "fifo.imbseg"
    os.mkfifo(fifo)
    with pytest.raises(BundleError, match="not a regular file") as info:  # would block if it were opened
        load_bundle(fifo)
    _log(str(info.value))
    with pytest.raises(BundleError, match="not found"):
        load_bundle(tmp_path / "missing.imbseg")


# --- safetensors header abuse (re-signed) -----------------------------------------------------

def _st(header, body=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _st_parts(valid):
    w = valid["members"]["weights.safetensors"]
    n = struct.unpack("<Q", w[:8])[0]
    return json.loads(w[8:8 + n]), w[8 + n:]


def _st_variant(valid, edit):
    header, body = _st_parts(valid)
    header, body = edit(header, body)
    return _st(header, body)


def _first(header):
    return sorted(k for k in header if k != "__metadata__")[0]


def _set(key, value):
    def edit(h, b):
        h[_first(h)][key] = value
        return h, b
    return edit


ST_CASES = [
    ("header_len_beyond_file", lambda v: struct.pack("<Q", 1 << 40) + b"{}", "header length 1099511627776 is larger"),
    ("header_len_max", lambda v: b"\xff" * 8 + b"{}", "is larger than the file"),
    ("header_too_big", lambda v: _st({"__metadata__": {"x": "y" * (2 << 20)}}), "implausibly large"),
    ("too_short", lambda v: b"\x01\x02", "only 2 bytes"),
    ("header_not_json", lambda v: struct.pack("<Q", 4) + b"\x80abc", "header is not valid JSON"),
    ("header_list", lambda v: _st([1, 2]), "header is not a JSON object"),
    ("metadata_not_str", lambda v: _st_variant(v, lambda h, b: ({**h, "__metadata__": {"a": 1}}, b)),
     "__metadata__ must map"),
    ("dtype_i64", lambda v: _st_variant(v, _set("dtype", "I64")), "dtype 'I64'; allowed: F32"),
    ("dtype_f64", lambda v: _st_variant(v, _set("dtype", "F64")), "dtype 'F64'; allowed: F32"),
    ("dtype_object", lambda v: _st_variant(v, _set("dtype", ["O"])), r"dtype \['O'\]"),
    ("shape_mismatch", lambda v: _st_variant(v, _set("shape", [1, 2, 3])), "has shape \\[1, 2, 3\\]; the network"),
    ("shape_huge", lambda v: _st_variant(v, _set("shape", [2 ** 62, 2 ** 62])), "has shape"),
    ("offsets_beyond", lambda v: _st_variant(v, _set("data_offsets", [0, 1 << 40])), "invalid data offsets"),
    ("offsets_negative", lambda v: _st_variant(v, _set("data_offsets", [-8, 100])), "invalid data offsets"),
    ("offsets_strings", lambda v: _st_variant(v, _set("data_offsets", ["0", "4"])), "invalid data offsets"),
    ("tensor_missing", lambda v: _st_variant(v, lambda h, b: ({k: x for k, x in h.items() if k != _first(h)}, b)),
     "tensors missing"),
    ("tensor_extra", lambda v: _st_variant(
        v, lambda h, b: ({**h, "evil": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b)), "unexpected"),
    ("trailing_bytes", lambda v: _st_variant(v, lambda h, b: (h, b + b"\0" * 64)), "bytes after the last tensor"),
    ("overlapping_tensors", lambda v: _st_variant(v, _overlap), "overlap or leave gaps"),
    ("random_bytes", lambda v: bytes(random.Random(1).randrange(256) for _ in range(5000)), "weights.safetensors"),
]


def _overlap(h, b):
    keys = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    a, c = keys[0], keys[1]
    size = h[c]["data_offsets"][1] - h[c]["data_offsets"][0]
    if size <= h[a]["data_offsets"][1]:
        h[c]["data_offsets"] = [0, size]
    else:
        h[c]["data_offsets"] = [h[c]["data_offsets"][0] - 4, h[c]["data_offsets"][1] - 4]
    return h, b


@pytest.mark.parametrize("make, why", [c[1:] for c in ST_CASES], ids=[c[0] for c in ST_CASES])
def test_safetensors_header_abuse(valid, make, why):
    _refused(_signed(valid["members"], weights=make(valid)), why)


def test_weights_for_a_larger_network_are_refused(valid):
    big = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [8, 16]})
    from safetensors.torch import save as st_save
    _refused(_signed(valid["members"], weights=st_save(big.state_dict())), "weights do not fit the network")


# --- hypothesis fuzzing (bounded) -----------------------------------------------------------

@settings(max_examples=150, **FUZZ)
@given(st.data())
def test_fuzz_byte_mutations_of_a_valid_bundle(valid, data):
    buf = bytearray(valid["bytes"])
    for _ in range(data.draw(st.integers(1, 6), label="n_mutations")):
        kind = data.draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate", "dup"]))
        pos = data.draw(st.integers(0, max(0, len(buf) - 1)))
        if kind == "flip" and buf:
            buf[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[pos] = data.draw(st.integers(0, 255))
        elif kind == "delete":
            del buf[pos:pos + data.draw(st.integers(1, 64))]
        elif kind == "insert":
            buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=64))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "dup":
            buf[pos:pos] = buf[pos:pos + data.draw(st.integers(1, 256))]
    result = _outcome_ok(bytes(buf), valid)
    if result == "loaded":
        b = load_bundle_from_bytes(bytes(buf))
        assert b.card == valid["card"]
        assert all(torch.equal(v, valid["state"][k]) for k, v in b.network.state_dict().items())


@settings(max_examples=100, **FUZZ)
@given(st.binary(max_size=4096), st.booleans())
def test_fuzz_random_bytes(blob, with_end_record):
    if with_end_record:  # get past the first check: a plausible end record pointing into the blob
        blob = blob + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 3, 3, len(blob) // 2, len(blob) - len(blob) // 2, 0)
    with pytest.raises(BundleError) as info:
        load_bundle_from_bytes(blob)
    assert UNEXPECTED not in str(info.value)


@settings(max_examples=120, **FUZZ)
@given(st.data())
def test_fuzz_resigned_member_mutations(valid, data):
    """Attacker mode: mutate card or weights bytes, then recompute checksums and CRCs."""
    which = data.draw(st.sampled_from(["card.json", "weights.safetensors"]))
    raw = bytearray(valid["members"][which] if which == "weights.safetensors" else json.dumps(_card()).encode())
    limit = len(raw) - 1 if which == "card.json" else 600  # weights: header region
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, min(limit, len(raw) - 1)))
        op = data.draw(st.sampled_from(["set", "delete", "insert"]))
        if op == "set":
            raw[pos] = data.draw(st.sampled_from(b'{}[]",:0123456789-.eE ntrufalsNI\x00\xff'))
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    kw = {"card": bytes(raw)} if which == "card.json" else {"weights": bytes(raw)}
    _outcome_ok(_signed(valid["members"], **kw), valid)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-10 ** 12, 10 ** 12)
                    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
                    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                                      max_size=4),
                    max_leaves=12)
CARD_PATHS = [["name"], ["network"], ["network", "arch"], ["network", "params"], ["network", "params", "features"],
              ["network", "params", "in_channels"], ["network", "params", "out_channels"], ["classes"],
              ["classes", 0], ["classes", 1, "value"], ["classes", 2, "name"], ["classes", 1, "color"],
              ["preprocessing"], ["preprocessing", "target_spacing"], ["preprocessing", "patch_size"],
              ["preprocessing", "normalization"], ["preprocessing", "normalization", "scheme"],
              ["preprocessing", "modality"], ["calibration"], ["calibration", "method"], ["calibration", "temperature"],
              ["format_version"], ["description"]]


@settings(max_examples=150, **FUZZ)
@given(st.sampled_from(CARD_PATHS), JSON)
def test_fuzz_card_field_values(valid, path, value):
    card = _card_with(path, value)
    try:
        bundle_mod.validate_card(json.loads(json.dumps(card)))
    except BundleError:
        pass
    _outcome_ok(_signed(valid["members"], card=card), valid)


# --- images: read_image must only raise ImageError ------------------------------------------------

@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    arr = (np.random.default_rng(0).random((6, 7, 8)) + 1).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 2.0))
    out = {"dir": d, "array": arr}
    for name, compress in [("raw.nrrd", False), ("gz.nrrd", True), ("raw.nii", False), ("gz.nii.gz", True)]:
        sitk.WriteImage(img, str(d / name), compress)
        out[name] = (d / name).read_bytes()
    return out


_MAX_FUZZ_VOXELS = 32 * 1024 * 1024


def _read_only_image_error(path, monkeypatch=None):
    """read_image gives an image or ImageError; declared sizes above 32 M voxels are skipped (memory)."""
    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    try:
        r.ReadImageInformation()
        if np.prod(r.GetSize(), dtype=np.float64) * r.GetNumberOfComponents() > _MAX_FUZZ_VOXELS:
            return "skipped"
    except RuntimeError:
        pass
    try:
        read_image(path)
    except ImageError:
        return "ImageError"
    return "loaded"


NRRD_VALUES = st.sampled_from(["0", "-1", "1", "3", "4", "99999999999", "nan", "inf", "1e308", "", "a b c", "1 1",
                               "8 7 6 5", "float", "int64", "block", "raw", "gzip", "hex", "ascii", "bzip2",
                               "little", "big", "LIST", "(nan,0,0) (0,1,0) (0,0,1)", "(0,0,0) (0,0,0) (0,0,0)",
                               "(1,0,0) (1,0,0) (0,0,1)", "none (1,0,0) (0,1,0)", "3-vector domain domain",
                               "left-posterior-superior", "RGB-color", "-5", "2147483648 7 6"]) | st.text(
    alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@settings(max_examples=150, **FUZZ)
@given(st.data())
def test_fuzz_nrrd_headers(image_files, data):
    raw = image_files[data.draw(st.sampled_from(["raw.nrrd", "gz.nrrd"]))]
    header, body = raw.split(b"\n\n", 1)
    lines = header.split(b"\n")
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(1, len(lines) - 1))
        op = data.draw(st.sampled_from(["value", "drop", "add"]))
        if op == "value":
            key = lines[i].split(b":")[0]
            lines[i] = key + b": " + data.draw(NRRD_VALUES).encode()
        elif op == "drop" and len(lines) > 2:
            del lines[i]
        else:
            key = data.draw(st.sampled_from(["data file", "byte skip", "line skip", "space dimension", "spacings",
                                              "block size", "endian", "space units", "measurement frame"]))
            lines.insert(i, f"{key}: {data.draw(NRRD_VALUES)}".encode())
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(body))))
    blob = b"\n".join(lines) + b"\n\n" + (body if cut is None else body[:cut])
    path = image_files["dir"] / "fuzz.nrrd"
    path.write_bytes(blob)
    _read_only_image_error(path)


@settings(max_examples=150, **FUZZ)
@given(st.data())
def test_fuzz_nifti_headers(image_files, data):
    name = data.draw(st.sampled_from(["raw.nii", "gz.nii.gz"]))
    raw = bytearray(image_files["raw.nii"])
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, 351))
        raw[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    path = image_files["dir"] / ("fuzz_" + name)
    if name.endswith(".gz"):
        import gzip
        path.write_bytes(gzip.compress(bytes(raw)))
    else:
        path.write_bytes(bytes(raw))
    _read_only_image_error(path)


@pytest.mark.parametrize("name", ["raw.nrrd", "gz.nrrd", "raw.nii", "gz.nii.gz"])
def test_truncated_images_raise_only_image_error(image_files, name):
    raw = image_files[name]
    path = image_files["dir"] / ("trunc_" + name)
    for cut in np.linspace(0, len(raw) - 1, 25).astype(int):
        path.write_bytes(raw[:cut])
        _read_only_image_error(path)


@pytest.mark.parametrize("name", ["raw.nii", "gz.nii.gz"])
def test_truncated_nifti_is_refused(image_files, name):
    raw = image_files[name]
    path = image_files["dir"] / ("cut_" + name)
    path.write_bytes(raw[:int(len(raw) * 0.9)])
    with pytest.raises(ImageError):
        read_image(path)


def test_truncated_nrrd_is_refused(image_files):
    for name in ("raw.nrrd", "gz.nrrd"):
        raw = image_files[name]
        path = image_files["dir"] / ("cut_" + name)
        path.write_bytes(raw[:int(len(raw) * 0.9)])
        with pytest.raises(ImageError, match="cannot be read"):
            read_image(path)


_CRASH_CHILD = """
import sys
sys.path.insert(0, {src!r})
from imbalanceseglib.images import read_image, ImageError
try:
    read_image({path!r})
except ImageError as exc:
    print("ImageError:", str(exc)[:200])
"""


@pytest.mark.parametrize("line", [b"type: " + b"a" * 2000, b"a" * 1000, b"dimension: " + b"1" * 2000])
def test_nrrd_long_header_line_does_not_crash_the_process(tmp_path, line):
    path = tmp_path / "long.nrrd"
    path.write_bytes(b"NRRD0004\n" + (b"type: float\n" if not line.startswith(b"type") else b"") + line + b"\n\n")
    child = subprocess.run([sys.executable, "-c", _CRASH_CHILD.format(src=str(SRC), path=str(path))],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, f"reader process died with code {child.returncode}"
    assert "ImageError" in child.stdout
