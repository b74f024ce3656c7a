"""The bundle container: a hardened reader of the ``.imbseg`` ZIP archive, and :func:`read_card`.

A bundle is a stored (uncompressed) ZIP archive of exactly ``manifest.json``,
``card.json`` and ``weights.safetensors``. This module checks the ZIP end record,
the member names, kinds and sizes, reads the members into memory (nothing is
extracted), checks the manifest and the SHA-256 checksums, and parses and validates
the card (:mod:`imbalanceseglib.card`); a PyTorch training checkpoint passed instead is
recognised by its first bytes (never unpickled) and named as such. The weights are left to
:mod:`imbalanceseglib.bundle`. Standard library only, so that models can be listed
before PyTorch is installed.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple, TypeVar, Union

from .card import CONTROL_CHARS, FORMAT_VERSION, BundleError, is_int, parse_json, short_repr, validate_card

__all__ = ["BundleError", "BUNDLE_SUFFIX", "FORMAT_NAME", "FORMAT_VERSION", "MAX_MEMBER_BYTES", "read_card",
           "read_verified", "open_path", "guarded", "sha256_hex"]

FORMAT_NAME = "imbalanceseg-bundle"
BUNDLE_SUFFIX = ".imbseg"
_MEMBERS = ("manifest.json", "card.json", "weights.safetensors")

# --- limits (every one is checked before the corresponding work is done) -----
#: Size limit of each bundle member, in bytes (imbalanceseglib.bundle checks it when writing one).
MAX_MEMBER_BYTES = {"manifest.json": 64 << 10, "card.json": 8 << 20, "weights.safetensors": 1 << 30}
_MAX_FILE_BYTES = sum(MAX_MEMBER_BYTES.values()) + (64 << 10)
_MAX_ENTRIES = 16               # central-directory entries (a bundle has 3; a few more get a clear message)
_MAX_CENTRAL_DIR_BYTES = 64 << 10

_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record (22 bytes)
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_LOCAL_HEADER_BYTES = 30
_HEX64 = re.compile(r"[0-9a-f]{64}")

_T = TypeVar("_T")


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data`` as 64 lower-case hex digits (as the manifest gives it)."""
    return hashlib.sha256(data).hexdigest()


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
    if CONTROL_CHARS.search(name):
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
            raise BundleError(f"{label}: archive member name {short_repr(info.orig_filename)} {problem}; refusing it "
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
        if info.file_size > MAX_MEMBER_BYTES[name]:
            raise BundleError(f"{label}: member {name} declares an implausible size ({info.file_size} bytes, "
                              f"limit {MAX_MEMBER_BYTES[name]})")
        if info.compress_size != info.file_size:
            raise BundleError(f"{label}: member {name} is damaged (stored size {info.compress_size} differs "
                              f"from its size {info.file_size})")
        if info.header_offset < end:
            raise BundleError(f"{label}: member {name} overlaps another member (damaged or crafted archive)")
        end = info.header_offset + _LOCAL_HEADER_BYTES + len(info.orig_filename.encode("utf-8")) + info.file_size
        if end > cd_offset:
            raise BundleError(f"{label}: member {name} declares {info.file_size} bytes, more than the file "
                              "holds (truncated or damaged)")


# --- a training checkpoint where a bundle is expected ---------------------------------------

_LOCAL_HEADER_SIG = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)   # pickle protocol 2+ files start with b"\x80" and the protocol
_MAX_BUNDLES_LISTED = 5
_MAX_FOLDER_ENTRIES = 10000


def _checkpoint_kind(fh: BinaryIO, size: int) -> Optional[str]:
    """What kind of PyTorch checkpoint the file is, or None; only its first bytes are read, never unpickled.

    ``torch.save`` writes a ZIP archive whose first member is ``<archive>/data.pkl`` (a pickle), or
    (before PyTorch 1.6, or with ``_use_new_zipfile_serialization=False``) a bare pickle stream.
    """
    fh.seek(0)
    head = fh.read(_LOCAL_HEADER_BYTES)
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "a pickle file written by torch.save"
    if len(head) == _LOCAL_HEADER_BYTES and head[:4] == _LOCAL_HEADER_SIG:
        name_len = struct.unpack_from("<H", head, 26)[0]
        name = fh.read(min(name_len, 512))
        if name_len <= 512 and name.endswith(b"/data.pkl") and name.count(b"/") == 1 and len(name) > 9:
            return "a torch.save archive"
    return None


