"""Training speed on real patients: ImbalanceSegLib's loop with and without its CPU training path,
against a plain MONAI training loop with the same network, patch, batch, loss and optimizer.

Data: MSD Task04 hippocampus (``../shared/data/msd_hippocampus``), the demo model's patient-wise
split (``Resources/Models/demo_hippocampus.split.json``): its 200 training patients, and the first
10 of its validation patients as the fixed validation subset. Configuration: the demo model's
(``Resources/Models/demo_hippocampus.train.json``): UNet3D [16, 32, 64, 128], 3 classes, patch
40x56x40, Dice + cross-entropy, AdamW lr 0.003, weight decay 1e-5, nnU-Net's polynomial decay,
gradient norm clipped at 12, half of the patches centred on foreground, the ``default``
augmentation policy, 2 threads; at batch 1 and 2.

Loops (every one starts from the same initial weights for a given seed):

* ``monai/wN``: a plain MONAI loop: the cases' arrays (the same deterministic preprocessing as
  ours, done once), padded to the patch by ``SpatialPadd`` (MONAI's defaults: centred, zeros) in a
  ``CacheDataset``, then per sample ``RandCropByPosNegLabeld`` (pos 1, neg 1) and MONAI's random
  transforms closest to our
  ``default`` policy (``RandAffined`` p 0.2 +-10 degrees, scale +-0.1; ``RandSimulateLowResolutiond``
  p 0.1; ``RandBiasFieldd`` p 0.2; ``RandAdjustContrastd`` p 0.3, gamma exp(+-0.3);
  ``RandScaleIntensityd``/``RandShiftIntensityd`` p 0.15; ``RandGaussianNoised`` p 0.15, std 0.1),
  ``EnsureTyped(track_meta=False)`` (MONAI's advice for speed), a ``monai.data.DataLoader`` with
  N worker processes (0 and 1 are measured: on two cores, more workers only take cores from the
  network), ``DiceCELoss(include_background=False, batch=True)``, and the same optimizer,
  schedule and clipping as ours;
* ``ours``: :func:`imbalanceseglib.training.train` with its CPU training path (the default);
* ``ours-module``: the same with ``IMBALANCESEG_TRAINING_ENGINE=module`` (the network's own
  module: the one change between the two).

Measurements:

1. per-operator profile (``torch.profiler``) of one training step through the module (what the
   MONAI loop and ``ours-module`` run) and through the CPU training path;
2. throughput: every loop at batch 1 and 2, interleaved (all loops at one batch size, then the
   other, then again) ``--repeats`` times; iterations per second over ``--iterations`` timed
   iterations after ``--warmup``; best, median, and the median of the per-round ratios;
3. time to a validation Dice: from the same initial weights, each loop (the faster MONAI loop,
   ``ours``, ``ours-module``) trains at batch 2 and
   validates every ``--val-every`` iterations on the validation subset (the same sliding-window
   evaluation for every loop; its time is not counted) until the mean foreground Dice reaches
   ``--target``; ``--seeds`` seeds, the loops interleaved per seed, capped at ``--max-minutes``.

For each run it records how much CPU other processes used meanwhile (``/proc/stat`` less this
process and its children), to say whether the machine was shared.

    python Testing/Benchmarks/training_speed.py [--quick]

Writes Testing/Benchmarks/reports/training_speed.md (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
DATA = ROOT.parent / "shared" / "data" / "msd_hippocampus"
CONFIG = ROOT / "Resources" / "Models" / "demo_hippocampus.train.json"
SPLIT = ROOT / "Resources" / "Models" / "demo_hippocampus.split.json"
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "training_speed.md"
WORK = ROOT / "work-tmp" / "training_speed"
N_VAL = 10
THREADS = 2


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- the machine


def _cpu_busy_s() -> float:
    """CPU seconds all processes spent busy since boot (/proc/stat; NaN where absent)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        v = [int(f) for f in fields]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class OthersCpu:
    """Cores' worth of CPU other processes used while this window was open."""

    def __enter__(self):
        self.t, self.busy, self.own = time.perf_counter(), _cpu_busy_s(), _own_cpu_s()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t
        others = (_cpu_busy_s() - self.busy) - (_own_cpu_s() - self.own)
        self.cores = max(0.0, others / wall) if wall > 0 else float("nan")
        return False


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 3.0) -> float:
    """Wait until other processes use under ``threshold`` cores over ``window_s`` (at most
    ``max_wait_s``); returns the seconds waited."""
    t0 = time.perf_counter()
    while True:
        with OthersCpu() as others:
            time.sleep(window_s)
        if others.cores < threshold or time.perf_counter() - t0 >= max_wait_s:
            return time.perf_counter() - t0


