#!/usr/bin/env python
"""Semi-supervised training for rare classes (issue #7): supervised-only vs plain CPS vs CPS
with DisW/CDifW-weighted networks vs the full Double-Mix framework.

Cohort: the training benchmark's (``brain_cohort.py``: Colin27 + AAL at 3 mm, nine
foreground classes, three under 0.1 % of the voxels; subjects are synthetic variants of that
one anatomy).  ``--pool`` training cases (default 20); 10 % and 20 % of them are labelled
(2 and 4 cases), the rest are used without their labels.  Same validation and test cases,
network, patch size, iterations and learning rate as ``imbalance_training.py``, so the
supervised-only runs on 2 labelled cases are exactly that benchmark's ``dice_ce`` runs on 2
cases (their cached results are reused when present).

Usage::

    python Testing/Benchmarks/semi_supervised.py [--seeds 3] [--jobs 2] [--report-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(HERE))

import brain_cohort  # noqa: E402
import imbalance_training as it  # noqa: E402
from benchmark_common import machine  # noqa: E402

METHODS = ["dice_ce", "cps", "cps_weighted", "double_mix"]
LABEL = {"dice_ce": "supervised only (Dice + CE)", "cps": "CPS", "cps_weighted": "CPS + DisW/CDifW",
         "double_mix": "Double-Mix (CPS + DisW/CDifW + mixing)"}


def job_dir(work: Path, method: str, n_lab: int, n_unl: int, seed: int, iterations: int, lr: float) -> Path:
    tag = it.settings_tag(it.method_settings(method))  # a run made under another preset is not reused
    if method == "dice_ce":  # identical to the training benchmark's run: share its folder and cache
        return work / "runs" / f"dice_ce_{tag}_n{n_lab}_s{seed}_it{iterations}_lr{lr:g}"
    return work / "semi_runs" / f"{method}_{tag}_n{n_lab}_u{n_unl}_s{seed}_it{iterations}_lr{lr:g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "work-tmp" / "imbalance_training"),
                    help="shared with imbalance_training.py (cohort and cached runs)")
    ap.add_argument("--pool", type=int, default=20, help="training cases, labelled + unlabelled")
    ap.add_argument("--fractions", default="0.1,0.2", help="labelled fractions of the pool")
    ap.add_argument("--iterations", type=int, default=600)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--report-only", action="store_true", help="report the runs finished so far")
    ap.add_argument("--out", default=str(HERE / "reports" / "semi_supervised.md"))
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    why = brain_cohort.missing()
    if why:
        print(why, flush=True)
        return 0
    work = Path(args.work)
    methods = args.methods.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    sizes = [max(1, int(round(f * args.pool))) for f in fractions]
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    files = brain_cohort.build(work / "cohort", args.pool, 3, 6)
    files = {k: [[str(a), str(b)] for a, b in v] for k, v in files.items()}
    it.log(f"cohort ready in {time.perf_counter() - t0:.0f} s: pool of {len(files['train'])} training cases")
    jobs = []
    for s in seeds:  # seed-major: a partial run is balanced across methods
        for n in sizes:
            for m in methods:
                n_unl = 0 if m == "dice_ce" else args.pool - n
                jobs.append({"method": m, "size": n, "seed": s, "iterations": args.iterations, "lr": args.lr,
                             "files": files, "n_unlabeled": n_unl, "need_asd": True,
                             "settings": it.method_settings(m),
                             "dir": str(job_dir(work, m, n, args.pool - n, s, args.iterations, args.lr))})
    results: List[Dict] = []
    if args.report_only:
        for j in jobs:
            p = Path(j["dir"]) / "result.json"
            if p.exists():
                results.append(json.loads(p.read_text()))
        it.log(f"report from {len(results)}/{len(jobs)} finished runs")
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(it.run_job, j): j for j in jobs}
            for fut in as_completed(futures):
                j, r = futures[fut], fut.result()
                results.append(r)
                small = it.group_values([r], it.SMALL, "dice")
                it.log(f"done {len(results)}/{len(jobs)}: {j['method']:<13} labelled={j['size']:<2} seed={j['seed']}  "
                       f"{r['wall_time_s']:.0f} s  small-class Dice {small[0] if small else float('nan'):.3f}")
    write_report(args, command, results, methods, sizes, seeds, files)
    return 0


def write_report(args, command, results, methods, sizes, seeds, files) -> None:
    names = [c["name"] for c in brain_cohort.class_table()]
    planned = len(methods) * len(sizes) * len(seeds)
    lines = [
        "# Semi-supervised training for rare classes: CPS, DisW/CDifW, Double-Mix",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine(f'{args.jobs} training processes with 1 thread each')}  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Runs in this report: {len(results)} of {planned} planned ({len(methods)} methods x {len(sizes)} labelled "
        f"fractions x {len(seeds)} seeds)" + ("" if len(results) == planned else
                                               " - PARTIAL: the seeds finished are counted per row; rerun the "
                                               "command to complete it (finished runs are cached)") + ".",
        "",
        "## Set-up",
        "",
        f"Cohort: `brain_cohort.py` (Colin27 T1 + AAL at 3 mm, {len(names) - 1} foreground classes; Pallidum, "
        "Amygdala and Heschl gyrus under 0.1 % of the voxels). The subjects are synthetic variants of one real "
        "anatomy (smooth elastic + affine deformation, bias field, gamma, Rician noise, lower resolution along one "
        "axis in some), not different people. "
        f"Pool of {args.pool} training cases; labelled: {', '.join(f'{n} ({100 * n / args.pool:.0f} %)' for n in sizes)}; "
        f"the rest of the pool is given without labels. Validation {len(files['val'])} and test "
        f"{len(files['test'])} cases, the same for every run.",
        "",
        f"Every run: UNet3D [8, 16, 32, 64], patches 32³, {args.iterations} iterations, AdamW lr {args.lr:g} with "
        "polynomial decay, 2 labelled patches per iteration (two thirds centred on a class drawn uniformly among "
        "those present), Dice + CE. Semi-supervised runs add 2 unlabelled patches per iteration and train two "
        "networks; the model is the mean of their logits. CPS weight 0.1 ramped up (sigmoid) over the first 40 % "
        "of the iterations; Double-Mix mixes from 10 % of the iterations with weight 0.5 and EMA teachers (decay "
        "0.99). `CPS + DisW/CDifW` weights network A by CDifW and network B by DisW (DHC's rule, background "
        "weight 0). Short runs on 2 CPU cores: they show early-training behaviour, not converged accuracy.",
        "",
        "ASD here is the average *symmetric* surface distance (ASSD, mm) from `imbalanceseglib.evaluation`; a class "
        "missed entirely gets the evaluation's penalty distance (the image diagonal), so it weighs heavily in "
        "the means.",
        "",
    ]
    for n in sizes:
        lines += [f"## {n} labelled cases ({100 * n / args.pool:.0f} %): test-set metrics, mean ± SD over seeds", "",
                  "| method | seeds | small Dice | small sensitivity | small precision | small ASD mm | medium Dice | "
                  "large Dice | all-class Dice | all-class ASD mm | s / iteration (fastest seed) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in methods:
            rs = [r for r in results if r["method"] == m and r["size"] == n]
            if not rs:
                continue
            fg = names[1:]
            lines.append(
                f"| {LABEL.get(m, m)} | {len(rs)} | {it._mean_std(it.group_values(rs, it.SMALL, 'dice'))} | "
                f"{it._mean_std(it.group_values(rs, it.SMALL, 'sensitivity'))} | "
                f"{it._mean_std(it.group_values(rs, it.SMALL, 'precision'))} | "
                f"{it._mean_std(it.group_values(rs, it.SMALL, 'asd'))} | "
                f"{it._mean_std(it.group_values(rs, it.MEDIUM, 'dice'))} | "
                f"{it._mean_std(it.group_values(rs, it.LARGE, 'dice'))} | "
                f"{it._mean_std(it.group_values(rs, fg, 'dice'))} | {it._mean_std(it.group_values(rs, fg, 'asd'))} | "
                f"{min(r['seconds_per_iteration'] for r in rs):.3f} |")
        lines += ["", f"Per-class test Dice / ASD (mm), {n} labelled cases (mean over seeds and test cases):", "",
                  "| method | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * (len(names) - 1)]
        for m in methods:
            rs = [r for r in results if r["method"] == m and r["size"] == n]
            if rs:
                cells = []
                for c in names[1:]:
                    d, a = it.group_values(rs, [c], "dice"), it.group_values(rs, [c], "asd")
                    cells.append(f"{np.mean(d):.3f} / {np.mean(a):.1f}" if d and a else "-")
                lines.append(f"| {LABEL.get(m, m)} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Against supervised-only (points of Dice, from the tables above)", ""]
    for n in sizes:
        base = [r for r in results if r["method"] == "dice_ce" and r["size"] == n]
        if not base:
            continue
        b_small = np.mean(it.group_values(base, it.SMALL, "dice"))
        b_all = np.mean(it.group_values(base, names[1:], "dice"))
        parts = []
        for m in methods[1:]:
            rs = [r for r in results if r["method"] == m and r["size"] == n]
            if rs:
                parts.append(f"{LABEL.get(m, m)}: small {100 * (np.mean(it.group_values(rs, it.SMALL, 'dice')) - b_small):+.1f}, "
                             f"all classes {100 * (np.mean(it.group_values(rs, names[1:], 'dice')) - b_all):+.1f}")
        lines.append(f"* {n} labelled cases (supervised-only: small {100 * b_small:.1f}, all {100 * b_all:.1f}): "
                     + "; ".join(parts))
    lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    it.log(f"report written to {out}")


if __name__ == "__main__":
    sys.exit(main())
