#!/usr/bin/env python
"""Suggestive annotation on real patients (issue #23 item 3): which scans to annotate next.

An active-learning curve on ACDC cine MRI (``--dataset acdc``, the default: ``../shared/data/acdc``,
its patient-wise train/test lists, each ED and ES volume a scan, the grid and shared training
settings of ``real_data.py`` / ``real_imbalance.py``) or on MSD Task04 hippocampus
(``--dataset hippocampus``: ``../shared/data/msd_hippocampus``; the demo model's patient-wise split
``Resources/Models/demo_hippocampus.split.json`` and its training config). Per seed, ``--initial``
scans (hippocampus: patients) of the split's training part are labelled at random and ``--pool``
others form the unlabelled pool. Each round trains a model on the labelled patients (the demo training config,
``Resources/Models/demo_hippocampus.train.json``, with a smaller network ``--features`` and
``--iterations``), measures its Dice on the fixed test set (the split's first ``--test`` test
patients), ranks the pool with each strategy of :func:`imbalanceseglib.suggestive.rank_for_annotation`
and adds its ``--per-round`` picks (their reference labels play the annotator):

* ``suggestive``: Yang et al. (MICCAI 2017): the ``--candidates-factor`` x n most uncertain, then the
  greedy max-cover of the pool's representativeness, the labelled patients counting as covered;
* ``uncertainty``: the n most uncertain;
* ``random``: n at random (seeded).

Round 0 (the initial patients) is the same model for every strategy; ``--rounds`` acquisition rounds
follow. Every strategy trains with the same training seed at a given seed, so the labelled set is
the only difference. It also records, for the uncertainty-based rankings, how well the scan
uncertainty follows the true error on the pool (Spearman correlation with 1 - Dice of the same
predictions, the pool's labels being known here). Results are cached per (strategy, seed, round) in ``work-tmp/suggestive_annotation/<settings>/``
(the models per labelled set, so round 0 is trained once per seed); a rerun resumes.

    python Testing/Benchmarks/suggestive_annotation.py [--plan] [--quick] [--report-only]

Writes ``Testing/Benchmarks/reports/suggestive_annotation.md`` (ACDC;
``suggestive_annotation_hippocampus.md`` for hippocampus) and ``.png`` (``--out``; ``--quick``
writes its report into its work folder instead). The default run (3 seeds, 4 + 3 x 4 scans, pool
60, the 40 test scans, 1000 iterations of UNet3D [8, 16, 32, 64]; hippocampus: 4 + 3 x 4 patients,
test 20, 200 iterations) trains 30 models; ``--plan`` measures and prints its time before anything
long runs.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(HERE))
from benchmark_common import code_commit, write_json_atomic  # noqa: E402
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
CONFIG = ROOT / "Resources" / "Models" / "demo_hippocampus.train.json"
SPLIT = ROOT / "Resources" / "Models" / "demo_hippocampus.split.json"
#: --dataset -> report; ACDC is the default: its patients differ (five diagnostic groups, matrices,
#: slice counts), so which scans are annotated can matter. On hippocampus a first run (2026-12-03,
#: seed 0) gave test Dice 0.821 with 4 annotated patients and 0.823 with 8: the curve was already flat.
REPORTS = {"acdc": HERE / "reports" / "suggestive_annotation.md",
           "hippocampus": HERE / "reports" / "suggestive_annotation_hippocampus.md"}
REPORT = REPORTS["acdc"]
WORK = ROOT / "work-tmp" / "suggestive_annotation"
#: Each finished round's result (and the run's meta and plan) is kept here, per settings, and
#: committed with the report, so that a run resumes across sessions and clones; the models stay
#: in WORK (a missing one is trained again only for a round not yet done).
RESULTS = HERE / "reports" / "suggestive_annotation_results"


def kept(work: Path) -> Path:
    """Where the results of the run whose models are in ``work`` are kept (see :data:`RESULTS`);
    a smoke test (``quick_``) or another work folder keeps them in ``work``."""
    work = Path(work)
    if work.parent.resolve() == WORK.resolve() and not work.name.startswith("quick_"):
        return RESULTS / work.name
    return work
STRATEGIES = ["suggestive", "uncertainty", "random"]
THREADS = 2
QUICK = dict(seeds=1, rounds=1, initial=2, per_round=2, pool=6, test=3, iterations=20)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- data


class Data:
    """The patients' images (pool, labelled, test) and prepared training cases, loaded on demand."""

    def __init__(self, cfg, dataset: str = "hippocampus"):
        self.cfg = cfg
        self.dataset = dataset
        self.images: Dict[str, Any] = {}
        self.labels: Dict[str, Any] = {}
        self.cases: Dict[str, Any] = {}

    def _read(self, name: str) -> None:
        import SimpleITK as sitk
        if self.dataset == "acdc":  # nominal geometry and class indices as the other real-data benchmarks
            import real_data as rd
            spec = rd.DATASETS["acdc"]
            self.images[name], self.labels[name] = rd.read_pair(spec, rd.data_folder(spec), name)
        else:
            self.images[name] = sitk.ReadImage(str(DATA / "images" / f"{name}.nii.gz"))
            self.labels[name] = sitk.ReadImage(str(DATA / "labels" / f"{name}.nii.gz"))

    def image(self, name: str):
        if name not in self.images:
            self._read(name)
        return self.images[name]

    def label(self, name: str):
        if name not in self.labels:
            self._read(name)
        return self.labels[name]

    def case(self, name: str):
        from imbalanceseglib.training_data import prepare_case
        if name not in self.cases:
            self.cases[name] = prepare_case(self.image(name), self.label(name), self.cfg, name)
        return self.cases[name]


