"""An imbalanced multi-subject cohort built from real anatomy that installs offline.

Source: Colin27 T1 (``ch2.nii.gz``) and the AAL atlas (``aal.nii.gz``) from the
Debian package ``mricron-data`` (``/usr/share/mricron/templates``).  One real
subject only: the "subjects" of the cohort are synthetic variants of it made by
:func:`imbalanceseglib.synth.make_variant` (smooth elastic deformation + affine,
bias field, gamma/contrast, Rician noise, sometimes lower resolution along one
axis).  Every report that uses this cohort says so.

Nine foreground classes grouped from AAL regions by name, at 3 mm, from a
whole-brain class down to three structures under 0.1 % of the voxels:

    cortex, cerebellum, thalamus, caudate, putamen, hippocampus, pallidum, amygdala, Heschl gyrus

Used by ``imbalance_training.py`` (issue #3) and the semi-supervised benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

TEMPLATES = Path("/usr/share/mricron/templates")
SPACING_MM = 3.0

#: class name -> AAL region name prefixes (matched against the AAL name table)
CLASS_REGIONS: List[Tuple[str, List[str]]] = [
    ("Cerebral cortex", ["Precentral", "Frontal", "Rolandic", "Supp_Motor", "Olfactory", "Rectus", "Insula",
                         "Cingulum", "ParaHippocampal", "Calcarine", "Cuneus", "Lingual", "Occipital",
                         "Fusiform", "Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus",
                         "Paracentral", "Temporal"]),
    ("Cerebellum", ["Cerebelum", "Vermis"]),
    ("Thalamus", ["Thalamus"]),
    ("Caudate", ["Caudate"]),
    ("Putamen", ["Putamen"]),
    ("Hippocampus", ["Hippocampus"]),
    ("Pallidum", ["Pallidum"]),
    ("Amygdala", ["Amygdala"]),
    ("Heschl gyrus", ["Heschl"]),
]
COLORS = [(0.8, 0.62, 0.62), (0.9, 0.58, 0.13), (0.0, 0.57, 0.55), (0.48, 0.73, 0.86), (0.93, 0.53, 0.79),
          (0.86, 0.85, 0.08), (0.56, 0.35, 0.76), (0.4, 1.0, 1.0), (0.95, 0.3, 0.2)]


def missing(templates: Path = TEMPLATES) -> Optional[str]:
    """Why the cohort cannot be built here (a message naming the absent files and the package that
    installs them), or None."""
    absent = [n for n in ("ch2.nii.gz", "aal.nii.gz", "aal.nii.txt") if not (templates / n).is_file()]
    if not absent:
        return None
    return (f"skipped: {', '.join(absent)} not found in {templates}; this benchmark's cohort is built from "
            "Colin27 + AAL of the Debian package mricron-data (apt-get install mricron-data)")


def class_table() -> List[Dict]:
    out = [{"value": 0, "name": "Background", "color": [0.0, 0.0, 0.0]}]
    for i, ((name, _), color) in enumerate(zip(CLASS_REGIONS, COLORS), start=1):
        out.append({"value": i, "name": name, "color": list(color)})
    return out


def _aal_names(path: Path) -> Dict[int, str]:
    names = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            names[int(parts[0])] = parts[1]
    return names


def source_subject(templates: Path = TEMPLATES) -> Tuple[np.ndarray, np.ndarray, Tuple[float, float, float]]:
    """Colin27 T1 and the nine-class label map at 3 mm, cropped to the head: (t1, labels, spacing)."""
    t1_img = sitk.ReadImage(str(templates / "ch2.nii.gz"))
    aal_img = sitk.ReadImage(str(templates / "aal.nii.gz"))
    t1 = sitk.GetArrayFromImage(t1_img).astype(np.float32)
    aal = sitk.GetArrayFromImage(aal_img).astype(np.int32)
    if t1.shape != aal.shape:
        raise RuntimeError("ch2 and aal grids differ")
    names = _aal_names(templates / "aal.nii.txt")
    lut = np.zeros(max(names) + 1, dtype=np.uint8)
    for cls, (_, prefixes) in enumerate(CLASS_REGIONS, start=1):
        hits = [i for i, n in names.items() if any(n.startswith(p) for p in prefixes)]
        if not hits:
            raise RuntimeError(f"no AAL region for class {cls}")
        lut[hits] = cls
    labels = lut[np.clip(aal, 0, len(lut) - 1)]
    # head box: T1 above a low threshold, plus a margin; multiple of 3 voxels per axis
    from scipy import ndimage
    smooth = ndimage.gaussian_filter(t1, 2.0)
    mask = smooth > np.percentile(smooth, 55)
    lab_cc, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum(mask, lab_cc, range(1, n + 1))
        mask = lab_cc == (1 + int(np.argmax(sizes)))
    idx = np.nonzero(mask)
    lo = [max(0, int(i.min()) - 4) for i in idx]
    hi = [min(s, int(i.max()) + 5) for i, s in zip(idx, t1.shape)]
    f = int(SPACING_MM)
    hi = [l + ((h - l) // f) * f for l, h in zip(lo, hi)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    t1, labels = t1[sl], labels[sl]
    shp = tuple(s // f for s in t1.shape)
    t1_3 = t1.reshape(shp[0], f, shp[1], f, shp[2], f).mean(axis=(1, 3, 5))
    onehot = np.stack([(labels == c) for c in range(len(CLASS_REGIONS) + 1)]).astype(np.float32)
    frac = onehot.reshape(-1, shp[0], f, shp[1], f, shp[2], f).mean(axis=(2, 4, 6))
    lab_3 = np.argmax(frac, axis=0).astype(np.uint8)
    return t1_3.astype(np.float32), lab_3, (SPACING_MM,) * 3


def build(work: Path, n_train: int, n_val: int, n_test: int, seed0: int = 0, strength: str = "train"
          ) -> Dict[str, List[Path]]:
    """Write (cached) variants as ``<split>_<i>_{img,lab}.nrrd`` under ``work``; return the file lists."""
    from imbalanceseglib.synth import make_variant
    work.mkdir(parents=True, exist_ok=True)
    t1, lab, spacing = source_subject()
    splits = {"train": (n_train, seed0 + 1000), "val": (n_val, seed0 + 2000), "test": (n_test, seed0 + 3000)}
    files: Dict[str, List[Path]] = {}
    for split, (n, base) in splits.items():
        files[split] = []
        for i in range(n):
            ip, lp = work / f"{split}_{i:02d}_img.nrrd", work / f"{split}_{i:02d}_lab.nrrd"
            if not (ip.exists() and lp.exists()):
                img, lab_v = make_variant(t1, lab, spacing, base + i, strength=strength)
                for arr, path in ((img.astype(np.float32), ip), (lab_v.astype(np.uint8), lp)):
                    im = sitk.GetImageFromArray(arr)
                    im.SetSpacing(spacing)
                    tmp = path.with_name(path.name + ".tmp.nrrd")
                    sitk.WriteImage(im, str(tmp), True)
                    tmp.replace(path)
            files[split].append((ip, lp))
    return files


def fractions(labels: np.ndarray) -> np.ndarray:
    return np.bincount(labels.ravel(), minlength=len(CLASS_REGIONS) + 1) / labels.size


if __name__ == "__main__":
    t1, lab, sp = source_subject()
    fr = fractions(lab)
    print("grid", t1.shape, "voxels", lab.size)
    for c in class_table():
        print(f"{c['value']:>2} {c['name']:<18} {fr[c['value']] * 100:7.3f}%  {int(fr[c['value']] * lab.size):>7} voxels")
    print(json.dumps([c["name"] for c in class_table()]))
