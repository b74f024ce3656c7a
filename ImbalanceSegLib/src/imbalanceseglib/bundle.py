"""Model bundles: one file per trained model, loaded without executing code.

Format (``.imbseg``): a ZIP archive (stored, not compressed) with exactly these
members

* ``manifest.json`` -- format name, format version and the SHA-256 of each other member;
* ``card.json``     -- the model card: network, classes, preprocessing,
  calibration, validation results and training provenance (plain JSON);
* ``weights.safetensors`` -- the network weights (safetensors: tensors only).

Nothing is unpickled and no member name is used as a path on disk, so a bundle
cannot run code or write outside its target. A truncated, bit-flipped or
tampered file fails the ZIP CRC, the recorded checksums or the schema check and
raises :class:`BundleError` with a message that names the problem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import atomic_path
from .networks import build_network

FORMAT_NAME = "imbalanceseg-bundle"
FORMAT_VERSION = 1
BUNDLE_SUFFIX = ".imbseg"
_MEMBERS = ("manifest.json", "card.json", "weights.safetensors")
# Refuse absurd sizes before reading members into memory (zip bombs, damaged headers).
_MAX_MEMBER_BYTES = {"manifest.json": 1 << 20, "card.json": 16 << 20, "weights.safetensors": 4 << 30}


class BundleError(ValueError):
    """A model bundle is missing, damaged, tampered with or does not fit the request."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_color(c: Any, where: str) -> List[float]:
    if (not isinstance(c, (list, tuple)) or len(c) != 3
            or not all(isinstance(v, (int, float)) and 0.0 <= float(v) <= 1.0 for v in c)):
        raise BundleError(f"{where}: colour must be three numbers in [0, 1], got {c!r}")
    return [float(v) for v in c]


def validate_card(card: Dict[str, Any]) -> Dict[str, Any]:
    """Check the model card schema; return it unchanged or raise BundleError."""
    if not isinstance(card, dict):
        raise BundleError("card.json must hold a JSON object")
    for key in ("name", "network", "classes", "preprocessing"):
        if key not in card:
            raise BundleError(f"model card lacks the required field {key!r}")
    net = card["network"]
    if not isinstance(net, dict) or not isinstance(net.get("arch"), str) or not isinstance(net.get("params", {}), dict):
        raise BundleError("model card field 'network' must be {'arch': str, 'params': {...}}")
    classes = card["classes"]
    if not isinstance(classes, list) or len(classes) < 2:
        raise BundleError("model card must list at least two classes (background first)")
    seen_values, seen_names = set(), set()
    for i, cls in enumerate(classes):
        if not isinstance(cls, dict) or not isinstance(cls.get("name"), str) or not cls["name"].strip():
            raise BundleError(f"class #{i} needs a non-empty 'name'")
        value = cls.get("value")
        if value != i:
            raise BundleError(f"class #{i} ({cls['name']!r}) must have value {i}, got {value!r}")
        if cls["name"] in seen_names:
            raise BundleError(f"class name {cls['name']!r} appears twice")
        seen_names.add(cls["name"])
        seen_values.add(value)
        _check_color(cls.get("color", [0, 0, 0]), f"class {cls['name']!r}")
    out_ch = net.get("params", {}).get("out_channels")
    if out_ch is not None and out_ch != len(classes):
        raise BundleError(
            f"network predicts {out_ch} channels but the card lists {len(classes)} classes")
    pre = card["preprocessing"]
    if not isinstance(pre, dict):
        raise BundleError("model card field 'preprocessing' must be an object")
    spacing = pre.get("target_spacing")
    if spacing is not None and (not isinstance(spacing, list) or len(spacing) != 3
                                or not all(isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in spacing)):
        raise BundleError(f"preprocessing.target_spacing must be three positive numbers, got {spacing!r}")
    patch = pre.get("patch_size")
    if patch is not None and (not isinstance(patch, list) or len(patch) != 3
                              or not all(isinstance(s, int) and s > 0 for s in patch)):
        raise BundleError(f"preprocessing.patch_size must be three positive integers, got {patch!r}")
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
    card_bytes = json.dumps(card, indent=2, sort_keys=True, allow_nan=False).encode("utf-8")
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    weights = st_save(state, metadata={"format": FORMAT_NAME})
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


