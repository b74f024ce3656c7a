"""Model bundles: one file per trained model, loaded without executing code.

Format (``.imbseg``): a ZIP archive (stored, not compressed) with exactly these
members

* ``manifest.json`` -- format name, format version and the SHA-256 of each other member;
* ``card.json``     -- the model card: network, classes, preprocessing,
  calibration, validation results and training provenance (plain JSON);
* ``weights.safetensors`` -- the network weights (safetensors: tensors only).

Nothing is unpickled and no member name is used as a path on disk (nothing is
extracted: members are read into memory), so a bundle cannot run code or write
anywhere. A truncated, bit-flipped, tampered or hostile file raises
:class:`BundleError` (a ``ValueError``) with a message that names the problem;
every step is bounded so that no file can make loading hang or exhaust memory:

* the whole file is at most ``_MAX_FILE_BYTES``; the ZIP end record must close
  the file (no trailing or prepended data, no comment, no ZIP64, one disk) and
  the central directory is at most ``_MAX_CENTRAL_DIR_BYTES`` and
  ``_MAX_ENTRIES`` entries, so parsing it is cheap;
* members must be plain names (no ``/``, ``\\``, ``..``, NUL, drive letters),
  appear once, be regular files (no symbolic links), unencrypted and *stored*
  (compressed members are refused, which rules out compression bombs); their
  declared sizes must fit the file and the per-member caps ``_MAX_MEMBER_BYTES``;
* JSON is parsed with NaN/Infinity, duplicate keys and numbers of more than
  ``_MAX_INT_DIGITS`` digits refused, and nesting deeper than ``_MAX_JSON_DEPTH``;
* the card schema bounds every field a loader or inference uses (at most
  ``_MAX_CLASSES`` classes, finite spacings, bounded patch sizes, ...);
* the safetensors header is parsed and checked against the network the card
  names (tensor names, dtypes, shapes, offsets) *before* any tensor is built,
  the network being sized on PyTorch's ``meta`` device first, so the memory used
  is bounded by the size of the weights member.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import re
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import atomic_path
from .images import NORMALIZATION_SCHEMES
from .networks import available_architectures, build_network
from .performance import CONFIDENCE_SCORES
from .performance import METHODS as ESTIMATION_METHODS

FORMAT_NAME = "imbalanceseg-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".imbseg"
_MEMBERS = ("manifest.json", "card.json", "weights.safetensors")

# --- limits (every one is checked before the corresponding work is done) -----
_MAX_MEMBER_BYTES = {"manifest.json": 64 << 10, "card.json": 8 << 20, "weights.safetensors": 1 << 30}
_MAX_FILE_BYTES = sum(_MAX_MEMBER_BYTES.values()) + (64 << 10)
_MAX_ENTRIES = 16               # central-directory entries (a bundle has 3; a few more get a clear message)
_MAX_CENTRAL_DIR_BYTES = 64 << 10
_MAX_JSON_DEPTH = 32
_MAX_INT_DIGITS = 30            # JSON integers; Python would otherwise parse 4300-digit numbers
_MAX_ST_HEADER_BYTES = 1 << 20  # safetensors JSON header
_MAX_CLASSES = 256              # label maps are written as uint8
_MAX_NAME_CHARS = 200
_MAX_IN_CHANNELS = 64
_MAX_LEVELS = 8                 # UNet3D resolution levels
_MAX_FEATURES = 4096            # channels per level (also enforced by networks.build_network)
_SPACING_RANGE = (1e-3, 1e3)    # mm
_MAX_PATCH_EDGE = 512
_MAX_PATCH_VOXELS = 1 << 24     # e.g. 256**3
#: Calibration methods a card may name (applied by inference.apply_calibration; the
#: estimation methods are described in imbalanceseglib.performance).
CALIBRATION_METHODS = ("none", "temperature") + tuple(m for m in ESTIMATION_METHODS if m != "none")
_CALIBRATION_RANGES = {"temperature": (1e-6, 1e6), "offset": (-1.0, 1.0), "threshold": (-1e-6, 1.0)}
_ST_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2),
              torch.float64: ("F64", 8), torch.int64: ("I64", 8)}

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_LOCAL_HEADER_BYTES = 30
_HEX64 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class BundleError(ValueError):
    """A model bundle is missing, damaged, tampered with or does not fit the request."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- JSON with bounds ---------------------------------------------------------