def matmul_gflops(threads: int) -> float:
    """The machine's float32 matrix-product rate on ``threads`` threads (best of several)."""
    import torch
    torch.set_num_threads(threads)
    rate = 0.0
    for n in (2048, 3072):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        for _ in range(8):
            t = time.perf_counter()
            a @ b
            rate = max(rate, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return rate


# --------------------------------------------------------------------------- data and config


def load_data(n_train: Optional[int]):
    import SimpleITK as sitk
    from imbalanceseglib.train_config import TrainConfig
    from imbalanceseglib.training_data import prepare_case
    base = json.loads(CONFIG.read_text())["train"]
    cfg = TrainConfig.from_dict({**base, "name": "speed"})
    split = json.loads(SPLIT.read_text())
    names = {"train": split["train"][:n_train] if n_train else split["train"], "val": split["val"][:N_VAL]}
    cases = {}
    for part, ids in names.items():
        cases[part] = [prepare_case(sitk.ReadImage(str(DATA / "images" / f"{c}.nii.gz")),
                                    sitk.ReadImage(str(DATA / "labels" / f"{c}.nii.gz")), cfg, c) for c in ids]
    return base, cases, names


def config_for(base: Dict[str, Any], batch: int, iterations: int, seed: int, val_every: int):
    from imbalanceseglib.train_config import TrainConfig
    return TrainConfig.from_dict({**base, "name": "speed", "batch_size": batch, "iterations": iterations,
                                  "seed": seed, "val_every": val_every, "log_every": 1,
                                  "checkpoint_every": iterations, "num_threads": THREADS})


def mean_dice(per_class: Dict[str, Any]) -> float:
    vals = [v["dice"] for v in per_class.values() if v.get("dice") is not None]
    return sum(vals) / len(vals) if vals else float("nan")


# --------------------------------------------------------------------------- the MONAI loop


def monai_loader(cases, patch: Sequence[int], batch: int, workers: int, seed: int):
    import numpy as np
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (Compose, EnsureTyped, RandAdjustContrastd, RandAffined, RandBiasFieldd,
                                  RandCropByPosNegLabeld, RandGaussianNoised, RandScaleIntensityd,
                                  RandShiftIntensityd, RandSimulateLowResolutiond, SpatialPadd)
    # the cases' arrays after our deterministic preprocessing (orientation, spacing, intensities)
    items = [{"image": c.image[None].astype(np.float32), "label": c.labels[None].astype(np.float32)} for c in cases]
    deg = np.pi / 180
    keys = ["image", "label"]
    transforms = Compose([
        SpatialPadd(keys, spatial_size=list(patch)),  # MONAI's defaults: centred, zeros (cached)
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=list(patch), pos=1, neg=1, num_samples=1),
        RandAffined(keys, prob=0.2, rotate_range=[10 * deg] * 3, scale_range=[0.1] * 3, mode=("bilinear", "nearest"),
                    padding_mode="border"),
        RandSimulateLowResolutiond("image", prob=0.1, zoom_range=(0.4, 0.67)),
        RandBiasFieldd("image", prob=0.2, coeff_range=(0.0, 0.2)),
        RandAdjustContrastd("image", prob=0.3, gamma=(float(np.exp(-0.3)), float(np.exp(0.3)))),
        RandScaleIntensityd("image", factors=(-0.15, 0.2), prob=0.15),
        RandShiftIntensityd("image", offsets=0.2, prob=0.15),
        RandGaussianNoised("image", prob=0.15, std=0.1),
        EnsureTyped(keys, track_meta=False),
    ])
    transforms.set_random_state(seed)
    return DataLoader(CacheDataset(items, transforms, progress=False), batch_size=batch, shuffle=True,
                      num_workers=workers, persistent_workers=workers > 0, drop_last=True)


