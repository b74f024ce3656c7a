#!/usr/bin/env python
"""Context label learning (CoLab) on real patients, with and without (issue #23 item 1).

CoLab (Li, Kamnitsas, Ouyang, Chen & Glocker, IEEE TMI 2023; in the library as
:mod:`imbalanceseglib.context_labels`, ``TrainConfig.context_labels``) trains a task generator
with the segmentation network that splits the background near the foreground into context
classes. The paper's claim: a heterogeneous background's logits drift across the decision
boundary on unseen data, which over-segments the small foreground; context classes keep them
away, so precision (and Dice) of the small structure should rise. The issue asks whether it lifts
the rare class (ACDC right ventricle, CHAOS kidneys) and what it costs in time.

Design: the pipeline, data, splits, seeds, validation subsets, evaluation and run folders of
``deep_supervision.py`` (its module docstring; ``real_imbalance.py``'s settings: UNet3D [8, 16, 32,
64], batch 2, AdamW 3e-3, 1500 iterations, Dice + CE), whose "plain" runs are this benchmark's
baseline: the same run ids and results, so they are trained once for both. The "colab" arm differs
only in ``"context_labels": {"enabled": true}`` (the library's defaults, the authors' settings: one
context class, generator = a U-Net of the same width, meta step every 5 iterations, context labels
within 60 mm of the patch's foreground fading over 40 mm). The generator is built after the
network, so the initial network, the patients and the patch sampling are those of the plain run of
the same seed. Time per iteration: each run's own training CPU seconds per iteration (one thread;
the runs go two side by side) and the interleaved measurement of ``context_labels_cost.py``.

    python Testing/Benchmarks/context_labels.py [--datasets acdc,chaos] [--max-hours H] [--report-only] [--quick]

Runs resume (results in ``Testing/Benchmarks/reports/deep_supervision_results/``, committed; the
file ``work-tmp/deep_supervision/STOP`` stops cleanly between pairs). Writes
``Testing/Benchmarks/reports/context_labels.md`` and ``context_labels.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import deep_supervision as dsb  # noqa: E402  (its runs, pipeline and helpers; nothing runs on import)
import real_data as rd  # noqa: E402
from benchmark_common import machine, write_report_atomic  # noqa: E402

REPORT = HERE / "reports" / "context_labels.md"
PLOT = HERE / "reports" / "context_labels.png"
COST_REPORT = HERE / "reports" / "context_labels_cost.md"
LOSS = "dice_ce"
ARMS = ("plain", "colab")
ARM_LABELS = {"plain": "without CoLab", "colab": "with CoLab"}
METRICS = ("dice", "sensitivity", "precision", "hd95")


def plan_runs(datasets: Sequence[str], seeds: Sequence[int], iterations: Dict[str, int],
              evals: int = dsb.EVALS) -> List[Dict[str, Any]]:
    """ACDC first, every seed of a data set before the next; per seed the colab run, then the
    plain one (usually done already by ``deep_supervision.py``)."""
    out = []
    for ds in sorted(datasets, key=lambda d: (d != "acdc", d)):
        for s in seeds:
            for arm in ("colab", "plain"):
                out.append(dsb.make_run(ds, LOSS, arm, s, iterations[ds], evals))
    return out


def paired(results: Dict[str, Dict[str, Any]], ds: str) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    by: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for r in results.values():
        if r["dataset"] == ds and r["loss"] == LOSS and r["arm"] in ARMS:
            by.setdefault(r["seed"], {})[r["arm"]] = r
    return [(v["plain"], v["colab"]) for _, v in sorted(by.items()) if len(v) == 2]


def arm_runs(results, ds: str, arm: str) -> List[Dict[str, Any]]:
    return sorted([r for r in results.values() if r["dataset"] == ds and r["loss"] == LOSS and r["arm"] == arm],
                  key=lambda r: r["seed"])


def diffs(pp, split: str, cls: str, metric: str) -> List[float]:
    out = []
    for p, q in pp:
        a, b = dsb._cm(p[split], cls, metric), dsb._cm(q[split], cls, metric)
        if a is not None and b is not None:
            out.append(b - a)
    return out


def stats(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    s = f"{np.mean(v):+.{digits}f}" + (f" ± {np.std(v, ddof=1):.{digits}f}" if len(v) > 1 else "")
    return s + f" (CoLab higher in {sum(x > 0 for x in v)} of {len(v)})"


def cost_line() -> str:
    if not COST_REPORT.is_file():
        return "the interleaved measurement (`python Testing/Benchmarks/context_labels_cost.py`) has not been run"
    ratio = [ln for ln in COST_REPORT.read_text().splitlines() if ln.startswith("Ratio with / without")]
    return ("interleaved measurement of `context_labels_cost.py` (reports/context_labels_cost.md): "
            + (ratio[0].rstrip(".") if ratio else "see that report"))


def findings(results, datasets) -> List[str]:
    """The findings lines; ``results`` may hold deep_supervision.py's runs too (the "ds" arm)."""
    out = []
    for ds in datasets:
        spec = rd.DATASETS[ds]
        pp = paired(results, ds)
        if not pp:
            continue
        tag = f"{ds.upper()} ({len(pp)} seed(s))"
        for cls in spec.rare:
            tr = [dsb._cm(p["train"], cls, "dice") for p, _ in pp]
            fit = "learned it on its training volumes" if np.mean(tr) >= 0.8 else \
                "did NOT learn it well on its training volumes"
            te = [(dsb._cm(p["test"], cls, "dice"), dsb._cm(q["test"], cls, "dice")) for p, q in pp]
            out.append(f"* {tag}, {cls}: the run without CoLab {fit} (training Dice {dsb._ms(tr)}). Test Dice "
                       f"{dsb._ms([a for a, _ in te])} without, {dsb._ms([b for _, b in te])} with; paired "
                       f"difference {stats(diffs(pp, 'test', cls, 'dice'))}; sensitivity "
                       f"{stats(diffs(pp, 'test', cls, 'sensitivity'))}; precision "
                       f"{stats(diffs(pp, 'test', cls, 'precision'))}; HD95 ({'nominal ' if ds == 'acdc' else ''}mm) "
                       f"{stats(diffs(pp, 'test', cls, 'hd95'), 1)}; training Dice "
                       f"{stats(diffs(pp, 'train', cls, 'dice'))}.")
            d = diffs(pp, "test", cls, "dice")
            if len(d) > 2:
                out.append(f"  Median paired test Dice difference {np.median(d):+.3f}.")
            lost = [(p["seed"], dsb._cm(p["train"], cls, "dice"), dsb._cm(q["train"], cls, "dice")) for p, q in pp
                    if (dsb._cm(p["train"], cls, "dice") or 0) >= 0.8 and (dsb._cm(q["train"], cls, "dice") or 0) < 0.5]
            for seed, a, b in lost:
                first = next((pt["iteration"] for p, _ in pp if p["seed"] == seed for pt in p["curve"]
                              if (pt["dice"].get(cls) or 0) >= 0.2), None)
                other = next((r for r in results.values() if r["dataset"] == ds and r["loss"] == LOSS
                              and r["arm"] == "ds" and r["seed"] == seed), None)
                out.append(f"  **Seed {seed}: with CoLab the run did not learn {cls} even on its own training volumes** "
                           f"(training Dice {b:.3f}, against {a:.3f} without, whose validation Dice first reached "
                           f"0.2 at iteration {first}"
                           + (f"; the run with deep supervision of this seed: training Dice "
                              f"{dsb._cm(other['train'], cls, 'dice'):.3f}" if other else "") + ").")
        others = [c for c in pp[0][0]["classes"][1:] if c not in spec.rare]
        if others:
            out.append(f"* {tag}, other classes, test Dice with minus without: "
                       + "; ".join(f"{c} {stats(diffs(pp, 'test', c, 'dice'))}" for c in others) + ".")
        ratio = [q["cpu_seconds_per_iteration"] / p["cpu_seconds_per_iteration"] for p, q in pp
                 if p.get("cpu_seconds_per_iteration") and q.get("cpu_seconds_per_iteration")]
        if ratio:
            out.append(f"* {tag}, time: training CPU seconds per iteration with / without CoLab, per seed, over "
                       f"the whole runs: {', '.join(f'{x:.2f}' for x in ratio)} (mean {np.mean(ratio):.2f}); "
                       + cost_line() + ". Inference is unchanged (the bundle's network merges the context output "
                       "into the background).")
    return out