def seed_split(split: Dict[str, List[str]], seed: int, initial: int, pool: int):
    """The seed's initial labelled patients and unlabelled pool, drawn from the split's training part."""
    import numpy as np
    order = [split["train"][i] for i in np.random.default_rng(1000 + seed).permutation(len(split["train"]))]
    if initial + pool > len(order):
        raise SystemExit(f"--initial {initial} + --pool {pool} exceeds the {len(order)} training patients")
    return order[:initial], order[initial:initial + pool]


def train_config(base: Dict[str, Any], args, seed: int, log_every: Optional[int] = None):
    from imbalanceseglib.train_config import TrainConfig
    return TrainConfig.from_dict({**base, "name": "al", "features": args.features, "iterations": args.iterations,
                                  "seed": seed, "val_every": args.iterations + 1,
                                  "log_every": log_every or args.iterations,
                                  "checkpoint_every": args.iterations, "num_threads": THREADS,
                                  "learning_rate": args.lr})


def settings_key(args) -> str:
    return ("" if args.dataset == "hippocampus" else f"{args.dataset}_") + (f"it{args.iterations}_f{'-'.join(map(str, args.features))}_lr{args.lr:g}_i{args.initial}_p{args.pool}"
            f"_k{args.per_round}_t{args.test}_c{args.candidates_factor:g}")


def dice_per_class(pred, ref, n_classes: int) -> List[Optional[float]]:
    out = []
    for c in range(1, n_classes):
        p, r = pred == c, ref == c
        den = int(p.sum()) + int(r.sum())
        out.append(None if den == 0 else 2.0 * int((p & r).sum()) / den)
    return out


def evaluate(bundle, data: Data, names: Sequence[str]) -> Dict[str, Any]:
    """Per-case and mean Dice per foreground class of ``bundle`` on ``names``."""
    import SimpleITK as sitk
    from imbalanceseglib.inference import predict
    per_case = {}
    for name in names:
        pred = predict(data.image(name), bundle)
        per_case[name] = dice_per_class(pred.labels, sitk.GetArrayViewFromImage(data.label(name)), bundle.num_classes)
    classes = bundle.class_names[1:]
    means = {}
    for k, cname in enumerate(classes):
        vals = [d[k] for d in per_case.values() if d[k] is not None]
        means[cname] = sum(vals) / len(vals) if vals else None
    defined = [v for v in means.values() if v is not None]
    return {"per_case": per_case, "dice": means, "mean_dice": sum(defined) / len(defined) if defined else None}


