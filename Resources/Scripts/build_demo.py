#!/usr/bin/env python
"""Build the ImbalanceSeg demo case from real anatomy.

Inputs (Debian package ``mricron-data``, ``/usr/share/mricron/templates``):

* ``ch2.nii.gz``  - Colin27 ("ch2") T1-weighted MRI, 1 mm, whole head, MNI space
* ``aal.nii.gz``  - Automated Anatomical Labeling (AAL) atlas, same 1 mm grid
* ``aal.nii.txt`` - AAL region index / name / code table

Outputs (default ``Resources/Demo`` next to this script's parent folder):

* ``demo_t1.nrrd``     - T1, 2 mm isotropic, cropped to the head, int16, gzip
* ``demo_labels.nrrd`` - uint8 label map (0 = background, 1..5 classes), same grid
* ``classes.json``     - class table (value, name, colour, AAL regions, fractions)
* ``SOURCES.md``       - provenance, processing and licence notes

Processing (deterministic, no random numbers):

1. Read T1 and AAL; check they share one grid; read the AAL names from the
   text table and build the five classes *by name* (the numeric AAL indices are
   looked up, not assumed).
2. Head mask: T1 smoothed (Gaussian, 2 mm), threshold, largest connected
   component; bounding box plus a 4 mm margin, clipped to the field of view and
   made an even number of 1 mm voxels along every axis.
3. 1 mm -> 2 mm by exact 2x2x2 block averaging.  For the T1 this is the
   partial-volume (area) average of the eight 1 mm voxels.  For the labels each
   class is one-hot encoded and block-averaged, which is identical to linear
   interpolation of the one-hot maps at the 2 mm voxel centres (each centre lies
   half-way between 1 mm centres on every axis); the output label is the argmax
   of the class fractions; ties (fractions are multiples of 1/8) are broken by
   the class fractions in a wider Gaussian neighbourhood (sigma 1.5 mm), which
   keeps every class volume within a few percent of the 1 mm atlas.
4. Write NRRD files with SimpleITK (compressed) keeping the physical geometry
   (origin shifted to the centre of the first 2x2x2 block, same direction).

Usage::

    python Resources/Scripts/build_demo.py [--out DIR] [--templates DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

try:
    import SimpleITK as sitk
except ImportError:  # pragma: no cover - environment problem
    sys.exit("build_demo.py needs SimpleITK: pip install SimpleITK")

from scipy import ndimage

TEMPLATE_DIR = Path("/usr/share/mricron/templates")
COPYRIGHT_FILE = Path("/usr/share/doc/mricron-data/copyright")
T1_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
ATLAS_TABLE = "aal.nii.txt"

MARGIN_MM = 4.0
FACTOR = 2  # 1 mm -> 2 mm
TIE_SIGMA_MM = 1.5

# Colours (RGB 0..1).  Cortex pinkish grey; the subcortical colours follow the
# conventions most users know from FreeSurfer-style look-up tables
# (cerebellum orange, caudate/deep grey light blue, hippocampus yellow,
# amygdala cyan).
COLORS = {
    1: [0.80, 0.62, 0.62],
    2: [0.90, 0.58, 0.13],
    3: [0.48, 0.73, 0.86],
    4: [0.86, 0.85, 0.08],
    5: [0.40, 1.00, 1.00],
}


def _die(msg: str) -> None:
    sys.exit(f"build_demo.py: {msg}")


def read_aal_table(path: Path) -> dict[int, str]:
    """Return {index: name} from an MRIcron ``aal.nii.txt`` (``index name code``)."""
    table: dict[int, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            table[int(parts[0])] = parts[1]
    if not table:
        _die(f"could not parse any region from {path}")
    return table


def define_classes(table: dict[int, str]) -> list[dict]:
    """Group AAL regions into the five demo classes, by region name."""

    def pick(pred) -> list[int]:
        return sorted(i for i, n in table.items() if pred(n))

    cerebellum = pick(lambda n: n.startswith("Cerebelum_") or n.startswith("Vermis_"))
    deep = pick(lambda n: n.split("_")[0] in {"Caudate", "Putamen", "Pallidum", "Thalamus"})
    hippo = pick(lambda n: n.split("_")[0] == "Hippocampus")
    amyg = pick(lambda n: n.split("_")[0] == "Amygdala")
    taken = set(cerebellum) | set(deep) | set(hippo) | set(amyg)
    # Everything else in AAL is cerebral cortex (frontal, insula, cingulate,
    # parahippocampal, occipital, parietal, temporal, olfactory, Heschl...).
    cortex = sorted(i for i in table if i not in taken)

    for name, regs, n_expected in (
        ("Cerebellum", cerebellum, 26),
        ("Deep grey nuclei", deep, 8),
        ("Hippocampus", hippo, 2),
        ("Amygdala", amyg, 2),
        ("Cerebral cortex", cortex, 78),
    ):
        if len(regs) != n_expected:
            _die(f"unexpected AAL table: {name} has {len(regs)} regions, expected {n_expected}")

    specs = [
        (1, "Cerebral cortex", cortex),
        (2, "Cerebellum", cerebellum),
        (3, "Deep grey nuclei", deep),
        (4, "Hippocampus", hippo),
        (5, "Amygdala", amyg),
    ]
    return [
        {
            "value": v,
            "name": name,
            "color": COLORS[v],
            "aal_labels": [{"index": i, "name": table[i]} for i in regs],
        }
        for v, name, regs in specs
    ]


def head_bbox(t1: np.ndarray, spacing_mm: float = 1.0) -> tuple[slice, ...]:
    """Bounding box of the head (largest bright component) with a margin."""
    sm = ndimage.gaussian_filter(t1.astype(np.float32), sigma=2.0 / spacing_mm)
    thr = 0.1 * float(np.percentile(sm, 99.5))
    mask = sm > thr
    lab, n = ndimage.label(mask)
    if n == 0:
        _die("no head found in the T1 image")
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    mask = lab == (int(np.argmax(sizes)) + 1)
    margin = int(round(MARGIN_MM / spacing_mm))
    slices = []
    for ax in range(3):
        other = tuple(i for i in range(3) if i != ax)
        nz = np.nonzero(mask.any(axis=other))[0]
        lo = max(0, int(nz[0]) - margin)
        hi = min(t1.shape[ax], int(nz[-1]) + 1 + margin)
        if (hi - lo) % FACTOR:  # make the extent a multiple of FACTOR
            if hi < t1.shape[ax]:
                hi += 1
            elif lo > 0:
                lo -= 1
            else:  # head fills the field of view: drop one edge voxel
                hi -= 1
        slices.append(slice(lo, hi))
    return tuple(slices)


def block_mean(a: np.ndarray, f: int) -> np.ndarray:
    """Mean over non-overlapping f*f*f blocks (shape must be divisible by f)."""
    z, y, x = a.shape
    return a.reshape(z // f, f, y // f, f, x // f, f).mean(axis=(1, 3, 5))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sources(out: Path, classes: list[dict], info: dict) -> None:
    cls_rows = "\n".join(
        f"| {c['value']} | {c['name']} | {c['voxel_count']} | {100 * c['voxel_fraction']:.3f} % "
        f"| {c['volume_ml']:.1f} | {c['volume_ml_1mm_atlas']:.1f} | {', '.join(r['name'] for r in c['aal_labels'])} |"
        for c in classes
    )
    text = f"""# Demo data: sources, processing and licences