class _JsonRefused(ValueError):
    pass


def _refuse_constant(name: str) -> Any:
    raise _JsonRefused(f"{name} is not allowed")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRefused(f"number {text[:40]} is out of range")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _JsonRefused(f"integer with {len(text)} digits is implausibly large")
    return int(text)


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _JsonRefused(f"key {key[:60]!r} appears twice in one object")
        out[key] = value
    return out


def _json_depth(obj: Any) -> int:
    """Nesting depth, computed without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > _MAX_JSON_DEPTH:
                break
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _parse_json(data: bytes, what: str, label: str) -> Any:
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float,
                         parse_int=_parse_int, object_pairs_hook=_no_duplicate_keys)
    except RecursionError as exc:
        raise BundleError(f"{label}: {what} is nested too deeply (limit {_MAX_JSON_DEPTH} levels)") from exc
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError, _JsonRefused, int digit limit
        raise BundleError(f"{label}: {what} is not valid JSON ({str(exc)[:200]})") from exc
    if _json_depth(obj) > _MAX_JSON_DEPTH:
        raise BundleError(f"{label}: {what} is nested too deeply (limit {_MAX_JSON_DEPTH} levels)")
    return obj


# --- card schema --------------------------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite JSON number (bool is not a number here; Python ints are always finite)."""
    if isinstance(v, float):
        return math.isfinite(v)
    return _is_int(v)


def _check_text(v: Any, where: str, allow_empty: bool = False) -> str:
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        raise BundleError(f"{where} must be a non-empty string, got {_short(v)}")
    if len(v) > _MAX_NAME_CHARS or _CONTROL.search(v):
        raise BundleError(f"{where} must be at most {_MAX_NAME_CHARS} printable characters, got {_short(v)}")
    return v


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "...'"


def _check_color(c: Any, where: str) -> List[float]:
    if (not isinstance(c, (list, tuple)) or len(c) != 3
            or not all(_is_number(v) and 0.0 <= float(v) <= 1.0 for v in c)):
        raise BundleError(f"{where}: colour must be three numbers in [0, 1], got {_short(c)}")
    return [float(v) for v in c]


def _check_network(net: Any, n_classes: int) -> None:
    if not isinstance(net, dict) or not isinstance(net.get("arch"), str) or not isinstance(net.get("params", {}), dict):
        raise BundleError("model card field 'network' must be {'arch': str, 'params': {...}}")
    if net["arch"] not in available_architectures():
        raise BundleError(f"unknown network architecture {_short(net['arch'])}; "
                          f"known: {', '.join(available_architectures())}")
    params = net.get("params", {})
    out_ch = params.get("out_channels")
    if out_ch is not None and (not _is_int(out_ch) or out_ch != n_classes):
        raise BundleError(
            f"network predicts {_short(out_ch)} channels but the card lists {n_classes} classes")
    in_ch = params.get("in_channels")
    if in_ch is not None and (not _is_int(in_ch) or not 1 <= in_ch <= _MAX_IN_CHANNELS):
        raise BundleError(f"network in_channels must be an integer in [1, {_MAX_IN_CHANNELS}], got {_short(in_ch)}")
    feats = params.get("features")
    if feats is not None and (not isinstance(feats, list) or not 2 <= len(feats) <= _MAX_LEVELS
                              or not all(_is_int(f) and 1 <= f <= _MAX_FEATURES for f in feats)):
        raise BundleError(f"network features must be a list of 2 to {_MAX_LEVELS} integers in "
                          f"[1, {_MAX_FEATURES}], got {_short(feats)}")
    if "members" in params or net["arch"] == "UNet3DEnsemble":
        members = params.get("members", 2)
        if net["arch"] != "UNet3DEnsemble":
            raise BundleError(f"network parameter 'members' is only accepted by UNet3DEnsemble, not {_short(net['arch'])}")
        if not _is_int(members) or not 2 <= members <= 8:
            raise BundleError(f"network members must be an integer in [2, 8], got {_short(members)}")


