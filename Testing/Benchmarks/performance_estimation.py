#!/usr/bin/env python
"""Label-free per-class performance estimation: ImbalanceSegLib vs MOVAL (issue #4).

Both tools get the same logits of the demo model (``Resources/Models/demo_brain.imbseg``)
on its 2 mm working grid, cropped to the same brain box.  Calibration is fitted on
labelled validation cases (synthetic variants of the training subject, Colin27 +
AAL); the per-class Dice of every test case is then estimated without labels and
compared with the true Dice.

Test sets
* synthetic shifts of variants of the training subject: contrast/gamma, Rician
  noise, Gaussian blur, bias field, lower resolution; three strengths each;
* a natural shift: a different real anatomy, the MNI152 2009 template shipped in
  the ``nilearn`` wheel (a skull-stripped average of 152 brains), whose labels are
  the AAL classes propagated from Colin27 by SimpleITK registration (affine +
  B-spline on the brain-extracted Colin27, ``ch2bet``) - its "true" Dice therefore
  includes registration error.

Peer: ``moval`` 0.3.25 from PyPI (licence "free for non-commercial use": we run it
here, never ship or copy it).  Benchmark-only set-up: ``pip install nilearn`` in ``.venv``
(MNI152 template), and MOVAL in an interpreter with NumPy 1 (its class-specific solver
fails under NumPy 2)::

    python3 -m venv /tmp/moval_env
    /tmp/moval_env/bin/pip install "numpy<2" "scipy<1.14" scikit-learn pandas nibabel moval==0.3.25

Usage::

    python Testing/Benchmarks/performance_estimation.py [--work DIR] [--rebuild] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import SimpleITK as sitk
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_common import machine  # noqa: E402
from imbalanceseglib import estimation as pe  # noqa: E402
from imbalanceseglib.bundle import load_bundle  # noqa: E402
from imbalanceseglib.inference import working_grid_logits  # noqa: E402
from imbalanceseglib.metrics import overlap_metrics  # noqa: E402
from imbalanceseglib import synth  # noqa: E402

TEMPLATES = Path("/usr/share/mricron/templates")
SHIFTS = {  # name -> three strengths (mild, moderate, severe)
    "contrast/gamma": [1.6, 2.4, 3.4],      # gamma exponent on [0, 1]-scaled intensities (alternating 1/g)
    "noise": [0.06, 0.12, 0.20],            # Rician sigma / robust intensity range
    "blur": [1.5, 2.5, 3.5],                # Gaussian sigma in mm
    "bias field": [0.5, 0.9, 1.3],          # synth.bias_field strength
    "low resolution": [2.5, 4.0, 5.5],      # slice-thickness factor along one axis
}
METHODS = ["none", "ts", "doc", "atc", "ts-atc"]
MOVAL_NAME = {"none": "ac-model", "ts": "ts-model", "doc": "doc-model", "atc": "atc-model", "ts-atc": "ts-atc-model"}
SMALL = ("Hippocampus", "Amygdala")          # < 0.5 % of the voxels
LARGE = ("Cerebral cortex", "Cerebellum", "Deep grey nuclei")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- data

def _robust(img: np.ndarray) -> Tuple[float, float]:
    return float(np.percentile(img, 1)), float(np.percentile(img, 99))


def apply_shift(img: np.ndarray, kind: str, strength: float, spacing, rng: np.random.Generator) -> np.ndarray:
    lo, hi = _robust(img)
    if kind == "contrast/gamma":
        g = strength if rng.random() < 0.5 else 1.0 / strength
        x = np.clip((img - lo) / (hi - lo), 0, None)
        return (lo + (hi - lo) * x ** g).astype(np.float32)
    if kind == "noise":
        return synth.add_rician_noise(img, rng, strength * (hi - lo)).astype(np.float32)
    if kind == "blur":
        from scipy import ndimage
        return ndimage.gaussian_filter(img, [strength / s for s in spacing]).astype(np.float32)
    if kind == "bias field":
        return (img * synth.bias_field(img.shape, rng, strength=strength)).astype(np.float32)
    if kind == "low resolution":
        return synth.simulate_low_resolution(img, spacing, rng, factor=strength,
                                             axis=int(rng.integers(0, 3))).astype(np.float32)
    raise ValueError(kind)


def _image(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    im = sitk.GetImageFromArray(arr)
    im.CopyInformation(ref)
    return im


def natural_shift_subject(work: Path) -> Tuple[sitk.Image, sitk.Image]:
    """MNI152 (nilearn) with the demo classes propagated from Colin27 by registration (cached)."""
    img_p, lab_p = work / "mni152_t1.nrrd", work / "mni152_labels.nrrd"
    if img_p.exists() and lab_p.exists():
        return sitk.ReadImage(str(img_p)), sitk.ReadImage(str(lab_p))
    from nilearn import datasets
    tmp = work / "mni152_template.nii.gz"
    datasets.load_mni152_template(resolution=1).to_filename(str(tmp))
    fixed = sitk.ReadImage(str(tmp), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(TEMPLATES / "ch2bet.nii.gz"), sitk.sitkFloat32)
    aal = sitk.ReadImage(str(TEMPLATES / "aal.nii.gz"))
    classes = json.loads((ROOT / "Resources" / "Demo" / "classes.json").read_text())
    lut = np.zeros(256, dtype=np.uint8)
    for c in classes:
        for region in c["aal_labels"]:
            lut[region["index"]] = c["value"]
    lab_arr = lut[np.clip(sitk.GetArrayFromImage(aal), 0, 255)]
    labels = sitk.GetImageFromArray(lab_arr)
    labels.CopyInformation(aal)
    # intensity-normalise both brains to [0, 1] for the metric
    def norm(im):
        a = sitk.GetArrayFromImage(im)
        hi = np.percentile(a[a > 0], 99)
        return sitk.Clamp(im / float(hi), sitk.sitkFloat32, 0.0, 1.5)
    f, m = norm(fixed), norm(moving)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.05, seed=1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-4, 200)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    init = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(init, inPlace=False)
    affine = reg.Execute(f, m)
    log(f"  affine registration metric {reg.GetMetricValue():.4f}")
    bs_init = sitk.BSplineTransformInitializer(f, [8, 8, 8])
    reg2 = sitk.ImageRegistrationMethod()
    reg2.SetMetricAsMattesMutualInformation(32)
    reg2.SetMetricSamplingStrategy(reg2.RANDOM)
    reg2.SetMetricSamplingPercentage(0.05, seed=2)
    reg2.SetInterpolator(sitk.sitkLinear)
    reg2.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=60)
    reg2.SetShrinkFactorsPerLevel([4, 2])
    reg2.SetSmoothingSigmasPerLevel([2, 1])
    reg2.SetMovingInitialTransform(affine)
    reg2.SetInitialTransform(bs_init, inPlace=True)
    reg2.Execute(f, m)
    log(f"  B-spline registration metric {reg2.GetMetricValue():.4f}")
    composite = sitk.CompositeTransform([affine, bs_init])
    warped = sitk.Resample(labels, fixed, composite, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    sitk.WriteImage(fixed, str(img_p), True)
    sitk.WriteImage(warped, str(lab_p), True)
    return fixed, warped


def build(work: Path, bundle, n_val: int, n_per_shift: int, n_natural: int) -> Dict[str, List[Path]]:
    """Logits and labels of every case as cached .npz files; returns {set name: [files]}."""
    work.mkdir(parents=True, exist_ok=True)
    t1 = sitk.ReadImage(str(ROOT / "Resources" / "Demo" / "demo_t1.nrrd"))
    lab = sitk.ReadImage(str(ROOT / "Resources" / "Demo" / "demo_labels.nrrd"))
    arr, lab_arr = sitk.GetArrayFromImage(t1).astype(np.float32), sitk.GetArrayFromImage(lab)
    spacing = tuple(reversed(t1.GetSpacing()))
    sets: Dict[str, List[Path]] = {}

    def case(name: str, make) -> Path:
        path = work / f"{name}.npz"
        if not path.exists():
            img, labels = make()
            logits, lab_w, _ = working_grid_logits(img, bundle, labels)
            np.savez(path, logits=logits.astype(np.float32), labels=lab_w.astype(np.uint8))
        return path

    def variant(seed: int, preset: str):
        return synth.make_variant(arr, lab_arr, spacing, seed, strength=preset)

    sets["validation"] = [case(f"val_{i}", lambda i=i: tuple(
        _image(a, t1) for a in variant(80000 + i, "light" if i % 2 == 0 else "train"))) for i in range(n_val)]
    log(f"validation: {len(sets['validation'])} cases")
    sets["in-distribution"] = [case(f"iid_{i}", lambda i=i: tuple(
        _image(a, t1) for a in variant(81000 + i, "light" if i % 2 == 0 else "train"))) for i in range(n_per_shift)]
    for si, (kind, strengths) in enumerate(SHIFTS.items()):
        for level, strength in enumerate(strengths, start=1):
            key = f"{kind} {level}"
            files = []
            for i in range(n_per_shift):
                seed = 90000 + 100 * si + 10 * level + i

                def make(seed=seed, kind=kind, strength=strength):
                    img, labels = variant(seed, "light")
                    img = apply_shift(img, kind, strength, spacing, np.random.default_rng(seed))
                    return _image(img, t1), _image(labels, lab)
                files.append(case(f"shift_{si}_{level}_{i}", make))
            sets[key] = files
        log(f"{kind}: {3 * n_per_shift} cases")
    mni_img, mni_lab = natural_shift_subject(work)
    m_arr, m_lab = sitk.GetArrayFromImage(mni_img).astype(np.float32), sitk.GetArrayFromImage(mni_lab)
    m_sp = tuple(reversed(mni_img.GetSpacing()))
    files = [case("natural_0", lambda: (mni_img, mni_lab))]
    for i in range(1, n_natural):
        files.append(case(f"natural_{i}", lambda i=i: tuple(
            _image(a, mni_img) for a in synth.make_variant(m_arr, m_lab, m_sp, 95000 + i, strength="light"))))
    sets["natural (MNI152)"] = files
    log(f"natural shift: {len(files)} cases")
    return sets


def load_cropped(path: Path, margin: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Logits and labels of one case cropped to the box holding its labelled and predicted
    structures plus a margin (the same arrays go to both tools)."""
    d = np.load(path)
    logits, labels = d["logits"], d["labels"]
    idx = np.nonzero((labels > 0) | (logits.argmax(0) > 0))
    sl = tuple(slice(max(0, int(i.min()) - margin), min(s, int(i.max()) + 1 + margin))
               for i, s in zip(idx, labels.shape))
    return np.ascontiguousarray(logits[(slice(None),) + sl]), np.ascontiguousarray(labels[sl])


