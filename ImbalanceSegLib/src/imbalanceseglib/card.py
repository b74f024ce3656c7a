"""The model-card schema of a bundle: what ``card.json`` may hold, and bounded JSON parsing.

:func:`validate_card` checks every card field a loader or inference uses (types,
ranges, names); :func:`parse_json` parses JSON with NaN/Infinity, duplicate keys,
huge integers and deep nesting refused. Standard library only, so that a card can
be read (for instance by 3D Slicer's module panel) before PyTorch is installed.
The names a card may use that belong to other modules (network architectures,
normalisation schemes, confidence scores, estimation methods) are defined here;
:mod:`imbalanceseglib.images` and :mod:`imbalanceseglib.estimation` import them
and ``tests/test_torch_free.py`` checks them against the network registry.

:class:`ModelCard` is the typed, read-only view of a validated card (classes with names,
colours and values; preprocessing, network, calibration, validation and training
sections): code that runs a model reads the card once into it
(:attr:`imbalanceseglib.bundle.ModelBundle.model_card`) and passes its sections on.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

__all__ = [
    "BundleError", "FORMAT_VERSION", "ARCHITECTURES", "NORMALIZATION_SCHEMES", "CONFIDENCE_SCORES",
    "ESTIMATION_METHODS", "CALIBRATION_METHODS", "TERMINOLOGY_KEYS", "DEFAULT_FEATURES", "validate_card",
    "check_calibration", "network_size_divisor", "patch_size_problem", "CardClass", "ModelCard",
    "parse_json", "is_int", "short_repr", "CONTROL_CHARS",
]

FORMAT_VERSION = 1

#: Network architectures a card may name (the registry of :mod:`imbalanceseglib.networks`).
ARCHITECTURES: Tuple[str, ...] = ("UNet3D", "UNet3DEnsemble")
#: Channels per resolution level when a card's network gives no ``features`` (the default of
#: ``UNet3D`` and ``UNet3DEnsemble``; ``tests/test_sharp_edges_inputs.py`` checks they agree).
DEFAULT_FEATURES: Tuple[int, ...] = (16, 32, 64, 128)
#: Intensity normalisation schemes :func:`imbalanceseglib.images.normalise_intensities` applies.
NORMALIZATION_SCHEMES: Tuple[str, ...] = ("none", "percentile_zscore", "fixed_zscore")
#: Confidence scores and performance-estimation methods of :mod:`imbalanceseglib.estimation`.
CONFIDENCE_SCORES: Tuple[str, ...] = ("mcp", "entropy", "energy", "doctor")
ESTIMATION_METHODS: Tuple[str, ...] = ("none", "ts", "doc", "atc", "ts-atc")

# --- limits (every one is checked before the corresponding work is done) -----
_MAX_JSON_DEPTH = 32
_MAX_INT_DIGITS = 30            # JSON integers; Python would otherwise parse 4300-digit numbers
_MAX_CLASSES = 256              # label maps are written as uint8
_MAX_NAME_CHARS = 200
_MAX_IN_CHANNELS = 64
_MAX_LEVELS = 8                 # UNet3D resolution levels
_MAX_FEATURES = 4096            # channels per level (also enforced by networks.build_network)
_MAX_CONTEXT_CLASSES = 16       # networks.MAX_CONTEXT_CLASSES (context labels merged into the background)
_SPACING_RANGE = (1e-3, 1e3)    # mm
_MAX_PATCH_EDGE = 512
_MAX_PATCH_VOXELS = 1 << 24     # e.g. 256**3
#: Calibration methods a card may name (read by imbalanceseglib.estimation.estimator_from_card;
#: the estimation methods are described in imbalanceseglib.estimation).
CALIBRATION_METHODS = ("none", "temperature") + tuple(m for m in ESTIMATION_METHODS if m != "none")
_CALIBRATION_RANGES = {"temperature": (1e-6, 1e6), "offset": (-1.0, 1.0), "threshold": (-1e-6, 1.0)}
#: Control characters, refused in names (card texts here, archive member names in imbalanceseglib.container).
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL = CONTROL_CHARS


class BundleError(ValueError):
    """A model bundle is missing, damaged, tampered with or does not fit the request."""


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


def parse_json(data: bytes, what: str, label: str) -> Any:
    """Parse a bundle member as JSON, refusing NaN/Infinity, duplicate keys, huge integers and
    deep nesting; raise BundleError naming ``what`` (the member) and ``label`` (the file)."""
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

def is_int(v: Any) -> bool:
    """A JSON integer (bool is not an integer here)."""
    return isinstance(v, int) and not isinstance(v, bool)


_is_int = is_int


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


def short_repr(v: Any, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages that quote a value from a file."""
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "...'"