def _check_normalization(norm: Any) -> None:
    if not isinstance(norm, dict):
        raise BundleError(f"preprocessing.normalization must be an object, got {_short(norm)}")
    scheme = norm.get("scheme", "percentile_zscore")
    if scheme not in NORMALIZATION_SCHEMES:
        raise BundleError(f"unknown intensity normalisation scheme {_short(scheme)}; "
                          f"known: {', '.join(NORMALIZATION_SCHEMES)}")
    if scheme == "percentile_zscore":
        lo, hi = norm.get("lower_percentile", 0.5), norm.get("upper_percentile", 99.5)
        if not (_is_number(lo) and _is_number(hi) and 0 <= lo < hi <= 100):
            raise BundleError(f"normalisation percentiles must satisfy 0 <= lower < upper <= 100, "
                              f"got {_short(lo)}, {_short(hi)}")
    elif scheme == "fixed_zscore":
        for key in ("clip_min", "clip_max", "mean", "std"):
            if not _is_number(norm.get(key)):
                raise BundleError(f"fixed_zscore normalisation needs a finite number {key!r}, "
                                  f"got {_short(norm.get(key))}")
        if not norm["clip_min"] < norm["clip_max"] or not norm["std"] > 0:
            raise BundleError("fixed_zscore normalisation needs clip_min < clip_max and std > 0")


TERMINOLOGY_KEYS = ("category", "type", "type_modifier", "region", "region_modifier")


def _check_terminology(term: Any, where: str) -> None:
    """Optional DICOM-style coded terminology of a class: ``category`` and ``type`` (required),
    ``type_modifier``, ``region``, ``region_modifier`` (optional), each ``[coding scheme, code value,
    code meaning]``, e.g. ``["SCT", "123037004", "Anatomical Structure"]``; plus an optional
    ``context`` (the Slicer terminology context name)."""
    if not isinstance(term, dict):
        raise BundleError(f"{where}: 'terminology' must be an object")
    unknown = set(term) - set(TERMINOLOGY_KEYS) - {"context"}
    if unknown:
        raise BundleError(f"{where}: unknown terminology fields {sorted(unknown)}; "
                          f"allowed: context, {', '.join(TERMINOLOGY_KEYS)}")
    for key in ("category", "type"):
        if key not in term:
            raise BundleError(f"{where}: terminology needs '{key}'")
    for key in TERMINOLOGY_KEYS:
        if key in term:
            code = term[key]
            if not (isinstance(code, list) and len(code) == 3 and all(isinstance(v, str) for v in code)
                    and code[0].strip() and code[1].strip()):
                raise BundleError(f"{where}: terminology '{key}' must be [coding scheme, code value, code meaning] "
                                  f"strings, got {_short(code)}")
            for v in code:
                _check_text(v, f"{where} terminology {key}")
                if any(ch in v for ch in "~^|"):
                    raise BundleError(f"{where}: terminology '{key}' must not contain '~', '^' or '|'")
    if "context" in term:
        if not isinstance(term["context"], str):
            raise BundleError(f"{where}: terminology 'context' must be a string")
        _check_text(term["context"], f"{where} terminology context")


