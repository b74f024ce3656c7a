"""Image I/O and the geometric and intensity preprocessing a model bundle prescribes.

Arrays follow SimpleITK/numpy order (z, y, x); spacing, origin and direction
follow ITK (x, y, z; LPS physical space).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_path

CANONICAL_ORIENTATION = "LPS"


class ImageError(ValueError):
    """An image cannot be used as given (wrong dimension, empty, non-finite, ...)."""


def check_image(image: sitk.Image, what: str = "image", min_size: int = 1) -> sitk.Image:
    """Refuse images the library cannot segment, naming the problem.

    Accepted: 3-D, one scalar component of any integer or real type (they are cast
    to float32), at least ``min_size`` voxels along every axis (segmentation and
    training ask for 2: a single slice is refused; evaluation accepts it), finite
    positive spacing, finite origin and an orthonormal direction matrix (oblique is fine).
    """
    if image.GetDimension() != 3:
        raise ImageError(f"{what} is {image.GetDimension()}-D; ImbalanceSeg segments 3-D volumes "
                         "(split 4-D series into 3-D volumes first)")
    pixel = image.GetPixelIDTypeAsString()
    if "complex" in pixel.lower():
        raise ImageError(f"{what} has complex voxels ({pixel}); use its magnitude image")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{what} has {image.GetNumberOfComponentsPerPixel()} components per voxel ({pixel}); "
            "a scalar (grey-level) volume is needed")
    size = image.GetSize()
    if min(size) < 1:
        raise ImageError(f"{what} has an empty dimension (size {size})")
    if min(size) < min_size:
        raise ImageError(f"{what} is a single slice (size {size}); ImbalanceSeg segments 3-D volumes")
    spacing = image.GetSpacing()
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageError(f"{what} has invalid voxel spacing {spacing}")
    if not all(math.isfinite(o) for o in image.GetOrigin()):
        raise ImageError(f"{what} has a non-finite origin {image.GetOrigin()}")
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.isfinite(d).all() or not np.allclose(d @ d.T, np.eye(3), atol=1e-4):
        raise ImageError(f"{what} has a direction matrix that is not a rotation/reflection: {tuple(d.ravel())}")
    return image


def read_image(path: Union[str, Path], what: Optional[str] = None) -> sitk.Image:
    path = Path(path)
    what = what or str(path)
    if not path.exists():
        raise ImageError(f"{what}: file not found")
    if path.is_dir():
        raise ImageError(f"{what}: is a folder, not an image file")
    _precheck_file(path, what)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # header only: refuse absurd sizes before allocating
        size = reader.GetSize()
        n_bytes = int(np.prod(size, dtype=np.float64)) * max(1, reader.GetNumberOfComponents()) * 4
        available = available_memory_bytes()
        if available is not None and n_bytes > available:
            raise ImageError(f"{what}: declares {'x'.join(map(str, size))} voxels "
                             f"(~{format_bytes(n_bytes)} as float32), more than the "
                             f"{format_bytes(available)} of memory available")
        image = reader.Execute()
    except RuntimeError as exc:
        text = str(exc).strip()
        first = text.splitlines()[-1] if text else "unreadable"
        raise ImageError(f"{what}: cannot be read as an image ({first})") from exc
    except MemoryError as exc:
        raise ImageError(f"{what}: not enough memory to read it") from exc
    return check_image(image, what)


# --- checks made before ITK sees a file ---------------------------------------------------------
# ITK's readers trust their headers: SimpleITK 2.5.7 segfaults on an NRRD header line of ~1000+
# characters that fails to parse, loads a truncated NIfTI with the missing voxels set to 0, and
# follows an NRRD "data file:" field to any readable file. These checks refuse such files first.

_NRRD_MAX_HEADER = 1 << 20
_NRRD_MAX_FIELD_LINE = 900
_NIFTI_TYPE_BYTES = {2: 1, 4: 2, 8: 4, 16: 4, 32: 8, 64: 8, 128: 3, 256: 1, 512: 2, 768: 4,
                     1024: 8, 1280: 8, 1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _precheck_file(path: Path, what: str) -> None:
    name = path.name.lower()
    try:
        if name.endswith((".nrrd", ".nhdr")):
            _precheck_nrrd(path, what)
        elif name.endswith((".nii", ".nii.gz")):
            _precheck_nifti(path, what)
    except ImageError:
        raise
    except (ValueError, IndexError, OverflowError, UnicodeError) as exc:  # malformed header fields
        raise ImageError(f"{what}: malformed image header ({type(exc).__name__}: {exc})") from exc


def _precheck_nrrd(path: Path, what: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(_NRRD_MAX_HEADER + 1)
    if not head.startswith(b"NRRD"):
        raise ImageError(f"{what}: not an NRRD file (no NRRD magic)")
    end = head.find(b"\n\n")
    if end < 0:
        if len(head) > _NRRD_MAX_HEADER:
            raise ImageError(f"{what}: NRRD header longer than {_NRRD_MAX_HEADER} bytes")
        end = len(head)
    for line in head[:end].split(b"\n")[1:]:
        line = line.rstrip(b"\r")
        if line.startswith(b"#") or b":=" in line:
            continue  # comments and key/value pairs: any length is fine
        if len(line) > _NRRD_MAX_FIELD_LINE:
            raise ImageError(f"{what}: NRRD header field line of {len(line)} characters "
                             f"(over {_NRRD_MAX_FIELD_LINE}); refusing a malformed header")
        key = line.split(b":", 1)[0].strip().lower()
        if key in (b"data file", b"datafile"):
            target = line.split(b":", 1)[1].strip().decode("utf-8", "replace")
            if not target:
                raise ImageError(f"{what}: NRRD 'data file' field is empty")
            if target.upper().startswith("LIST") or "%" in target.split()[0]:
                raise ImageError(f"{what}: NRRD data-file lists/patterns are not supported")
            data = (path.parent / target.split()[0]).resolve()
            if data.parent != path.parent.resolve():
                raise ImageError(f"{what}: NRRD 'data file' {target!r} is outside the header's folder; "
                                 "refusing to read it")


def _gzip_trailer_size(path: Path) -> Optional[int]:
    """Uncompressed size mod 2**32 from a gzip file's last 4 bytes (ISIZE)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            return int.from_bytes(fh.read(4), "little")
    except OSError:
        return None


