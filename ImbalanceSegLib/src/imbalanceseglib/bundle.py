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
  declared sizes must fit the file and the per-member caps ``MAX_MEMBER_BYTES``;
* JSON is parsed with NaN/Infinity, duplicate keys and numbers of more than
  ``_MAX_INT_DIGITS`` digits refused, and nesting deeper than ``_MAX_JSON_DEPTH``;
* the card schema bounds every field a loader or inference uses (at most
  ``_MAX_CLASSES`` classes, finite spacings, bounded patch sizes, ...);
* the safetensors header is parsed and checked against the network the card
  names (tensor names, dtypes, shapes, offsets) *before* any tensor is built,
  the network being sized on PyTorch's ``meta`` device first, so the memory used
  is bounded by the size of the weights member.

The card schema lives in :mod:`imbalanceseglib.card` and the ZIP container
(with :func:`read_card`) in :mod:`imbalanceseglib.container`, both free of
PyTorch; this module adds the weights and re-exports their public names.
"""

from __future__ import annotations

import copy
import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .atomic import atomic_path
# The public names of the card schema and the container that callers import from this module
# (BundleError, read_card, validate_card, BUNDLE_SUFFIX, ...), re-exported; then what it uses itself.
from .card import (  # noqa: F401
    CALIBRATION_METHODS, CONFIDENCE_SCORES, ESTIMATION_METHODS, FORMAT_VERSION, NORMALIZATION_SCHEMES,
    TERMINOLOGY_KEYS, BundleError, validate_card,
)
from .card import ModelCard, is_int, parse_json, short_repr
from .container import BUNDLE_SUFFIX, FORMAT_NAME, read_card  # noqa: F401
from .container import MAX_MEMBER_BYTES, guarded, open_path, read_verified, sha256_hex
from .networks import available_architectures, build_network  # noqa: F401

_MAX_ST_HEADER_BYTES = 1 << 20  # safetensors JSON header
_ST_DTYPES = {torch.float32: ("F32", 4), torch.float16: ("F16", 2), torch.bfloat16: ("BF16", 2),
              torch.float64: ("F64", 8), torch.int64: ("I64", 8)}


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

    @property
    def model_card(self) -> ModelCard:
        """The card as typed, read-only sections (:class:`~imbalanceseglib.card.ModelCard`), made
        from ``card`` as it is now: read it once per run and pass the sections on."""
        return ModelCard.from_card(self.card)

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
    if len(card_bytes) > MAX_MEMBER_BYTES["card.json"]:
        raise BundleError(f"model card is {len(card_bytes)} bytes; at most {MAX_MEMBER_BYTES['card.json']} are allowed")
    state = {k: v.detach().to("cpu").contiguous() for k, v in network.state_dict().items()}
    weights = st_save(state, metadata={"format": FORMAT_NAME})
    if len(weights) > MAX_MEMBER_BYTES["weights.safetensors"]:
        raise BundleError(f"network weights are {len(weights)} bytes; at most "
                          f"{MAX_MEMBER_BYTES['weights.safetensors']} are allowed in a bundle")
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "sha256": {"card.json": sha256_hex(card_bytes), "weights.safetensors": sha256_hex(weights)},
    }
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8")
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("manifest.json", manifest_bytes)
            zf.writestr("card.json", card_bytes)
            zf.writestr("weights.safetensors", weights)
    return path


# --- weights ------------------------------------------------------------------------

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
    header = parse_json(data[8:8 + n], "weights.safetensors header", label)
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
                              f"dtype {short_repr(entry.get('dtype'))}; allowed: {code})")
        if entry.get("shape") != shape or not all(is_int(s) for s in entry.get("shape", [])):
            raise BundleError(f"{label}: weights do not fit the network in the card (tensor {key} has "
                              f"shape {short_repr(entry.get('shape'))}; the network needs {shape})")
        offs = entry.get("data_offsets")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(is_int(o) for o in offs)
                or not 0 <= offs[0] <= offs[1] <= body or offs[1] - offs[0] != nbytes):
            raise BundleError(f"{where}: tensor {key} has invalid data offsets {short_repr(offs)} "
                              f"(needs {nbytes} bytes within {body})")
        spans.append((offs[0], offs[1]))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise BundleError(f"{where}: tensor data overlap or leave gaps (damaged or crafted)")
        pos = end
    if pos != body:
        raise BundleError(f"{where}: {body - pos} bytes after the last tensor (damaged or crafted)")


def _check_finite(state: Dict[str, torch.Tensor], label: str) -> None:
    """Refuse NaN or infinite weights (a diverged training), naming the first such tensor."""
    for key, t in state.items():
        if t.is_floating_point():
            bad = int(t.numel() - torch.isfinite(t).sum())
            if bad:
                raise BundleError(f"{label}: weights contain non-finite values in tensor {key} ({bad} of "
                                  f"{t.numel()} values are NaN or infinite; the training that wrote this "
                                  "bundle probably diverged)")


# --- loading ------------------------------------------------------------------------

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
    return open_path(path, lambda fh, size, label: _load(fh, size, label, path, with_weights))


def _load(fh: BinaryIO, size: int, label: str, path: Optional[Path], with_weights: bool) -> ModelBundle:
    return guarded(label, _load_checked, fh, size, label, path, with_weights)


def _load_checked(fh: BinaryIO, size: int, label: str, path: Optional[Path], with_weights: bool) -> ModelBundle:
    members, sums, card = read_verified(fh, size, label)
    network: Optional[torch.nn.Module] = None
    if with_weights:
        arch, params = card["network"]["arch"], card["network"].get("params", {})
        weights = members["weights.safetensors"]
        _check_safetensors(weights, _expected_tensors(arch, params, label), label)
        try:
            state = st_load(weights)
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{label}: weights.safetensors is damaged ({str(exc)[:200]})") from exc
        _check_finite(state, label)
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