The demo case is **one real subject**: the Colin27 T1-weighted MRI with the AAL
atlas labels that were drawn on that same brain. It is produced by
`Resources/Scripts/build_demo.py` (deterministic; re-run it to reproduce the files
bit for bit from the Debian package).

**The training/validation cohort used by ImbalanceSeg is synthetic variation of
this one real subject** (random smooth deformations, global affine changes, bias
fields, contrast changes, noise and simulated low resolution, see
`imbalanceseglib.synth`). It contains no other real people and says nothing
about how a model would do on real multi-subject, multi-scanner data.

## Source files

Debian package `mricron-data` version {info['package_version']}
(source package `mricron`, upstream MRIcron by Chris Rorden), installed under
`/usr/share/mricron/templates/`:

| File | What it is | SHA-256 |
|---|---|---|
| `ch2.nii.gz` | Colin27 ("ch2") T1-weighted MRI, 181x217x181, 1 mm, whole head, MNI space | `{info['sha_t1']}` |
| `aal.nii.gz` | AAL atlas, 116 regions, same grid as `ch2.nii.gz` | `{info['sha_atlas']}` |
| `aal.nii.txt` | AAL index / region name / code table | `{info['sha_table']}` |

References:

* Colin27: C. J. Holmes, R. Hoge, L. Collins, R. Woods, A. W. Toga, A. C. Evans.
  *Enhancement of MR images using registration for signal averaging.*
  J. Comput. Assist. Tomogr. 22(2):324-333, 1998. (27 T1 scans of one healthy
  adult, registered and averaged; MNI / McConnell Brain Imaging Centre.)
