"""Training data sources named in a training config.

* ``{"kind": "folders", "images": DIR, "labels": DIR}``: files matched by name.
  ``"unlabeled_images": DIR`` adds unlabelled images for semi-supervised methods.
* ``{"kind": "synthetic_cohort", "image": FILE, "labels": FILE, "n_train": N,
  "n_val": M, "seed": S}``: varied subjects made from one real labelled anatomy by
  smooth deformation, bias field, contrast, noise and resolution changes
  (:mod:`imbalanceseglib.synth`). Every variant is deformed, so the source case
  itself is never a training case.  ``"n_unlabeled": K`` adds K more variants whose
  labels are dropped (for semi-supervised methods).
* ``{"kind": "dataset", "folder": DIR}``: a data folder in any layout that
  :func:`imbalanceseglib.datasets.open_dataset` reads (``images/ labels/ classes.json``,
  nnU-Net v2 raw, MSD); its label values become consecutive training indices.
  ``"val_folder": DIR`` (same classes), or ``"val_images"``/``"val_labels"`` folders, add
  validation cases.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from .datasets import IMAGE_SUFFIXES as _IMAGE_SUFFIXES
from .datasets import Dataset, DatasetError, case_stem as _stem, folder_cases, open_dataset
from .images import check_same_geometry, read_image

ImagePair = Tuple[sitk.Image, sitk.Image, str]


def folder_pairs(images: Path, labels: Path) -> List[ImagePair]:
    images, labels = Path(images), Path(labels)
    for d in (images, labels):
        if not d.is_dir():
            raise FileNotFoundError(f"training folder not found: {d}")
    lab_by_stem = {_stem(p): p for p in labels.iterdir() if p.name.endswith(_IMAGE_SUFFIXES)}
    pairs = []
    for p in sorted(images.iterdir()):
        if not p.name.endswith(_IMAGE_SUFFIXES):
            continue
        stem = _stem(p)
        if stem not in lab_by_stem:
            raise FileNotFoundError(f"no label map in {labels} for image {p.name}")
        image, label_map = read_image(p), read_image(lab_by_stem[stem])
        check_same_geometry(image, label_map, stem, p, lab_by_stem[stem])
        pairs.append((image, label_map, stem))
    if not pairs:
        raise FileNotFoundError(f"no images found in {images}")
    return pairs


def dataset_pairs(dataset: Dataset, classes: Optional[List[Dict[str, Any]]] = None) -> List[ImagePair]:
    """Every labelled case of ``dataset``, labels as consecutive training indices.

    ``classes`` (a config's classes, with ``label_value`` where it differs from ``value``) must
    name the same label values as the dataset when given."""
    if classes is not None:
        from .datasets import card_label_values
        if card_label_values(classes) != dataset.label_values:
            raise DatasetError(f"{dataset.folder}: the config's classes (label values "
                               f"{card_label_values(classes)}) differ from the data folder's "
                               f"{dataset.label_values}; leave 'classes' out to take them from the folder")
    cases = dataset.labelled_cases()
    if not cases:
        raise FileNotFoundError(f"no labelled cases in {dataset.folder}")
    pairs = []
    for case in cases:
        image, label_map = read_image(case.image), dataset.read_labels(case)
        check_same_geometry(image, label_map, case.case_id, case.image, case.label)
        pairs.append((image, label_map, case.case_id))
    return pairs


def config_classes_from_data(spec: Dict[str, Any], base: Path) -> Tuple[List[Dict[str, Any]], str]:
    """Classes (and modality, "" when not stated) of a config's ``data`` section, for a training
    config without ``classes``: a ``dataset`` folder, or the folder above ``folders``' images."""
    kind = spec.get("kind")
    if kind == "dataset":
        ds = open_dataset(base / spec["folder"])
    elif kind == "folders" and (Path(base / spec["images"]).parent / "classes.json").is_file():
        ds = open_dataset(Path(base / spec["images"]).parent)
    else:
        raise ValueError("the training config has no 'classes' and its data section names no data folder "
                         "with classes (classes.json or dataset.json); add \"classes\" to the config")
    return ds.config_classes(), ds.modality


def synthetic_pairs(image_path: Path, label_path: Path, n: int, seed: int,
                    log: Callable[[str], None] = lambda s: None) -> List[ImagePair]:
    from .synth import make_variant  # imported lazily: only this data kind needs it

    image = read_image(image_path)
    labels = read_image(label_path)
    check_same_geometry(image, labels, "synthetic cohort source", image_path, label_path)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    lab = sitk.GetArrayFromImage(labels).astype(np.uint8)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    pairs = []
    for i in range(n):
        v_img, v_lab = make_variant(arr, lab, spacing_zyx, seed=seed + i)
        im = sitk.GetImageFromArray(v_img.astype(np.float32))
        im.CopyInformation(image)
        lb = sitk.GetImageFromArray(v_lab.astype(np.uint8))
        lb.CopyInformation(image)
        pairs.append((im, lb, f"variant-{seed + i}"))
        log(f"  synthesised variant {i + 1}/{n} (seed {seed + i})")
    return pairs


def load_training_data(spec: Dict[str, Any], base: Path,
                       log: Callable[[str], None] = lambda s: None,
                       classes: Optional[List[Dict[str, Any]]] = None) -> Tuple[List[ImagePair], List[ImagePair]]:
    """Return (train, validation) pairs for a config's ``data`` section."""
    kind = spec.get("kind")
    if kind == "synthetic_cohort":
        image, labels = base / spec["image"], base / spec["labels"]
        seed = int(spec.get("seed", 1000))
        n_train, n_val = int(spec["n_train"]), int(spec.get("n_val", 0))
        train = synthetic_pairs(image, labels, n_train, seed, log)
        val = synthetic_pairs(image, labels, n_val, seed + 100000, log)
        return train, val
    if kind == "folders":
        train = folder_pairs(base / spec["images"], base / spec["labels"])
        val: List[ImagePair] = []
        if spec.get("val_images"):
            val = folder_pairs(base / spec["val_images"], base / spec["val_labels"])
        return train, val
    if kind == "dataset":
        ds = open_dataset(base / spec["folder"])
        log(f"  data folder {ds.folder}: {ds.describe()}")
        train = dataset_pairs(ds, classes)
        val = []
        if spec.get("val_folder"):
            val = dataset_pairs(open_dataset(base / spec["val_folder"]), classes or ds.config_classes())
        elif spec.get("val_images"):  # plain folders read with the data folder's classes
            val_cases = folder_cases(base / spec["val_images"], base / spec["val_labels"])
            val = dataset_pairs(dataclasses.replace(ds, cases=val_cases), classes)
        return train, val
    raise ValueError(f"unknown data kind {kind!r}; use 'dataset', 'folders' or 'synthetic_cohort'")


def folder_images(images: Path) -> List[Tuple[sitk.Image, str]]:
    """Every image of a folder, with its case name (for unlabelled data)."""
    images = Path(images)
    if not images.is_dir():
        raise FileNotFoundError(f"unlabelled image folder not found: {images}")
    out = [(read_image(p), _stem(p)) for p in sorted(images.iterdir()) if p.name.endswith(_IMAGE_SUFFIXES)]
    if not out:
        raise FileNotFoundError(f"no images found in {images}")
    return out


def load_unlabeled_data(spec: Dict[str, Any], base: Path,
                        log: Callable[[str], None] = lambda s: None) -> List[Tuple[sitk.Image, str]]:
    """Unlabelled images named by a config's ``data`` section (empty when it names none)."""
    kind = spec.get("kind")
    if kind == "synthetic_cohort" and int(spec.get("n_unlabeled", 0)) > 0:
        seed = int(spec.get("seed", 1000)) + 200000
        pairs = synthetic_pairs(base / spec["image"], base / spec["labels"], int(spec["n_unlabeled"]), seed, log)
        return [(img, f"unlabelled-{name}") for img, _, name in pairs]
    if kind in ("folders", "dataset") and spec.get("unlabeled_images"):
        return folder_images(base / spec["unlabeled_images"])
    return []