def class_table(results, ds: str) -> List[str]:
    spec = rd.DATASETS[ds]
    g = {a: arm_runs(results, ds, a) for a in ARMS}
    if not any(g.values()):
        return []
    r0 = next(r for a in ARMS for r in g[a])
    per = "volume" if ds == "acdc" else "patient"
    lines = [f"Per class, mean ± SD over seeds of the per-{per} means; test set ({len(r0['test']['cases'])} "
             f"volumes) and the run's own training volumes; HD95 in {'nominal ' if ds == 'acdc' else ''}mm.", "",
             "| arm | seeds | class | test Dice | test sensitivity | test precision | test HD95 | training Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for cls in r0["classes"][1:]:
        for a in ARMS:
            if g[a]:
                lines.append(f"| {ARM_LABELS[a]} | {len(g[a])} | {cls}{' (rare)' if cls in spec.rare else ''} | "
                             + " | ".join(dsb._ms([dsb._cm(r["test"], cls, k) for r in g[a]], 1 if k == "hd95" else 3)
                                          for k in METRICS)
                             + f" | {dsb._ms([dsb._cm(r['train'], cls, 'dice') for r in g[a]])} |")
    lines.append("")
    pp = paired(results, ds)
    if pp:
        seeds = [p["seed"] for p, _ in pp]
        lines += ["Paired differences, with minus without CoLab (same seed: same patients, initial network and "
                  "patch sampling): test Dice per seed, then mean ± SD over seeds.", "",
                  "| class | " + " | ".join(f"Δ test Dice s{s}" for s in seeds)
                  + " | Δ test Dice | Δ sensitivity | Δ precision | Δ HD95 | Δ training Dice |",
                  "|---|" + "---|" * (len(seeds) + 5)]
        for cls in r0["classes"][1:]:
            d = diffs(pp, "test", cls, "dice")
            lines.append(f"| {cls}{' (rare)' if cls in spec.rare else ''} | " + " | ".join(f"{x:+.3f}" for x in d)
                         + " | " + " | ".join(stats(diffs(pp, s, cls, k), 1 if k == "hd95" else 3)
                                              for s, k in (("test", "dice"), ("test", "sensitivity"),
                                                           ("test", "precision"), ("test", "hd95"),
                                                           ("train", "dice"))) + " |")
        lines.append("")
        lines += ["Rare-class validation Dice during training (the library's validation on the fixed validation "
                  "subset): final and mean over the curve, per seed, without / with.", "",
                  "| seed | final without | final with | mean over curve without | with | CPU s/iteration without / "
                  "with |", "|---|---|---|---|---|---|"]
        for p, q in pp:
            fp, fq = dsb.rare_curve(p)[2], dsb.rare_curve(q)[2]
            lines.append(f"| {p['seed']} | {dsb.fmt(fp[-1] if len(fp) else None)} | "
                         f"{dsb.fmt(fq[-1] if len(fq) else None)} | {dsb.fmt(float(np.mean(fp)) if len(fp) else None)} "
                         f"| {dsb.fmt(float(np.mean(fq)) if len(fq) else None)} | "
                         f"{dsb.fmt(p.get('cpu_seconds_per_iteration'))} / {dsb.fmt(q.get('cpu_seconds_per_iteration'))} |")
        lines.append("")
    return lines


def plot(results, datasets, path: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [ds for ds in datasets if arm_runs(results, ds, "colab")]
    if not rows:
        return None
    fig, axes = plt.subplots(len(rows), 2, figsize=(8.5, 3.3 * len(rows)), squeeze=False)
    colours = {"plain": "#1f77b4", "colab": "#9467bd"}
    for i, ds in enumerate(rows):
        spec = rd.DATASETS[ds]
        ax = axes[i][0]
        for a in ARMS:
            rs = [r for r in arm_runs(results, ds, a) if r["curve"]]
            ys = []
            for r in rs:
                x, _, y = dsb.rare_curve(r)
                ax.plot(x, y, color=colours[a], lw=0.6, alpha=0.45)
                ys.append(y)
            if ys and len({len(y) for y in ys}) == 1:
                ax.plot(x, np.mean(ys, axis=0), color=colours[a], lw=2.0, label=f"{ARM_LABELS[a]} (n={len(rs)})")
        ax.set_ylim(0, 1)
        ax.set_title(f"{ds.upper()}: validation Dice, {' + '.join(spec.rare)}", fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3)
        ax = axes[i][1]
        pp = paired(results, ds)
        for k, m in enumerate(("dice", "sensitivity", "precision")):
            for cls_i, cls in enumerate(spec.rare):
                v = diffs(pp, "test", cls, m)
                xs = np.full(len(v), k + 0.15 * cls_i)
                ax.scatter(xs, v, s=18, color=["#d62728", "#2ca02c"][cls_i % 2],
                           label=cls if k == 0 else None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(3))
        ax.set_xticklabels(["Dice", "sensitivity", "precision"], fontsize=8)
        ax.set_title(f"{ds.upper()}: test, with minus without CoLab (per seed)", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results, runs, command: str, out: Path, plot_path: Optional[Path], datasets: Sequence[str],
                 info: Optional[Dict[str, Any]]) -> None:
    done = [r for r in runs if r["id"] in results]
    missing = [r for r in runs if r["id"] not in results]
    loads = [x for r in results.values() if r["arm"] == "colab" for x in r.get("loadavg_start_end", [])]
    lines = ["# Context label learning (CoLab) on real patients, with and without (ACDC, CHAOS)", "",
             f"Command: `{command}`" + (" (this report from the saved results)" if "--report-only" in command else "")
             + "  ",
             f"Machine: {machine()}; one torch thread per run, two runs side by side"
             + (f"; load average at CoLab run starts/ends {min(loads):.1f}-{max(loads):.1f}" if loads else "") + "  ",
             f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
             f"Runs done: **{len(done)} of {len(runs)}** (the runs without CoLab are `deep_supervision.py`'s).", ""]
    if missing:
        lines += ["Missing (rerun the command to continue; finished runs are skipped): "
                  + ", ".join(f"`{r['id']}`" for r in missing), ""]
    if info and info.get("failed"):
        lines += ["Failed in this session: " + ", ".join(f"`{k}`" for k in info["failed"]), ""]
    lines += ["## Set-up", "",
              "* Pipeline, data, patients per seed, validation subsets, test sets and evaluation: those of "
              "[deep_supervision.md](deep_supervision.md) (`real_imbalance.py`'s settings, 1500 iterations, Dice + CE; "
              "ACDC 3 training patients = 6 volumes, CHAOS MR T2 2 patients).",
              "* The only difference: `\"context_labels\": " + json.dumps(dsb.COLAB_SETTING) + "` with the library's "
              "defaults (the authors' settings; where the implementation differs from their code, and why: "
              "`imbalanceseglib.context_labels` module docstring). The segmentation network trains with one more "
              "output; the bundle merges it into the background, so evaluation sees the same classes.",
              "* Soft targets: the context labels are soft, and the Dice term uses the Dice semimetric overlap "
              "(`losses.per_class_dice_loss`), which is smallest where the prediction equals a soft target.", "",
              "## Findings (computed from the tables below)", "",
              "\"Learned\": mean training-set Dice of the run without CoLab at least 0.8. \"CoLab higher in k of n\": "
              "seeds where the run with CoLab has the larger value (for HD95 larger is worse).", ""]
    lines += findings(results, datasets) or ["* no paired results yet"]
    lines.append("")
    for ds in datasets:
        sec = class_table(results, ds)
        if sec:
            lines += [f"## {rd.DATASETS[ds].title}", ""] + sec
    if plot_path:
        lines += ["## Curves", "", f"![context_labels]({os.path.relpath(plot_path, out.parent)})", "",
                  "Left: rare-class validation Dice against iterations (thin: seeds, thick: mean). Right: test-set "
                  "differences per seed and rare class.", ""]
    lines += ["## Against the published effect", "",
              "Li et al. (IEEE TMI 2023) report that CoLab moves the background logits away from the decision "
              "boundary and so reduces the systematic over-segmentation of small targets, with significantly "
              "better segmentation accuracy over several tasks and data sets, with training sets of tens of "
              "patients and far longer training. Their figures are not reproduced here (different data, network and "
              "budget); what is compared is the direction, and precision is the metric their mechanism predicts "
              "to move.", "",
              "## Runs", "", "| run | status | training CPU s / wall s | CPU s/iteration | finished |",
              "|---|---|---|---|---|"]
    for r in runs:
        res = results.get(r["id"])
        lines.append(f"| `{r['id']}` | {'done' if res else 'missing'} | "
                     + (f"{dsb.fmt(res.get('train_cpu_s'), 0)} / {res['train_s']:.0f} | "
                        f"{dsb.fmt(res.get('cpu_seconds_per_iteration'), 3)} | {res['finished']} |" if res
                        else "- | - | - |"))
    lines.append("")
    write_report_atomic(out, lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one torch thread each)")
    ap.add_argument("--max-hours", type=float, default=None, help="start no new pair of runs after this many hours")
    ap.add_argument("--datasets", default="acdc,chaos")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--quick", action="store_true", help="6 iterations, 1 seed, 2 test volumes (work-tmp only)")
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    datasets = rd.available([d for d in args.datasets.split(",") if d])
    if not datasets:
        return 0
    work = dsb.QUICK_WORK if args.quick else dsb.WORK
    out = work / "context_labels.md" if args.quick else REPORT
    plot_path = out.with_name("context_labels.png")
    if args.quick:
        runs = plan_runs(datasets, (0,), {ds: 6 for ds in datasets}, 3)
    else:
        runs = plan_runs(datasets, dsb.SEEDS, {ds: dsb.ITERATIONS[ds] for ds in datasets})
    info = None if args.report_only else dsb.run_all(runs, work, max(1, args.jobs), args.max_hours, args.quick)
    results = dsb.load_results(work, runs)
    n_done = len(results)
    # deep_supervision.py's runs with DS of the same seeds, for the findings' cross-reference
    results.update(dsb.load_results(work, [dict(r, arm="ds", id=r["id"].replace("-plain-", "-ds-"))
                                           for r in runs if r["arm"] == "plain"]))
    p = plot(results, datasets, plot_path)
    write_report(results, runs, command, out, p, datasets, info)
    dsb.log(f"report: {out} ({n_done} of {len(runs)} runs done)")
    return 1 if info and info["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