def _check_calibration(cal: Any, n_classes: int) -> None:
    if not isinstance(cal, dict):
        raise BundleError(f"model card field 'calibration' must be an object, got {_short(cal)}")
    method = cal.get("method", "none")
    if method not in CALIBRATION_METHODS:
        raise BundleError(f"unknown calibration method {_short(method)}; known: {', '.join(CALIBRATION_METHODS)}")
    if method == "temperature":
        t = cal.get("temperature")
        values = t if isinstance(t, list) else [t]
        if (isinstance(t, list) and len(t) != n_classes) or not all(
                _is_number(v) and 1e-6 <= v <= 1e6 for v in values):
            raise BundleError(f"temperature calibration needs one positive finite temperature or one per "
                              f"class ({n_classes}), got {_short(t)}")
        return
    if "class_specific" in cal and not isinstance(cal["class_specific"], bool):
        raise BundleError(f"calibration.class_specific must be true or false, got {_short(cal['class_specific'])}")
    conf = cal.get("confidence", "mcp")
    if conf not in CONFIDENCE_SCORES:
        raise BundleError(f"unknown calibration confidence score {_short(conf)}; known: {', '.join(CONFIDENCE_SCORES)}")
    needs = {"none": (), "ts": ("temperature",), "doc": ("offset",), "atc": ("threshold",),
             "ts-atc": ("temperature", "threshold")}[method]
    for key, (lo, hi) in _CALIBRATION_RANGES.items():
        if key not in cal:
            if key in needs:
                raise BundleError(f"calibration method {method!r} needs {key!r} (one value or one per class)")
            continue
        v = cal[key]
        values = v if isinstance(v, list) else [v]
        if (isinstance(v, list) and len(v) != n_classes) or not values or not all(
                _is_number(x) and lo <= x <= hi for x in values):
            raise BundleError(f"calibration.{key} must be one number in [{lo:g}, {hi:g}] or one per class "
                              f"({n_classes}), got {_short(v)}")
    if conf == "energy" or "score_range" in cal:
        sr = cal.get("score_range")
        if not (isinstance(sr, list) and len(sr) == 2 and all(_is_number(x) for x in sr) and sr[0] < sr[1]):
            raise BundleError(f"calibration.score_range must be two finite numbers low < high "
                              f"(needed by the energy score), got {_short(sr)}")
    if "fitted_on" in cal and not isinstance(cal["fitted_on"], dict):
        raise BundleError("calibration.fitted_on must be an object")