* AAL: N. Tzourio-Mazoyer, B. Landeau, D. Papathanassiou, F. Crivello, O. Etard,
  N. Delcroix, B. Mazoyer, M. Joliot. *Automated anatomical labeling of
  activations in SPM using a macroscopic anatomical parcellation of the MNI MRI
  single-subject brain.* NeuroImage 15(1):273-289, 2002. The AAL regions were
  delineated on the Colin27 (MNI single-subject) brain, so the atlas and the T1
  are aligned without registration.

## Processing

1. Region indices were read from `aal.nii.txt` and grouped by name (table below).
   Class 1 is every AAL cerebral region not in another class (78 regions,
   including insula, cingulate, parahippocampal, olfactory and Heschl gyri).
2. Head mask: T1 smoothed with a 2 mm Gaussian, threshold at 10 % of the 99.5th
   percentile, largest connected component. Crop = its bounding box + {MARGIN_MM:g} mm,
   clipped to the field of view (the Colin27 field of view already cuts the
   head at the neck), extent rounded to an even number of 1 mm voxels.
   1 mm crop (z, y, x index ranges): {info['crop']}.
3. 1 mm -> 2 mm isotropic by exact 2x2x2 block averaging. T1: mean of the eight
   1 mm voxels, rounded to int16. Labels: block average of the one-hot map of each
   class (the same as linear interpolation of the one-hot maps at the 2 mm voxel
   centres), then argmax. Ties (fractions are multiples of 1/8, ~1 % of voxels)
   are broken by the class fractions after a 1.5 mm Gaussian smoothing of the
   1 mm one-hot maps (remaining exact ties -> lower label value). Class
   volumes stay within a few percent of the 1 mm atlas (table below).
4. Output grid: {info['shape_xyz'][0]} x {info['shape_xyz'][1]} x {info['shape_xyz'][2]} voxels (x, y, z),
   spacing 2 mm, origin {info['origin']} (LPS, mm), direction {info['direction']}
   (the NIfTI orientation, as read by SimpleITK). Both NRRD files are gzip-compressed.

## Classes (measured on the 2 mm grid, {info['n_voxels']} voxels in total)

| Value | Name | Voxels | Fraction | Volume (ml) | 1 mm atlas (ml) | AAL regions |
|---|---|---|---|---|---|---|
{cls_rows}

Background: {info['bg_count']} voxels ({100 * info['bg_fraction']:.2f} %).
Mean T1 intensity (0..254 scale) per class: {info['mean_t1']}.

## Licences

