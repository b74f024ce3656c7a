"""Real patients for the benchmarks: CHAOS MR T2 and ACDC from ``../shared/data`` as training cases.

Shared by ``real_imbalance.py``; no training here. What it decides, once:

* where the data are (``<repo>/../shared/data``; :func:`data_folder` says so and how to get them
  when they are absent, and callers skip);
* the splits: ACDC's customary patient-wise ``train.list`` / ``test.list`` (70 / 20 patients; its
  ``val.list`` is not used: no model selection happens here), CHAOS by case id (the 10 lowest ids
  are the training pool, the 10 highest the test set);
* which training patients a run with ``n`` patients and seed ``s`` gets: the first ``n`` of the
  pool shuffled by ``s`` (the same for every method, so methods are compared on the same data
  within a seed, and seeds differ in data as well as in initialisation);
* the grid the networks work on (:data:`DATASETS`), with the reasons;
* preprocessing: :func:`imbalanceseglib.training_data.prepare_case` (the library's own: canonical
  orientation, resampling to the target spacing, percentile z-score), cached per case as ``.npz``
  (written atomically) so that parallel jobs do not redo it.

ACDC geometry. The stored volumes kept no spacing (1 x 1 x 1 "voxel units", through-plane axis
last) and their in-plane matrices differ (208-512 voxels on the longer side). The heart's extent
is a constant fraction of the longer side (0.28-0.31 for every matrix size, measured on the 200
label maps), i.e. the field of view is what is constant, as in the original scans (e.g. patient001:
256 x 1.5625 mm = 400 mm). So each volume is given a *nominal* geometry before preprocessing:
in-plane spacing ``400 mm / longer side`` and 10 mm between slices (ACDC's usual slice spacing; some
scans had 5-8 mm, which this cannot know). Distances (HD95) on ACDC are therefore in nominal mm.
Without this the 10 volumes with 288-512 voxel matrices would show a heart up to twice as large.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"

ACDC_FOV_MM = 400.0        # nominal longer in-plane side of the field of view
ACDC_SLICE_MM = 10.0       # nominal distance between slices


@dataclass(frozen=True)
class DataSpec:
    """One data set as the benchmark trains on it."""

    key: str
    folder: str
    title: str
    modality: str
    target_spacing: Sequence[float]     # ITK order (x, y, z), mm (nominal mm for ACDC)
    patch_size: Sequence[int]           # array order (z, y, x)
    rare: Sequence[str]                 # the classes the asymmetric methods treat as rare
    why: str
    sizes: Sequence[int] = ()           # training-set sizes (patients) of the imbalance part
    extra: Dict[str, str] = field(default_factory=dict)


DATASETS: Dict[str, DataSpec] = {
    "chaos": DataSpec(
        key="chaos", folder="chaos_mr_t2", title="CHAOS MR T2-SPIR (abdomen)", modality="MR T2",
        target_spacing=(2.5, 2.5, 7.7), patch_size=(16, 48, 48), rare=("right kidney", "left kidney"),
        sizes=(2, 8),
        why=("in-plane 1.25 -> 2.5 mm (a kidney is still about 20 x 16 voxels per slice; 128 x 128 x 31-46 "
             "voxels per volume), slices kept at 7.7 mm; patch 16 x 48 x 48 voxels = 123 x 120 x 120 mm holds "
             "a whole kidney (11-16 slices) with its neighbours")),
    "acdc": DataSpec(
        key="acdc", folder="acdc", title="ACDC cine MRI (heart, ED + ES)", modality="MR cine",
        target_spacing=(2.5, 2.5, ACDC_SLICE_MM), patch_size=(8, 64, 64), rare=("right ventricle",),
        sizes=(3, 14),
        why=("nominal geometry (module docstring) resampled in-plane to 2.5 nominal mm (160 voxels on the "
             "longer side, the heart about 45 voxels across), slices kept; patch 8 x 64 x 64 = 8 slices "
             "of 160 x 160 mm, most of the heart (6-18 slices, most volumes 8-10)")),
}


def data_folder(spec: DataSpec) -> Optional[Path]:
    """The data set's folder, or None (with the reason printed by :func:`missing_message`)."""
    folder = DATA / spec.folder
    return folder if (folder / "images").is_dir() and (folder / "labels").is_dir() else None


def missing_message(spec: DataSpec) -> str:
    return (f"skipped: {DATA / spec.folder} is absent. The benchmark needs the real data sets of "
            f"../shared/data (see its README.md: {spec.title}); they are never part of the repository.")


def available(keys) -> List[str]:
    """Those of the data set ``keys`` (keys of :data:`DATASETS`, in order) whose data is present;
    a :func:`missing_message` is printed for each of the others."""
    out = []
    for k in keys:
        if data_folder(DATASETS[k]) is None:
            print(missing_message(DATASETS[k]))
        else:
            out.append(k)
    return out