# --------------------------------------------------------------------------- running

def true_dice(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([np.nan if m["dice"] is None else m["dice"]
                     for m in overlap_metrics(logits.argmax(0), labels, logits.shape[0])])


def run_ours(val, tests, confidences) -> Dict:
    """Fit every method from scratch on the validation logits (the statistics pass each method
    needs is part of its fit time: all temperatures for TS and TS-ATC, T = 1 otherwise)."""
    out = {}
    for conf in confidences:
        for method in METHODS:
            for cs in (False, True):
                if method == "none" and cs:
                    continue
                t1 = time.perf_counter()
                est = pe.fit_estimator(val, method=method, class_specific=cs, confidence=conf)
                fit_s = time.perf_counter() - t1
                est_times, estimates = [], {}
                for key, cases in tests.items():
                    estimates[key] = []
                    for lg, _ in cases:
                        t2 = time.perf_counter()
                        estimates[key].append(est.estimate(lg).metric_array("dice"))
                        est_times.append(time.perf_counter() - t2)
                out[("ours", conf, method, cs)] = {"fit_s": fit_s, "reduce_s": 0.0,
                                                   "estimate_s": float(np.mean(est_times)), "estimates": estimates}
                log(f"ours {conf:<8} {method:<6} {'CS' if cs else 'global':<6} fit from scratch {fit_s:.2f} s, "
                    f"estimate {np.mean(est_times):.2f} s/case")
    return out


def run_moval(val, tests, work: Path, python: str, reuse: bool = False) -> Tuple[Dict, Dict]:
    """MOVAL on the same cropped logits, in its own interpreter (see moval_worker.py)."""
    import subprocess
    crop = work / "cropped"
    crop.mkdir(exist_ok=True)
    man = {"val": [], "tests": {}, "methods": [[m, cs] for m in METHODS for cs in (False, True)
                                                if not (m == "none" and cs)]}
    for i, (lg, lab) in enumerate(val):
        p = crop / f"val_{i}.npz"
        np.savez(p, logits=lg, labels=lab)
        man["val"].append(str(p))
    for t, (key, cases) in enumerate(tests.items()):
        man["tests"][key] = []
        for i, (lg, lab) in enumerate(cases):
            p = crop / f"test_{t}_{i}.npz"
            np.savez(p, logits=lg, labels=lab)
            man["tests"][key].append(str(p))
    out_json = work / "moval_results.json"
    man_path = work / "moval_manifest.json"
    same = man_path.exists() and json.loads(man_path.read_text()) == man
    man_path.write_text(json.dumps(man))
    if reuse and same and out_json.exists():
        log("reusing MOVAL results of an earlier run on the same inputs (--reuse-moval)")
    else:
        subprocess.run([python, str(Path(__file__).with_name("moval_worker.py")), str(man_path),
                        str(out_json)], check=True)
    res = json.loads(out_json.read_text())
    out = {}
    for r in res["runs"]:
        est = {k: [np.array([np.nan if x is None else x for x in e]) for e in v] for k, v in r["estimates"].items()}
        out[("moval", "mcp", r["method"], r["class_specific"])] = {
            "fit_s": r["fit_s"], "reduce_s": 0.0, "estimate_s": r["estimate_s"], "estimates": est}
    return out, res["versions"]


# --------------------------------------------------------------------------- report

def mae(estimates: List[np.ndarray], truths: List[np.ndarray], idx: List[int]) -> float:
    errs = []
    for e, t in zip(estimates, truths):
        for k in idx:
            if not np.isnan(t[k]):
                ek = 0.0 if np.isnan(e[k]) else e[k]  # an "absent" estimate for a present class counts as Dice 0
                errs.append(abs(ek - t[k]))
    return 100.0 * float(np.mean(errs)) if errs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/imbseg_perf_bench")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (2 validation cases, 1 case per shift)")
    ap.add_argument("--val", type=int, default=3)
    ap.add_argument("--per-shift", type=int, default=2)
    ap.add_argument("--no-moval", action="store_true")
    ap.add_argument("--reuse-moval", action="store_true",
                    help="reuse MOVAL's results from --work if its inputs are unchanged (report-only reruns)")
    ap.add_argument("--moval-python", default="/tmp/moval_env/bin/python",
                    help="interpreter with moval==0.3.25 and numpy<2 (MOVAL's class-specific solver fails on NumPy 2)")
    ap.add_argument("--out", default=str(ROOT / "Testing" / "Benchmarks" / "reports" / "performance_estimation.md"))
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    torch.set_num_threads(2)
    work = Path(args.work)
    if args.rebuild and work.exists():
        for p in work.glob("*.npz"):
            p.unlink()
    n_val, n_shift = (2, 1) if args.quick else (args.val, args.per_shift)
    bundle = load_bundle(ROOT / "Resources" / "Models" / "demo_brain.imbseg")
    names = bundle.class_names
    t0 = time.perf_counter()
    sets = build(work, bundle, n_val, n_shift, 1 if args.quick else 3)
    build_s = time.perf_counter() - t0
    val = [load_cropped(p) for p in sets["validation"]]
    tests = {k: [load_cropped(p) for p in v] for k, v in sets.items() if k != "validation"}
    sizes = [lg[0].size for lg, _ in val] + [lg[0].size for v in tests.values() for lg, _ in v]
    log(f"cases cropped to their structures: {min(sizes):,} to {max(sizes):,} voxels")
    truths = {k: [true_dice(lg, lab) for lg, lab in v] for k, v in tests.items()}
    results = run_ours(val, tests, pe.CONFIDENCE_SCORES)
    moval_versions = {}
    if not args.no_moval:
        moval_results, moval_versions = run_moval(val, tests, work, args.moval_python, args.reuse_moval)
        results.update(moval_results)

    small = [names.index(n) for n in SMALL]
    large = [names.index(n) for n in LARGE]
    fg = list(range(1, len(names)))
    lines = [
        "# Label-free per-class performance estimation: ImbalanceSegLib vs MOVAL",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Data built in {build_s:.0f} s (cached under {work}); each case cropped to the box of its labelled and "
        f"predicted structures plus 3 voxels ({min(sizes):,} to {max(sizes):,} voxels of the 2 mm working grid), "
        f"the same arrays for both tools; "
        f"{len(val)} validation cases, {sum(len(v) for v in tests.values())} test cases.",
        "",
        "Model: `Resources/Models/demo_brain.imbseg` (trained on synthetic variants of one real subject, Colin27 + AAL). "
        "Validation and synthetic-shift cases are further variants of that subject (`imbalanceseglib.synth`); the natural "
        "shift is a different real anatomy (MNI152 2009 from the `nilearn` wheel, skull-stripped) with labels propagated "
        "from Colin27/AAL by SimpleITK affine + B-spline registration, so its \"true\" Dice includes registration error.",
        "",
        f"Small classes: {', '.join(SMALL)} (< 0.5 % of the voxels); large: {', '.join(LARGE)}. MAE = mean absolute "
        "error between estimated and true Dice, in Dice points (x100), over (case, class) pairs where the true Dice is "
        "defined. Both tools use the maximum class probability (MCP) as confidence unless stated; MOVAL is run with "
        "`metric=\"f1score\"`, as its segmentation examples do, in its own interpreter "
        f"({', '.join(f'{k} {v}' for k, v in moval_versions.items())}) because its class-specific solver fails "
        f"under NumPy 2 (`param[k] = x` with a one-element array); ours runs with NumPy {np.__version__}, "
        f"torch {torch.__version__}.",
        "",
        "## True Dice per test set (what is being estimated)",
        "",
        "| test set | cases | " + " | ".join(names[1:]) + " |",
        "|---|---|" + "---|" * (len(names) - 1),
    ]
    for key, tr in truths.items():
        arr = np.array(tr)
        lines.append(f"| {key} | {len(tr)} | " + " | ".join(f"{np.nanmean(arr[:, k]):.3f}" for k in fg) + " |")
    lines += ["", "## MAE of the estimated Dice, small classes / large classes (Dice points)", ""]
    methods = [(m, cs) for m in METHODS for cs in (False, True) if not (m == "none" and cs)]
    header = "| test set | " + " | ".join(f"{m}{' CS' if cs else ''} ours | {m}{' CS' if cs else ''} MOVAL"
                                           for m, cs in methods) + " |"
    lines += [header, "|---|" + "---|" * (2 * len(methods))]
    wins = {"small": [0, 0], "large": [0, 0]}
    for key in tests:
        cells = []
        for m, cs in methods:
            for tool in ("ours", "moval"):
                r = results.get((tool, "mcp", m, cs))
                if r is None:
                    cells.append("-")
                    continue
                s_, l_ = mae(r["estimates"][key], truths[key], small), mae(r["estimates"][key], truths[key], large)
                cells.append(f"{s_:.1f} / {l_:.1f}")
            o, v = results.get(("ours", "mcp", m, cs)), results.get(("moval", "mcp", m, cs))
            if o and v:
                for grp, idx in (("small", small), ("large", large)):
                    wins[grp][0] += mae(o["estimates"][key], truths[key], idx) <= mae(v["estimates"][key], truths[key], idx) + 1e-9
                    wins[grp][1] += 1
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    # pooled per class
    lines += ["", "## MAE per class over all test sets (Dice points, MCP)", "",
              "| method | tool | " + " | ".join(names[1:]) + " | all foreground |", "|---|---|" + "---|" * len(names)]
    for m, cs in methods:
        for tool in ("ours", "moval"):
            r = results.get((tool, "mcp", m, cs))
            if r is None:
                continue
            est_all = [e for key in tests for e in r["estimates"][key]]
            tr_all = [t for key in tests for t in truths[key]]
            lines.append(f"| {m}{' CS' if cs else ''} | {tool} | " + " | ".join(
                f"{mae(est_all, tr_all, [k]):.1f}" for k in fg) + f" | {mae(est_all, tr_all, fg):.1f} |")
    lines += ["", "## Other confidence scores (ours; MAE small / large over all test sets)", "",
              "| method | " + " | ".join(pe.CONFIDENCE_SCORES) + " |", "|---|" + "---|" * len(pe.CONFIDENCE_SCORES)]
    for m, cs in methods:
        cells = []
        for conf in pe.CONFIDENCE_SCORES:
            r = results[("ours", conf, m, cs)]
            est_all = [e for key in tests for e in r["estimates"][key]]
            tr_all = [t for key in tests for t in truths[key]]
            cells.append(f"{mae(est_all, tr_all, small):.1f} / {mae(est_all, tr_all, large):.1f}")
        lines.append(f"| {m}{' CS' if cs else ''} | " + " | ".join(cells) + " |")
    lines += ["", "## Wall time (same machine, same run)", "",
              "Fit = from the validation logits to fitted parameters, for one method; ours includes reducing the cases to "
              "statistics (every temperature for TS and TS-ATC, T = 1 only for the others).",
              "",
              "| method | ours: fit (s) | MOVAL: fit (s) | fit speed-up | ours: estimate (s/case) | MOVAL: estimate (s/case) |",
              "|---|---|---|---|---|---|"]
    speedups = []
    for m, cs in methods:
        o, v = results[("ours", "mcp", m, cs)], results.get(("moval", "mcp", m, cs))
        total = o["fit_s"]
        sp = (v["fit_s"] / total) if v else float("nan")
        speedups.append(sp)
        lines.append(f"| {m}{' CS' if cs else ''} | {o['fit_s']:.2f} | {v['fit_s']:.1f} | {sp:.1f}x | "
                     f"{o['estimate_s']:.2f} | {v['estimate_s']:.2f} |" if v else
                     f"| {m}{' CS' if cs else ''} | {o['fit_s']:.2f} | - | - | {o['estimate_s']:.2f} | - |")
    if results.get(("moval", "mcp", "ts", False)):
        ours_all = sum(results[("ours", "mcp", m, cs)]["fit_s"] for m, cs in methods)
        moval_all = sum(results[("moval", "mcp", m, cs)]["fit_s"] for m, cs in methods)
        lines += ["", f"All nine variants: ours {ours_all:.1f} s, MOVAL {moval_all:.0f} s ({moval_all / ours_all:.0f}x); "
                  "ours could share one statistics pass between them (not counted that way here)."]
    # goals
    cs_better = []
    for m in METHODS[1:]:
        g, c = results[("ours", "mcp", m, False)], results[("ours", "mcp", m, True)]
        est_g = [e for key in tests for e in g["estimates"][key]]
        est_c = [e for key in tests for e in c["estimates"][key]]
        tr_all = [t for key in tests for t in truths[key]]
        cs_better.append((m, mae(est_g, tr_all, small), mae(est_c, tr_all, small)))
    lines += ["", "## Goals from the issue", ""]
    if not args.no_moval:
        lines.append(f"* Error no worse than MOVAL's for the same method on every shift: ours <= MOVAL in "
                     f"{wins['small'][0]}/{wins['small'][1]} (method, test set) pairs for the small classes and "
                     f"{wins['large'][0]}/{wins['large'][1]} for the large ones (see the MAE table for the exceptions).")
        finite = [s for s in speedups if np.isfinite(s)]
        lines.append(f"* At least 20 times faster fitting: speed-up per method {min(finite):.1f}x to {max(finite):.0f}x; "
                     + ", ".join(f"{m}{' CS' if cs else ''} {sp:.0f}x" for (m, cs), sp in zip(methods, speedups)
                                 if np.isfinite(sp) and sp < 20) + " fall short (see below).")
    lines.append("* CS variants beating their global counterparts on the small classes (MAE over all test sets, global -> CS): "
                 + "; ".join(f"{m} {a:.1f} -> {b:.1f}" for m, a, b in cs_better) + ".")
    lines += ["", "## Where our definitions knowingly differ from MOVAL's code, and why", "",
              (ROOT / "Testing" / "Benchmarks" / "performance_estimation_differences.md").read_text().strip(), ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    (work / "results.json").write_text(json.dumps({"|".join(map(str, k)): {
        "fit_s": v["fit_s"], "reduce_s": v["reduce_s"], "estimate_s": v["estimate_s"]} for k, v in results.items()}, indent=1))
    log(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