_short = short_repr


def _check_color(c: Any, where: str) -> List[float]:
    if (not isinstance(c, (list, tuple)) or len(c) != 3
            or not all(_is_number(v) and 0.0 <= float(v) <= 1.0 for v in c)):
        raise BundleError(f"{where}: colour must be three numbers in [0, 1], got {_short(c)}")
    return [float(v) for v in c]


def _check_network(net: Any, n_classes: int) -> None:
    if not isinstance(net, dict) or not isinstance(net.get("arch"), str) or not isinstance(net.get("params", {}), dict):
        raise BundleError("model card field 'network' must be {'arch': str, 'params': {...}}")
    if net["arch"] not in ARCHITECTURES:
        raise BundleError(f"unknown network architecture {_short(net['arch'])}; "
                          f"known: {', '.join(sorted(ARCHITECTURES))}")
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
    if "context_classes" in params:  # a network trained with context labels (merged at its output)
        ctx = params["context_classes"]
        if net["arch"] != "UNet3D":
            raise BundleError(f"network parameter 'context_classes' is only accepted by UNet3D, not {_short(net['arch'])}")
        if not _is_int(ctx) or not 0 <= ctx <= _MAX_CONTEXT_CLASSES:
            raise BundleError(f"network context_classes must be an integer in [0, {_MAX_CONTEXT_CLASSES}], "
                              f"got {_short(ctx)}")
    if "members" in params or net["arch"] == "UNet3DEnsemble":
        members = params.get("members", 2)
        if net["arch"] != "UNet3DEnsemble":
            raise BundleError(f"network parameter 'members' is only accepted by UNet3DEnsemble, not {_short(net['arch'])}")
        if not _is_int(members) or not 2 <= members <= 8:
            raise BundleError(f"network members must be an integer in [2, 8], got {_short(members)}")


def network_size_divisor(network: Dict[str, Any]) -> int:
    """What every patch edge must be a multiple of for the network a (validated) card names.

    Both architectures are U-Nets (an ensemble's members all share one shape) whose encoder
    halves the size once per extra resolution level (stride-2 convolutions) and whose decoder
    doubles it back and joins the skip connection, so each edge must be a multiple of
    ``2 ** (levels - 1)`` with ``levels = len(features)``: the rule of
    :attr:`imbalanceseglib.networks.UNet3D.size_divisor`, computed here without PyTorch.
    """
    features = network.get("params", {}).get("features")
    if not isinstance(features, list):  # absent (or null: refused when the network is built)
        features = DEFAULT_FEATURES
    return 2 ** (len(features) - 1)