def model_for(labelled: Sequence[str], seed: int, args, base, data: Data, work: Path, test: Sequence[str]):
    """The model trained on ``labelled`` at ``seed`` (trained once, cached by the labelled set) and its test Dice."""
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.training import train
    key = hashlib.sha1(json.dumps([sorted(labelled), seed]).encode()).hexdigest()[:12]
    folder = work / "models" / key
    meta_path = folder / "result.json"
    bundle_path = folder / "al.imbseg"
    if meta_path.exists() and bundle_path.exists():
        return load_bundle(bundle_path), json.loads(meta_path.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    cfg = train_config(base, args, seed)
    cases = [data.case(n) for n in labelled]
    t0 = time.perf_counter()
    path = train(cfg, cases, [], folder, resume=False, log=lambda *a, **k: None)
    train_s = time.perf_counter() - t0
    (folder / "checkpoint.pt").unlink(missing_ok=True)
    bundle = load_bundle(path)
    t1 = time.perf_counter()
    ev = evaluate(bundle, data, test)
    meta = {"labelled": sorted(labelled), "seed": seed, "train_s": train_s, "eval_s": time.perf_counter() - t1, **ev}
    write_json_atomic(meta_path, meta)
    return bundle, meta


def spearman(a: Sequence[float], b: Sequence[float]) -> Optional[float]:
    from scipy.stats import spearmanr
    if len(a) < 3:
        return None
    r = spearmanr(a, b).correlation
    return None if r is None or math.isnan(r) else float(r)


def run_round(strategy: str, seed: int, rnd: int, labelled: List[str], pool: List[str], args, base, data: Data,
              work: Path, test: Sequence[str], last: bool) -> Dict[str, Any]:
    from imbalanceseglib.suggestive import rank_for_annotation
    path = kept(work) / "results" / f"{strategy}_s{seed}_r{rnd}.json"
    if path.exists():
        return json.loads(path.read_text())
    bundle, meta = model_for(labelled, seed, args, base, data, work, test)
    result = {"strategy": strategy, "seed": seed, "round": rnd, "labelled": list(labelled),
              "n_labelled": len(labelled), "dice": meta["dice"], "mean_dice": meta["mean_dice"],
              "train_s": meta["train_s"], "eval_s": meta["eval_s"], "picks": [], "rank_s": None}
    remaining = [n for n in pool if n not in set(labelled)]
    if not last and remaining:
        import SimpleITK as sitk
        truth: Dict[str, List[Optional[float]]] = {}

        def score(name, pred):  # the true Dice of the very predictions the ranking used (labels known here)
            truth[name] = dice_per_class(pred.labels, sitk.GetArrayViewFromImage(data.label(name)), bundle.num_classes)

        t0 = time.perf_counter()
        rows = rank_for_annotation(bundle, {n: data.image(n) for n in remaining}, min(args.per_round, len(remaining)),
                                   strategy=strategy,
                                   annotated={n: data.image(n) for n in labelled} if strategy == "suggestive" else None,
                                   seed=seed * 1000 + rnd, candidates_factor=args.candidates_factor,
                                   on_prediction=score)
        result["rank_s"] = time.perf_counter() - t0
        result["picks"] = [r.name for r in rows if r.chosen]
        result["rows"] = [r.as_dict() for r in rows]
        if strategy != "random":
            # how the scan uncertainty follows the true error of this model on the pool
            err = {n: 1 - sum(v for v in d if v is not None) / max(1, sum(v is not None for v in d))
                   for n, d in truth.items()}
            unc = {r.name: r.uncertainty for r in rows}
            result["spearman_uncertainty_error"] = spearman([unc[n] for n in remaining], [err[n] for n in remaining])
            result["pool_mean_dice"] = statistics.mean(1 - e for e in err.values())
            result["picks_mean_dice"] = statistics.mean(1 - err[n] for n in result["picks"])
    result["commit"] = code_commit()
    write_json_atomic(path, result)
    return result


def load_dataset(dataset: str):
    """(base training config, {"train": pool scans, "test": test scans}) of ``dataset``, or ``None``
    (with a message) when its data are absent."""
    if dataset == "acdc":
        import real_data as rd
        from real_imbalance import COMMON
        spec = rd.DATASETS["acdc"]
        folder = rd.data_folder(spec)
        if folder is None:
            print("skipped: " + rd.missing_message(spec))
            return None
        sp = rd.split(spec, folder)
        base = {k: v for k, v in COMMON.items() if k != "features"}
        base.update(name="al", method="dice_ce", loss={"name": "dice_ce"}, classes=rd.classes(folder),
                    target_spacing=list(spec.target_spacing), patch_size=list(spec.patch_size),
                    modality=spec.modality, rare_classes=list(spec.rare))
        return base, {"train": sp.volumes(sp.pool), "test": list(sp.test)}
    if not (DATA / "images").is_dir() or not (DATA / "labels").is_dir():
        print(f"skipped: the MSD hippocampus data set is not at {DATA} (images/ and labels/; see "
              "../shared/data/README.md)")
        return None
    return json.loads(CONFIG.read_text())["train"], json.loads(SPLIT.read_text())


# --------------------------------------------------------------------------- plan


def plan(args, base, data: Data, split, work: Path) -> Dict[str, float]:
    """Estimate the run's time from a short measured training and one scan's ranking and evaluation."""
    import torch
    from imbalanceseglib.inference import predict
    from imbalanceseglib.suggestive import prediction_uncertainty, scan_features
    from imbalanceseglib.training import train
    probe_it = 40
    initial, pool = seed_split(split, 0, args.initial, args.pool)
    cfg_args = argparse.Namespace(**{**vars(args), "iterations": probe_it})
    cfg = train_config(base, cfg_args, 0, log_every=10)
    folder = work / "plan"
    shutil.rmtree(folder, ignore_errors=True)
    cases = [data.case(n) for n in initial]
    stamps: List[tuple] = []

    def events(ev):
        if ev.get("event") == "iteration":
            stamps.append((time.perf_counter(), ev["iteration"]))

    t0 = time.perf_counter()
    path = train(cfg, cases, [], folder, resume=False, log=lambda *a, **k: None, events=events)
    probe_s = time.perf_counter() - t0
    if len(stamps) >= 2:  # the steady rate between logged iterations; the rest is the run's fixed cost
        s_per_it = (stamps[-1][0] - stamps[0][0]) / max(1, stamps[-1][1] - stamps[0][1])
    else:
        s_per_it = probe_s / probe_it
    fixed_s = max(0.0, probe_s - s_per_it * probe_it)
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(path)
    names = pool[:4]
    for n in names[:1]:  # warm-up
        predict(data.image(n), bundle)
    t1 = time.perf_counter()
    for n in names:
        prediction_uncertainty(predict(data.image(n), bundle))
    t_pred = (time.perf_counter() - t1) / len(names)
    t2 = time.perf_counter()
    for n in names:
        scan_features(data.image(n), bundle)
    t_feat = (time.perf_counter() - t2) / len(names)
    shutil.rmtree(folder, ignore_errors=True)
    strategies = args.strategies
    models = args.seeds * (1 + args.rounds * len(strategies))
    train_s = models * (fixed_s + args.iterations * s_per_it)
    eval_s = models * args.test * t_pred
    rank_s = 0.0
    for rnd in range(args.rounds):
        left = args.pool - rnd * args.per_round
        labelled = args.initial + rnd * args.per_round
        for s in strategies:
            if s == "suggestive":
                rank_s += args.seeds * (left * (t_pred + t_feat) + labelled * t_feat)
            elif s == "uncertainty":
                rank_s += args.seeds * left * t_pred
    total = train_s + eval_s + rank_s
    est = {"models": models, "s_per_iteration": s_per_it, "fixed_s_per_training": fixed_s,
           "s_per_prediction": t_pred, "s_per_descriptor": t_feat,
           "train_min": train_s / 60, "eval_min": eval_s / 60, "rank_min": rank_s / 60,
           "total_min": total / 60, "core_hours": total * THREADS / 3600, "threads": torch.get_num_threads()}
    return est


def print_plan(est: Dict[str, float], args) -> None:
    print(f"plan ({args.seeds} seeds, {args.rounds} acquisition rounds of {args.per_round}, {args.initial} initial, "
          f"pool {args.pool}, test {args.test}, {args.iterations} iterations, features {args.features}, "
          f"strategies {', '.join(args.strategies)}):")
    print(f"  {est['models']} trainings at {est['s_per_iteration']:.3f} s/iteration + "
          f"{est.get('fixed_s_per_training', 0):.0f} s start-up each (measured on {THREADS} threads): "
          f"{est['train_min']:.1f} min")
    print(f"  test evaluation ({est['s_per_prediction']:.2f} s per scan): {est['eval_min']:.1f} min")
    print(f"  rankings (a prediction per pool scan, {est['s_per_descriptor']:.2f} s per descriptor): "
          f"{est['rank_min']:.1f} min")
    print(f"  total about {est['total_min']:.0f} min wall on {THREADS} threads = {est['core_hours']:.2f} core-hours "
          f"(cached rounds are skipped)")


# --------------------------------------------------------------------------- report


def _mean_sd(values: Sequence[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def collect(work: Path, strategies: Sequence[str]) -> List[Dict[str, Any]]:
    out = []
    for path in sorted((kept(work) / "results").glob("*.json")):
        r = json.loads(path.read_text())
        if r["strategy"] in strategies:
            out.append(r)
    return out


def plot(results: List[Dict[str, Any]], strategies: Sequence[str], classes: Sequence[str], out: Path,
         unit: str = "patients") -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = ["mean"] + list(classes)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for s in strategies:
            rows = [r for r in results if r["strategy"] == s]
            sizes = sorted({r["n_labelled"] for r in rows})
            means, sds = [], []
            for n in sizes:
                vals = [r["mean_dice"] if panel == "mean" else r["dice"].get(panel)
                        for r in rows if r["n_labelled"] == n]
                vals = [v for v in vals if v is not None]
                means.append(statistics.mean(vals) if vals else float("nan"))
                sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(sizes, means, yerr=sds, marker="o", capsize=3, label=s)
        ax.set_xticks(sorted({r["n_labelled"] for r in results}))
        ax.set_xlabel(f"annotated {unit}")
        ax.set_ylabel("test Dice" if panel == "mean" else f"Dice, {panel}")
        ax.set_title("mean of the classes" if panel == "mean" else panel, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    png = out.with_suffix(".png")
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(out: Path, meta: Dict[str, Any], results: List[Dict[str, Any]], strategies: Sequence[str]) -> None:
    args = meta["args"]
    classes = meta["classes"]
    seeds = sorted({r["seed"] for r in results})
    sizes = sorted({r["n_labelled"] for r in results})
    dataset = args.get("dataset", "hippocampus")
    unit = "scans" if dataset == "acdc" else "patients"
    png = plot(results, strategies, classes, out, unit) if results else None
    lines = [f"# Suggestive annotation: which {unit} to annotate next "
             f"({'ACDC cine MRI' if dataset == 'acdc' else 'MSD hippocampus'})", "",
             f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}  ",
             f"Date: {meta['started']}; " + (f"this run {meta['elapsed_min']:.1f} min (cached rounds not redone)"
                                              if meta.get("elapsed_min") is not None else "partial run (in progress "
                                              "or interrupted)"), ""]
    if dataset == "acdc":
        lines += ["Data: ACDC cine MRI (Bernard et al., IEEE TMI 2018), its customary patient-wise split "
                  "(`train.list` / `test.list`), each patient's ED and ES volumes as two scans, with the nominal "
                  "geometry and grid of `Testing/Benchmarks/real_data.py`. Per seed s, the training patients' "
                  "scans in the order of `numpy.random.default_rng(1000 + s).permutation`: the first "
                  f"{args['initial']} are labelled at the start, the next {args['pool']} are the unlabelled pool "
                  f"(both frames of a patient may fall in the pool). Test: {args['test']} scans of the test "
                  "patients, the same for every run.", "",
                  "Protocol: each round trains a model on the labelled scans (`real_imbalance.py`'s shared "
                  "settings: Dice + cross-entropy, patch 8x64x64, batch 2, no augmentation, "
                  f"UNet3D {args['features']}, {args['iterations']} iterations, learning rate {args['lr']:g}, "
                  "training seed = s for every strategy), measures its Dice on the test scans, ranks the pool "
                  f"with `imbalanceseglib.suggestive.rank_for_annotation` and adds {args['per_round']} picks; "
                  f"acquisition rounds: {args['rounds']}; seeds {seeds}. "
                  f"Strategies: `suggestive` (Yang et al., MICCAI 2017: the {args['candidates_factor']:g} x "
                  f"{args['per_round']} most uncertain, then the greedy max-cover of the pool's cosine similarity "
                  "of deepest-encoder descriptors, the labelled scans counting as covered), `uncertainty` (the "
                  "most uncertain) and `random`. Uncertainty per scan: the mean over the three classes (right "
                  "ventricle, myocardium, left ventricle) of (mean normalised entropy within 1 voxel of the class "
                  "+ 1 - label-free estimated Dice) / 2 (module docstring of `imbalanceseglib/suggestive.py`). "
                  "Dice: mean over the test scans; mean ± SD over seeds.", ""]
    else:
        lines += ["Data: MSD Task04 hippocampus (CC BY-SA 4.0; Antonelli et al., Nat Commun 2022), the demo model's "
                  "patient-wise split (`Resources/Models/demo_hippocampus.split.json`). Per seed s, the split's "
                  f"training patients in the order of `numpy.random.default_rng(1000 + s).permutation`: the first "
                  f"{args['initial']} are labelled at the start, the next {args['pool']} are the unlabelled pool. "
                  f"Test: the split's first {args['test']} test patients, the same for every run.", "",
                  f"Protocol: each round trains a model on the labelled patients (the demo config "
                  f"`Resources/Models/demo_hippocampus.train.json`, Dice + cross-entropy, patch 40x56x40, batch 2, "
                  f"augmentation `default`, but UNet3D {args['features']}, {args['iterations']} iterations, "
                  f"learning rate {args['lr']:g}, training seed = s for every strategy), measures its Dice on the "
                  f"test patients, ranks the pool with `imbalanceseglib.suggestive.rank_for_annotation` and adds "
                  f"{args['per_round']} picks; acquisition rounds: {args['rounds']}; seeds {seeds}. "
                  f"Strategies: `suggestive` (Yang et al., MICCAI 2017: the {args['candidates_factor']:g} x "
                  f"{args['per_round']} most uncertain, then the greedy max-cover of the pool's cosine similarity of "
                  "deepest-encoder descriptors, the labelled patients counting as covered), `uncertainty` (the "
                  "most uncertain) and `random`. Uncertainty per patient: the mean over the two hippocampus classes "
                  "of (mean normalised entropy within 1 voxel of the class + 1 - label-free estimated Dice) / 2 "
                  "(module docstring of `imbalanceseglib/suggestive.py`). Dice: mean over the test patients; "
                  "mean ± SD over seeds.", ""]
    if png:
        lines += [f"![Dice against annotated {unit}]({png.name})", ""]
    # mean Dice table
    lines += [f"## Test Dice (mean of the classes) against the number of annotated {unit}", "",
              "| annotated | " + " | ".join(strategies) + " |", "|---|" + "---|" * len(strategies)]
    for n in sizes:
        cells = [_mean_sd([r["mean_dice"] for r in results if r["strategy"] == s and r["n_labelled"] == n])
                 for s in strategies]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("")
    for cname in classes:
        lines += [f"**{cname}**", "", "| annotated | " + " | ".join(strategies) + " |",
                  "|---|" + "---|" * len(strategies)]
        for n in sizes:
            cells = [_mean_sd([r["dice"].get(cname) for r in results if r["strategy"] == s and r["n_labelled"] == n])
                     for s in strategies]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    # paired differences against random
    if "random" in strategies:
        lines += ["## Paired differences against random (same seed, same size)", "",
                  "Mean Dice of the strategy minus that of `random` for the same seed and number of annotated "
                  f"{unit}; mean ± SD over seeds (n = seeds with both), and the mean over the acquisition "
                  "rounds (the area between the two learning curves after round 0, divided by the rounds).", "",
                  "| strategy | " + " | ".join(str(n) for n in sizes[1:]) + " | mean over rounds |",
                  "|---|" + "---|" * (len(sizes[1:]) + 1)]
        for s in strategies:
            if s == "random":
                continue
            cells, per_seed = [], {}
            for n in sizes[1:]:
                diffs = []
                for seed in seeds:
                    a = [r["mean_dice"] for r in results if r["strategy"] == s and r["seed"] == seed
                         and r["n_labelled"] == n]
                    b = [r["mean_dice"] for r in results if r["strategy"] == "random" and r["seed"] == seed
                         and r["n_labelled"] == n]
                    if a and b and a[0] is not None and b[0] is not None:
                        diffs.append(a[0] - b[0])
                        per_seed.setdefault(seed, []).append(a[0] - b[0])
                cells.append(f"{_mean_sd(diffs)} (n={len(diffs)})" if diffs else "–")
            auc = [statistics.mean(v) for v in per_seed.values() if len(v) == len(sizes[1:])]
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {_mean_sd(auc)} |")
        lines.append("")
    # the uncertainty check and the picks
    ranked = [r for r in results if r.get("spearman_uncertainty_error") is not None or r.get("picks_mean_dice")]
    if ranked:
        lines += ["## Does the scan uncertainty follow the error?", "",
                  "For the rankings by `suggestive` and `uncertainty`: Spearman correlation between a scan's "
                  "uncertainty and its true error (1 - mean Dice of that round's model, the pool's labels being "
                  "known here), the pool's mean Dice and the picks' mean Dice under that model (lower: the picks "
                  f"are the {unit} the model handles worst); mean ± SD over seeds and rounds.", "",
                  "| strategy | Spearman(uncertainty, error) | pool mean Dice | picks' mean Dice | rankings |",
                  "|---|---|---|---|---|"]
        for s in strategies:
            rows = [r for r in ranked if r["strategy"] == s]
            if not rows:
                continue
            lines.append(f"| {s} | {_mean_sd([r.get('spearman_uncertainty_error') for r in rows])} | "
                         f"{_mean_sd([r.get('pool_mean_dice') for r in rows])} | "
                         f"{_mean_sd([r.get('picks_mean_dice') for r in rows])} | {len(rows)} |")
        lines.append("")
    sug = {(r["seed"], r["round"]): set(r["picks"]) for r in results if r["strategy"] == "suggestive" and r["picks"]}
    unc = {(r["seed"], r["round"]): set(r["picks"]) for r in results if r["strategy"] == "uncertainty" and r["picks"]}
    if sug and unc and 0 in {k[1] for k in sug}:
        same = [len(sug[k] & unc[k]) / len(sug[k]) for k in sug if k in unc and k[1] == 0]
        if same:
            frac = statistics.mean(same)
            lines += [f"From the same round-0 model, `suggestive` and `uncertainty` picked the same {unit} "
                      f"{100 * frac:.0f} % of the time (mean over seeds)" + (
                          f"; the others are less uncertain {unit} the max-cover step preferred for "
                          "representativeness." if frac < 1 else "."), ""]
    # time
    models = {}
    for r in results:
        models[(tuple(sorted(r["labelled"])), r["seed"])] = r
    train_s = [r["train_s"] for r in models.values()]
    rank = {s: [r["rank_s"] for r in results if r["strategy"] == s and r.get("rank_s")] for s in strategies}
    if not train_s:
        train_s = [0.0]
    lines += ["## Time", "",
              f"{len(models)} models trained, {statistics.mean(train_s):.0f} s each on average "
              f"({sum(train_s) / 60:.1f} min); test evaluation "
              f"{sum(r['eval_s'] for r in models.values()) / 60:.1f} min. "
              "Ranking the pool, per round: " + ", ".join(
                  f"{s} {statistics.mean(v):.1f} s" for s, v in rank.items() if v) + ".", ""]
    if meta.get("plan"):
        p = meta["plan"]
        lines += [f"Estimated beforehand (`--plan`): {p['total_min']:.0f} min wall on {THREADS} threads "
                  f"({p['core_hours']:.2f} core-hours).", ""]
    about = ("ACDC's patients come from five diagnostic groups (normal, previous infarction, dilated and "
             "hypertrophic cardiomyopathy, abnormal right ventricle) and differ in matrix and slice count, so "
             "the pool is heterogeneous; the right ventricle is the rare class." if dataset == "acdc" else
             "Hippocampus crops are alike (one structure, one modality, similar field of view), which probably "
             "leaves representativeness less to do than a heterogeneous cohort would; the two classes are "
             "imbalanced (about 2.7 % and 2.5 % of the voxels) but not rare.")
    tally = []
    for s in strategies:
        if s == "random":
            continue
        pairs = [(a["mean_dice"], b["mean_dice"]) for a in results for b in results
                 if a["strategy"] == s and b["strategy"] == "random" and a["seed"] == b["seed"]
                 and a["n_labelled"] == b["n_labelled"] and a["round"] > 0
                 and a["mean_dice"] is not None and b["mean_dice"] is not None]
        if pairs:
            tally.append(f"`{s}` beat `random` in {sum(x > y for x, y in pairs)} of {len(pairs)} paired "
                         "(seed, size) comparisons after round 0")
    lines += ["## Reading it", "",
              "Few seeds and short trainings: differences smaller than the seeds' SD are not evidence either way. "
              + about + " The uncertainty-vs-error table "
              f"says whether the uncertainty score itself points at the {unit} the model gets wrong.", ""]
    if tally:
        lines += ["; ".join(tally) + ".", ""]
    lines += ["Published: Yang et al. (MICCAI 2017) found suggestive annotation ahead of uncertainty-only and "
              "random selection on the 2015 gland segmentation challenge (85 two-dimensional training images), "
              "with uncertainty from a bootstrapped ensemble of FCNs and budgets from 10 % to 50 % of the "
              "training set. This benchmark is a different regime: one network's entropy and label-free Dice "
              f"estimate as uncertainty, a start from {args.get('initial', 'a few')} labelled {unit}, and at most "
              f"{args.get('initial', 0) + args.get('rounds', 0) * args.get('per_round', 0)} labelled 3D {unit}. From so small a start, active learning often loses to "
              "random selection (the cold-start problem). Here the uncertainty did follow the error (the table "
              "above), so both strategies picked the hardest scans of the pool; added to a tiny labelled set, "
              "they did not raise the Dice on the test scans as much as a random, typical sample did.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(REPORTS), default="acdc",
                    help="acdc: the ACDC training patients' scans (ED and ES volumes) as the pool, its test list as "
                    "the test set, real_imbalance's settings; hippocampus: the demo model's split and config")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="acquisition rounds after the initial model")
    ap.add_argument("--initial", type=int, default=4, help="patients (ACDC: scans) labelled at the start")
    ap.add_argument("--per-round", type=int, default=4, help="patients (ACDC: scans) annotated per round")
    ap.add_argument("--pool", type=int, default=60, help="unlabelled patients (ACDC: scans) to choose from")
    ap.add_argument("--test", type=int, default=None, help="the split's first N test scans (default: hippocampus 20, "
                    "ACDC all 40)")
    ap.add_argument("--iterations", type=int, default=None, help="default: hippocampus 200, ACDC 1000")
    ap.add_argument("--features", default="8,16,32,64")
    ap.add_argument("--lr", type=float, default=None, help="default: the demo config's")
    ap.add_argument("--candidates-factor", type=float, default=2.0)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--plan", action="store_true", help="measure a short training and one ranking, print the "
                    "estimated time of the run, and stop")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: 1 seed, 1 round of 2 from a pool of 6, 3 test patients, 20 iterations")
    ap.add_argument("--report-only", action="store_true", help="write the report from the cached results")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    args.features = [int(f) for f in str(args.features).split(",")]
    args.strategies = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown}; known: {STRATEGIES}")
    if args.iterations is None:
        args.iterations = 1000 if args.dataset == "acdc" else 200
    loaded = load_dataset(args.dataset)
    if loaded is None:
        return 0
    base, split = loaded
    if args.test is None:
        args.test = len(split["test"]) if args.dataset == "acdc" else 20
    if args.lr is None:
        args.lr = float(base["learning_rate"])
    work = WORK / (("quick_" if args.quick else "") + settings_key(args))
    # a smoke test's report stays in its work folder, beside its results
    out = Path(args.out) if args.out else (work / "report.md" if args.quick else REPORTS[args.dataset])
    import torch
    torch.set_num_threads(THREADS)
    from imbalanceseglib.train_config import TrainConfig
    cfg = TrainConfig.from_dict({**base, "name": "al", "features": args.features})
    data = Data(cfg, args.dataset)
    classes = [c["name"] for c in base["classes"]][1:]
    if args.report_only:
        if not (kept(work) / "meta.json").exists():
            print(f"no run with these settings has started yet (nothing in {work})")
            return 1
        meta = json.loads((kept(work) / "meta.json").read_text())
        write_report(out, meta, collect(work, args.strategies), args.strategies)
        print(f"report written to {out}")
        return 0
    from benchmark_common import machine
    import monai
    mach = machine(f"torch {torch.__version__}, MONAI {monai.__version__}, {THREADS} threads")
    t_all = time.perf_counter()
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    work.mkdir(parents=True, exist_ok=True)
    kept(work).mkdir(parents=True, exist_ok=True)
    est = None
    if args.plan or not (kept(work) / "plan.json").exists():
        log("measuring for the plan (a short training and one ranking)")
        est = plan(args, base, data, split, work)
        write_json_atomic(kept(work) / "plan.json", est)
        print_plan(est, args)
        if args.plan:
            return 0
    else:
        est = json.loads((kept(work) / "plan.json").read_text())
    test = split["test"][:args.test]
    log(mach)
    meta = {"command": command, "machine": mach, "started": started, "classes": classes, "elapsed_min": None,
            "plan": est, "args": {k: v for k, v in vars(args).items() if k not in ("report_only", "plan", "out")}}
    write_json_atomic(kept(work) / "meta.json", meta)  # so that --report-only can report a partial run
    for seed in range(args.seeds):
        initial, pool = seed_split(split, seed, args.initial, args.pool)
        labelled = {s: list(initial) for s in args.strategies}
        for rnd in range(args.rounds + 1):
            for s in args.strategies:
                r = run_round(s, seed, rnd, labelled[s], pool, args, base, data, work, test, last=rnd == args.rounds)
                extra = (f", picks {r['picks']}" if r["picks"] else "") + (
                    f", Spearman(u, error) {r['spearman_uncertainty_error']:.2f}"
                    if r.get("spearman_uncertainty_error") is not None else "")
                md = r["mean_dice"]
                log(f"seed {seed} round {rnd} {s}: {len(labelled[s])} labelled, test Dice "
                    f"{'–' if md is None else f'{md:.3f}'}{extra}")
                labelled[s] = labelled[s] + r["picks"]
    meta["elapsed_min"] = (time.perf_counter() - t_all) / 60
    write_json_atomic(kept(work) / "meta.json", meta)
    write_report(out, meta, collect(work, args.strategies), args.strategies)
    log(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
