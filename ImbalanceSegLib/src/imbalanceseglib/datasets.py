"""Users' own data folders in the layouts they already have: detection and reading, in one place.

:func:`open_dataset` recognises three layouts and returns one :class:`Dataset`:

* ``plain``: ``images/``, ``labels/`` (same case names) and ``classes.json``, either a list of
  ``{"value", "name", optional "color"}`` or a mapping ``{"0": "background", "1": "liver", ...}``
  (label value to name);
* ``nnunet_v2``: the nnU-Net v2 raw layout, ``dataset.json`` with ``channel_names``, ``labels``
  ``{name: value}``, ``file_ending``, ``numTraining``; ``imagesTr/<case>_0000<ending>``,
  ``labelsTr/<case><ending>``, optional ``imagesTs/`` (single-channel only);
* ``msd``: the Medical Segmentation Decathlon layout, ``dataset.json`` with ``modality``,
  ``labels`` ``{"0": "background", ...}``, ``training`` ``[{"image", "label"}]`` and ``test``.

Label values need not be consecutive: the classes get consecutive training indices (background,
label value 0, is index 0) and keep their original ``label_value``; :meth:`Dataset.read_labels`
turns a label map into indices (float-coded integers such as 2.0 are accepted; 2.5, NaN or a
value no class lists is an error naming the case, the file and the values), and
:func:`indices_to_label_values` maps a prediction back. The model card records the mapping as
``classes[i]["label_value"]``. The modality is the layout's own statement, or empty.
Needs SimpleITK and NumPy only (no torch).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
LAYOUTS = ("plain", "nnunet_v2", "msd")
_PALETTE = [(0.9, 0.3, 0.3), (0.3, 0.8, 0.3), (0.3, 0.4, 0.9), (0.9, 0.8, 0.2), (0.8, 0.3, 0.8),
            (0.2, 0.8, 0.8), (0.9, 0.55, 0.2), (0.55, 0.35, 0.2), (0.6, 0.6, 0.9), (0.5, 0.8, 0.5)]


class DatasetError(ValueError):
    """A data folder that cannot be read as any supported layout, or a label map that does not fit it."""


def case_stem(path: Path) -> str:
    """File name without its image suffix (``case1.nii.gz`` -> ``case1``)."""
    name = Path(path).name
    for s in IMAGE_SUFFIXES:
        if name.endswith(s):
            return name[: -len(s)]
    return Path(path).stem


@dataclass(frozen=True)
class DatasetClass:
    """One class: consecutive training ``index`` (background 0), ``name``, the ``label_value`` the
    label maps use, and an RGB ``color`` in [0, 1]."""

    index: int
    name: str
    label_value: int
    color: Tuple[float, float, float]


@dataclass(frozen=True)
class DatasetCase:
    case_id: str
    image: Path
    label: Optional[Path] = None


@dataclass(frozen=True)
class Dataset:
    """A data folder read by :func:`open_dataset` (``modality`` is ``""`` when the layout does not say)."""

    folder: Path
    layout: str
    classes: Tuple[DatasetClass, ...]
    cases: Tuple[DatasetCase, ...]
    test_cases: Tuple[DatasetCase, ...] = ()
    modality: str = ""

    @property
    def label_values(self) -> List[int]:
        return [c.label_value for c in self.classes]

    @property
    def needs_mapping(self) -> bool:
        """True when the label values are not already 0, 1, 2, ..."""
        return self.label_values != list(range(len(self.classes)))

    def config_classes(self) -> List[Dict[str, Any]]:
        """Classes as a training config / model card lists them (``label_value`` only when it differs
        from the index somewhere)."""
        out = []
        for c in self.classes:
            entry: Dict[str, Any] = {"value": c.index, "name": c.name, "color": list(c.color)}
            if self.needs_mapping:
                entry["label_value"] = c.label_value
            out.append(entry)
        return out

    def labelled_cases(self) -> List[DatasetCase]:
        return [c for c in self.cases if c.label is not None]

    def read_labels(self, case: DatasetCase):
        """The case's label map as training indices (uint8 SimpleITK image, same geometry)."""
        import SimpleITK as sitk
        if case.label is None:
            raise DatasetError(f"case {case.case_id!r} of {self.folder} has no label map")
        img = sitk.ReadImage(str(case.label))
        idx = label_values_to_indices(sitk.GetArrayViewFromImage(img), self.label_values,
                                      f"case {case.case_id!r} ({case.label})")
        out = sitk.GetImageFromArray(idx)
        out.CopyInformation(img)
        return out

    def describe(self) -> str:
        mod = self.modality or "not stated (left empty)"
        return (f"{self.layout} layout, {len(self.cases)} training case(s)"
                + (f", {len(self.test_cases)} test case(s)" if self.test_cases else "")
                + f", classes {[(c.name, c.label_value) for c in self.classes]}, modality {mod}")