# --------------------------------------------------------------------------- splits


def _read_list(path: Path) -> List[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def patient_of(spec: DataSpec, case_id: str) -> str:
    """ACDC cases are ``patientNNN_frameMM`` (two frames per patient); a CHAOS case is a patient."""
    return case_id.split("_frame")[0] if spec.key == "acdc" else case_id


@dataclass
class Split:
    pool: List[str]           # training patients (in file order)
    test: List[str]           # held-out cases (volumes)
    cases_of: Dict[str, List[str]]   # patient -> its volumes

    def volumes(self, patients: Sequence[str]) -> List[str]:
        return [c for p in patients for c in self.cases_of[p]]


def split(spec: DataSpec, folder: Path) -> Split:
    if spec.key == "acdc":
        train = _read_list(folder / "train.list")
        test = _read_list(folder / "test.list")
    else:
        ids = sorted(n[:-len(".nii.gz")] for n in os.listdir(folder / "images") if n.endswith(".nii.gz"))
        train, test = ids[:len(ids) // 2], ids[len(ids) // 2:]
    cases_of: Dict[str, List[str]] = {}
    for c in train:
        cases_of.setdefault(patient_of(spec, c), []).append(c)
    return Split(pool=list(cases_of), test=test, cases_of=cases_of)


def training_patients(sp: Split, n: int, seed: int) -> List[str]:
    """The ``n`` training patients of seed ``seed``: the pool shuffled by the seed, first ``n``."""
    if not 1 <= n <= len(sp.pool):
        raise ValueError(f"{n} training patients asked, the pool has {len(sp.pool)}")
    order = np.random.default_rng(10_000 + seed).permutation(len(sp.pool))
    return [sp.pool[i] for i in order[:n]]


# --------------------------------------------------------------------------- cases


_OPENED: Dict[str, object] = {}


def _dataset(folder: Path):
    from imbalanceseglib.datasets import open_dataset
    key = str(folder)
    if key not in _OPENED:
        _OPENED[key] = open_dataset(folder)
    return _OPENED[key]


def classes(folder: Path) -> List[Dict]:
    return _dataset(folder).config_classes()


def read_pair(spec: DataSpec, folder: Path, case_id: str, with_labels: bool = True):
    """A case's image and class-index label map as SimpleITK images, ACDC with its nominal geometry."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(folder / "images" / f"{case_id}.nii.gz"))
    labels = None
    if with_labels:
        ds = _dataset(folder)
        case = next(c for c in ds.cases if c.case_id == case_id)
        labels = ds.read_labels(case)   # float-coded integers (CHAOS) become indices here
    if spec.key == "acdc":
        size = image.GetSize()
        s = ACDC_FOV_MM / max(size[0], size[1])
        for im in (image, labels):
            if im is not None:
                im.SetSpacing((s, s, ACDC_SLICE_MM))
    return image, labels


def grid_tag(spec: DataSpec) -> str:
    return spec.key + "_" + "x".join(f"{v:g}" for v in spec.target_spacing)


def load_case(spec: DataSpec, folder: Path, case_id: str, config, cache: Path):
    """A labelled training case (:class:`imbalanceseglib.training_data.Case`), cached."""
    from imbalanceseglib.training_data import make_case, prepare_case

    path = cache / grid_tag(spec) / f"{case_id}.npz"
    if path.is_file():
        try:
            with np.load(path) as z:
                return make_case(z["image"], z["labels"], case_id)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file: prepare again
    image, labels = read_pair(spec, folder, case_id)
    case = prepare_case(image, labels, config, case_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
    with os.fdopen(fd, "wb") as fh:
        np.savez(fh, image=case.image, labels=case.labels)
    os.replace(tmp, path)
    return case


def load_unlabelled(spec: DataSpec, folder: Path, case_id: str, config, cache: Path):
    """The same case as an unlabelled one (image only, labels dropped), as
    :func:`imbalanceseglib.training_data.prepare_unlabeled_case` returns it (same preprocessing)."""
    from imbalanceseglib.training_data import Case

    case = load_case(spec, folder, case_id, config, cache)
    return Case(image=case.image, labels=np.zeros(case.labels.shape, dtype=np.uint8), name=case_id,
                class_voxels={})


def working_spacing_zyx(spec: DataSpec) -> tuple:
    return tuple(float(v) for v in reversed(spec.target_spacing))


def describe() -> str:
    return json.dumps({k: {"folder": v.folder, "target_spacing": list(v.target_spacing),
                           "patch_size": list(v.patch_size), "rare": list(v.rare)} for k, v in DATASETS.items()})