def validate_card(card: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model card schema; return it unchanged or raise BundleError.

    Only ``BundleError`` escapes, whatever the (JSON) input; fields the library
    uses are type- and range-checked, other fields are free JSON.
    """
    if not isinstance(card, dict):
        raise BundleError("card.json must hold a JSON object")
    for key in ("name", "network", "classes", "preprocessing"):
        if key not in card:
            raise BundleError(f"model card lacks the required field {key!r}")
    _check_text(card["name"], "model card field 'name'")
    if "description" in card and not isinstance(card["description"], str):
        raise BundleError("model card field 'description' must be a string")
    version = card.get("format_version", FORMAT_VERSION)
    if not _is_int(version) or not 1 <= version <= FORMAT_VERSION:
        raise BundleError(f"model card format_version {_short(version)} is not supported "
                          f"(this ImbalanceSegLib reads version {FORMAT_VERSION})")
    classes = card["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise BundleError("model card must list at least two classes (background first)")
    if len(classes) > _MAX_CLASSES:
        raise BundleError(f"model card lists {len(classes)} classes; at most {_MAX_CLASSES} are supported")
    seen_names = set()
    for i, cls in enumerate(classes):
        if not isinstance(cls, dict) or not isinstance(cls.get("name"), str) or not cls["name"].strip():
            raise BundleError(f"class #{i} needs a non-empty 'name'")
        _check_text(cls["name"], f"class #{i} name")
        value = cls.get("value")
        if not _is_int(value) or value != i:
            raise BundleError(f"class #{i} ({cls['name']!r}) must have value {i}, got {_short(value)}")
        if cls["name"] in seen_names:
            raise BundleError(f"class name {cls['name']!r} appears twice")
        seen_names.add(cls["name"])
        _check_color(cls.get("color", [0, 0, 0]), f"class {cls['name']!r}")
        if "terminology" in cls:
            _check_terminology(cls["terminology"], f"class {cls['name']!r}")
    _check_network(card["network"], len(classes))
    pre = card["preprocessing"]
    if not isinstance(pre, dict):
        raise BundleError("model card field 'preprocessing' must be an object")
    spacing = pre.get("target_spacing")
    lo, hi = _SPACING_RANGE
    if spacing is not None and (not isinstance(spacing, list) or len(spacing) != 3
                                or not all(_is_number(s) and lo <= s <= hi for s in spacing)):
        raise BundleError(f"preprocessing.target_spacing must be three positive numbers "
                          f"(in [{lo:g}, {hi:g}] mm), got {_short(spacing)}")
    patch = pre.get("patch_size")
    if patch is not None and (not isinstance(patch, list) or len(patch) != 3
                              or not all(_is_int(s) and 0 < s <= _MAX_PATCH_EDGE for s in patch)
                              or math.prod(patch) > _MAX_PATCH_VOXELS):
        raise BundleError(f"preprocessing.patch_size must be three positive integers (each at most "
                          f"{_MAX_PATCH_EDGE}, at most {_MAX_PATCH_VOXELS} voxels), got {_short(patch)}")
    if "normalization" in pre:
        _check_normalization(pre["normalization"])
    for key in ("modality", "orientation"):
        if key in pre and not isinstance(pre[key], str):
            raise BundleError(f"preprocessing.{key} must be a string, got {_short(pre[key])}")
    if "calibration" in card and card["calibration"] is not None:
        _check_calibration(card["calibration"], len(classes))
    return card


@dataclass
class ModelBundle:
    """A trained network with its model card."""

    card: Dict[str, Any]
    network: torch.nn.Module
    path: Optional[Path] = None
    checksums: Dict[str, str] = field(default_factory=dict)

    @property
    def class_names(self) -> List[str]:
        return [c["name"] for c in self.card["classes"]]

    @property
    def classes(self) -> List[Dict[str, Any]]:
        return self.card["classes"]

    @property
    def num_classes(self) -> int:
        return len(self.card["classes"])

    @property
    def preprocessing(self) -> Dict[str, Any]:
        return self.card["preprocessing"]

    def summary(self) -> str:
        lines = [f"{self.card['name']} ({self.card['network']['arch']}, {self.num_classes} classes)"]
        for cls in self.classes:
            lines.append(f"  {cls['value']:>2} {cls['name']}")
        return "\n".join(lines)


def save_bundle(path: Union[str, Path], card: Dict[str, Any], network: torch.nn.Module) -> Path:
    """Write a bundle atomically: the final file appears only when complete."""
    card = copy.deepcopy(card)
    card.setdefault("format_version", FORMAT_VERSION)
    validate_card(card)
    try:
        card_bytes = json.dumps(card, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise BundleError(f"model card cannot be written as plain JSON ({exc})") from exc
    if len(card_bytes) > _MAX_MEMBER_BYTES["card.json"]:
        raise BundleError(f"model card is {len(card_bytes)} bytes; at most {_MAX_MEMBER_BYTES['card.json']} are allowed")
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    weights = st_save(state, metadata={"format": FORMAT_NAME})
    if len(weights) > _MAX_MEMBER_BYTES["weights.safetensors"]:
        raise BundleError(f"network weights are {len(weights)} bytes; at most "
                          f"{_MAX_MEMBER_BYTES['weights.safetensors']} are allowed in a bundle")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sha256": {"card.json": _sha256(card_bytes), "weights.safetensors": _sha256(weights)},
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", manifest_bytes)
            zf.writestr("card.json", card_bytes)
            zf.writestr("weights.safetensors", weights)
    return path


# --- reading the archive (in memory; nothing is extracted) ----------------------

def _member_name_problem(info: zipfile.ZipInfo) -> Optional[str]:
    """Why a member name is refused, or None for a plain name."""
    name = info.filename
    if info.orig_filename != name or "\x00" in name:
        return "contains a NUL character"
    if name == "" or name.endswith("/"):
        return "is a folder entry"
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    parts = re.split(r"[/\\]", name)
    if ".." in parts:
        return "climbs out of its folder ('..')"
    if len(parts) > 1:
        return "is a path, not a plain name"
    if _CONTROL.search(name):
        return "contains control characters"
    return None


def _check_end_record(fh: BinaryIO, size: int, label: str) -> Tuple[int, int]:
    """Check the ZIP end record before zipfile parses anything; return (cd_offset, n_entries)."""
    if size < _EOCD.size:
        raise BundleError(f"{label} is not a model bundle (not a ZIP archive or truncated: {size} bytes)")
    fh.seek(size - _EOCD.size)
    sig, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = _EOCD.unpack(fh.read(_EOCD.size))
    if sig != _EOCD_SIG or comment_len != 0:
        raise BundleError(f"{label} is not a model bundle (not a ZIP archive or truncated: no ZIP end record "
                          "at the end of the file)")
    if size >= _EOCD.size + 20:
        fh.seek(size - _EOCD.size - 20)
        if fh.read(4) == _ZIP64_LOCATOR_SIG:
            raise BundleError(f"{label} is a ZIP64 archive; model bundles are plain ZIP files")
    if disk != 0 or cd_disk != 0 or n_disk != n_total:
        raise BundleError(f"{label} is a multi-part ZIP archive; model bundles are one file")
    if n_total > _MAX_ENTRIES:
        raise BundleError(f"{label} holds {n_total} archive entries; a model bundle has {len(_MEMBERS)}")
    if cd_size > _MAX_CENTRAL_DIR_BYTES:
        raise BundleError(f"{label}: ZIP central directory of {cd_size} bytes is implausibly large")
    if cd_offset + cd_size != size - _EOCD.size:
        raise BundleError(f"{label} is damaged (not a ZIP archive or truncated: the central directory does not "
                          "end where the end record says; truncated, or data added before or after)")
    return cd_offset, n_total


def _check_infos(infos: List[zipfile.ZipInfo], cd_offset: int, label: str) -> None:
    """Refuse entries by name, type, method and size before any member is read."""
    for info in infos:
        problem = _member_name_problem(info)
        if problem:
            raise BundleError(f"{label}: archive member name {_short(info.orig_filename)} {problem}; refusing it "
                              "(bundle members are plain names and are never used as file paths)")
    names = [i.filename for i in infos]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BundleError(f"{label} holds duplicate members {dupes}; refusing to load it")
    unexpected = sorted(set(names) - set(_MEMBERS))
    if unexpected:
        raise BundleError(f"{label} holds unexpected members {unexpected}; refusing to load it")
    missing = [m for m in _MEMBERS if m not in names]
    if missing:
        raise BundleError(f"{label} lacks the members {missing}")
    end = 0
    for info in sorted(infos, key=lambda i: i.header_offset):
        name = info.filename
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind == stat.S_IFLNK:
            raise BundleError(f"{label}: member {name} is a symbolic link; refusing it")
        if kind not in (0, stat.S_IFREG):
            raise BundleError(f"{label}: member {name} is not a regular file (mode {oct(info.external_attr >> 16)})")
        if info.flag_bits & 0x1:
            raise BundleError(f"{label}: member {name} is encrypted; bundles are not")
        if info.compress_type != zipfile.ZIP_STORED:
            raise BundleError(f"{label}: member {name} is compressed (method {info.compress_type}); bundles store "
                              "members uncompressed, so compressed ones are refused (zip-bomb guard)")
        if info.file_size > _MAX_MEMBER_BYTES[name]:
            raise BundleError(f"{label}: member {name} declares an implausible size ({info.file_size} bytes, "
                              f"limit {_MAX_MEMBER_BYTES[name]})")
        if info.compress_size != info.file_size:
            raise BundleError(f"{label}: member {name} is damaged (stored size {info.compress_size} differs "
                              f"from its size {info.file_size})")
        if info.header_offset < end:
            raise BundleError(f"{label}: member {name} overlaps another member (damaged or crafted archive)")
        end = info.header_offset + _LOCAL_HEADER_BYTES + len(info.orig_filename.encode("utf-8")) + info.file_size
        if end > cd_offset:
            raise BundleError(f"{label}: member {name} declares {info.file_size} bytes, more than the file "
                              "holds (truncated or damaged)")


def _read_members(fh: BinaryIO, size: int, label: str) -> Dict[str, bytes]:
    if size > _MAX_FILE_BYTES:
        raise BundleError(f"{label} is {size} bytes; model bundles are at most {_MAX_FILE_BYTES} bytes")
    cd_offset, _ = _check_end_record(fh, size, label)
    fh.seek(0)
    try:
        zf = zipfile.ZipFile(fh, "r")
    except Exception as exc:  # zipfile raises BadZipFile, but also struct/Unicode/Value errors on crafted input
        raise BundleError(f"{label} is not a model bundle (not a ZIP archive or truncated: "
                          f"{type(exc).__name__}: {str(exc)[:200]})") from exc
    out: Dict[str, bytes] = {}
    with zf:
        _check_infos(zf.infolist(), cd_offset, label)
        for name in _MEMBERS:
            info = zf.getinfo(name)
            try:
                with zf.open(info) as member:
                    data = member.read(info.file_size + 1)
            except Exception as exc:  # BadZipFile (CRC, header mismatch), EOFError, OSError, ...
                raise BundleError(f"{label}: member {name} is damaged ({type(exc).__name__}: "
                                  f"{str(exc)[:200]})") from exc
            if len(data) != info.file_size:
                raise BundleError(f"{label}: member {name} is damaged (read {len(data)} bytes, "
                                  f"expected {info.file_size})")
            out[name] = data
    return out


# --- manifest and weights ---------------------------------------------------------

def _check_manifest(manifest: Any, label: str) -> Dict[str, str]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{label} is not an ImbalanceSeg model bundle (format {_short(fmt)})")
    version = manifest.get("format_version")
    if not _is_int(version) or version != FORMAT_VERSION:
        raise BundleError(
            f"{label} has bundle format version {_short(version)}; this ImbalanceSegLib reads version {FORMAT_VERSION}")
    sums = manifest.get("sha256")
    if (not isinstance(sums, dict) or set(sums) != {"card.json", "weights.safetensors"}
            or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in sums.values())):
        raise BundleError(f"{label}: manifest.json must give the SHA-256 (64 hex digits) of exactly card.json "
                          "and weights.safetensors")
    return dict(sums)


def _expected_tensors(arch: str, params: Dict[str, Any], label: str) -> Dict[str, Tuple[str, List[int], int]]:
    """Names, safetensors dtypes, shapes and byte sizes of the network's state, sized on the meta device."""
    try:
        with torch.device("meta"):
            net = build_network(arch, params)
    except (ValueError, TypeError) as exc:
        raise BundleError(f"{label}: cannot build the network: {exc}") from exc
    out = {}
    for key, t in net.state_dict().items():
        if t.dtype not in _ST_DTYPES:
            raise BundleError(f"{label}: network state {key} has unsupported dtype {t.dtype}")
        code, itemsize = _ST_DTYPES[t.dtype]
        out[key] = (code, list(t.shape), t.numel() * itemsize)
    return out


def _check_safetensors(data: bytes, expected: Dict[str, Tuple[str, List[int], int]], label: str) -> None:
    """Check the safetensors header against the network before any tensor is built."""
    where = f"{label}: weights.safetensors"
    if len(data) < 8:
        raise BundleError(f"{where} is damaged (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise BundleError(f"{where}: header length {n} is larger than the file ({len(data)} bytes)")
    if n > _MAX_ST_HEADER_BYTES:
        raise BundleError(f"{where}: header of {n} bytes is implausibly large (limit {_MAX_ST_HEADER_BYTES})")
    header = _parse_json(data[8:8 + n], "weights.safetensors header", label)
    if not isinstance(header, dict):
        raise BundleError(f"{where}: header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise BundleError(f"{where}: __metadata__ must map names to strings")
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise BundleError(f"{label}: weights do not fit the network in the card "
                          f"(tensors missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                          f"unexpected {[e[:60] for e in extra[:5]]}{'...' if len(extra) > 5 else ''})")
    body = len(data) - 8 - n
    spans = []
    for key, entry in header.items():
        code, shape, nbytes = expected[key]
        if not isinstance(entry, dict):
            raise BundleError(f"{where}: entry for {key} is not an object")
        if entry.get("dtype") != code:
            raise BundleError(f"{label}: weights do not fit the network in the card (tensor {key} has "
                              f"dtype {_short(entry.get('dtype'))}; allowed: {code})")
        if entry.get("shape") != shape or not all(_is_int(s) for s in entry.get("shape", [])):
            raise BundleError(f"{label}: weights do not fit the network in the card (tensor {key} has "
                              f"shape {_short(entry.get('shape'))}; the network needs {shape})")
        offs = entry.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= body or offs[1] - offs[0] != nbytes):
            raise BundleError(f"{where}: tensor {key} has invalid data offsets {_short(offs)} "
                              f"(needs {nbytes} bytes within {body})")
        spans.append((offs[0], offs[1]))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise BundleError(f"{where}: tensor data overlap or leave gaps (damaged or crafted)")
        pos = end
    if pos != body:
        raise BundleError(f"{where}: {body - pos} bytes after the last tensor (damaged or crafted)")


# --- loading ------------------------------------------------------------------------

def read_card(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and verify only the model card (fast; used to list models)."""
    return _load_path(Path(path), with_weights=False).card


def load_bundle(path: Union[str, Path]) -> ModelBundle:
    """Load a bundle, verifying format, checksums, card schema and weights."""
    return _load_path(Path(path), with_weights=True)


def load_bundle_from_bytes(data: bytes, name: str = "<bytes>") -> ModelBundle:
    """Load from bytes, entirely in memory (no temporary file); used by fuzzing and tests."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise BundleError(f"{name}: expected bytes, got {type(data).__name__}")
    data = bytes(data)
    return _load(io.BytesIO(data), len(data), name, None, with_weights=True)


def _load_path(path: Path, with_weights: bool) -> ModelBundle:
    if not path.exists():
        raise BundleError(f"model bundle not found: {path}")
    if not path.is_file():
        raise BundleError(f"model bundle {path} is not a regular file")
    try:
        fh = open(path, "rb")
        size = path.stat().st_size
    except OSError as exc:
        raise BundleError(f"model bundle {path} cannot be read ({exc})") from exc
    with fh:
        return _load(fh, size, path.name, path, with_weights)


_UNEXPECTED = "unexpected internal error while reading it"


def _load(fh: BinaryIO, size: int, label: str, path: Optional[Path], with_weights: bool) -> ModelBundle:
    try:
        return _load_checked(fh, size, label, path, with_weights)
    except BundleError:
        raise
    except Exception as exc:  # safety net: whatever a crafted file triggers, callers see BundleError
        raise BundleError(f"{label}: {_UNEXPECTED} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "the file is damaged or not a model bundle") from exc


def _load_checked(fh: BinaryIO, size: int, label: str, path: Optional[Path], with_weights: bool) -> ModelBundle:
    members = _read_members(fh, size, label)
    manifest = _parse_json(members["manifest.json"], "manifest.json", label)
    sums = _check_manifest(manifest, label)
    for name in ("card.json", "weights.safetensors"):
        if _sha256(members[name]) != sums[name]:
            raise BundleError(f"{label}: checksum of {name} does not match the manifest (damaged or tampered)")
    card = _parse_json(members["card.json"], "card.json", label)
    try:
        validate_card(card)
    except BundleError as exc:
        raise BundleError(f"{label}: invalid model card: {exc}") from exc
    network: Optional[torch.nn.Module] = None
    if with_weights:
        arch, params = card["network"]["arch"], card["network"].get("params", {})
        weights = members["weights.safetensors"]
        _check_safetensors(weights, _expected_tensors(arch, params, label), label)
        try:
            state = st_load(weights)
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{label}: weights.safetensors is damaged ({str(exc)[:200]})") from exc
        try:
            network = build_network(arch, params)
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{label}: cannot build the network: {exc}") from exc
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{label}: weights do not fit the network in the card ({str(exc)[:400]})") from exc
        network.eval()
    return ModelBundle(card=card, network=network, path=path, checksums=sums)


def update_card(path: Union[str, Path], updates: Dict[str, Any]) -> Path:
    """Rewrite a bundle with top-level card fields replaced (atomically)."""
    bundle = load_bundle(path)
    card = copy.deepcopy(bundle.card)
    card.update(copy.deepcopy(updates))
    return save_bundle(path, card, bundle.network)