The Debian copyright file of the package (`/usr/share/doc/mricron-data/copyright`,
machine-readable format 1.0, "Upstream-Name: MRIcron", "Upstream-Contact: Chris
Rorden", "Source: https://github.com/neurolabusc/MRIcron/releases") has **no
stanza for the template or atlas files**. They fall under its catch-all stanza:

```
Files: *
Copyright: Copyright 2006-2010, Chris Rorden
License: BSD-3-clause
```

whose licence text begins:

```
  Redistribution and use in source and binary forms, with or without
  modification, are permitted provided that the following conditions are met:
  .
  Redistributions of source code must retain the above copyright notice, this
  list of conditions and the following disclaimer.
  .
  Redistributions in binary form must reproduce the above copyright notice, this
  list of conditions and the following disclaimer in the documentation and/or
  other materials provided with the distribution.  Neither the names of the
  copyright owners nor the names of this project (MRIcron) may be used to
  endorse or promote products derived from this software without specific prior
  written permission.
```

The file does not mention Colin27, MNI, AAL, Holmes et al. or Tzourio-Mazoyer et
al.; the other stanzas cover only code (`fpmath/*`, `rgb/*`, `common/*`,
`debian/*`). So Debian redistributes these images under MRIcron's BSD-3-clause
terms, but that is the packager's blanket statement, not a licence from the
original authors of the data: Colin27 comes from the Montreal Neurological
Institute (McConnell Brain Imaging Centre), and AAL from the GIN (Groupe
d'Imagerie Neurofonctionnelle, Caen/Bordeaux). Their own distribution terms are
not reproduced in the Debian package and were not checked when these files
were built. We therefore (a) keep the BSD-3-clause notice above with the
derived files, (b) cite both original papers, and (c) treat the derived demo
files as redistributable for research and teaching with attribution; anyone redistributing them in a product
should check the original MNI and AAL terms first.

The derived files in this folder (`demo_t1.nrrd`, `demo_labels.nrrd`,
`classes.json`) are downsampled, cropped and regrouped versions of the files
above; the processing code is part of ImbalanceSeg.
"""
    (out / "SOURCES.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).resolve()
    default_out = here.parent.parent / "Demo"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=default_out, help=f"output folder (default {default_out})")
    ap.add_argument("--templates", type=Path, default=TEMPLATE_DIR, help="mricron-data templates folder")
    args = ap.parse_args(argv)

    tdir: Path = args.templates
    missing = [f for f in (T1_FILE, ATLAS_FILE, ATLAS_TABLE) if not (tdir / f).is_file()]
    if missing:
        _die(
            f"missing {', '.join(missing)} in {tdir}.\n"
            "These come from the Debian/Ubuntu package mricron-data: "
            "run `apt-get install mricron-data` (or pass --templates DIR)."
        )

    t1_img = sitk.ReadImage(str(tdir / T1_FILE))
    at_img = sitk.ReadImage(str(tdir / ATLAS_FILE))
    for attr in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        a, b = getattr(t1_img, attr)(), getattr(at_img, attr)()
        if not np.allclose(a, b, atol=1e-4):
            _die(f"T1 and atlas grids differ ({attr}: {a} vs {b})")
    if not np.allclose(t1_img.GetSpacing(), 1.0, atol=1e-4):
        _die(f"expected 1 mm input, got spacing {t1_img.GetSpacing()}")

    t1 = sitk.GetArrayFromImage(t1_img).astype(np.float32)  # z, y, x
    aal = sitk.GetArrayFromImage(at_img).astype(np.int32)
    table = read_aal_table(tdir / ATLAS_TABLE)
    classes = define_classes(table)
    unknown = sorted(set(np.unique(aal).tolist()) - set(table) - {0})
    if unknown:
        _die(f"atlas contains indices not in the table: {unknown}")

    # AAL index -> class value
    lut = np.zeros(max(max(table), int(aal.max())) + 1, dtype=np.uint8)
    for c in classes:
        for r in c["aal_labels"]:
            lut[r["index"]] = c["value"]
    cls1 = lut[aal]

    crop = head_bbox(t1)
    t1c = t1[crop]
    clsc = cls1[crop]

    t1_2 = np.rint(block_mean(t1c, FACTOR)).astype(np.int16)
    n_cls = len(classes) + 1
    frac = np.stack([block_mean((clsc == k).astype(np.float32), FACTOR) for k in range(n_cls)])
    # Fractions are multiples of 1/8, so ties are common (~1 % of voxels).  Break
    # them with the class fractions in a wider, Gaussian-weighted neighbourhood
    # (sigma TIE_SIGMA_MM) instead of always giving them to one class; the
    # secondary score is scaled so it can never override a real majority.
    tie = np.stack(
        [block_mean(ndimage.gaussian_filter((clsc == k).astype(np.float32), TIE_SIGMA_MM), FACTOR) for k in range(n_cls)]
    )
    lab_2 = np.argmax(frac + 1e-3 * tie, axis=0).astype(np.uint8)

    # Geometry: the first 2 mm voxel centre is the centre of the first block,
    # i.e. continuous 1 mm index (start + 0.5) on every axis (x, y, z order for ITK).
    start_xyz = [crop[2].start + 0.5, crop[1].start + 0.5, crop[0].start + 0.5]
    origin = t1_img.TransformContinuousIndexToPhysicalPoint(start_xyz)
    spacing = tuple(FACTOR * s for s in t1_img.GetSpacing())

    def to_itk(arr: np.ndarray) -> sitk.Image:
        im = sitk.GetImageFromArray(arr)
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
        im.SetDirection(t1_img.GetDirection())
        return im

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_itk(t1_2), str(out / "demo_t1.nrrd"), useCompression=True)
    sitk.WriteImage(to_itk(lab_2), str(out / "demo_labels.nrrd"), useCompression=True)

    n_vox = int(lab_2.size)
    mean_t1 = {}
    print(f"grid (z,y,x) {lab_2.shape}, spacing {spacing} mm, {n_vox} voxels")
    print(f"{'value':>5}  {'name':<18} {'voxels':>8} {'fraction':>9} {'1mm ml':>7} {'2mm ml':>7} {'mean T1':>7}")
    for c in classes:
        v = c["value"]
        cnt = int((lab_2 == v).sum())
        c["voxel_count"] = cnt
        c["voxel_fraction"] = round(cnt / n_vox, 6)
        c["volume_ml"] = round(cnt * float(np.prod(spacing)) / 1000.0, 2)
        c["volume_ml_1mm_atlas"] = round(float((cls1 == v).sum()) / 1000.0, 2)
        mean_t1[c["name"]] = round(float(t1_2[lab_2 == v].mean()), 1)
        print(
            f"{v:>5}  {c['name']:<18} {cnt:>8} {100 * cnt / n_vox:>8.3f}% "
            f"{c['volume_ml_1mm_atlas']:>7.1f} {c['volume_ml']:>7.1f} {mean_t1[c['name']]:>7.1f}"
        )
    bg = int((lab_2 == 0).sum())
    print(f"{0:>5}  {'background':<18} {bg:>8} {100 * bg / n_vox:>8.3f}%")
    if min(c["voxel_fraction"] for c in classes) >= 0.005:
        _die("expected at least one class below 0.5 % of voxels")

    (out / "classes.json").write_text(json.dumps(classes, indent=2) + "\n")

    pkg_version = "unknown"
    status = Path("/var/lib/dpkg/status")
    if status.is_file():
        blocks = status.read_text(errors="replace").split("\n\n")
        for b in blocks:
            if b.startswith("Package: mricron-data\n"):
                for line in b.splitlines():
                    if line.startswith("Version:"):
                        pkg_version = line.split(":", 1)[1].strip()
    info = {
        "package_version": pkg_version,
        "sha_t1": sha256(tdir / T1_FILE),
        "sha_atlas": sha256(tdir / ATLAS_FILE),
        "sha_table": sha256(tdir / ATLAS_TABLE),
        "crop": ", ".join(f"[{s.start}, {s.stop})" for s in crop),
        "shape_xyz": lab_2.shape[::-1],
        "origin": tuple(round(o, 2) for o in origin),
        "direction": tuple(int(round(d)) for d in t1_img.GetDirection()),
        "n_voxels": n_vox,
        "bg_count": bg,
        "bg_fraction": bg / n_vox,
        "mean_t1": ", ".join(f"{k} {v}" for k, v in mean_t1.items())
        + f", background {float(t1_2[lab_2 == 0].mean()):.1f}",
    }
    write_sources(out, classes, info)
    for f in ("demo_t1.nrrd", "demo_labels.nrrd", "classes.json", "SOURCES.md"):
        print(f"wrote {out / f} ({(out / f).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