def _precheck_nifti(path: Path, what: str) -> None:
    import gzip
    import struct
    import zlib

    gz = path.name.lower().endswith(".gz")
    try:
        opener = gzip.open(path, "rb") if gz else open(path, "rb")
        with opener as fh:
            hdr = fh.read(540)
            if len(hdr) < 348:
                raise ImageError(f"{what}: NIfTI header is truncated ({len(hdr)} bytes)")
            for endian in ("<", ">"):
                sizeof_hdr = struct.unpack(endian + "i", hdr[:4])[0]
                if sizeof_hdr in (348, 540):
                    break
            else:
                raise ImageError(f"{what}: not a NIfTI-1/2 header")
            if sizeof_hdr == 348:
                dims = struct.unpack(endian + "8h", hdr[40:56])
                datatype, bitpix = struct.unpack(endian + "2h", hdr[70:74])
                vox_offset_f = struct.unpack(endian + "f", hdr[108:112])[0]
                if not math.isfinite(vox_offset_f) or vox_offset_f < 0:
                    raise ImageError(f"{what}: NIfTI header has an invalid data offset {vox_offset_f}")
                vox_offset = int(vox_offset_f)
            else:
                if len(hdr) < 540:
                    raise ImageError(f"{what}: NIfTI-2 header is truncated")
                datatype, bitpix = struct.unpack(endian + "2h", hdr[12:16])
                dims = struct.unpack(endian + "8q", hdr[16:80])
                vox_offset = int(struct.unpack(endian + "q", hdr[168:176])[0])
            ndim = dims[0]
            if not 1 <= ndim <= 7 or any(d < 0 for d in dims[1:ndim + 1]):
                raise ImageError(f"{what}: NIfTI header has invalid dimensions {dims}")
            n_vox = 1
            for d in dims[1:ndim + 1]:
                n_vox *= max(int(d), 1)
            bytes_per = _NIFTI_TYPE_BYTES.get(datatype, max(bitpix, 8) // 8)
            need = max(vox_offset, sizeof_hdr) + n_vox * bytes_per
            if gz and _gzip_trailer_size(path) == need % (1 << 32):
                have = need  # intact stream of exactly the declared length: no second decompression
            elif gz:
                have = len(hdr)
                while True:
                    chunk = fh.read(1 << 20)
                    if not chunk:
                        break
                    have += len(chunk)
                    if have >= need:
                        break
            else:
                have = path.stat().st_size
    except (EOFError, OSError, zlib.error, struct.error) as exc:
        raise ImageError(f"{what}: damaged or truncated NIfTI file ({exc})") from exc
    if have < need:
        raise ImageError(f"{what}: NIfTI file is truncated ({have} bytes of data, header needs {need})")


def format_bytes(n: float) -> str:
    """Human-readable size: 512 B, 3.2 MiB, 1.5 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"


def available_memory_bytes() -> Optional[int]:
    """Memory the OS reports as available (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def write_image(image: sitk.Image, path: Union[str, Path], compress: bool = True) -> Path:
    """Write atomically (temporary file beside the target, then rename)."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return path


def array_from_image(image: sitk.Image, dtype=np.float32) -> np.ndarray:
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False)


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    return out


def orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    """Permute/flip axes (no interpolation) so the array axes run along L, P, S."""
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


@dataclass
class Geometry:
    size: Tuple[int, int, int]
    spacing: Tuple[float, float, float]
    origin: Tuple[float, float, float]
    direction: Tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{float(v):.6g}" for v in values) + ")"


def geometry_differences(image: sitk.Image, labels: sitk.Image) -> list:
    """How the grid of ``labels`` differs from that of ``image``: one ``"<property> <image> vs
    <labels>"`` text per differing property (size, spacing, origin, direction, and the physical
    extent when size or spacing differ); empty when they share one grid.

    Tolerances are those training has always used: spacing relative 1e-4, origin 1e-3 mm,
    direction cosines 1e-4."""
    out = []
    size_a, size_b = tuple(image.GetSize()), tuple(labels.GetSize())
    sp_a, sp_b = image.GetSpacing(), labels.GetSpacing()
    if size_a != size_b:
        out.append(f"size {size_a} vs {size_b}")
    if len(sp_a) != len(sp_b) or not np.allclose(sp_a, sp_b, rtol=1e-4):
        out.append(f"spacing {_fmt(sp_a)} vs {_fmt(sp_b)} mm")
    if out:
        ext_a = [n * s for n, s in zip(size_a, sp_a)]
        ext_b = [n * s for n, s in zip(size_b, sp_b)]
        if len(ext_a) != len(ext_b) or not np.allclose(ext_a, ext_b, rtol=1e-4, atol=1e-3):
            out.append(f"extent {_fmt(ext_a)} vs {_fmt(ext_b)} mm")
    org_a, org_b = image.GetOrigin(), labels.GetOrigin()
    if len(org_a) != len(org_b) or not np.allclose(org_a, org_b, atol=1e-3):
        out.append(f"origin {_fmt(org_a)} vs {_fmt(org_b)} mm")
    dir_a, dir_b = image.GetDirection(), labels.GetDirection()
    if len(dir_a) != len(dir_b) or not np.allclose(dir_a, dir_b, atol=1e-4):
        out.append(f"direction {_fmt(dir_a)} vs {_fmt(dir_b)}")
    return out


def check_same_geometry(image: sitk.Image, labels: sitk.Image, case: str = "",
                        image_file: Optional[Union[str, Path]] = None,
                        label_file: Optional[Union[str, Path]] = None) -> None:
    """Raise :class:`ImageError` when ``labels`` is not on the grid of ``image``, naming the case,
    both files (when given) and each differing property with both values (image vs labels)."""
    diffs = geometry_differences(image, labels)
    if not diffs:
        return
    who = f"{case}: " if case else ""
    lab = f"label map {label_file}" if label_file is not None else "label map"
    img = f"its image {image_file}" if image_file is not None else "its image"
    raise ImageError(f"{who}{lab} is not on the grid of {img}: {'; '.join(diffs)} (image vs labels); "
                     "resample the label map onto the image (nearest neighbour) or fix its header")


def resampled_size(size: Sequence[int], spacing: Sequence[float], new_spacing: Sequence[float]) -> np.ndarray:
    """Voxel counts of a grid with ``new_spacing`` covering the same extent (at least 1 per axis)."""
    return np.maximum(1, np.round(np.asarray(size, float) * np.asarray(spacing, float)
                                  / np.asarray(new_spacing, float))).astype(int)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float],
                        interpolator=sitk.sitkLinear, default_value: float = 0.0) -> sitk.Image:
    """Resample onto a grid with ``spacing`` covering the same physical extent."""
    old_size = np.array(image.GetSize(), dtype=float)
    old_spacing = np.array(image.GetSpacing(), dtype=float)
    new_spacing = np.array(spacing, dtype=float)
    new_size = resampled_size(old_size, old_spacing, new_spacing)
    # Keep the centre of the field of view fixed.
    direction = np.array(image.GetDirection()).reshape(3, 3)
    old_centre_idx = (old_size - 1) / 2.0
    centre = np.array(image.GetOrigin()) + direction @ (old_centre_idx * old_spacing)
    new_origin = centre - direction @ (((new_size - 1) / 2.0) * new_spacing)
    return sitk.Resample(image, [int(s) for s in new_size], sitk.Transform(), interpolator,
                         tuple(new_origin), tuple(new_spacing), image.GetDirection(),
                         default_value, image.GetPixelID())


def needs_resampling(image: sitk.Image, target_spacing: Optional[Sequence[float]], rtol: float = 0.02) -> bool:
    if target_spacing is None:
        return False
    return not np.allclose(image.GetSpacing(), target_spacing, rtol=rtol)


#: Intensity normalisation schemes :func:`normalise_intensities` applies (model cards are checked against this;
#: defined with the card schema in :mod:`imbalanceseglib.card`, which imports neither SimpleITK nor torch).
from .card import NORMALIZATION_SCHEMES  # noqa: E402,F401


def normalise_intensities(array: np.ndarray, params: Dict[str, Any], copy: bool = True) -> np.ndarray:
    """Apply the intensity normalisation recorded in a model card.

    Schemes:
    * ``percentile_zscore``: clip to the [lower, upper] percentiles of the volume,
      then subtract the mean and divide by the standard deviation of the clipped volume;
    * ``fixed_zscore``: clip to [clip_min, clip_max], then (x - mean) / std with the
      fixed mean/std of the card (CT-style);
    * ``none``.

    ``copy=False`` normalises a float32 ``array`` in place (big volumes: no second full copy).
    """
    scheme = params.get("scheme", "percentile_zscore")
    arr = np.asarray(array).astype(np.float32, copy=copy)
    flat = arr.reshape(-1)
    for start in range(0, flat.size, 1 << 24):  # chunked: no full-size boolean mask
        if not np.isfinite(flat[start:start + (1 << 24)]).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ImageError(f"image has {bad} NaN or infinite voxel values; fix or mask them before segmenting")
    if scheme == "none":
        return arr
    if scheme == "percentile_zscore":
        lo, hi = np.percentile(arr, [params.get("lower_percentile", 0.5), params.get("upper_percentile", 99.5)])
        np.clip(arr, lo, hi, out=arr)
        std = float(arr.std())
        arr -= float(arr.mean())
        arr /= std if std > 1e-8 else 1.0
        return arr
    if scheme == "fixed_zscore":
        np.clip(arr, params["clip_min"], params["clip_max"], out=arr)
        arr -= params["mean"]
        arr /= params["std"]
        return arr
    raise ImageError(f"unknown intensity normalisation scheme {scheme!r}")