def patch_size_problem(patch: List[int], network: Dict[str, Any]) -> Optional[str]:
    """Why the network of a (validated) card cannot run on ``patch`` (z, y, x voxels), or None.

    Two rules, both of the U-Net's forward pass: every edge a multiple of
    :func:`network_size_divisor` (otherwise upsampled and skip tensors differ in size), and more
    than one voxel at the deepest level (instance normalisation needs at least two values).
    """
    divisor = network_size_divisor(network)
    halvings = divisor.bit_length() - 1
    arch = network.get("arch", "UNet3D")
    levels = f"{arch} with {halvings + 1} resolution levels halves the patch {halvings} time" + \
        ("s" if halvings != 1 else "")
    if any(edge % divisor for edge in patch):
        fixed = [max(divisor, int(round(edge / divisor)) * divisor) for edge in patch]
        if math.prod(e // divisor for e in fixed) < 2:
            fixed[-1] = 2 * divisor
        return (f"preprocessing.patch_size {list(patch)} does not fit the network: {levels}, so every "
                f"edge must be a multiple of {divisor} (for example {fixed})")
    if math.prod(edge // divisor for edge in patch) < 2:
        deepest = "x".join(str(edge // divisor) for edge in patch)
        return (f"preprocessing.patch_size {list(patch)} is too small for the network: {levels}, leaving "
                f"{deepest} voxel at the deepest level, and instance normalisation needs more than one; "
                f"make at least one edge {2 * divisor} or more")
    return None


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


def check_calibration(cal: Any, n_classes: int) -> None:
    """Check a card's ``calibration`` entry for a model with ``n_classes`` classes (raises
    BundleError): the one check of the entry, made when a card is validated and again by
    :func:`imbalanceseglib.estimation.estimator_from_card`, which relies on it."""
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
    seen_label_values: set = set()
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
        if "label_value" in cls:  # the value the training label maps used (non-consecutive labels)
            lv = cls["label_value"]
            if not _is_int(lv) or not 0 <= lv <= 65535:
                raise BundleError(f"class #{i} ({cls['name']!r}) label_value must be an integer in "
                                  f"[0, 65535], got {_short(lv)}")
            if lv in seen_label_values:
                raise BundleError(f"class #{i} ({cls['name']!r}) label_value {lv} appears twice")
            seen_label_values.add(lv)
        _check_color(cls.get("color", [0, 0, 0]), f"class {cls['name']!r}")
        if "terminology" in cls:
            _check_terminology(cls["terminology"], f"class {cls['name']!r}")
    if seen_label_values and len(seen_label_values) != len(classes):
        raise BundleError("model card: 'label_value' must be given for every class or for none")
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
    if patch is not None:
        problem = patch_size_problem(patch, card["network"])
        if problem:
            raise BundleError(problem)
    if "normalization" in pre:
        _check_normalization(pre["normalization"])
    for key in ("modality", "orientation"):
        if key in pre and not isinstance(pre[key], str):
            raise BundleError(f"preprocessing.{key} must be a string, got {_short(pre[key])}")
    if "calibration" in card and card["calibration"] is not None:
        check_calibration(card["calibration"], len(classes))
    return card


# --- typed view ---------------------------------------------------------------

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _section(card: Dict[str, Any], key: str) -> Mapping[str, Any]:
    value = card.get(key)
    return MappingProxyType(value) if isinstance(value, dict) else _EMPTY


@dataclass(frozen=True)
class CardClass:
    """One class of a model card: its label value, name, colour (RGB in [0, 1]) and optional
    coded terminology."""

    value: int
    name: str
    color: Tuple[float, float, float]
    terminology: Optional[Mapping[str, Any]] = None
    label_value: Optional[int] = None  # the original label value, when training data used another

    @property
    def output_value(self) -> int:
        """The label value outputs use: ``label_value`` when the card records one, else ``value``."""
        return self.value if self.label_value is None else self.label_value


@dataclass(frozen=True)
class ModelCard:
    """Typed, read-only view of a validated model card, made once by whoever runs the model.

    ``classes`` (background first) as :class:`CardClass`; the other sections are read-only
    mappings of the card's own objects (empty when the card has none; ``calibration`` is
    ``None`` then, and :func:`imbalanceseglib.estimation.estimator_from_card` builds the
    estimator from it). ``card`` is the plain dictionary the view was made from (what
    ``card.json`` holds). Build it with :meth:`from_card` from a card that
    :func:`validate_card` accepted; it does not check the card again.
    """

    name: str
    classes: Tuple[CardClass, ...]
    network: Mapping[str, Any]
    preprocessing: Mapping[str, Any]
    calibration: Optional[Mapping[str, Any]]
    validation: Mapping[str, Any]
    training: Mapping[str, Any]
    card: Mapping[str, Any]

    @classmethod
    def from_card(cls, card: Dict[str, Any]) -> "ModelCard":
        classes = tuple(CardClass(value=int(c["value"]), name=c["name"],
                                  color=tuple(float(v) for v in c.get("color", [0, 0, 0])),  # type: ignore[arg-type]
                                  terminology=MappingProxyType(c["terminology"]) if "terminology" in c else None,
                                  label_value=int(c["label_value"]) if "label_value" in c else None)
                        for c in card["classes"])
        calibration = card.get("calibration")
        return cls(name=card["name"], classes=classes, network=_section(card, "network"),
                   preprocessing=_section(card, "preprocessing"),
                   calibration=MappingProxyType(calibration) if isinstance(calibration, dict) else None,
                   validation=_section(card, "validation"), training=_section(card, "training"),
                   card=MappingProxyType(card))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> List[str]:
        return [c.name for c in self.classes]

    @property
    def colors(self) -> List[Tuple[float, float, float]]:
        return [c.color for c in self.classes]

    @property
    def values(self) -> List[int]:
        return [c.value for c in self.classes]

    @property
    def output_values(self) -> List[int]:
        """Label values predictions are written with (the training data's original values)."""
        return [c.output_value for c in self.classes]

    @property
    def in_channels(self) -> Any:
        """Input channels the network expects (1 when the card does not say)."""
        return self.network.get("params", {}).get("in_channels", 1)

    @property
    def rare_classes(self) -> List[str]:
        """Names the card's training section lists as rare (``training.rare_classes``)."""
        return list(self.training.get("rare_classes") or [])