def monai_run(base, cases, batch: int, workers: int, seed: int, iterations: int,
              on_iteration: Callable[[int], None], validate: Optional[Callable[[Any, int], bool]] = None,
              val_every: int = 0) -> None:
    """A plain MONAI training loop; ``on_iteration(done)`` after each step; ``validate(network,
    done)`` every ``val_every`` iterations, True to stop."""
    import torch
    from monai.losses import DiceCELoss
    from monai.utils import set_determinism
    from imbalanceseglib.networks import UNet3D
    torch.set_num_threads(THREADS)
    set_determinism(seed)
    torch.manual_seed(seed)
    net = UNet3D(1, len(base["classes"]), base["features"])
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                         smooth_nr=1e-5, smooth_dr=1e-5)
    opt = torch.optim.AdamW(net.parameters(), lr=base["learning_rate"], weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / iterations) ** 0.9)
    loader = monai_loader(cases["train"], base["patch_size"], batch, workers, seed)
    done = 0
    net.train()
    try:
        while done < iterations:
            for data in loader:
                x, y = data["image"], data["label"]
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(x), y)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
                opt.step()
                sched.step()
                done += 1
                on_iteration(done)
                if validate is not None and val_every and done % val_every == 0:
                    net.eval()
                    stop = validate(net, done)
                    net.train()
                    if stop:
                        return
                if done >= iterations:
                    break
    finally:
        set_determinism(None)
        del loader


# --------------------------------------------------------------------------- our loop


class _Stop(Exception):
    pass


def ours_run(base, cases, batch: int, engine: str, seed: int, iterations: int, on_iteration: Callable[[int], None],
             validate_every: int = 0, on_validation: Optional[Callable[[float, int], bool]] = None,
             out: Path = WORK / "run") -> List[str]:
    """:func:`imbalanceseglib.training.train` with ``IMBALANCESEG_TRAINING_ENGINE=engine``; the
    validation Dice goes to ``on_validation(mean Dice, done)``, True to stop. Returns the log."""
    from imbalanceseglib.training import train
    os.environ["IMBALANCESEG_TRAINING_ENGINE"] = engine
    cfg = config_for(base, batch, iterations, seed, validate_every or iterations + 1)
    shutil.rmtree(out, ignore_errors=True)
    logs: List[str] = []

    def events(ev):
        if ev["event"] == "iteration":
            on_iteration(ev["iteration"])
        elif ev["event"] == "validation" and on_validation is not None:
            vals = [v for v in ev["dice"].values() if v is not None]
            if on_validation(sum(vals) / len(vals) if vals else float("nan"), ev["iteration"]):
                raise _Stop()

    try:
        train(cfg, cases["train"], cases["val"] if validate_every else [], out, resume=False, log=logs.append,
              events=events)
    except _Stop:
        pass
    finally:
        os.environ.pop("IMBALANCESEG_TRAINING_ENGINE", None)
        shutil.rmtree(out, ignore_errors=True)
    return logs


# --------------------------------------------------------------------------- measurements


