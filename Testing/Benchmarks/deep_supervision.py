#!/usr/bin/env python
"""Deep supervision on real patients, with and without (issue #23 item 2).

Deep supervision (Dou et al., "3D deeply supervised network for automated segmentation of
volumetric medical images", MedIA 41, 2017; in the library as nnU-Net does it:
:mod:`imbalanceseglib.deep_supervision`, ``TrainConfig.deep_supervision``) adds 1x1x1 auxiliary
heads at the U-Net's coarser decoder levels, trained with down-weighted losses and dropped at
inference. The issue asks for its effect on rare classes and on convergence speed, on the real data
of ``../shared/data``, with at least 3 seeds, against the same pipeline without it.

Design
------
* **Pipeline**: the one of ``real_imbalance.py`` (its :data:`~real_imbalance.COMMON` settings and
  :func:`~real_imbalance.job_config`: UNet3D features [8, 16, 32, 64], batch 2, AdamW lr 3e-3 with
  polynomial decay, two thirds of the patches centred on a class present, no augmentation; the data,
  splits, grids and preprocessing of ``real_data.py``), at the *smallest* training-set size it uses
  (CHAOS MR T2: 2 patients; ACDC: 3 patients = 6 volumes). Loss Dice + CE (``dice_ce``); optionally
  (``--losses dice_ce,asym_large_margin``) also the asymmetric large-margin loss of
  ``real_imbalance`` as a second loss, each with and without deep supervision.
* **The two arms of a seed differ only in** ``"deep_supervision": {"enabled": true}`` (levels: all,
  i.e. the 1/2 and 1/4 resolution decoder outputs of this 4-level U-Net; weights "halving": 4/7,
  2/7, 1/7 for the full, 1/2 and 1/4 resolution outputs). Same training patients (seed ``s``:
  ``real_data.training_patients``), same training seed (network initialisation, patch sampling).
  The auxiliary heads are built after the network, so the initial network is the same too.
* **Convergence**: every ``iterations / 15`` iterations (100 at 1500) the library's own validation
  (``train(..., val_cases)`` -> :func:`imbalanceseglib.training_loop.validation_step`: per class
  Dice, sliding windows) runs on a fixed validation subset that is *not* the test set: ACDC: 8
  volumes of its ``val.list`` (8 patients, end-diastole and end-systole alternately); CHAOS: 4 of
  the 5 pool patients that no seed trains on (chaos_01, 02, 03, 05; the 10 test patients stay for
  the final evaluation). Fewer volumes and validations than one might like: validation costs about
  as much CPU as training here, and the budget is ~2 CPU-hours. The time each validation takes is
  taken from the trainer's ``iteration`` and ``validation`` events and subtracted, so every curve
  point has its *training* seconds (the two arms of a seed run side by side, one thread each, so
  they see the same machine load). From
  the curves: iterations and seconds until the rare-class validation Dice first reaches 90 % of
  the *baseline's* final one on that seed, and the mean rare-class validation Dice over the curve
  (area under it, normalised). Seconds are given as this run's CPU seconds (one thread: robust to
  the machine being shared) and as wall seconds.
* **Final evaluation**: :func:`real_imbalance.evaluate_split` (``imbalanceseglib.evaluation``:
  Dice, sensitivity, precision, HD95 on the working grid) on the whole test set (ACDC
  ``test.list``, 40 volumes; CHAOS the 10 highest ids) and on the run's own training volumes.
* **Time cost**: seconds per iteration with and without deep supervision, measured apart from the
  long runs (which share the CPU with other jobs): short ``train()`` runs (5 warm-up + 60 timed
  iterations, one thread), arms interleaved A-B / B-A over 3 repetitions per data set; CPU and wall
  seconds per iteration and the ratio of each repetition's pair, mean ± SD. The long runs' own
  training CPU seconds per iteration give the ratio a second time (over 1500 iterations).
* **Iterations**: 1500 per run on both data sets (``real_imbalance`` uses 4000 / 3000 for its
  overfitting regime): with ~0.2 CPU s per iteration and the validations, the 12 runs are about
  2 CPU-hours (``--plan``); the runs without DS reach training-set Dice 0.89-0.95 on the rare
  classes at 1500, so the baseline does learn them.

Jobs and resume
---------------
Each (data set, loss, arm, iterations, seed) is one run with a stable id
(``acdc-n3-dice_ce-ds-i1500-s0``); its folder ``work-tmp/deep_supervision/<id>/`` holds the
library's ``checkpoint.pt`` while it trains (``train()`` resumes from it), the bundle and
``train.log``; its result (curves, evaluation) goes to
``Testing/Benchmarks/reports/deep_supervision_results/<id>.json`` (atomic; committed, so the
benchmark resumes across sessions; a run with a result is skipped), as does ``timing.json``.
Preprocessed cases are shared with ``real_imbalance.py`` (``work-tmp/real_imbalance_cache``: same
preprocessing). Runs go in pairs (the two arms of one seed side by side with ``--jobs 2``, one torch
thread each); ``--max-hours H`` starts no new pair after H hours, and so does the file
``work-tmp/deep_supervision/STOP`` (a clean stop: the pairs in progress finish).

Usage::

    python Testing/Benchmarks/deep_supervision.py --plan          # times a few iterations, prints the estimate
    python Testing/Benchmarks/deep_supervision.py                 # the default run (timing, then the runs)
    python Testing/Benchmarks/deep_supervision.py --report-only
    python Testing/Benchmarks/deep_supervision.py --quick         # a few minutes (1-5), end to end

Writes ``Testing/Benchmarks/reports/deep_supervision.md`` and ``deep_supervision.png`` (with
``--quick``: under ``work-tmp/deep_supervision_quick/``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(HERE))

import real_data as rd  # noqa: E402
import real_imbalance as ri  # noqa: E402  (its settings, job_config and evaluate_split; nothing runs on import)
from benchmark_common import machine, write_json_atomic, write_report_atomic  # noqa: E402

WORK = ROOT / "work-tmp" / "deep_supervision"
QUICK_WORK = ROOT / "work-tmp" / "deep_supervision_quick"
CACHE = ROOT / "work-tmp" / "real_imbalance_cache"   # shared with real_imbalance.py (same preprocessing)
RESULTS = HERE / "reports" / "deep_supervision_results"
REPORT = HERE / "reports" / "deep_supervision.md"
PLOT = HERE / "reports" / "deep_supervision.png"

#: Iterations per run (see ``--plan``; chosen for the ~2 CPU-hour budget, see the report).
ITERATIONS = {"chaos": 1500, "acdc": 1500}
#: Validations per run (every iterations / EVALS iterations).
EVALS = 15
SEEDS = (0, 1, 2)
#: Training patients: the smallest size real_imbalance uses.
PATIENTS = {k: int(s.sizes[0]) for k, s in rd.DATASETS.items()}
#: Losses of the default plan (``--losses``): Dice + CE; asym_large_margin is the optional second one.
DEFAULT_LOSSES = ("dice_ce",)
LOSS_LABELS = {"dice_ce": "Dice + CE", "asym_large_margin": "asym. large margin (m = 1) + Dice"}
#: The deep supervision setting of the "ds" arm (library defaults: all decoder levels, halving weights).
DS_SETTING = {"enabled": True, "levels": None, "weights": "halving"}
#: The context-label arm of ``context_labels.py``, which runs through this script's runs (same
#: pipeline, same "plain" runs as its baseline): CoLab with the library's defaults.
COLAB_SETTING = {"enabled": True}
ARMS = ("plain", "ds")
ARM_LABELS = {"plain": "without DS", "ds": "with DS"}
N_VAL = {"acdc": 8, "chaos": 4}
#: Convergence threshold: this fraction of the baseline's final rare-class validation Dice.
REACH = 0.9
#: Interleaved timing: repetitions, warm-up and timed iterations per short run.
TIMING_REPS, TIMING_WARM, TIMING_IT = 3, 5, 60
#: CPU-hour budget of the default run.
BUDGET_CPU_HOURS = 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- runs


def run_id(ds: str, loss: str, arm: str, seed: int, iterations: int) -> str:
    return f"{ds}-n{PATIENTS[ds]}-{loss}-{arm}-i{iterations}-s{seed}"


def make_run(ds: str, loss: str, arm: str, seed: int, iterations: int, evals: int = EVALS) -> Dict[str, Any]:
    return {"id": run_id(ds, loss, arm, seed, iterations), "dataset": ds, "n": PATIENTS[ds], "method": loss,
            "loss": loss, "arm": arm, "seed": seed, "iterations": iterations,
            "eval_every": max(1, iterations // evals), "lr": ri.COMMON["learning_rate"]}


def plan_runs(datasets: Sequence[str], losses: Sequence[str], seeds: Sequence[int],
              iterations: Dict[str, int], evals: int = EVALS) -> List[Dict[str, Any]]:
    """In run order: Dice + CE before any other loss; ACDC (the cheaper runs) before CHAOS, every
    seed of a data set before the next data set (a partial run has all seeds of one data set
    rather than a few of each); the two arms of a (data set, loss, seed) next to each other (they
    run as a pair)."""
    out = []
    order = sorted(datasets, key=lambda d: (d != "acdc", d))
    for loss in losses:
        for ds in order:
            for s in seeds:
                for arm in ARMS:
                    out.append(make_run(ds, loss, arm, s, iterations[ds], evals))
    return out


def result_path(work: Path, rid: str) -> Path:
    if Path(work).resolve() == WORK.resolve():
        return RESULTS / f"{rid}.json"
    return Path(work) / rid / "result.json"


def timing_path(work: Path) -> Path:
    return RESULTS / "timing.json" if Path(work).resolve() == WORK.resolve() else Path(work) / "timing.json"


def validation_ids(spec: rd.DataSpec, folder: Path, n: int) -> List[str]:
    """The fixed validation subset (not the test set): ACDC: ``val.list``, one volume per patient,
    end-diastole and end-systole alternately; CHAOS: the pool patients no seed of the plan trains on."""
    sp = rd.split(spec, folder)
    if spec.key == "acdc":
        vals = [line.strip() for line in (folder / "val.list").read_text().splitlines() if line.strip()]
        by_patient: Dict[str, List[str]] = {}
        for c in vals:
            by_patient.setdefault(rd.patient_of(spec, c), []).append(c)
        out = []
        for k, (_, cases) in enumerate(sorted(by_patient.items())):
            cases = sorted(cases)
            out.append(cases[k % len(cases)])
        return out[:n]
    used = {p for s in range(max(3, max(SEEDS) + 1)) for p in rd.training_patients(sp, PATIENTS[spec.key], s)}
    return sp.volumes([p for p in sp.pool if p not in used])[:n]


def run_config(run: Dict[str, Any], classes: List[Dict[str, Any]], threads: int) -> Dict[str, Any]:
    """real_imbalance's job config for this loss, plus the validation cadence and the arm's one change."""
    cfg = ri.job_config(run, classes, threads)
    it = int(run["iterations"])
    every = int(run["eval_every"])
    cfg.update(val_every=every, log_every=every, checkpoint_every=max(every, it // 10),
               description=f"deep_supervision benchmark run {run['id']}")
    cfg["deep_supervision"] = copy.deepcopy(DS_SETTING) if run["arm"] == "ds" else {"enabled": False}
    if run["arm"] == "colab":  # context_labels.py's arm: CoLab with the library's defaults, nothing else changed
        cfg["context_labels"] = copy.deepcopy(COLAB_SETTING)
    return cfg


def curve_from_history(history: List[Dict[str, Any]], timeline: Dict[int, Dict[str, float]]) -> List[Dict[str, Any]]:
    """Per validation: iteration, training seconds (wall: the history's elapsed time minus the
    earlier validations' wall time; CPU: this process's CPU time minus the earlier validations'),
    per class validation Dice and sensitivity."""
    elapsed = {h["iteration"]: h["elapsed_s"] for h in history if "elapsed_s" in h}
    out = []
    for h in history:
        if not isinstance(h.get("val"), dict):
            continue
        it = int(h["iteration"])
        wall_before = sum(v.get("val_wall", 0.0) for k, v in timeline.items() if k < it)
        cpu_before = sum(v.get("val_cpu", 0.0) for k, v in timeline.items() if k < it)
        t = elapsed.get(it)
        c = timeline.get(it, {}).get("cpu")
        out.append({"iteration": it, "train_s": (t - wall_before) if t is not None else None,
                    "train_cpu_s": (c - cpu_before) if c is not None else None,
                    "dice": {k: v.get("dice") for k, v in h["val"].items()},
                    "sensitivity": {k: v.get("sensitivity") for k, v in h["val"].items()}})
    return out


def run_one(run: Dict[str, Any], work: str, threads: int, quick: bool = False) -> Dict[str, Any]:
    """Train and evaluate one run (in a worker process); its result also goes to its JSON file."""
    out_dir = Path(work) / run["id"]
    res_file = result_path(Path(work), run["id"])
    if res_file.is_file():
        return json.loads(res_file.read_text())
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.training import TrainConfig, train

    start = ri.open_job(run["dataset"], out_dir, threads)
    spec, folder, sp, classes, names, say = start.spec, start.folder, start.split, start.classes, start.names, start.say
    config = TrainConfig.from_dict(run_config(run, classes, threads))
    patients = rd.training_patients(sp, run["n"], run["seed"])
    train_ids = sp.volumes(patients)
    val_ids = validation_ids(spec, folder, 2 if quick else N_VAL[spec.key])
    test_ids = sp.test[:2] if quick else list(sp.test)
    load = (lambda c: rd.load_case(spec, folder, c, config, CACHE))
    train_cases = [load(c) for c in train_ids]
    val_cases = [load(c) for c in val_ids]
    test_cases = [load(c) for c in test_ids]
    say(f"run {run['id']}: training {', '.join(train_ids)}; validation {', '.join(val_ids)}; {len(test_ids)} test")

    # From the trainer's events, per logged iteration: this run's cumulative CPU seconds at the
    # "iteration" event, and the wall and CPU seconds of the validation that follows it (until the
    # "validation" event). Kept in timeline.json, so a resumed run continues its CPU count.
    tl_file = out_dir / "timeline.json"
    timeline: Dict[int, Dict[str, float]] = {}
    if tl_file.is_file():
        try:
            timeline = {int(k): v for k, v in json.loads(tl_file.read_text()).items()}
        except (ValueError, OSError):
            timeline = {}
    marks: Dict[int, Tuple[float, float]] = {}
    session: Dict[str, float] = {}

    def events(e: Dict[str, Any]) -> None:
        kind = e.get("event")
        if kind not in ("iteration", "validation"):
            return
        it = int(e["iteration"])
        wall, cpu = time.perf_counter(), time.process_time()
        if kind == "iteration":
            if "base" not in session:  # first event of this session: continue from the last one kept before it
                before = [k for k in timeline if k < it]
                session["base"] = timeline[max(before)]["cpu"] if before else 0.0
            marks[it] = (wall, cpu)
            timeline[it] = {"cpu": session["base"] + cpu - cpu0}
        elif it in marks:
            timeline.setdefault(it, {}).update(val_wall=wall - marks[it][0], val_cpu=cpu - marks[it][1])
        write_json_atomic(tl_file, {str(k): v for k, v in sorted(timeline.items())})

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    bundle_path = train(config, train_cases, val_cases, out_dir, resume=True, log=say, events=events)
    session_s = time.perf_counter() - t0
    session_cpu = time.process_time() - cpu0
    bundle = load_bundle(bundle_path)
    tr = bundle.card["training"]
    history = tr.get("history") or []
    curve = curve_from_history(history, timeline)
    wall = float(tr["wall_time_s"])
    total_val = float(sum(v.get("val_wall", 0.0) for v in timeline.values()))
    total_val_cpu = float(sum(v.get("val_cpu", 0.0) for v in timeline.values()))
    last = curve[-1] if curve and curve[-1]["iteration"] == run["iterations"] else {}
    train_wall = last.get("train_s")
    if train_wall is None:  # no validation at the end (cannot happen with val_cases): elapsed minus validations
        train_wall = wall - total_val
    train_cpu = last.get("train_cpu_s")
    rare_idx = [names.index(n) for n in spec.rare]
    t1 = time.perf_counter()
    result: Dict[str, Any] = {
        "id": run["id"], "dataset": run["dataset"], "n_patients": run["n"], "loss": run["loss"], "arm": run["arm"],
        "seed": run["seed"], "iterations": run["iterations"], "quick": quick, "threads": threads,
        "train_patients": patients, "train_volumes": train_ids, "validation_volumes": val_ids,
        "test_volumes": test_ids, "classes": names, "rare": list(spec.rare), "config": config.to_dict(),
        "deep_supervision_card": tr.get("deep_supervision"), "context_labels_card": tr.get("context_labels"),
        "wall_time_s": wall, "validation_s": total_val, "validation_cpu_s": total_val_cpu,
        # training only, up to the last iteration (the curve's last point: the validations before it subtracted)
        "train_s": train_wall, "seconds_per_iteration": train_wall / max(1, run["iterations"]),
        "train_cpu_s": train_cpu,
        "cpu_seconds_per_iteration": train_cpu / max(1, run["iterations"]) if train_cpu is not None else None,
        "session_s": session_s, "session_cpu_s": session_cpu,
        "loss_history": [{"iteration": h["iteration"], "loss": h["loss"]} for h in history if "loss" in h],
        "curve": curve,
        "test": ri.evaluate_split(bundle.network, test_cases, spec, names, rare_idx, margins=False),
        "train": ri.evaluate_split(bundle.network, train_cases, spec, names, rare_idx, margins=False),
    }
    result["eval_s"] = time.perf_counter() - t1
    result["eval_cpu_s"] = time.process_time() - cpu0 - session_cpu
    return ri.close_job(start, result, res_file, out_dir,
                        f"wall {wall:.0f} s (validation {total_val:.0f} s), evaluation {result['eval_s']:.0f} s")


def _worker(run: Dict[str, Any], work: str, threads: int, quick: bool) -> Tuple[str, Optional[str], float]:
    t0 = time.perf_counter()
    try:
        run_one(run, work, threads, quick)
        return run["id"], None, time.perf_counter() - t0
    except Exception:  # noqa: BLE001 - reported by the parent; the other runs go on
        return run["id"], traceback.format_exc(), time.perf_counter() - t0


def warm_cache(runs: List[Dict[str, Any]], quick: bool) -> None:
    """Prepare every case the runs need once, in this process, so that parallel workers do not
    prepare the same case twice (the cache is shared with real_imbalance.py)."""
    from imbalanceseglib.training import TrainConfig
    for ds in sorted({r["dataset"] for r in runs}):
        spec = rd.DATASETS[ds]
        folder = rd.data_folder(spec)
        classes = rd.classes(folder)
        config = TrainConfig.from_dict(run_config(next(r for r in runs if r["dataset"] == ds), classes, 1))
        sp = rd.split(spec, folder)
        ids = set(validation_ids(spec, folder, 2 if quick else N_VAL[ds]))
        ids |= set(sp.test[:2] if quick else sp.test)
        for r in runs:
            if r["dataset"] == ds:
                ids |= set(sp.volumes(rd.training_patients(sp, r["n"], r["seed"])))
        missing = [c for c in sorted(ids) if not (CACHE / rd.grid_tag(spec) / f"{c}.npz").is_file()]
        if missing:
            t0 = time.perf_counter()
            for c in missing:
                rd.load_case(spec, folder, c, config, CACHE)
            log(f"{ds}: prepared {len(missing)} case(s) in {time.perf_counter() - t0:.0f} s")


def stop_requested(work: Path) -> bool:
    return (Path(work) / "STOP").exists()


def run_all(runs: List[Dict[str, Any]], work: Path, n_procs: int, max_hours: Optional[float],
            quick: bool) -> Dict[str, Any]:
    """The runs in groups of ``n_procs`` (the two arms of a seed side by side), one torch thread each."""
    threads = 1
    todo = [r for r in runs if not result_path(work, r["id"]).is_file()]
    log(f"{len(runs) - len(todo)} of {len(runs)} runs already done; {len(todo)} to run, {n_procs} at a time x "
        f"{threads} thread" + (f"; no new pair after {max_hours:g} h" if max_hours else "")
        + f"; touch {Path(work) / 'STOP'} to stop after the pair in progress")
    failed: Dict[str, str] = {}
    t_start = time.time()
    if not todo:
        return {"failed": failed, "hours": 0.0}
    warm_cache(todo, quick)
    import multiprocessing as mp
    with ProcessPoolExecutor(max_workers=n_procs, mp_context=mp.get_context("spawn")) as pool:
        for k in range(0, len(todo), n_procs):
            group = todo[k:k + n_procs]
            if max_hours is not None and time.time() - t_start > max_hours * 3600:
                log(f"--max-hours {max_hours:g} reached: {len(todo) - k} run(s) not started")
                break
            if stop_requested(work):
                log(f"{Path(work) / 'STOP'} found: {len(todo) - k} run(s) not started")
                break
            log("start " + ", ".join(r["id"] for r in group))
            futs = {pool.submit(_worker, r, str(work), threads, quick): r for r in group}
            wait(list(futs))
            for fut, r in futs.items():
                try:
                    rid, err, secs = fut.result()
                except Exception as exc:  # noqa: BLE001 - e.g. a worker killed for memory
                    rid, err, secs = r["id"], f"{type(exc).__name__}: {exc}", 0.0
                if err:
                    failed[rid] = err
                    log(f"FAILED {rid} after {secs / 60:.1f} min:\n{err}")
                else:
                    log(f"done {rid} in {secs / 60:.1f} min")
            if failed and any("BrokenProcessPool" in e for e in failed.values()):
                log("the worker pool broke; rerun the command to continue")
                break
    return {"failed": failed, "hours": (time.time() - t_start) / 3600}


# --------------------------------------------------------------------------- timing


def time_iterations(datasets: Sequence[str], reps: int, warm: int, n_it: int, work: Path,
                    losses: Sequence[str] = ("dice_ce",), eval_cases: int = 0) -> Dict[str, Any]:
    """Seconds per training iteration with and without deep supervision (one thread, this process):
    short ``train()`` runs, the arms interleaved (A B, then B A, ...); per run the seconds of the
    last ``n_it`` iterations from the history's elapsed times (the engine check and the first
    ``warm`` iterations excluded). With ``eval_cases``, also seconds per validation volume and per
    evaluated test volume (for ``--plan``)."""
    import torch
    torch.set_num_threads(1)
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.training import TrainConfig, train
    from imbalanceseglib.training_loop import evaluate_cases

    out: Dict[str, Any] = {"reps": reps, "warm": warm, "timed_iterations": n_it, "threads": 1, "rows": [],
                           "loadavg_start": os.getloadavg()[0]}
    for ds in datasets:
        spec = rd.DATASETS[ds]
        folder = rd.data_folder(spec)
        classes = rd.classes(folder)
        sp = rd.split(spec, folder)
        for loss in losses:
            for rep in range(reps):
                order = ARMS if rep % 2 == 0 else tuple(reversed(ARMS))
                for arm in order:
                    run = make_run(ds, loss, arm, 0, warm + n_it)
                    cfg = run_config(run, classes, 1)
                    cfg.update(log_every=1, val_every=10 ** 9, checkpoint_every=10 ** 9, name=f"timing-{run['id']}")
                    config = TrainConfig.from_dict(cfg)
                    cases = [rd.load_case(spec, folder, c, config, CACHE)
                             for c in sp.volumes(rd.training_patients(sp, PATIENTS[ds], 0))]
                    out_dir = work / "_timing" / run["id"]
                    shutil.rmtree(out_dir, ignore_errors=True)
                    load0 = os.getloadavg()[0]
                    cpu_at: Dict[int, float] = {}

                    def mark(line: str) -> None:  # the progress line of each iteration: this process's CPU time
                        if line.startswith("iter "):
                            cpu_at[int(line.split()[1].split("/")[0])] = time.process_time()
                    bundle = load_bundle(train(config, cases, [], out_dir, resume=False, log=mark))
                    el = [h["elapsed_s"] for h in bundle.card["training"]["history"] if "elapsed_s" in h]
                    spi = (el[-1] - el[warm - 1]) / n_it
                    cpi = (cpu_at[warm + n_it] - cpu_at[warm]) / n_it
                    out["rows"].append({"dataset": ds, "loss": loss, "arm": arm, "rep": rep, "s_per_it": spi,
                                        "cpu_s_per_it": cpi, "loadavg": [load0, os.getloadavg()[0]]})
                    log(f"timing {ds} {loss} {arm} rep {rep}: {spi:.4f} s/iteration wall, {cpi:.4f} CPU "
                        f"(load {load0:.1f})")
                    shutil.rmtree(out_dir, ignore_errors=True)
                    if eval_cases and rep == 0 and arm == "plain":
                        names = [c["name"] for c in classes]
                        vc = [rd.load_case(spec, folder, c, config, CACHE)
                              for c in validation_ids(spec, folder, eval_cases)]
                        t0, c0 = time.perf_counter(), time.process_time()
                        evaluate_cases(bundle.network, vc, config)
                        out.setdefault("val_s_per_volume", {})[ds] = (time.perf_counter() - t0) / len(vc)
                        out.setdefault("val_cpu_per_volume", {})[ds] = (time.process_time() - c0) / len(vc)
                        tc = [rd.load_case(spec, folder, c, config, CACHE) for c in sp.test[:eval_cases]]
                        t0, c0 = time.perf_counter(), time.process_time()
                        ri.evaluate_split(bundle.network, tc, spec, names, [names.index(n) for n in spec.rare],
                                          margins=False)
                        out.setdefault("eval_s_per_volume", {})[ds] = (time.perf_counter() - t0) / len(tc)
                        out.setdefault("eval_cpu_per_volume", {})[ds] = (time.process_time() - c0) / len(tc)
    out["loadavg_end"] = os.getloadavg()[0]
    out["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return out


def timing_summary(timing: Dict[str, Any], ds: str, loss: str = "dice_ce") -> Optional[Dict[str, Any]]:
    rows = [r for r in timing.get("rows", []) if r["dataset"] == ds and r["loss"] == loss]
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: r["rep"])
    per = {a: [r["s_per_it"] for r in rows if r["arm"] == a] for a in ARMS}
    cpu = {a: [r.get("cpu_s_per_it") for r in rows if r["arm"] == a] for a in ARMS}
    out = {"plain": per["plain"], "ds": per["ds"], "ratios": [d / p for p, d in zip(per["plain"], per["ds"])]}
    if all(x is not None for a in ARMS for x in cpu[a]):
        out.update(cpu_plain=cpu["plain"], cpu_ds=cpu["ds"],
                   cpu_ratios=[d / p for p, d in zip(cpu["plain"], cpu["ds"])])
    return out


def estimate(runs: List[Dict[str, Any]], timing: Dict[str, Any]) -> List[Tuple[Dict[str, Any], float, float]]:
    """(run, estimated CPU seconds, estimated wall seconds at the load of the measurement), one
    thread: training + validations (+ the final one in the bundle) + final evaluation."""
    out = []
    for r in runs:
        ds = r["dataset"]
        s = timing_summary(timing, ds, r["loss"])
        factor = 1.0
        if s is None:  # this loss not timed: Dice + CE's time times real_imbalance's relative cost
            s, factor = timing_summary(timing, ds), ri.METHODS[r["loss"]][2]
        n_val = N_VAL[ds] * (r["iterations"] // r["eval_every"] + 1)
        n_eval = len_test(ds) + PATIENTS[ds] * (2 if ds == "acdc" else 1)
        est = []
        for key, v_key, e_key in (("cpu_", "val_cpu_per_volume", "eval_cpu_per_volume"),
                                  ("", "val_s_per_volume", "eval_s_per_volume")):
            spi = float(np.mean(s[f"{key}{r['arm']}"])) * factor
            est.append(r["iterations"] * spi + n_val * timing[v_key][ds] + n_eval * timing[e_key][ds] + 15.0)
        out.append((r, est[0], est[1]))
    return out


def len_test(ds: str) -> int:
    return 40 if ds == "acdc" else 10


def print_plan(runs: List[Dict[str, Any]], timing: Dict[str, Any], work: Path, procs: int) -> None:
    est = estimate(runs, timing)
    print(f"\nmeasured (1 thread, load average {timing['loadavg_start']:.1f}-{timing['loadavg_end']:.1f}; CPU = this "
          "process's CPU time, wall = elapsed at that load):")
    for ds in sorted({r['dataset'] for r in runs}):
        s = timing_summary(timing, ds)
        print(f"  {ds}: per iteration without / with DS: CPU {np.mean(s['cpu_plain']):.3f} / {np.mean(s['cpu_ds']):.3f} s "
              f"(x{np.mean(s['cpu_ratios']):.2f}), wall {np.mean(s['plain']):.3f} / {np.mean(s['ds']):.3f} s; per volume: "
              f"validation CPU {timing['val_cpu_per_volume'][ds]:.2f} s (wall {timing['val_s_per_volume'][ds]:.2f}), "
              f"final evaluation CPU {timing['eval_cpu_per_volume'][ds]:.2f} s (wall {timing['eval_s_per_volume'][ds]:.2f})")
    print(f"\n{'#':>3}  {'run':<40} {'CPU min':>8} {'wall min':>8} {'cum. CPU-h':>10}  status")
    cum = cum_wall = 0.0
    marked = False
    for i, (r, cpu, wall) in enumerate(est):
        if not marked and (cum + cpu) / 3600 > BUDGET_CPU_HOURS:
            print(f"     ---- {BUDGET_CPU_HOURS:g} CPU-hours reached before this run ----")
            marked = True
        cum += cpu
        cum_wall += wall
        done = "done" if result_path(work, r["id"]).is_file() else ""
        print(f"{i + 1:>3}  {r['id']:<40} {cpu / 60:>8.1f} {wall / 60:>8.1f} {cum / 3600:>10.2f}  {done}")
    n_ds = len({r['dataset'] for r in runs})
    timing_cpu = 2 * n_ds * TIMING_REPS * (TIMING_WARM + TIMING_IT) * float(np.mean(
        [np.mean(timing_summary(timing, ds)["cpu_ds"]) for ds in {r['dataset'] for r in runs}])) + 10 * 2 * n_ds * TIMING_REPS
    print(f"{len(runs)} runs: {cum / 3600:.2f} CPU-hours (one thread each) + about {timing_cpu / 60:.0f} CPU-min for the "
          f"interleaved timing; wall with --jobs {procs} at the measured load: about {cum_wall / 3600 / procs:.2f} h")


# --------------------------------------------------------------------------- results


def load_results(work: Path, runs: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    out = {}
    for r in runs:
        p = result_path(work, r["id"])
        if p.is_file():
            try:
                res = json.loads(p.read_text())
            except ValueError:
                continue
            if res.get("iterations") == r["iterations"]:
                out[r["id"]] = res
    return out


def _ms(values: Sequence[Optional[float]], digits: int = 3) -> str:
    return ri._ms(values, digits)


def _cm(split: Dict[str, Any], cls: str, metric: str) -> Optional[float]:
    return ri._case_mean(split, cls, metric)


def rare_value(d: Dict[str, Optional[float]], rare: Sequence[str]) -> Optional[float]:
    """Mean over the rare classes (None when any is undefined)."""
    v = [d.get(c) for c in rare]
    return float(np.mean(v)) if v and all(x is not None for x in v) else None


def rare_curve(res: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    pts = [(p["iteration"], p["train_s"] if p["train_s"] is not None else np.nan, rare_value(p["dice"], res["rare"]))
           for p in res["curve"]]
    pts = [(i, t, d if d is not None else 0.0) for i, t, d in pts]
    a = np.array(pts, dtype=np.float64).reshape(-1, 3)
    return a[:, 0], a[:, 1], a[:, 2]


def first_reach(res: Dict[str, Any], threshold: float) -> Tuple[Optional[int], Optional[float], Optional[float]]:
    """(iteration, training CPU s, training wall s) of the first validation whose rare-class Dice
    reaches ``threshold``; Nones when none does."""
    _, _, dice = rare_curve(res)
    for p, d in zip(res["curve"], dice):
        if d >= threshold:
            return int(p["iteration"]), p.get("train_cpu_s"), p.get("train_s")
    return None, None, None


def pairs(results: Dict[str, Dict[str, Any]], ds: str, loss: str) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
    """(without, with) per seed where both are done, by seed."""
    by: Dict[int, Dict[str, Dict[str, Any]]] = {}
    for r in results.values():
        if r["dataset"] == ds and r["loss"] == loss:
            by.setdefault(r["seed"], {})[r["arm"]] = r
    return [(v["plain"], v["ds"]) for s, v in sorted(by.items()) if "plain" in v and "ds" in v]


def arm_results(results, ds: str, loss: str, arm: str) -> List[Dict[str, Any]]:
    return sorted([r for r in results.values() if r["dataset"] == ds and r["loss"] == loss and r["arm"] == arm],
                  key=lambda r: r["seed"])


def convergence_rows(results, ds: str, loss: str) -> List[Dict[str, Any]]:
    rows = []
    for p, d in pairs(results, ds, loss):
        base_final = rare_curve(p)[2][-1] if p["curve"] else None
        thr = REACH * base_final if base_final is not None else None
        row = {"seed": p["seed"], "base_final": base_final, "threshold": thr}
        for tag, r in (("plain", p), ("ds", d)):
            its, secs, dice = rare_curve(r)
            row[f"{tag}_final"] = float(dice[-1]) if len(dice) else None
            row[f"{tag}_auc"] = float(np.mean(dice)) if len(dice) else None
            row[f"{tag}_it"], row[f"{tag}_cpu"], row[f"{tag}_s"] = (first_reach(r, thr) if thr is not None
                                                                     else (None, None, None))
            row[f"{tag}_spi"] = r["seconds_per_iteration"]
            row[f"{tag}_cspi"] = r.get("cpu_seconds_per_iteration")
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- report


def fmt(v: Optional[float], digits: int = 3) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def diff_stats(values: Sequence[float], digits: int = 3) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "-"
    s = f"{np.mean(v):+.{digits}f}"
    if len(v) > 1:
        s += f" ± {np.std(v, ddof=1):.{digits}f}"
    return s + f" (DS higher in {sum(x > 0 for x in v)} of {len(v)})"


def timing_section(timing: Optional[Dict[str, Any]], datasets: Sequence[str]) -> List[str]:
    if not timing:
        return ["Not measured yet.", ""]
    lines = [f"Measured {timing['finished']} in one process, one torch thread, {timing['reps']} repetitions per data "
             f"set with the arms interleaved (without-with, then with-without, ...); each value is the mean seconds "
             f"of {timing['timed_iterations']} iterations after {timing['warm']} warm-up ones, of a `train()` run of "
             f"the pipeline on seed 0's training volumes. Load average {timing['loadavg_start']:.1f} at the start, "
             f"{timing['loadavg_end']:.1f} at the end (2 cores, shared with other jobs).", "",
             "CPU time is this process's (one thread: what the iteration costs); wall time also counts the waits "
             "for the shared cores.", "",
             "| data set | CPU s/iteration without DS (per repetition) | with DS | CPU ratio with/without "
             "(mean ± SD) | wall s/iteration without / with | wall ratio |",
             "|---|---|---|---|---|---|"]
    for ds in datasets:
        s = timing_summary(timing, ds)
        if not s:
            continue
        lines.append(f"| {ds.upper()} | {', '.join(f'{x:.4f}' for x in s.get('cpu_plain', []))} | "
                     f"{', '.join(f'{x:.4f}' for x in s.get('cpu_ds', []))} | {_ms(s.get('cpu_ratios', []), 3)} | "
                     f"{np.mean(s['plain']):.4f} / {np.mean(s['ds']):.4f} | {_ms(s['ratios'], 3)} |")
    lines.append("")
    return lines


def in_run_ratios(results, ds: str, loss: str = "dice_ce") -> List[float]:
    """Per seed: training CPU seconds per iteration with DS over without, from the long runs (the
    two arms ran side by side; validation time excluded)."""
    return [q["cpu_seconds_per_iteration"] / p["cpu_seconds_per_iteration"] for p, q in pairs(results, ds, loss)
            if p.get("cpu_seconds_per_iteration") and q.get("cpu_seconds_per_iteration")]


def in_run_section(results, datasets: Sequence[str]) -> List[str]:
    rows = []
    for ds in datasets:
        pp = pairs(results, ds, "dice_ce")
        if not pp:
            continue
        r = in_run_ratios(results, ds)
        without = ", ".join("%.3f" % p["cpu_seconds_per_iteration"] for p, _ in pp)
        with_ds = ", ".join("%.3f" % q["cpu_seconds_per_iteration"] for _, q in pp)
        rows.append(f"| {ds.upper()} | {without} | {with_ds} | "
                    f"{', '.join(f'{x:.3f}' for x in r)} | {_ms(r, 3)} |")
    if not rows:
        return []
    return ["The same from the long runs (Dice + CE): each run's training CPU seconds per iteration over all its "
            "iterations (validations excluded; the two arms of a seed ran side by side), per seed.", "",
            "| data set | CPU s/iteration without DS (per seed) | with DS | ratio per seed | ratio mean ± SD |",
            "|---|---|---|---|---|"] + rows + [""]


def final_section(results, ds: str, loss: str) -> List[str]:
    spec = rd.DATASETS[ds]
    g = {a: arm_results(results, ds, loss, a) for a in ARMS}
    if not any(g.values()):
        return []
    any_r = next(r for a in ARMS for r in g[a])
    classes = any_r["classes"][1:]
    unit = "nominal mm" if ds == "acdc" else "mm"
    per = "volume" if ds == "acdc" else "patient"
    lines = [f"**Final evaluation, {LOSS_LABELS[loss]}**: per class mean ± SD over seeds of the per-{per} means; "
             f"test set ({len(any_r['test']['cases'])} volumes) and, last column, the run's own training volumes; "
             f"HD95 in {unit}.", "",
             "| arm | seeds | class | test Dice | test sensitivity | test precision | test HD95 | training Dice |",
             "|---|---|---|---|---|---|---|---|"]
    for cls in classes:
        star = " (rare)" if cls in spec.rare else ""
        for a in ARMS:
            rs = g[a]
            if not rs:
                continue
            lines.append(f"| {ARM_LABELS[a]} | {len(rs)} | {cls}{star} | "
                         + " | ".join(_ms([_cm(r["test"], cls, k) for r in rs], 1 if k == "hd95" else 3)
                                      for k in ("dice", "sensitivity", "precision", "hd95"))
                         + f" | {_ms([_cm(r['train'], cls, 'dice') for r in rs])} |")
    lines.append("")
    pp = pairs(results, ds, loss)
    if pp:
        seeds = [p["seed"] for p, _ in pp]
        lines += [f"**Paired differences, with minus without DS** (same seed: same patients, initialisation and "
                  f"sampling), {LOSS_LABELS[loss]}: test Dice per seed, then mean ± SD over seeds of each metric.", "",
                  "| class | " + " | ".join(f"Δ test Dice s{s}" for s in seeds)
                  + " | Δ test Dice | Δ test sens. | Δ test prec. | Δ test HD95 | Δ training Dice |",
                  "|---|" + "---|" * (len(seeds) + 5)]
        for cls in classes:
            star = " (rare)" if cls in spec.rare else ""

            def d(split, k):
                out = []
                for p, q in pp:
                    a, b = _cm(p[split], cls, k), _cm(q[split], cls, k)
                    out.append(b - a if a is not None and b is not None else float("nan"))
                return out
            dice = d("test", "dice")
            lines.append(f"| {cls}{star} | " + " | ".join(f"{x:+.3f}" for x in dice) + " | "
                         + " | ".join(diff_stats(v, 1 if k == "hd95" else 3) for v, k in
                                      ((dice, "dice"), (d("test", "sensitivity"), "s"), (d("test", "precision"), "p"),
                                       (d("test", "hd95"), "hd95"), (d("train", "dice"), "dice")))
                         + " |")
        lines.append("")
    return lines


def convergence_section(results, ds: str, loss: str) -> List[str]:
    spec = rd.DATASETS[ds]
    rows = convergence_rows(results, ds, loss)
    if not rows:
        return []
    r0 = pairs(results, ds, loss)[0][0]
    every = r0["curve"][0]["iteration"] if r0["curve"] else "-"
    lines = [f"**Convergence, {LOSS_LABELS[loss]}**: rare-class ({', '.join(spec.rare)}) validation Dice "
             f"({len(r0['validation_volumes'])} validation volumes, every {every} iterations). Threshold: "
             f"{REACH:.0%} of the run without DS's final value on the same seed; 'reached at' is the first validation "
             "at or above it, with the run's training seconds (validation time subtracted; the two arms ran side by "
             "side, so their wall seconds saw the same load; CPU seconds are the run's own). 'mean over curve' is the "
             "rare-class validation Dice averaged over all validations (area under the curve / iterations). CPU "
             "seconds include `train()`'s start (the training-engine check, a few seconds).", "",
             "| seed | final without DS | threshold | reached without DS: iteration (CPU s / wall s) | with DS | "
             "final with DS | mean over curve without / with | CPU s/it in the run without / with |",
             "|---|---|---|---|---|---|---|---|"]

    def at(it, c, s):
        return "not reached" if it is None else f"{it} ({fmt(c, 0)} / {fmt(s, 0)})"
    for r in rows:
        lines.append(f"| {r['seed']} | {fmt(r['base_final'])} | {fmt(r['threshold'])} | "
                     f"{at(r['plain_it'], r['plain_cpu'], r['plain_s'])} | {at(r['ds_it'], r['ds_cpu'], r['ds_s'])} | "
                     f"{fmt(r['ds_final'])} | {fmt(r['plain_auc'])} / {fmt(r['ds_auc'])} "
                     f"| {fmt(r['plain_cspi'], 3)} / {fmt(r['ds_cspi'], 3)} |")
    lines.append("")
    # per class final validation Dice and mean over curve
    classes = r0["classes"][1:]
    lines += ["Per class validation Dice, mean over seeds: at the end / averaged over the curve.", "",
              "| class | without DS: final | with DS: final | without DS: mean over curve | with DS: mean over curve |",
              "|---|---|---|---|---|"]
    for cls in classes:
        vals = {}
        for a in ARMS:
            rs = arm_results(results, ds, loss, a)
            fin = [r["curve"][-1]["dice"].get(cls) for r in rs if r["curve"]]
            auc = [np.mean([p["dice"].get(cls) or 0.0 for p in r["curve"]]) for r in rs if r["curve"]]
            vals[a] = (_ms(fin), _ms(auc))
        lines.append(f"| {cls}{' (rare)' if cls in spec.rare else ''} | {vals['plain'][0]} | {vals['ds'][0]} | "
                     f"{vals['plain'][1]} | {vals['ds'][1]} |")
    lines.append("")
    return lines


def findings(results, timing, datasets, losses) -> List[str]:
    out: List[str] = []
    for loss in losses:
        for ds in datasets:
            spec = rd.DATASETS[ds]
            pp = pairs(results, ds, loss)
            if not pp:
                continue
            base = [p for p, _ in pp]
            tag = f"{ds.upper()} ({LOSS_LABELS[loss]}, {len(pp)} seed(s))"
            for cls in spec.rare:
                tr = [_cm(p["train"], cls, "dice") for p in base]
                fit = "learned it on its training volumes" if np.mean(tr) >= 0.8 else \
                    "did NOT learn it well on its training volumes"
                te = [[_cm(x["test"], cls, "dice") for x in pair] for pair in pp]
                d = [b - a for a, b in te if a is not None and b is not None]
                ds_s = [[_cm(x["test"], cls, "sensitivity") for x in pair] for pair in pp]
                dsens = [b - a for a, b in ds_s if a is not None and b is not None]
                def paired(metric):
                    v = [(_cm(q["test"], cls, metric), _cm(p["test"], cls, metric)) for p, q in pp]
                    return [a - b for a, b in v if a is not None and b is not None]
                out.append(f"* {tag}, {cls}: the run without DS {fit} (training Dice {_ms(tr)}). Test Dice "
                           f"{_ms([a for a, _ in te])} without DS, {_ms([b for _, b in te])} with; paired difference "
                           f"{diff_stats(d)}; sensitivity {diff_stats(dsens)}; precision "
                           f"{diff_stats(paired('precision'))}; HD95 ({'nominal ' if ds == 'acdc' else ''}mm) "
                           f"{diff_stats(paired('hd95'), 1)}.")
                for p, q in pp:
                    a, b = _cm(p["train"], cls, "dice"), _cm(q["train"], cls, "dice")
                    if (a or 0) >= 0.8 and (b or 0) < 0.5:
                        out.append(f"  **Seed {p['seed']}: with DS the run did not learn {cls} even on its own "
                                   f"training volumes** (training Dice {b:.3f}, against {a:.3f} without; its "
                                   "validation curve shows whether it was starting to).")
            others = [c for c in pp[0][0]["classes"][1:] if c not in spec.rare]
            od = []
            for cls in others:
                v = [(_cm(q["test"], cls, "dice") or 0.0) - (_cm(p["test"], cls, "dice") or 0.0) for p, q in pp]
                od.append(f"{cls} {np.mean(v):+.3f} ({sum(x > 0 for x in v)}/{len(v)} higher)")
            if od:
                out.append(f"* {tag}, other classes, test Dice with minus without DS (mean over seeds): " + "; ".join(od) + ".")
            rows = convergence_rows(results, ds, loss)
            if rows:
                def its(tag):
                    return [r[f"{tag}_it"] for r in rows]
                faster = sum(1 for r in rows if r["ds_it"] is not None and (r["plain_it"] is None or r["ds_it"] < r["plain_it"]))
                slower = sum(1 for r in rows if r["plain_it"] is not None and (r["ds_it"] is None or r["ds_it"] > r["plain_it"]))
                def cpus(tag):
                    return "[" + ", ".join("-" if r[f"{tag}_cpu"] is None else f"{r[f'{tag}_cpu']:.0f}"
                                           for r in rows) + "]"
                auc = [r["ds_auc"] - r["plain_auc"] for r in rows]
                fin = [r["ds_final"] - r["plain_final"] for r in rows]
                out.append(f"* {tag}, convergence: iterations to {REACH:.0%} of the final rare-class validation Dice "
                           f"without DS, per seed: without {its('plain')}, with {its('ds')} (training CPU seconds "
                           f"{cpus('plain')} and {cpus('ds')}; None: not reached); DS earlier in {faster}, later in "
                           f"{slower}, tied in {len(rows) - faster - slower} of {len(rows)} seeds. Mean rare-class "
                           f"validation Dice over the curve, with minus without: {diff_stats(auc)}; final rare-class "
                           f"validation Dice, with minus without: {diff_stats(fin)}.")
    if timing:
        for ds in datasets:
            s = timing_summary(timing, ds)
            if s:
                r = in_run_ratios(results, ds)
                out.append(f"* {ds.upper()}, time: {np.mean(s.get('cpu_ds', [np.nan])):.3f} CPU s per iteration with "
                           f"DS against {np.mean(s.get('cpu_plain', [np.nan])):.3f} without (ratio "
                           f"{_ms(s.get('cpu_ratios', []), 3)}; wall ratio {_ms(s['ratios'], 3)}; interleaved timing, "
                           "one thread)"
                           + (f"; over the whole long runs the CPU ratio per seed was {', '.join(f'{x:.3f}' for x in r)}"
                              if r else "")
                           + "; inference is unchanged (the bundle holds the plain network).")
    return out


#: The deep-supervision runs made before the Dice term took soft targets in the semimetric form
#: (commit bf30074): the auxiliary outputs' Dice used sum(p * t) on block-averaged targets.
PRODUCT_DICE_RESULTS = RESULTS / "product_dice_aux"


def product_dice_section(results: Dict[str, Dict[str, Any]], datasets: Sequence[str]) -> List[str]:
    """The earlier runs with DS (product-form Dice on the auxiliary outputs' soft targets) beside
    the current ones of the same id: rare-class test Dice per seed."""
    if not PRODUCT_DICE_RESULTS.is_dir():
        return []
    rows = []
    for f in sorted(PRODUCT_DICE_RESULTS.glob("*.json")):
        try:
            old = json.loads(f.read_text())
        except ValueError:
            continue
        if old.get("dataset") not in datasets:
            continue
        new = results.get(old["id"])
        base = results.get(old["id"].replace("-ds-", "-plain-"))
        for cls in rd.DATASETS[old["dataset"]].rare:
            rows.append(f"| `{old['id']}` | {cls} | {fmt(_cm(base['test'], cls, 'dice') if base else None)} | "
                        f"{fmt(_cm(old['test'], cls, 'dice'))} | {fmt(_cm(new['test'], cls, 'dice') if new else None)} | "
                        f"{fmt(_cm(old['test'], cls, 'precision'))} / "
                        f"{fmt(_cm(new['test'], cls, 'precision') if new else None)} |")
    if not rows:
        return []
    return ["## Earlier runs: product-form Dice on the auxiliary outputs", "",
            "Until commit bf30074 the Dice term used the overlap sum(p * t), which for the auxiliary outputs' "
            "block-averaged (soft) targets is not smallest at p = t; it now uses the Dice semimetric overlap "
            "(sum p + sum t - sum |p - t|) / 2, equal for one-hot targets (so the runs without DS are unchanged). "
            "The runs with DS made before the fix are kept in `deep_supervision_results/product_dice_aux/`; their "
            "rare-class test Dice beside the rerun of the same id (same seed, patients, initial network and "
            "sampling):", "",
            "| run | class | test Dice without DS | with DS, product form (before) | with DS, semimetric (now) | "
            "test precision before / now |", "|---|---|---|---|---|---|"] + rows + [""]


def literature_lines() -> List[str]:
    return [
        "## Against the published effect",
        "",
        "Dou et al. (MedIA 41, 2017) introduced the 3D deeply supervised network on liver segmentation from CT "
        "(MICCAI-SLiver07) and whole-heart and great-vessel segmentation from MR (HVSMR 2016). Against the same 3D "
        "fully convolutional network without the auxiliary losses they report faster convergence (their training "
        "and validation loss curves fall faster) and better segmentation scores on both tasks, attributing it to "
        "the direct gradient the hidden layers receive. Their setting differs from this one: a plain "
        "encoder-decoder FCN whose side outputs are upsampled to full resolution by deconvolution and compared "
        "with the full-resolution labels (here, as in nnU-Net, the targets are averaged down to each decoder "
        "level), on large structures (liver, blood pool, myocardium), with a CRF afterwards; not on rare classes "
        "with a handful of training patients, and not on a 4-level U-Net whose skip connections already give the "
        "early layers a short gradient path. So only the direction of the effect is compared here.",
        "",
    ]


def plot(results, datasets, losses, path: Path) -> Optional[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [ds for ds in datasets if any(arm_results(results, ds, lo, a) for lo in losses for a in ARMS)]
    if not rows:
        return None
    n_cols = 1 + max(len(next(r for r in results.values() if r["dataset"] == ds)["classes"]) - 1 for ds in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(3.6 * n_cols, 3.3 * len(rows)), squeeze=False)
    colours = {("dice_ce", "plain"): "#1f77b4", ("dice_ce", "ds"): "#d62728",
               ("asym_large_margin", "plain"): "#2ca02c", ("asym_large_margin", "ds"): "#ff7f0e"}
    for i, ds in enumerate(rows):
        spec = rd.DATASETS[ds]
        r0 = next(r for r in results.values() if r["dataset"] == ds)
        panels = ([("rare: mean of " + " + ".join(spec.rare), None)] if len(spec.rare) > 1 else []) \
            + [(c + (" (rare)" if c in spec.rare else ""), c) for c in r0["classes"][1:]]
        for j in range(n_cols):
            ax = axes[i][j]
            if j >= len(panels):
                ax.axis("off")
                continue
            title, cls = panels[j]
            for lo in losses:
                for a in ARMS:
                    rs = [r for r in arm_results(results, ds, lo, a) if r["curve"]]
                    if not rs:
                        continue
                    col = colours.get((lo, a), None)
                    style = "-" if lo == "dice_ce" else "--"
                    ys = []
                    for r in rs:
                        x = [p["iteration"] for p in r["curve"]]
                        y = [(rare_value(p["dice"], spec.rare) if cls is None else p["dice"].get(cls)) or 0.0
                             for p in r["curve"]]
                        ax.plot(x, y, style, color=col, lw=0.6, alpha=0.45)
                        ys.append(y)
                    if len({len(y) for y in ys}) == 1:
                        ax.plot(x, np.mean(ys, axis=0), style, color=col, lw=2.0,
                                label=f"{LOSS_LABELS[lo]} {ARM_LABELS[a]} (n={len(rs)})")
            ax.set_ylim(0, 1)
            ax.set_title(f"{ds.upper()}: {title}", fontsize=9)
            ax.set_xlabel("iteration", fontsize=8)
            if j == 0:
                ax.set_ylabel("validation Dice", fontsize=8)
                ax.legend(fontsize=6, loc="lower right")
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    fig.suptitle("Validation Dice during training (thin: seeds, thick: mean)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(results, runs, timing, command: str, work: Path, out: Path, plot_path: Optional[Path],
                 datasets: Sequence[str], losses: Sequence[str], iterations: Dict[str, int],
                 run_info: Optional[Dict[str, Any]] = None) -> None:
    done = [r for r in runs if r["id"] in results]
    missing = [r for r in runs if r["id"] not in results]
    loads = [x for r in results.values() for x in r.get("loadavg_start_end", [])]
    cpu_s = sum((r.get("session_cpu_s") or 0.0) + (r.get("eval_cpu_s") or 0.0) for r in results.values())
    lines = [
        "# Deep supervision on real patients, with and without (CHAOS, ACDC)",
        "",
        f"Command: `{command}`"
        + (" (this report from the saved results; the runs were made by the same command without `--report-only`)"
           if "--report-only" in command else "") + "  ",
        f"Machine: {machine()}; one torch thread per run, two runs side by side"
        + (f"; load average at run starts/ends {min(loads):.1f}-{max(loads):.1f} (other jobs shared the 2 cores)"
           if loads else "") + "  ",
        f"Date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}  ",
        f"Runs done: **{len(done)} of {len(runs)} planned** (training + evaluation: {cpu_s / 3600:.2f} CPU-hours, "
        "one thread per run).",
        "",
    ]
    if missing:
        lines += [f"Missing ({len(missing)}; not started in the session(s) so far: the run stops cleanly between "
                  "pairs with `--max-hours` or the STOP file. Rerun the command to continue; finished runs are "
                  "skipped): " + ", ".join(f"`{r['id']}`" for r in missing), ""]
    if run_info and run_info.get("failed"):
        lines += ["Failed in this session: " + ", ".join(f"`{k}`" for k in run_info["failed"]), ""]
    lines += ["## Set-up", ""]
    for ds in datasets:
        spec = rd.DATASETS[ds]
        folder = rd.data_folder(spec)
        sp = rd.split(spec, folder)
        pats = {s: rd.training_patients(sp, PATIENTS[ds], s) for s in SEEDS}
        lines.append(f"* **{spec.title}** (`../shared/data/{spec.folder}`): {spec.why}. {PATIENTS[ds]} training "
                     f"patients per run (the smallest size of `real_imbalance.py`): "
                     + "; ".join(f"seed {s}: {', '.join(p)}" for s, p in pats.items())
                     + f". Rare class(es): {', '.join(spec.rare)}. Validation subset (not the test set): "
                     f"{', '.join(validation_ids(spec, folder, N_VAL[ds]))}. Test set: "
                     + (f"`test.list` ({len(sp.test)} volumes)." if ds == "acdc" else f"{', '.join(sp.test)}."))
    c = ri.COMMON
    lines += [
        f"* Pipeline: `real_imbalance.py`'s (`COMMON`, `job_config`): UNet3D features {c['features']}, batch "
        f"{c['batch_size']}, AdamW lr {c['learning_rate']:g} (weight decay {c['weight_decay']:g}) with polynomial "
        f"decay over the run, {c['foreground_fraction']:.0%} of the patches centred on a class present, no "
        f"augmentation; iterations {iterations}; validation every "
        + ", ".join(sorted({f"{r['eval_every']} ({r['dataset'].upper()})" for r in runs}))
        + " iterations; training seed = the seed.",
        "* The only difference between the arms: `\"deep_supervision\": " + json.dumps(DS_SETTING)
        + "`, i.e. 1x1x1 heads on the decoder outputs at 1/2 and 1/4 resolution, losses (the same loss as the main "
        "output, its Dice term in the semimetric form that soft targets need) against the targets averaged over "
        "2x2x2 / 4x4x4 blocks, output weights 4/7 (full), 2/7, 1/7. The "
        "heads are dropped at inference (the bundle is the plain network).",
        "* Losses: " + ", ".join(f"{LOSS_LABELS[lo]} (`{lo}`)" for lo in losses)
        + ("" if "asym_large_margin" in losses else
           ". The issue wants DS for every loss; the library applies it to every loss and weighting, but this "
           "benchmark measures Dice + CE only (the budget of about 2 CPU-hours; `--losses dice_ce,asym_large_margin` "
           "adds the asymmetric large-margin loss, with and without DS)") + ".",
        "* Evaluation: `real_imbalance.evaluate_split` (sliding windows, overlap 0.5, on the working grid; Dice, "
        "sensitivity, precision, HD95 from `imbalanceseglib.evaluation`), test set and training volumes. The "
        "validation curve uses the library's validation (`train(..., val_cases)`, per class Dice, the mean over "
        "the validation volumes where the class is present or predicted).",
        "",
    ]
    lines += ["## Findings (computed from the tables below)", "",
              "\"Learned\" a rare class: mean training-set Dice of the run without DS at least 0.8. \"DS higher in k "
              "of n\": seeds where the run with DS has the larger value (for HD95 larger is worse).", ""]
    lines += findings(results, timing, datasets, losses) or ["* no results yet"]
    lines += ["", "## Time cost", ""] + timing_section(timing, datasets) + in_run_section(results, datasets)
    for ds in datasets:
        sec = []
        for lo in losses:
            sec += convergence_section(results, ds, lo) + final_section(results, ds, lo)
        if sec:
            lines += [f"## {rd.DATASETS[ds].title}", ""] + sec
    if plot_path:
        lines += ["## Curves", "", f"![deep_supervision]({os.path.relpath(plot_path, out.parent)})", "",
                  "Validation Dice against iterations, per class (CHAOS, first column: the mean of its two rare "
                  "classes); thin lines: seeds, thick: mean over seeds.", ""]
    lines += product_dice_section(results, datasets)
    lines += literature_lines()
    lines += ["## Runs", "", "| run | status | training CPU s / wall s (validation excluded) | CPU s/iteration | "
              "validation CPU s | final evaluation CPU s | finished |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        res = results.get(r["id"])
        lines.append(f"| `{r['id']}` | {'done' if res else 'missing'} | "
                     + (f"{fmt(res.get('train_cpu_s'), 0)} / {res['train_s']:.0f} | "
                        f"{fmt(res.get('cpu_seconds_per_iteration'), 3)} | {fmt(res.get('validation_cpu_s'), 0)} | "
                        f"{fmt(res.get('eval_cpu_s'), 0)} | {res['finished']} |" if res else "- | - | - | - | - |"))
    lines.append("")
    write_report_atomic(out, lines)


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (one torch thread each)")
    ap.add_argument("--max-hours", type=float, default=None, help="start no new pair of runs after this many hours")
    ap.add_argument("--losses", default=",".join(DEFAULT_LOSSES),
                    help="comma-separated: dice_ce, asym_large_margin (default %(default)s)")
    ap.add_argument("--datasets", default="chaos,acdc")
    ap.add_argument("--iterations", type=int, default=None, help="override the iterations of every run (probes)")
    ap.add_argument("--plan", action="store_true", help="time a few iterations and evaluations, print the estimate")
    ap.add_argument("--report-only", action="store_true", help="write the report from the runs done so far")
    ap.add_argument("--retime", action="store_true", help="measure the interleaved timing again")
    ap.add_argument("--quick", action="store_true", help="a short end-to-end check (6 iterations, 1 seed, 2 test volumes)")
    ap.add_argument("--work", default=None, help=f"run folders (default {os.path.relpath(WORK, ROOT)})")
    ap.add_argument("--out", default=None, help=f"report (default {os.path.relpath(REPORT, ROOT)})")
    args = ap.parse_args(argv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))

    datasets = rd.available([d for d in args.datasets.split(",") if d])
    if not datasets:
        return 0
    losses = [lo for lo in args.losses.split(",") if lo]
    for lo in losses:
        if lo not in LOSS_LABELS:
            ap.error(f"unknown loss {lo!r}; known: {', '.join(LOSS_LABELS)}")
    work = Path(args.work) if args.work else (QUICK_WORK if args.quick else WORK)
    out = Path(args.out) if args.out else (work / "report.md" if args.quick else REPORT)
    plot_path = work / "deep_supervision.png" if args.quick else out.with_name("deep_supervision.png")
    if args.quick:
        its = {ds: 6 for ds in datasets}
        seeds: Sequence[int] = (0,)
        evals = 3
    else:
        its = {ds: (args.iterations or ITERATIONS[ds]) for ds in datasets}
        seeds = SEEDS
        evals = EVALS
    runs = plan_runs(datasets, losses, seeds, its, evals)

    if args.plan:
        timing = time_iterations(datasets, 1, 3, 12, work, losses, eval_cases=2)
        print_plan(runs, timing, work, max(1, args.jobs))
        return 0

    tpath = timing_path(work)
    timing = json.loads(tpath.read_text()) if tpath.is_file() else None
    info = None
    if not args.report_only:
        if timing is None or args.retime:
            if args.quick:
                timing = time_iterations(datasets, 1, 2, 3, work, losses)
            else:
                timing = time_iterations(datasets, TIMING_REPS, TIMING_WARM, TIMING_IT, work, losses)
            write_json_atomic(tpath, timing)
        info = run_all(runs, work, max(1, args.jobs), args.max_hours, args.quick)
    results = load_results(work, runs)
    p = plot(results, datasets, losses, plot_path)
    write_report(results, runs, timing, command, work, out, p, datasets, losses, its, info)
    log(f"report: {out} ({len(results)} of {len(runs)} runs done)")
    return 1 if info and info["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