def label_values_to_indices(arr: np.ndarray, label_values: Sequence[int], where: str) -> np.ndarray:
    """Map a label array (any numeric dtype) to consecutive indices; refuse non-integral or unknown values."""
    a = np.asarray(arr)
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a) | (a != np.round(a))
        if bad.any():
            shown = sorted({float(v) for v in np.unique(a[bad])[:10]}, key=str)
            raise DatasetError(f"{where}: label values must be integers, found {shown}")
        a = a.astype(np.int64)
    elif a.dtype.kind not in "iub":
        raise DatasetError(f"{where}: label map has voxel type {a.dtype}, expected integers")
    present = np.unique(a)
    unknown = sorted(int(v) for v in present if int(v) not in set(label_values))
    if unknown:
        raise DatasetError(f"{where}: label values {unknown} are not among the classes' values "
                           f"{sorted(label_values)}")
    lut_size = int(max(max(label_values), int(present.max()) if present.size else 0)) + 1
    if lut_size > 1 << 20:  # sparse huge values: map one by one
        out = np.zeros(a.shape, dtype=np.uint8)
        for i, v in enumerate(label_values):
            out[a == v] = i
        return out
    lut = np.zeros(lut_size, dtype=np.uint8)
    for i, v in enumerate(label_values):
        lut[v] = i
    return lut[a]


def indices_to_label_values(arr: np.ndarray, label_values: Sequence[int]) -> np.ndarray:
    """Map training indices back to the original label values (uint8, or uint16 above 255)."""
    lut = np.asarray(label_values, dtype=np.uint16 if max(label_values) > 255 else np.uint8)
    return lut[np.asarray(arr).astype(np.int64)]


def card_label_values(classes: Sequence[Dict[str, Any]]) -> List[int]:
    """The label values of a card's / config's classes (``label_value``, else ``value``)."""
    return [int(c.get("label_value", c["value"])) for c in classes]


def _color(c: Any, i: int) -> Tuple[float, float, float]:
    if isinstance(c, (list, tuple)) and len(c) == 3 and all(isinstance(v, (int, float)) for v in c):
        return tuple(float(v) for v in c)  # type: ignore[return-value]
    return (0.0, 0.0, 0.0) if i == 0 else _PALETTE[(i - 1) % len(_PALETTE)]


def _as_label_value(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise DatasetError(f"{where}: label value {v!r} is not an integer")
    try:
        f = float(v)
    except ValueError:
        raise DatasetError(f"{where}: label value {v!r} is not an integer") from None
    if not np.isfinite(f) or f != int(f) or f < 0:
        raise DatasetError(f"{where}: label value {v!r} is not a non-negative integer")
    return int(f)


def parse_classes(obj: Any, where: str, name_to_value: bool = False) -> Tuple[DatasetClass, ...]:
    """Classes from a list of ``{"value", "name", "color"}``, a mapping ``{value: name}`` or (with
    ``name_to_value``, nnU-Net) ``{name: value}``. Background (label value 0) is added when absent."""
    entries: List[Tuple[int, str, Any]] = []
    if isinstance(obj, list):
        for k, c in enumerate(obj):
            if not isinstance(c, dict) or "value" not in c or "name" not in c:
                raise DatasetError(f"{where}: entry #{k} must be an object with 'value' and 'name'")
            entries.append((_as_label_value(c["value"], where), str(c["name"]), c.get("color")))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if name_to_value:
                if isinstance(v, list):
                    raise DatasetError(f"{where}: label {k!r} is a region ({v}); region-based labels "
                                       "are not supported")
                entries.append((_as_label_value(v, where), str(k), None))
            else:
                entries.append((_as_label_value(k, where), str(v), None))
    else:
        raise DatasetError(f"{where}: classes must be a list of {{\"value\", \"name\"}} or a mapping "
                           f"{{\"0\": \"background\", \"1\": ...}}")
    values = [e[0] for e in entries]
    dup = sorted({v for v in values if values.count(v) > 1})
    if dup:
        raise DatasetError(f"{where}: label values {dup} are listed twice")
    names = [e[1] for e in entries]
    dupn = sorted({n for n in names if names.count(n) > 1})
    if dupn:
        raise DatasetError(f"{where}: class names {dupn} are listed twice")
    if 0 not in values:
        entries.append((0, "Background", [0, 0, 0]))
    entries.sort(key=lambda e: e[0])
    if len(entries) < 2:
        raise DatasetError(f"{where}: lists no foreground class")
    return tuple(DatasetClass(i, name, value, _color(color, i)) for i, (value, name, color) in enumerate(entries))


def read_classes_file(path: Path) -> Tuple[DatasetClass, ...]:
    """A ``classes.json`` in either form; any problem names the file."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise DatasetError(f"{path} is not valid JSON ({exc})") from exc
    return parse_classes(obj, str(path))


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(IMAGE_SUFFIXES))


def folder_cases(images: Path, labels: Optional[Path]) -> Tuple[DatasetCase, ...]:
    """The cases of an image folder, each with the label map of the same name in ``labels`` (or None)."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images}")
    by_stem = {case_stem(p): p for p in _images_in(Path(labels))} if labels and Path(labels).is_dir() else {}
    return tuple(DatasetCase(case_stem(p), p, by_stem.get(case_stem(p))) for p in _images_in(images))