def profile_step(base, cases, batch: int, engine: str, steps: int) -> Dict[str, Any]:
    """torch.profiler over ``steps`` training steps (after 3 unprofiled): per operator self CPU ms per step."""
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from imbalanceseglib.networks import build_network
    from imbalanceseglib.training_data import PatchSampler
    from imbalanceseglib.training_engine import training_forward
    from imbalanceseglib.training_loop import build_augmenter, build_training_loss
    torch.set_num_threads(THREADS)
    cfg = config_for(base, batch, 100, 0, 1000)
    names = [c["name"] for c in cfg.classes]
    loss_fn, _, rare = build_training_loss(cfg, names, [0.95, 0.0273, 0.0252])
    sampler = PatchSampler(cases["train"], cfg.patch_size, cfg.foreground_fraction, build_augmenter(cfg, rare))
    torch.manual_seed(0)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": len(names), "features": cfg.features})
    forward = training_forward(net, engine=engine)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(0)

    def step():
        x, y = sampler.batch(rng, batch)
        loss = loss_fn(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()

    for _ in range(3):
        step()
    with OthersCpu() as others:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t = time.perf_counter()
            for _ in range(steps):
                step()
            wall = (time.perf_counter() - t) / steps
    rows = sorted(((e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in prof.key_averages()),
                  key=lambda r: -r[1])
    total = sum(r[1] for r in rows)
    return {"engine": engine, "batch": batch, "step_ms": wall * 1000, "self_ms": total, "rows": rows[:14],
            "others": others.cores, "uses_path": forward is not net}


def network_flops(base, batch: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from imbalanceseglib.networks import UNet3D
    net = UNet3D(1, len(base["classes"]), base["features"])
    x = torch.randn(batch, 1, *base["patch_size"])
    with FlopCounterMode(display=False) as fc:
        net(x).sum().backward()
    return float(fc.get_total_flops())


def throughput_run(method: str, base, cases, batch: int, warmup: int, timed: int, seed: int) -> Dict[str, Any]:
    stamps: Dict[int, float] = {}

    def on_iteration(done: int) -> None:
        stamps[done] = time.perf_counter()

    total = warmup + timed
    with OthersCpu() as others:
        if method.startswith("monai/w"):
            monai_run(base, cases, batch, int(method[len("monai/w"):]), seed, total, on_iteration)
        else:
            logs = ours_run(base, cases, batch, "module" if method == "ours-module" else "auto", seed, total,
                            on_iteration)
            engine = [m for m in logs if m.startswith("training engine")]
            if method == "ours" and not (engine and "CPU training path (" in engine[0]):
                raise SystemExit(f"error: the CPU training path did not run: {engine}")
    rate = timed / (stamps[total] - stamps[warmup])
    return {"method": method, "batch": batch, "its": rate, "samples": rate * batch, "others": others.cores}


def time_to_dice(method: str, base, cases, seed: int, target: float, val_every: int, max_s: float,
                 batch: int) -> Dict[str, Any]:
    """Training seconds (validation excluded) and iterations until the validation Dice reaches ``target``."""
    from imbalanceseglib.training_loop import evaluate_cases
    state = {"train_s": 0.0, "last": None, "reached": None, "curve": [], "iters": 0}
    cap_iterations = 100000

    def on_iteration(done: int) -> None:
        now = time.perf_counter()
        if state["last"] is not None:
            state["train_s"] += now - state["last"]
        state["last"] = now
        state["iters"] = done

    def after_validation(dice: float, done: int) -> bool:
        state["curve"].append((done, round(state["train_s"], 1), round(dice, 4)))
        log(f"    {method} seed {seed}: iteration {done}, {state['train_s']:.0f} s training, val Dice {dice:.3f}")
        state["last"] = time.perf_counter()  # the validation's time is not counted
        if dice >= target:
            state["reached"] = (done, state["train_s"], dice)
            return True
        return state["train_s"] >= max_s

    cfg = config_for(base, batch, cap_iterations, seed, val_every)
    with OthersCpu() as others:
        if method.startswith("monai/w"):
            def validate(net, done):
                return after_validation(mean_dice(evaluate_cases(net, cases["val"], cfg)["per_class"]), done)
            monai_run(base, cases, batch, int(method[len("monai/w"):]), seed, cap_iterations, on_iteration,
                      validate, val_every)
        else:
            ours_run(base, cases, batch, "module" if method == "ours-module" else "auto", seed, cap_iterations,
                     on_iteration, val_every, after_validation)
    # the first step's time (from before the first iteration event) is not in train_s for any loop
    return {"method": method, "seed": seed, "reached": state["reached"], "train_s": state["train_s"],
            "iters": state["iters"], "curve": state["curve"], "others": others.cores}


# --------------------------------------------------------------------------- the report


def _fmt_ratio(values: Sequence[float]) -> str:
    return f"{statistics.median(values):.2f}× (best round {max(values):.2f}×, worst {min(values):.2f}×)"


def write_report(out: Path, command: str, machine: str, started: str, args, names, profiles, throughput,
                 ttd, flops, gflops, loss_check, check, elapsed_min: float, waited: Sequence[float],
                 redone: Sequence[str]) -> None:
    lines = ["# Training speed: the CPU training path against a plain MONAI loop", "",
             f"Command: `{command}`  ", f"Machine: {machine}  ", f"Date: {started}", ""]
    all_others = [r["others"] for r in throughput] + [r["others"] for r in ttd] + [p["others"] for p in profiles]
    shared = max(all_others) if all_others else 0.0
    lines += [f"Other processes' CPU use during the runs (``/proc/stat`` less this benchmark): median "
              f"{statistics.median(all_others):.2f} cores, largest {shared:.2f} cores of {os.cpu_count()}"
              + (" — **the machine was shared** while some of these numbers were measured; the loops were "
                 "interleaved, so the ratios compare runs that saw the same conditions." if shared > 0.25 else
                 " (the machine was quiet)."), "",
              f"Before each run the benchmark waited (up to {args.max_wait:g} s) for other processes to use "
              f"under 0.25 cores: {sum(waited) / 60:.1f} min of waiting in all. Whole benchmark: "
              f"{elapsed_min:.1f} min.", ""]
    lines += ["## Setup", "",
              f"MSD Task04 hippocampus ({DATA.name}), the demo model's split: {len(names['train'])} training "
              f"patients; validation subset: the first {len(names['val'])} validation patients "
              f"({', '.join(names['val'])}). Demo configuration: UNet3D {args.features}, patch "
              f"{'x'.join(map(str, args.patch))}, Dice + cross-entropy (batch Dice, background excluded), AdamW lr "
              f"{args.lr:g}, polynomial decay, clipping at 12, {THREADS} threads. The loops are described at the "
              "top of `Testing/Benchmarks/training_speed.py`: `monai/wN` a plain MONAI loop with N DataLoader "
              "workers, `ours` `imbalanceseglib.training.train` (CPU training path on), `ours-module` the same "
              "with `IMBALANCESEG_TRAINING_ENGINE=module`.", "",
              f"Same loss: MONAI's `DiceCELoss` and ours on one batch differ by {loss_check:.1e}. Same network: the "
              f"training path's check against the module on this network and patch (leaky ReLU slope 1, "
              f"`gradient_agreement`): largest relative difference of logits, input and parameter gradients "
              f"{check[1]:.1e} at batch 1, {check[2]:.1e} at batch 2.", ""]
    # profiles
    lines += ["## Where a training step's time goes (torch.profiler, self CPU time per step)", "",
              f"One training step as the trainer runs it (patch sampling and augmentation, forward, loss, "
              f"backward, clipping, AdamW), {args.profile_steps} profiled steps after 3, each configuration "
              "profiled twice (interleaved) and the faster profile kept.", "",
              f"The network's forward + backward: {flops[1] / 1e9:.1f} GFLOP per step at batch 1, "
              f"{flops[2] / 1e9:.1f} at batch 2; this machine's float32 matrix product: {gflops:.0f} GFLOP/s "
              f"on {THREADS} threads.", ""]
    for batch in (1, 2):
        for p in [q for q in profiles if q["batch"] == batch]:
            label = "CPU training path (after)" if p["engine"] == "auto" else "module (before; what the MONAI loop runs)"
            conv_ms = sum(ms for name, ms, _ in p["rows"] if "conv" in name.lower() and not name.startswith("_"))
            lines += [f"**Batch {batch}, {label}**: {p['step_ms']:.0f} ms per step (wall), "
                      f"{p['self_ms']:.0f} ms of operator self time; convolution kernels "
                      f"{conv_ms:.0f} ms = {flops[batch] / (conv_ms / 1000) / 1e9 if conv_ms else float('nan'):.0f} "
                      f"GFLOP/s, {flops[batch] / (conv_ms / 1000) / 1e9 / gflops * 100 if conv_ms else float('nan'):.0f} % "
                      f"of the matrix-product rate (other processes: {p['others']:.2f} cores)", "",
                      "| operator | ms per step | share | calls per step |", "|---|---|---|---|"]
            for name, ms, calls in p["rows"]:
                lines.append(f"| `{name}` | {ms:.1f} | {100 * ms / p['self_ms']:.1f} % | {calls} |")
            lines.append("")
    # throughput
    lines += ["## Throughput", "",
              f"{args.repeats} rounds; in each round every loop runs {args.warmup} warm-up and {args.iterations} timed "
              "iterations at one batch size, then at the other (interleaved). Ratios: per round, against the "
              "faster MONAI loop of that round; median over rounds (best and worst round). A run during which "
              "other processes used 0.25 cores or more was done again (twice at most; the last one counts): "
              + (f"{len(redone)} redone ({'; '.join(redone)})." if redone else "none was."), ""]
    methods = list(dict.fromkeys(r["method"] for r in throughput))
    headline = {}
    for batch in (1, 2):
        rows = [r for r in throughput if r["batch"] == batch]
        rounds = sorted({r["round"] for r in rows})
        lines += [f"**Batch {batch}**", "", "| loop | it/s best | it/s median | samples/s median | "
                  "median ratio to MONAI | other processes (cores, median) |", "|---|---|---|---|---|---|"]
        monai_by_round = {k: max(r["its"] for r in rows if r["round"] == k and r["method"].startswith("monai"))
                          for k in rounds}
        for m in methods:
            mine = [r for r in rows if r["method"] == m]
            ratios = [r["its"] / monai_by_round[r["round"]] for r in mine]
            its = [r["its"] for r in mine]
            if m == "ours":
                headline[batch] = ratios
            lines.append(f"| {m} | {max(its):.2f} | {statistics.median(its):.2f} | "
                         f"{statistics.median(r['samples'] for r in mine):.2f} | {_fmt_ratio(ratios)} | "
                         f"{statistics.median(r['others'] for r in mine):.2f} |")
        ours = [r["its"] for r in rows if r["method"] == "ours"]
        module = [r["its"] for r in rows if r["method"] == "ours-module"]
        if ours and module:
            per_round = [o / m for o, m in zip(ours, module)]
            lines += ["", f"The training path alone (`ours` / `ours-module`, same loop): {_fmt_ratio(per_round)}."]
        lines.append("")
    lines += ["**Goal: at least 1.5× the MONAI loop's iterations per second.** "
              + "; ".join(f"batch {b}: {statistics.median(v):.2f}× ({'reached' if statistics.median(v) >= 1.5 else 'not reached'})"
                          for b, v in headline.items()) + ".", ""]
    for batch, ratios in headline.items():
        if statistics.median(ratios) >= 1.5:
            continue
        after = [p for p in profiles if p["batch"] == batch and p["engine"] == "auto"]
        monai = [r["its"] for r in throughput if r["batch"] == batch and r["method"].startswith("monai")]
        if not after or not monai:
            continue
        conv_ms = sum(ms for name, ms, _ in after[0]["rows"] if "conv" in name.lower() and not name.startswith("_"))
        rest_ms = after[0]["step_ms"] - conv_ms
        floor_ms = flops[batch] / gflops / 1e6
        monai_ms = 1000.0 / max(monai)
        lines += [f"Why not at batch {batch}: the convolutions of the training path already run at "
                  f"{flops[batch] / conv_ms / 1e6:.0f} GFLOP/s, {100 * flops[batch] / conv_ms / 1e6 / gflops:.0f} % of "
                  f"this machine's matrix-product rate ({conv_ms:.0f} ms of the profiled {after[0]['step_ms']:.0f} ms "
                  f"step; at the full rate they would take {floor_ms:.0f} ms). The rest of the step, {rest_ms:.0f} ms "
                  f"(instance norms and leaky ReLUs, copies, the loss, AdamW, sampling and augmentation; memory-bound "
                  f"element-wise work), stays. The fastest MONAI iteration measured took {monai_ms:.0f} ms, so even with "
                  f"the convolutions at the full rate the ratio would be {monai_ms / (floor_ms + rest_ms):.2f}×; 1.5× "
                  f"needs the whole step under {monai_ms / 1.5:.0f} ms, i.e. the rest under "
                  f"{max(0.0, monai_ms / 1.5 - floor_ms):.0f} ms with the convolutions at the full rate "
                  "(fused element-wise kernels, which a pure-PyTorch library does not have).", ""]
    # time to Dice
    if ttd:
        lines += [f"## Time to a validation Dice of {args.target:g}", "",
                  f"Batch {args.ttd_batch}; validation every {args.val_every} iterations on the {len(names['val'])} "
                  f"validation patients (mean Dice of the two hippocampus classes, our sliding-window evaluation "
                  f"for every loop, its time not counted); training seconds are the loop's wall time from its "
                  f"first iteration, capped at {args.max_minutes:g} min.", "",
                  "| seed | loop | reached at iteration | training s | mean Dice then | other processes (cores) |",
                  "|---|---|---|---|---|---|"]
        for r in ttd:
            if r["reached"]:
                it, secs, dice = r["reached"]
                lines.append(f"| {r['seed']} | {r['method']} | {it} | {secs:.0f} | {dice:.3f} | {r['others']:.2f} |")
            else:
                best = max((c[2] for c in r["curve"]), default=float("nan"))
                lines.append(f"| {r['seed']} | {r['method']} | not reached in {r['iters']} | {r['train_s']:.0f} | "
                             f"best {best:.3f} | {r['others']:.2f} |")
        by_seed: Dict[int, Dict[str, Any]] = {}
        for r in ttd:
            by_seed.setdefault(r["seed"], {})[r["method"]] = r
        ratios, engine_ratios = [], []
        for seed, runs in sorted(by_seed.items()):
            monai = [r for m, r in runs.items() if m.startswith("monai") and r["reached"]]
            ours, module = runs.get("ours"), runs.get("ours-module")
            if monai and ours and ours["reached"]:
                ratios.append(monai[0]["reached"][1] / ours["reached"][1])
            if module and ours and module["reached"] and ours["reached"]:
                engine_ratios.append(module["reached"][1] / ours["reached"][1])
        if ratios:
            lines += ["", "MONAI's training time to the target over ours, per seed where both reached it: "
                      + ", ".join(f"{v:.2f}×" for v in ratios) + f" (median {statistics.median(ratios):.2f}×)."]
        if engine_ratios:
            lines += ["", "`ours-module`'s training time to the target over `ours` (the training path alone), per "
                      "seed where both reached it: " + ", ".join(f"{v:.2f}×" for v in engine_ratios)
                      + f" (median {statistics.median(engine_ratios):.2f}×)."]
        its = {m: [r["iters"] / r["train_s"] for r in ttd if r["method"] == m and r["train_s"] > 0]
               for m in dict.fromkeys(r["method"] for r in ttd)}
        lines += ["", "Iterations per second over these runs: " + ", ".join(
            f"{m} {statistics.median(v):.2f}" for m, v in its.items() if v) + "."]
        reached_its = {m: [r["reached"][0] for r in ttd if r["method"] == m and r["reached"]]
                       for m in dict.fromkeys(r["method"] for r in ttd)}
        lines += ["", "Iterations to the target where reached: " + "; ".join(
            f"{m} {', '.join(map(str, v)) if v else 'none'} (of {sum(1 for r in ttd if r['method'] == m)} runs)"
            for m, v in reached_its.items()) + ". `ours` and `ours-module` are the same loop (sampling, "
            "augmentation, loss, optimizer) and differ only in how the network is computed: they start from the same "
            "weights and draw the same patches, and float rounding makes them drift apart, so the difference in "
            "iterations between them is chance; a difference between them and the MONAI loop is the loops' "
            "(patch sampling: our sampler centres half the patches on a voxel of a random present class plus a "
            "random offset and places a volume smaller than the patch at a random offset in it, MONAI's "
            "RandCropByPosNegLabeld after a centred SpatialPadd; the augmentations differ in detail), not the "
            "training path's. Both pad with zeros, the value inference pads with. Until 2026-12-02 our sampler "
            "padded with the case minimum while inference pads with zeros: the hippocampus volumes are smaller than "
            "the patch, so the network was validated on a border it never saw in training, and our loop reached "
            "Dice 0.8 at 1050 iterations or not within 6 minutes where MONAI's took 300-500 (the run of 15:40 UTC "
            "that day; a probe of our loop at seed 0, batch 2: validation Dice 0.70, 0.55, 0.67, 0.71, 0.70, 0.73 "
            "at iterations 100-600 with the minimum, 0.82 and 0.85 at iterations 100 and 200 with zeros)."]
        lines += ["", "Validation curves (iteration, training s, mean Dice):", ""]
        for r in ttd:
            lines.append(f"* seed {r['seed']} {r['method']}: " + ", ".join(f"({a}, {b:g}, {c:.3f})" for a, b, c in r["curve"]))
        lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)


def _report_from(results: Dict[str, Any], out: Path) -> None:
    args = argparse.Namespace(**results["args"])
    fix = {int(k): v for k, v in results["flops"].items()}
    check = {int(k): v for k, v in results["check"].items()}
    write_report(out, results["command"], results["machine"], results["started"], args, results["names"],
                 results["profiles"], results["throughput"], results["ttd"], fix, results["gflops"],
                 results["loss_check"], check, results["elapsed_min"], results["waited"], results["redone"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved throughput rounds")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=16, help="timed iterations per throughput run")
    ap.add_argument("--monai-workers", default="0,1")
    ap.add_argument("--seeds", type=int, default=2, help="seeds for the time to the target Dice (0: skip)")
    ap.add_argument("--target", type=float, default=0.8)
    ap.add_argument("--val-every", type=int, default=50)
    ap.add_argument("--max-minutes", type=float, default=5.0)
    ap.add_argument("--ttd-batch", type=int, default=2)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--max-wait", type=float, default=120.0,
                    help="before each run, wait up to this many seconds for other processes to leave the CPU")
    ap.add_argument("--quick", action="store_true",
                    help="1 round of 8 timed iterations, 1 seed to a Dice of 0.5 (capped at 3 min)")
    ap.add_argument("--out", default=str(REPORT))
    ap.add_argument("--report-only", action="store_true",
                    help=f"write the report again from the last run's measurements ({WORK / 'results.json'})")
    args = ap.parse_args(argv)
    if args.report_only:
        _report_from(json.loads((WORK / "results.json").read_text()), Path(args.out))
        print(f"report written to {args.out}")
        return 0
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        args.repeats, args.iterations, args.warmup, args.seeds = 1, 8, 3, 1
        args.target, args.max_minutes, args.profile_steps = 0.5, 3.0, 2
    if not (DATA / "images").is_dir():
        print(f"skipped: the MSD hippocampus data set is not at {DATA} (see ../shared/data/README.md)")
        return 0
    import torch
    import monai
    from benchmark_common import machine
    from imbalanceseglib.training_engine import gradient_agreement, unsupported_reason
    from imbalanceseglib.networks import UNet3D
    torch.set_num_threads(THREADS)
    t_all = time.perf_counter()
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    mach = machine(f"torch {torch.__version__}, MONAI {monai.__version__}")
    log(mach)
    base, cases, names = load_data(None)
    args.features, args.patch, args.lr = base["features"], base["patch_size"], base["learning_rate"]
    log(f"{len(cases['train'])} training and {len(cases['val'])} validation patients loaded")
    reason = unsupported_reason(UNet3D(1, 3, base["features"]))
    if reason:
        print(f"skipped: the CPU training path does not run here: {reason}")
        return 0
    # same loss, same network
    from monai.losses import DiceCELoss
    from imbalanceseglib.losses import build_loss
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, *base["patch_size"], generator=gen)
    y = torch.randint(0, 3, (2, 1, *base["patch_size"]), generator=gen)
    ours_loss = build_loss({"name": "dice_ce"}, [c["name"] for c in base["classes"]], [0.95, 0.0273, 0.0252])
    monai_loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True,
                            smooth_nr=1e-5, smooth_dr=1e-5)
    loss_check = abs(float(ours_loss(z, y)) - float(monai_loss(z, y.float())))
    torch.manual_seed(0)
    net = UNet3D(1, 3, base["features"])
    check = {b: gradient_agreement(net, base["patch_size"], b) for b in (1, 2)}
    log(f"loss difference {loss_check:.1e}; path check {check}")
    gflops = matmul_gflops(THREADS)
    flops = {b: network_flops(base, b) for b in (1, 2)}
    torch.set_num_threads(THREADS)
    profiles, waited = [], []
    for batch in (1, 2):
        runs: Dict[str, List[Dict[str, Any]]] = {"module": [], "auto": []}
        for _ in range(2):  # twice each, interleaved; the less disturbed (faster) one is kept
            for engine in ("module", "auto"):
                waited.append(wait_for_quiet(args.max_wait))
                runs[engine].append(profile_step(base, cases, batch, engine, args.profile_steps))
                log(f"profile batch {batch} {engine}: {runs[engine][-1]['step_ms']:.0f} ms per step")
        profiles += [min(runs[e], key=lambda p: p["step_ms"]) for e in ("module", "auto")]
    methods = [f"monai/w{w}" for w in args.monai_workers.split(",")] + ["ours", "ours-module"]
    throughput, redone = [], []
    for rnd in range(args.repeats):
        for batch in (1, 2):
            for m in methods:
                for attempt in range(3):  # a run another process disturbed is done again (twice at most)
                    waited.append(wait_for_quiet(args.max_wait))
                    r = throughput_run(m, base, cases, batch, args.warmup, args.iterations, seed=rnd)
                    if r["others"] < 0.25:
                        break
                    redone.append(f"round {rnd} batch {batch} {m}: {r['its']:.2f} it/s with other processes "
                                  f"using {r['others']:.2f} cores")
                    log(f"redo: {redone[-1]}")
                r["round"] = rnd
                throughput.append(r)
                log(f"round {rnd} batch {batch} {m}: {r['its']:.2f} it/s (others {r['others']:.2f} cores)")
    ttd = []
    if args.seeds:
        b = args.ttd_batch
        monai_rates = {m: statistics.median(r["its"] for r in throughput if r["method"] == m and r["batch"] == b)
                       for m in methods if m.startswith("monai")}
        monai_best = max(monai_rates, key=monai_rates.get)
        for seed in range(args.seeds):
            for m in (monai_best, "ours", "ours-module"):
                waited.append(wait_for_quiet(args.max_wait))
                r = time_to_dice(m, base, cases, seed, args.target, args.val_every, args.max_minutes * 60, b)
                ttd.append(r)
                log(f"seed {seed} {m}: {r['reached']}")
    results = {"command": command, "machine": mach, "started": started, "names": names, "profiles": profiles,
               "throughput": throughput, "ttd": ttd, "flops": flops, "gflops": gflops, "loss_check": loss_check,
               "check": check, "elapsed_min": (time.perf_counter() - t_all) / 60, "waited": waited, "redone": redone,
               "args": {k: v for k, v in vars(args).items() if k != "report_only"}}
    WORK.mkdir(parents=True, exist_ok=True)
    (WORK / "results.json").write_text(json.dumps(results))
    _report_from(results, Path(args.out))
    log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