def _read_members(path: Path) -> Dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(path, "r")
    except zipfile.BadZipFile as exc:
        raise BundleError(f"{path.name} is not a model bundle (not a ZIP archive or truncated): {exc}") from exc
    with zf:
        names = zf.namelist()
        unexpected = sorted(set(names) - set(_MEMBERS))
        if unexpected:
            raise BundleError(f"{path.name} holds unexpected members {unexpected}; refusing to load it")
        missing = [m for m in _MEMBERS if m not in names]
        if missing:
            raise BundleError(f"{path.name} lacks the members {missing}")
        if len(names) != len(set(names)):
            raise BundleError(f"{path.name} holds duplicate members")
        out = {}
        for name in _MEMBERS:
            info = zf.getinfo(name)
            if info.file_size > _MAX_MEMBER_BYTES[name]:
                raise BundleError(f"{path.name}: member {name} is implausibly large ({info.file_size} bytes)")
            try:
                out[name] = zf.read(name)
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
                raise BundleError(f"{path.name}: member {name} is damaged ({exc})") from exc
    return out


def read_card(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and verify only the model card (fast; used to list models)."""
    return _load(Path(path), with_weights=False).card


def load_bundle(path: Union[str, Path]) -> ModelBundle:
    """Load a bundle, verifying format, checksums, card schema and weights."""
    return _load(Path(path), with_weights=True)


def _load(path: Path, with_weights: bool) -> ModelBundle:
    if not path.is_file():
        raise BundleError(f"model bundle not found: {path}")
    members = _read_members(path)
    try:
        manifest = json.loads(members["manifest.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path.name}: manifest.json is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path.name} is not an ImbalanceSeg model bundle (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{path.name} has bundle format version {version!r}; this ImbalanceSegLib reads version {FORMAT_VERSION}")
    sums = manifest.get("sha256", {})
    for name in ("card.json", "weights.safetensors"):
        if not isinstance(sums, dict) or _sha256(members[name]) != sums.get(name):
            raise BundleError(f"{path.name}: checksum of {name} does not match the manifest (damaged or tampered)")
    try:
        card = json.loads(members["card.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path.name}: card.json is not valid JSON ({exc})") from exc
    validate_card(card)
    network: Optional[torch.nn.Module] = None
    if with_weights:
        try:
            network = build_network(card["network"]["arch"], card["network"].get("params", {}))
        except (ValueError, TypeError) as exc:
            raise BundleError(f"{path.name}: cannot build the network: {exc}") from exc
        try:
            state = st_load(members["weights.safetensors"])
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{path.name}: weights.safetensors is damaged ({exc})") from exc
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"{path.name}: weights do not fit the network in the card ({str(exc)[:400]})") from exc
        network.eval()
    return ModelBundle(card=card, network=network, path=path, checksums=dict(sums))


def update_card(path: Union[str, Path], updates: Dict[str, Any]) -> Path:
    """Rewrite a bundle with top-level card fields replaced (atomically)."""
    bundle = load_bundle(path)
    card = copy.deepcopy(bundle.card)
    card.update(copy.deepcopy(updates))
    return save_bundle(path, card, bundle.network)


def load_bundle_from_bytes(data: bytes, name: str = "<bytes>") -> ModelBundle:
    """Load from bytes (used by fuzzing and by tests that damage bundles in memory)."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmpdir:
        p = Path(tmpdir) / (Path(name).name or "bundle.imbseg")
        p.write_bytes(data)
        return load_bundle(p)
