"""What 3D Slicer's module panel needs before PyTorch is installed (issue #17, defect 1).

Right after an Extension Manager install, torch, MONAI and safetensors are not there
yet, but the panel lists the models (``container.read_card``, ``BUNDLE_SUFFIX``) and
the training methods (``presets.method_names``). These tests import those modules in
a fresh interpreter where importing torch, monai or safetensors raises ImportError,
and compare what they give with the torch-backed loader in this process. They also
check that the names the card schema defines stay equal to the modules that use them.
"""

import ast
import copy
import hashlib
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import imbalanceseglib
from imbalanceseglib import bundle, card, container, images, networks, presets, training
from imbalanceseglib import estimation as performance
from imbalanceseglib.bundle import BundleError, load_bundle, read_card

SRC = Path(imbalanceseglib.__file__).resolve().parents[1]
PACKAGE = SRC / "imbalanceseglib"
DEMO = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_brain.imbseg"
BLOCKED = ("torch", "monai", "safetensors")
TORCH_FREE = ("card", "container", "presets")

# Runs in a fresh interpreter: argv[1] is a JSON object {"src", "demo", "damaged": {case: path}}.
CHILD = r'''
import json, sys

BLOCKED = ("torch", "monai", "safetensors")


class Blocker:
    """Refuse torch, monai and safetensors (and their submodules), as in Slicer before they are installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked: PyTorch is not installed yet)")
        return None


args = json.loads(sys.argv[1])
preloaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
sys.meta_path.insert(0, Blocker())
sys.path.insert(0, args["src"])

from imbalanceseglib import card, container, presets

out = {"preloaded": preloaded, "suffix": container.BUNDLE_SUFFIX, "methods": presets.method_names()}
demo = container.read_card(args["demo"])
out["demo_name"] = demo["name"]
out["demo_arch"] = demo["network"]["arch"]
out["class_names"] = [c["name"] for c in demo["classes"]]
out["num_classes"] = len(demo["classes"])
out["demo_card"] = demo
out["errors"] = {}
for case, path in args["damaged"].items():
    try:
        container.read_card(path)
        out["errors"][case] = None
    except card.BundleError as exc:
        out["errors"][case] = [type(exc).__name__, str(exc)]
try:
    card.validate_card({"name": "x"})
except card.BundleError as exc:
    out["validate_error"] = str(exc)
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
# The blocker works: the torch-backed module cannot be imported here.
try:
    import imbalanceseglib.bundle  # noqa: F401
    out["bundle_import"] = "imported"
except ImportError as exc:
    out["bundle_import"] = str(exc)
print(json.dumps(out))
'''


def _members(path: Path):
    with zipfile.ZipFile(path) as zf:
        return {n: zf.read(n) for n in ("manifest.json", "card.json", "weights.safetensors")}


def _zip(members, resum=True) -> bytes:
    """A bundle from members; with ``resum`` the manifest gets the checksums of these members."""
    members = dict(members)
    if resum:
        manifest = json.loads(members["manifest.json"])
        manifest["sha256"] = {n: hashlib.sha256(members[n]).hexdigest()
                              for n in ("card.json", "weights.safetensors")}
        members["manifest.json"] = json.dumps(manifest).encode("utf-8")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("manifest.json", "card.json", "weights.safetensors"):
            zf.writestr(name, members[name])
    return buf.getvalue()


def _with_card(members, edit):
    c = json.loads(members["card.json"])
    edit(c)
    return _zip({**members, "card.json": json.dumps(c).encode("utf-8")})


