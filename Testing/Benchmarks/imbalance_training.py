#!/usr/bin/env python
"""What each imbalance-aware training method does to small and large classes (issue #3).

Cohort (``brain_cohort.py``): nine foreground classes from Colin27 + AAL at 3 mm, three of
them under 0.1 % of the voxels (pallidum, amygdala, Heschl gyrus); the "subjects" are
synthetic variants of that one real anatomy (smooth elastic + affine deformation, bias
field, gamma/contrast, Rician noise, sometimes lower resolution), made by
``imbalanceseglib.synth``.  Every method is trained with ``imbalanceseglib.training.train``
at two training-set sizes and several seeds, on the same validation and test cases, and
evaluated on the test cases with ``imbalanceseglib.evaluation`` (Dice, sensitivity,
precision, HD95).  Jobs run in parallel processes (one thread each) and are cached, so an
interrupted benchmark resumes where it stopped.

Usage::

    python Testing/Benchmarks/imbalance_training.py [--work DIR] [--iterations N] [--seeds 3]
        [--sizes 2,12] [--jobs 2] [--methods ce,dice_ce,...] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import brain_cohort  # noqa: E402
from benchmark_common import machine  # noqa: E402

METHODS = ["ce", "dice_ce", "asym_focal", "asym_large_margin", "asym_mixup", "asym_adversarial", "asym_combined",
           "disw", "disw_floor", "difw", "cdifw"]
SMALL = ["Pallidum", "Amygdala", "Heschl gyrus"]          # < 0.1 % of the voxels
MEDIUM = ["Thalamus", "Caudate", "Putamen", "Hippocampus"]  # 0.2 - 0.3 %
LARGE = ["Cerebral cortex", "Cerebellum"]                   # > 1 %


def method_settings(method: str) -> Dict[str, Any]:
    """The library preset a method name stands for now (recorded with each run, and part of its folder
    name, so a run cached under an older preset of the same name is not reused)."""
    from imbalanceseglib.presets import METHOD_PRESETS
    return METHOD_PRESETS[method]


def settings_tag(settings: Dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _load(pair):
    import SimpleITK as sitk
    return sitk.ReadImage(str(pair[0])), sitk.ReadImage(str(pair[1]))


def run_job(job: Dict[str, Any]) -> Dict[str, Any]:
    """Train one (method, size, seed) and evaluate it on the test cases (in a worker process)."""
    import torch
    torch.set_num_threads(1)
    from imbalanceseglib.evaluation import evaluate_labels
    from imbalanceseglib.inference import sliding_window_logits
    from imbalanceseglib.training import TrainConfig, prepare_case, prepare_unlabeled_case, train

    out_dir = Path(job["dir"])
    result_path = out_dir / "result.json"
    stale = False
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if not job.get("need_asd") or "asd" in result["test"][0][next(iter(result["test"][0]))]:
            return result
        stale = True  # cached before ASD was recorded: re-evaluate its bundle below (no retraining)
    classes = brain_cohort.class_table()
    cfg = dict(name=f"{job['method']}_n{job['size']}_s{job['seed']}", classes=classes,
               target_spacing=[3.0, 3.0, 3.0], patch_size=[32, 32, 32], features=[8, 16, 32, 64],
               normalization={"scheme": "percentile_zscore", "lower_percentile": 0.5, "upper_percentile": 99.5},
               iterations=job["iterations"], batch_size=2, learning_rate=job["lr"], seed=job["seed"],
               val_every=10 ** 9, checkpoint_every=max(50, job["iterations"] // 4), log_every=10 ** 9,
               num_threads=1, method=job["method"])
    config = TrainConfig.from_dict(cfg)
    files = job["files"]
    train_cases = [prepare_case(*_load(p), config, f"train{i}") for i, p in enumerate(files["train"][:job["size"]])]
    val_cases = [prepare_case(*_load(p), config, f"val{i}") for i, p in enumerate(files["val"])]
    test_cases = [prepare_case(*_load(p), config, f"test{i}") for i, p in enumerate(files["test"])]
    # semi-supervised jobs: the training cases after the labelled ones, labels dropped
    n_unl = int(job.get("n_unlabeled", 0))
    unlabeled = [prepare_unlabeled_case(_load(p)[0], config, f"unl{i}")
                 for i, p in enumerate(files["train"][job["size"]:job["size"] + n_unl])] or None
    t0 = time.perf_counter()
    if stale:
        bundle_path = out_dir / f"{config.name}.imbseg"
    else:
        bundle_path = train(config, train_cases, val_cases, out_dir, resume=True, log=lambda s: None,
                            unlabeled_cases=unlabeled)
    train_s = result["train_s"] if stale else time.perf_counter() - t0
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(bundle_path)
    names = [c["name"] for c in classes]
    per_case = []
    for case in test_cases:
        logits = sliding_window_logits(bundle.network, case.image, config.patch_size, overlap=0.5)
        pred = logits[0].argmax(0).numpy().astype(np.uint8)
        res = evaluate_labels(pred, case.labels, (3.0, 3.0, 3.0), labels=list(range(1, len(names))),
                              class_names=names, metrics=("overlap", "distance"))
        per_case.append({r.name: {"dice": r.dice, "sensitivity": r.sensitivity, "precision": r.precision,
                                  "hd95": r.hd95_mm, "asd": r.assd_mm} for r in res.classes})
    card = bundle.card
    result = {"method": job["method"], "size": job["size"], "seed": job["seed"], "n_unlabeled": n_unl,
              "settings": job.get("settings"), "train_s": train_s,
              "wall_time_s": card["training"]["wall_time_s"],
              "seconds_per_iteration": card["training"]["seconds_per_iteration"],
              "rare_classes": card["training"]["rare_classes"], "test": per_case,
              "validation": card["validation"]["per_class"]}
    tmp = result_path.with_name("result.json.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
    (out_dir / "checkpoint.pt").unlink(missing_ok=True)
    return result


def _mean_std(vals: List[float]) -> str:
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not vals:
        return "-"
    return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"


def group_values(results: List[Dict], names: List[str], metric: str) -> List[float]:
    """Per-seed means over the test cases and the classes in ``names`` (for mean ± spread over seeds)."""
    out = []
    for r in results:
        vals = [c[n].get(metric) for c in r["test"] for n in names if c[n].get(metric) is not None]
        if vals:
            out.append(float(np.mean(vals)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "work-tmp" / "imbalance_training"),
                    help="cohort, per-run folders and cached results (an interrupted run resumes from here)")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--report-only", action="store_true",
                    help="write the report from the runs finished so far (marks missing seeds)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--sizes", default="2,12", help="training-set sizes (cases)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-val", type=int, default=3)
    ap.add_argument("--n-test", type=int, default=6)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 methods, 1 seed, 20 iterations")
    ap.add_argument("--out", default=str(ROOT / "Testing" / "Benchmarks" / "reports" / "imbalance_training.md"))
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    why = brain_cohort.missing()
    if why:
        print(why, flush=True)
        return 0
    methods = args.methods.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    seeds = list(range(args.seeds))
    iterations = args.iterations
    if args.quick:
        methods, seeds, iterations = methods[:2], [0], 20
    work = Path(args.work)
    t0 = time.perf_counter()
    files = brain_cohort.build(work / "cohort", max(sizes), args.n_val, args.n_test)
    files = {k: [[str(a), str(b)] for a, b in v] for k, v in files.items()}
    log(f"cohort ready in {time.perf_counter() - t0:.0f} s: {len(files['train'])} training, "
        f"{len(files['val'])} validation, {len(files['test'])} test cases")
    # seed-major order: every method and size gets seed 0 first, so a partial run is balanced
    settings = {m: method_settings(m) for m in methods}
    jobs = [{"method": m, "size": n, "seed": s, "iterations": iterations, "lr": args.lr, "files": files,
             "settings": settings[m],
             "dir": str(work / "runs" / f"{m}_{settings_tag(settings[m])}_n{n}_s{s}_it{iterations}_lr{args.lr:g}")}
            for s in seeds for n in sizes for m in methods]
    results: List[Dict] = []
    if args.report_only:
        for j in jobs:
            p = Path(j["dir"]) / "result.json"
            if p.exists():
                results.append(json.loads(p.read_text()))
        log(f"report from {len(results)}/{len(jobs)} finished runs")
        jobs = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_job, j): j for j in jobs}
        for fut in as_completed(futures):
            j = futures[fut]
            r = fut.result()
            results.append(r)
            small = group_values([r], SMALL, "dice")
            log(f"done {len(results)}/{len(jobs)}: {j['method']:<18} n={j['size']:<3} seed={j['seed']}  "
                f"{r['wall_time_s']:.0f} s  small-class Dice {small[0] if small else float('nan'):.3f}")

    import SimpleITK as sitk
    lab0 = sitk.GetArrayFromImage(sitk.ReadImage(files["train"][0][1]))
    _, src_lab, _ = brain_cohort.source_subject()
    fr = brain_cohort.fractions(src_lab)
    names = [c["name"] for c in brain_cohort.class_table()]
    lines = [
        "# Imbalance-aware training: what each method does to small and large classes",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(f'{args.jobs} training processes with 1 thread each')}  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Runs in this report: {len(results)} of {len(sizes) * len(seeds) * len(methods)} planned "
        f"({len(methods)} methods x {len(sizes)} sizes x {len(seeds)} seeds)"
        + ("" if len(results) == len(sizes) * len(seeds) * len(methods) else
           " - PARTIAL: the seeds actually finished are listed per row (n seeds); rerun the command to complete it")
        + f". Mean training time per run: {np.mean([r['train_s'] for r in results]) / 60 if results else 0:.1f} min.",
        "",
        "## Cohort",
        "",
        "One real anatomy (Colin27 T1 with the AAL atlas, Debian `mricron-data`) at 3 mm "
        f"({'x'.join(map(str, lab0.shape))} voxels); the subjects are synthetic variants of it "
        "(`imbalanceseglib.synth.make_variant`, preset `train`: smooth elastic + affine deformation, bias field, "
        "gamma/contrast, Rician noise, lower resolution along one axis in 30 % of the cases). This is not a "
        "multi-subject data set: it tests how methods treat small classes under realistic shape and intensity "
        "variation, not anatomical variability between people.",
        "",
        "| class | voxel fraction (source subject) | group |",
        "|---|---|---|",
    ]
    for k, n in enumerate(names[1:], start=1):
        grp = "small (< 0.1 %)" if n in SMALL else "medium" if n in MEDIUM else "large"
        lines.append(f"| {n} | {100 * fr[k]:.3f} % | {grp} |")
    lines += ["",
              f"Training: UNet3D features [8, 16, 32, 64], patches 32³ (96 mm), batch 2, {iterations} iterations, "
              f"AdamW lr {args.lr:g} with polynomial decay, two thirds of the patches centred on a class drawn uniformly "
              f"among those present (the library's default rare-class-aware sampling). Training-set sizes: "
              f"{', '.join(map(str, sizes))} cases; seeds {', '.join(map(str, seeds))}; the same "
              f"{len(files['val'])} validation and {len(files['test'])} test cases for every run. Rare mask: every "
              "foreground class under 1 % of the training voxels (the default). These are short runs (a few minutes "
              "each on 2 cores), far from the converged training of the TMI 2020 paper, so the numbers show what each "
              "method does early in training on small data, not its final accuracy. `disw` is DHC's rule as "
              "published (the most frequent class, here the background, gets weight 0); `disw_floor` is the same "
              "with every weight at least 1 (`class_weighting.min_weight`), added after `disw` over-segmented the "
              "large classes.",
              "",
              "Method settings (the library preset each name stood for when its runs were made):",
              "",
              "| method | settings |",
              "|---|---|"]
    for m in methods:
        made = {json.dumps(r["settings"], sort_keys=True) if r.get("settings") is not None else "not recorded"
                for r in results if r["method"] == m}
        lines.append(f"| {m} | " + "; ".join(f"`{x}`" if x != "not recorded" else x for x in sorted(made)) + " |")
    lines.append("")
    for size in sizes:
        lines += [f"## {size} training cases: test-set metrics (mean ± standard deviation over seeds)", "",
                  "| method | seeds | small Dice | small sensitivity | small precision | small HD95 mm | medium Dice | "
                  "large Dice | large precision | large HD95 mm | s / iteration (fastest seed) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [r for r in results if r["method"] == m and r["size"] == size]
            if not rs:
                continue
            spi = min(r["seconds_per_iteration"] for r in rs)  # fastest seed: least disturbed by other load
            lines.append(f"| {m} | {len(rs)} | {_mean_std(group_values(rs, SMALL, 'dice'))} | "
                         f"{_mean_std(group_values(rs, SMALL, 'sensitivity'))} | "
                         f"{_mean_std(group_values(rs, SMALL, 'precision'))} | "
                         f"{_mean_std(group_values(rs, SMALL, 'hd95'))} | "
                         f"{_mean_std(group_values(rs, MEDIUM, 'dice'))} | "
                         f"{_mean_std(group_values(rs, LARGE, 'dice'))} | "
                         f"{_mean_std(group_values(rs, LARGE, 'precision'))} | "
                         f"{_mean_std(group_values(rs, LARGE, 'hd95'))} | {spi:.3f} |")
        lines += ["", f"Per-class test Dice, {size} training cases (mean over seeds and test cases):", "",
                  "| method | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * (len(names) - 1)]
        for m in methods:
            rs = [r for r in results if r["method"] == m and r["size"] == size]
            if rs:
                lines.append(f"| {m} | " + " | ".join(_mean_std(group_values(rs, [n], "dice")).split(" ±")[0]
                                                      for n in names[1:]) + " |")
        lines.append("")
    plot = Path(args.out).with_suffix(".png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            for i, m in enumerate(methods):
                rs = [r for r in results if r["method"] == m and r["size"] == size]
                s_v, l_v = group_values(rs, SMALL, "dice"), group_values(rs, LARGE, "dice")
                if s_v and l_v:
                    ax.errorbar(np.mean(l_v), np.mean(s_v), xerr=np.std(l_v), yerr=np.std(s_v), fmt="o", label=m,
                                color=plt.cm.tab10(i % 10))
            ax.set_xlabel("large-class Dice")
            ax.set_ylabel("small-class Dice (< 0.1 % of voxels)")
            ax.set_title(f"{size} training cases")
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        tmp_png = plot.with_name(plot.stem + ".tmp.png")
        fig.savefig(tmp_png, dpi=110)
        os.replace(tmp_png, plot)
        lines += [f"![small vs large class Dice]({plot.name})", ""]
    except ImportError:
        lines += ["(matplotlib not installed: no plot)", ""]
    lines += ["## Against vanilla cross-entropy (computed from the tables above)", ""]
    for size in sizes:
        base = [r for r in results if r["method"] == "ce" and r["size"] == size]
        if not base:
            continue
        b = {k: np.mean(group_values(base, SMALL, k) or [np.nan]) for k in ("dice", "sensitivity", "precision")}
        bl = np.mean(group_values(base, LARGE, "dice") or [np.nan])
        def pts(v, sign=False):
            if not np.isfinite(v):
                return "n/a" if sign else "n/a (no predicted voxels)"
            return f"{100 * v:+.1f}" if sign else f"{100 * v:.1f}"
        lines.append(f"* {size} training cases, vanilla CE: small-class Dice {pts(b['dice'])} / sensitivity "
                     f"{pts(b['sensitivity'])} / precision {pts(b['precision'])}, large-class Dice "
                     f"{pts(bl)}. Changes (points):")
        for m in methods:
            if m == "ce":
                continue
            rs = [r for r in results if r["method"] == m and r["size"] == size]
            if not rs:
                continue
            d = {k: np.mean(group_values(rs, SMALL, k) or [np.nan]) - b[k] for k in b}
            dl = np.mean(group_values(rs, LARGE, "dice") or [np.nan]) - bl
            lines.append(f"  * {m}: small Dice {pts(d['dice'], True)}, sensitivity {pts(d['sensitivity'], True)}, "
                         f"precision {pts(d['precision'], True)}; large Dice {pts(dl, True)}")
    lines.append("")
    out = Path(args.out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    (work / "results.json").write_text(json.dumps(results))
    log(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