def _open_plain(folder: Path) -> Dataset:
    spec = folder / "classes.json"
    if not spec.is_file():
        raise FileNotFoundError(f"{spec} not found: a data folder needs classes.json with the class names")
    classes = read_classes_file(spec)
    images = _images_in(folder / "images")
    if not images:
        raise FileNotFoundError(f"no images in {folder / 'images'}")
    return Dataset(folder, "plain", classes, folder_cases(folder / "images", folder / "labels"))


def _open_nnunet(folder: Path, meta: Dict[str, Any], where: str) -> Dataset:
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if not isinstance(channels, dict) or not channels:
        raise DatasetError(f"{where}: 'channel_names' must be a mapping {{\"0\": \"CT\"}}")
    if len(channels) != 1:
        raise DatasetError(f"{where}: {len(channels)} channels ({', '.join(map(str, channels.values()))}); "
                           "only single-channel datasets are supported")
    modality = str(next(iter(channels.values())))
    if "labels" not in meta:
        raise DatasetError(f"{where}: lacks 'labels'")
    classes = parse_classes(meta["labels"], f"{where} 'labels'", name_to_value=True)
    ending = str(meta.get("file_ending", ".nii.gz"))

    def cases_in(sub: str, labelled: bool) -> Tuple[DatasetCase, ...]:
        d = folder / sub
        if not d.is_dir():
            return ()
        out = []
        for p in sorted(d.iterdir()):
            if not p.name.endswith(ending):
                continue
            stem = p.name[: -len(ending)]
            if not stem.endswith("_0000"):
                continue
            cid = stem[:-5]
            lab = folder / "labelsTr" / f"{cid}{ending}" if labelled else None
            if lab is not None and not lab.is_file():
                raise FileNotFoundError(f"{where}: no label map {lab} for image {p.name}")
            out.append(DatasetCase(cid, p, lab))
        return tuple(out)

    cases = cases_in("imagesTr", True)
    if not cases:
        raise FileNotFoundError(f"{where}: no images <case>_0000{ending} in {folder / 'imagesTr'}")
    return Dataset(folder, "nnunet_v2", classes, cases, cases_in("imagesTs", False), modality)


def _open_msd(folder: Path, meta: Dict[str, Any], where: str) -> Dataset:
    modalities = meta.get("modality") or {}
    if not isinstance(modalities, dict):
        raise DatasetError(f"{where}: 'modality' must be a mapping {{\"0\": \"MRI\"}}")
    if len(modalities) > 1:
        raise DatasetError(f"{where}: {len(modalities)} channels ({', '.join(map(str, modalities.values()))}); "
                           "only single-channel datasets are supported")
    modality = str(next(iter(modalities.values()))) if modalities else ""
    if "labels" not in meta:
        raise DatasetError(f"{where}: lacks 'labels'")
    classes = parse_classes(meta["labels"], f"{where} 'labels'")

    def resolve(rel: Any, what: str) -> Path:
        if not isinstance(rel, str) or not rel:
            raise DatasetError(f"{where}: {what} {rel!r} is not a path")
        p = (folder / rel).resolve()
        if not p.is_file():
            raise FileNotFoundError(f"{where}: {what} {p} not found")
        return p

    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{where}: 'training' must list {{\"image\", \"label\"}} entries")
    cases = []
    for k, e in enumerate(training):
        if not isinstance(e, dict) or "image" not in e:
            raise DatasetError(f"{where}: training entry #{k} needs 'image' (and 'label')")
        img = resolve(e["image"], "image")
        lab = resolve(e["label"], "label") if e.get("label") else None
        cases.append(DatasetCase(case_stem(img), img, lab))
    test = []
    for k, e in enumerate(meta.get("test") or []):
        rel = e.get("image") if isinstance(e, dict) else e
        img = resolve(rel, "test image")
        test.append(DatasetCase(case_stem(img), img, None))
    return Dataset(folder, "msd", classes, tuple(cases), tuple(test), modality)


def is_dataset_folder(folder: Path) -> bool:
    """True when ``folder`` looks like one of the layouts (not checked further)."""
    folder = Path(folder)
    return (folder / "dataset.json").is_file() or ((folder / "images").is_dir() and (folder / "classes.json").is_file())


def open_dataset(folder: Path) -> Dataset:
    """Detect the layout of ``folder`` and read its classes and cases (label maps are read later)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder not found: {folder}")
    meta_path = folder / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise DatasetError(f"{meta_path} is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path} must hold a JSON object")
        if "channel_names" in meta:
            return _open_nnunet(folder, meta, str(meta_path))
        if "training" in meta or "modality" in meta:
            return _open_msd(folder, meta, str(meta_path))
        raise DatasetError(f"{meta_path}: neither nnU-Net v2 ('channel_names') nor MSD ('modality', "
                           "'training')")
    if (folder / "images").is_dir():
        return _open_plain(folder)
    raise FileNotFoundError(f"{folder} is not a data folder: expected images/, labels/ and classes.json, "
                            "or dataset.json (nnU-Net v2 or Medical Segmentation Decathlon)")