def _damaged(tmp_path: Path):
    """Bundles damaged in ways that read_card must report (card schema, JSON, container)."""
    m = _members(DEMO)
    cases = {
        "unknown_arch": _with_card(m, lambda c: c["network"].update(arch="UNet4D")),
        "unknown_normalization": _with_card(
            m, lambda c: c["preprocessing"].update(normalization={"scheme": "minmax"})),
        "unknown_calibration": _with_card(m, lambda c: c.update(calibration={"method": "platt"})),
        "unknown_confidence": _with_card(
            m, lambda c: c.update(calibration={"method": "atc", "threshold": 0.5, "confidence": "bogus"})),
        "bad_terminology": _with_card(
            m, lambda c: c["classes"][1].update(terminology={"category": ["SCT", "1", "x"]})),
        "duplicate_class": _with_card(m, lambda c: c["classes"][2].update(name=c["classes"][1]["name"])),
        "nan_in_card": _zip({**m, "card.json": m["card.json"].replace(b'"classes"', b'"x": NaN, "classes"', 1)}),
        "card_not_object": _zip({**m, "card.json": b"[1, 2]"}),
        "checksum": _zip({**m, "card.json": m["card.json"].replace(b"Background", b"Backgroune", 1)}, resum=False),
        "truncated": DEMO.read_bytes()[: DEMO.stat().st_size // 2],
        "not_zip": b"not a bundle at all",
        "extra_member": None,
    }
    extra = io.BytesIO()
    with zipfile.ZipFile(extra, "w") as zf:
        for name, data in m.items():
            zf.writestr(name, data)
        zf.writestr("evil.py", b"print('hi')")
    cases["extra_member"] = extra.getvalue()
    paths = {}
    for name, data in cases.items():
        p = tmp_path / f"{name}.imbseg"
        p.write_bytes(data)
        paths[name] = str(p)
    paths["missing"] = str(tmp_path / "missing.imbseg")
    paths["folder"] = str(tmp_path)
    return paths


@pytest.fixture(scope="module")
def torch_free_run(tmp_path_factory):
    damaged = _damaged(tmp_path_factory.mktemp("damaged"))
    arg = json.dumps({"src": str(SRC), "demo": str(DEMO), "damaged": damaged})
    proc = subprocess.run([sys.executable, "-c", CHILD, arg], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), damaged


def test_demo_card_is_read_without_torch(torch_free_run):
    out, _ = torch_free_run
    assert out["preloaded"] == []  # a fresh interpreter: nothing was imported before the blocker
    b = load_bundle(DEMO)  # the torch-backed loader, in this process
    assert out["class_names"] == b.class_names
    assert out["num_classes"] == b.num_classes == len(b.card["classes"]) > 2
    assert out["demo_name"] == b.card["name"] and out["demo_arch"] == b.card["network"]["arch"]
    assert out["demo_card"] == b.card == read_card(DEMO)
    assert out["suffix"] == bundle.BUNDLE_SUFFIX == DEMO.suffix


def test_method_names_without_torch(torch_free_run):
    out, _ = torch_free_run
    assert out["methods"] == list(training.METHOD_PRESETS) == presets.method_names()
    assert training.METHOD_PRESETS is presets.METHOD_PRESETS


def test_no_torch_monai_or_safetensors_imported(torch_free_run):
    out, _ = torch_free_run
    assert out["loaded"] == []
    # ... and the blocker is effective: the torch-backed bundle module fails to import there.
    assert out["bundle_import"] != "imported"
    assert "blocked" in out["bundle_import"] and any(name in out["bundle_import"] for name in BLOCKED)


def test_damaged_cards_give_the_same_error_without_torch(torch_free_run):
    out, damaged = torch_free_run
    assert set(out["errors"]) == set(damaged)
    for case, path in damaged.items():
        with pytest.raises(BundleError) as with_torch:
            read_card(path)
        assert out["errors"][case] == ["BundleError", str(with_torch.value)], case
        if case not in ("missing", "folder"):
            with pytest.raises(BundleError) as loading:
                load_bundle(path)
            assert str(loading.value) == str(with_torch.value), case
    # the schema's names appear in its messages
    assert "known: UNet3D, UNet3DEnsemble" in out["errors"]["unknown_arch"][1]
    assert "known: none, percentile_zscore, fixed_zscore" in out["errors"]["unknown_normalization"][1]
    assert "known: mcp, entropy, energy, doctor" in out["errors"]["unknown_confidence"][1]
    assert "does not match the manifest" in out["errors"]["checksum"][1]
    with pytest.raises(BundleError) as exc:
        bundle.validate_card({"name": "x"})
    assert out["validate_error"] == str(exc.value)


# --- the torch-free names stay equal to the modules that use them ----------------------

def test_architectures_match_the_network_registry():
    assert set(card.ARCHITECTURES) == set(networks.available_architectures())
    assert list(card.ARCHITECTURES) == sorted(card.ARCHITECTURES)  # messages list them sorted, as before


def test_normalization_schemes_match_images():
    assert images.NORMALIZATION_SCHEMES is card.NORMALIZATION_SCHEMES
    params = {"none": {}, "percentile_zscore": {}, "fixed_zscore": {"clip_min": 0, "clip_max": 9, "mean": 1, "std": 2}}
    assert set(params) == set(card.NORMALIZATION_SCHEMES)
    arr = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    for scheme in card.NORMALIZATION_SCHEMES:
        images.normalise_intensities(arr, {"scheme": scheme, **params[scheme]})
    with pytest.raises(images.ImageError):
        images.normalise_intensities(arr, {"scheme": "minmax"})


def test_confidence_scores_and_methods_match_performance():
    assert performance.CONFIDENCE_SCORES is card.CONFIDENCE_SCORES
    assert performance.METHODS is card.ESTIMATION_METHODS
    assert bundle.CALIBRATION_METHODS == ("none", "temperature", "ts", "doc", "atc", "ts-atc")


def test_bundle_reexports_card_and_container():
    for name in ("BundleError", "FORMAT_VERSION", "validate_card", "TERMINOLOGY_KEYS", "CALIBRATION_METHODS"):
        assert getattr(bundle, name) is getattr(card, name), name
    for name in ("read_card", "BUNDLE_SUFFIX", "FORMAT_NAME"):
        assert getattr(bundle, name) is getattr(container, name), name
    assert issubclass(bundle.BundleError, ValueError)


def test_the_bundle_parsers_and_limits_live_in_card_and_container():
    """The JSON parser and the container's limits and safety net are defined once, in the
    PyTorch-free modules (bundle.py imports their public names; issue #18)."""
    for name in ("parse_json", "short_repr", "is_int"):
        assert getattr(card, name).__module__ == card.__name__, name
    assert card.CONTROL_CHARS.search("a\x00b") and not card.CONTROL_CHARS.search("ab")
    for name in ("read_verified", "open_path", "guarded", "sha256_hex"):
        assert getattr(container, name).__module__ == container.__name__, name
    assert isinstance(container._UNEXPECTED, str) and container._MEMBERS == (
        "manifest.json", "card.json", "weights.safetensors")
    assert set(container.MAX_MEMBER_BYTES) == set(container._MEMBERS)
    for name in ("_parse_json", "_short", "_UNEXPECTED", "_MEMBERS", "_MAX_MEMBER_BYTES", "_read_verified"):
        assert not hasattr(bundle, name), name


@pytest.mark.parametrize("module", TORCH_FREE)
def test_torch_free_modules_import_only_the_standard_library(module):
    """The same rules as test_hostile_files' check of bundle.py, plus: standard library only."""
    text = (PACKAGE / f"{module}.py").read_text()
    tree = ast.parse(text)
    assert ast.get_docstring(tree)
    absolute = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    absolute |= {n.module.split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module}
    relative = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0}
    assert absolute <= set(sys.stdlib_module_names) | {"__future__"}, absolute
    assert relative <= set(TORCH_FREE), relative
    assert not absolute & {"pickle", "_pickle", "marshal", "dill", "shelve", "importlib", "runpy"}
    calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
    assert not {f.id for f in calls if isinstance(f, ast.Name)} & {"eval", "exec", "__import__", "compile"}
    assert not {f.attr for f in calls if isinstance(f, ast.Attribute)} & {
        "extract", "extractall", "load_file", "mkstemp", "NamedTemporaryFile", "TemporaryDirectory",
        "write_bytes", "write_text", "unlink", "rename"}


def test_presets_are_plain_json_data():
    data = copy.deepcopy(presets.METHOD_PRESETS)
    assert json.loads(json.dumps(data)) == presets.METHOD_PRESETS
    assert presets.method_names() == list(presets.METHOD_PRESETS)
    names = presets.method_names()
    names.append("x")  # a fresh list each call
    assert "x" not in presets.METHOD_PRESETS