def _bundles_next_to(path: Path) -> List[Path]:
    """Up to a few ``.imbseg`` files in the folder of ``path`` (bounded scan; [] when unreadable)."""
    found: List[Path] = []
    try:
        with os.scandir(os.path.dirname(os.path.abspath(path))) as entries:
            for i, entry in enumerate(entries):
                if i >= _MAX_FOLDER_ENTRIES:
                    break
                if entry.name.endswith(BUNDLE_SUFFIX) and entry.is_file():
                    found.append(Path(entry.path))
    except OSError:
        return []
    return sorted(found)[:_MAX_BUNDLES_LISTED]


def _refuse_checkpoint(fh: BinaryIO, size: int, label: str, path: Optional[Path] = None) -> None:
    """Raise a BundleError that says so when the file is a training checkpoint, not a bundle."""
    try:
        kind = _checkpoint_kind(fh, size)
    except (OSError, struct.error):
        kind = None
    finally:
        fh.seek(0)
    if kind is None:
        return
    msg = (f"{label} is a training checkpoint ({kind}), not a model bundle; it was not loaded (checkpoints "
           f"are pickles, which can run code). Training writes the model bundle <name>{BUNDLE_SUFFIX} into "
           "its output folder, next to checkpoint.pt, when it finishes")
    if path is None:
        raise BundleError(msg)
    bundles = _bundles_next_to(path)
    if bundles:
        raise BundleError(f"{msg}; load the bundle next to it: {', '.join(str(b) for b in bundles)}")
    raise BundleError(f"{msg}; there is no {BUNDLE_SUFFIX} bundle in {os.path.dirname(os.path.abspath(path))} yet (the training did not "
                      "finish: resume it, or use the bundle it wrote elsewhere)")


def _read_members(fh: BinaryIO, size: int, label: str) -> Dict[str, bytes]:
    _refuse_checkpoint(fh, size, label)
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


# --- manifest ---------------------------------------------------------------------

def _check_manifest(manifest: Any, label: str) -> Dict[str, str]:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise BundleError(f"{label} is not an ImbalanceSeg model bundle (format {short_repr(fmt)})")
    version = manifest.get("format_version")
    if not is_int(version) or version != FORMAT_VERSION:
        raise BundleError(
            f"{label} has bundle format version {short_repr(version)}; this ImbalanceSegLib reads version {FORMAT_VERSION}")
    sums = manifest.get("sha256")
    if (not isinstance(sums, dict) or set(sums) != {"card.json", "weights.safetensors"}
            or not all(isinstance(v, str) and _HEX64.fullmatch(v) for v in sums.values())):
        raise BundleError(f"{label}: manifest.json must give the SHA-256 (64 hex digits) of exactly card.json "
                          "and weights.safetensors")
    return dict(sums)


# --- reading a bundle: path, safety net, verified members ----------------------------

def read_card(path: Union[str, Path]) -> Dict[str, Any]:
    """Read and verify only the model card (fast; used to list models).

    The whole container is checked (ZIP structure, manifest, both checksums) and the
    card validated; the weights are not parsed, so PyTorch is not needed.
    """
    return open_path(Path(path), lambda fh, size, label: guarded(label, _read_card_checked, fh, size, label))


def _read_card_checked(fh: BinaryIO, size: int, label: str) -> Dict[str, Any]:
    return read_verified(fh, size, label)[2]


def open_path(path: Path, read: Callable[[BinaryIO, int, str], _T]) -> _T:
    """Open a bundle file for reading and pass (file, size, file name) to ``read``."""
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
        _refuse_checkpoint(fh, size, path.name, path)
        return read(fh, size, path.name)


_UNEXPECTED = "unexpected internal error while reading it"


def guarded(label: str, work: Callable[..., _T], *args: Any) -> _T:
    """Run ``work(*args)``, turning any exception other than BundleError into one."""
    try:
        return work(*args)
    except BundleError:
        raise
    except Exception as exc:  # safety net: whatever a crafted file triggers, callers see BundleError
        raise BundleError(f"{label}: {_UNEXPECTED} ({type(exc).__name__}: {str(exc)[:200]}); "
                          "the file is damaged or not a model bundle") from exc


def read_verified(fh: BinaryIO, size: int, label: str) -> Tuple[Dict[str, bytes], Dict[str, str], Dict[str, Any]]:
    """Members, manifest checksums and validated card of a bundle (weights checked by checksum only)."""
    members = _read_members(fh, size, label)
    manifest = parse_json(members["manifest.json"], "manifest.json", label)
    sums = _check_manifest(manifest, label)
    for name in ("card.json", "weights.safetensors"):
        if sha256_hex(members[name]) != sums[name]:
            raise BundleError(f"{label}: checksum of {name} does not match the manifest (damaged or tampered)")
    card = parse_json(members["card.json"], "card.json", label)
    try:
        validate_card(card)
    except BundleError as exc:
        raise BundleError(f"{label}: invalid model card: {exc}") from exc
    return members, sums, card
