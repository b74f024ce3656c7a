#!/usr/bin/env python
"""What context labels (CoLab, issue #23 item 1) cost per training iteration.

Seconds per iteration of the same training with and without ``context_labels`` (everything
else equal: UNet3D [8, 16, 32, 64], batch 2, patch 8 x 64 x 64, Dice + CE, four synthetic
cardiac-like volumes so that no data set is needed), the arms interleaved and alternating in
order over ``--reps`` repetitions. Iterations after the first ``SKIP`` are timed from the trainer's
per-iteration log lines; ``--iterations`` minus ``SKIP`` is a multiple of the generator's
5-iteration meta cycle, so each timing holds whole cycles.

    python Testing/Benchmarks/context_labels_cost.py [--iterations 25] [--reps 4] [--threads 1]

Writes ``Testing/Benchmarks/reports/context_labels_cost.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(HERE))
REPORT = HERE / "reports" / "context_labels_cost.md"
SKIP = 5
CLASSES = [{"value": i, "name": n} for i, n in
           enumerate(["background", "right ventricle", "myocardium", "left ventricle"])]


def case(seed: int, shape=(16, 128, 128)):
    """A ring (myocardium) around a disc (left ventricle) with a small disc beside it (right ventricle)."""
    import numpy as np
    from imbalanceseglib.training import make_case
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    lab = np.zeros(shape, np.uint8)
    c = rng.integers(48, 80, 2)
    r = (y - c[0]) ** 2 + (x - c[1]) ** 2
    inside = (z > 3) & (z < 13)
    lab[inside & (r < 20 ** 2)] = 2
    lab[inside & (r < 14 ** 2)] = 3
    lab[inside & ((y - c[0]) ** 2 + (x - c[1] + 22) ** 2 < 8 ** 2) & (lab == 0)] = 1
    img = lab.astype(np.float32) * 0.7 + rng.normal(0, 0.3, shape).astype(np.float32)
    return make_case(img, lab, name=f"c{seed}")


def seconds_per_iteration(cases, context: bool, rep: int, iterations: int, threads: int, work: Path) -> float:
    import numpy as np
    from imbalanceseglib.train_config import TrainConfig
    from imbalanceseglib.training import train
    cfg = TrainConfig.from_dict(dict(
        name="t", classes=CLASSES, target_spacing=[2.5, 2.5, 10.0], patch_size=[8, 64, 64],
        features=[8, 16, 32, 64], batch_size=2, learning_rate=3e-3, iterations=iterations, val_every=10 ** 9,
        checkpoint_every=10 ** 6, log_every=1, num_threads=threads, normalization={"scheme": "none"}, seed=rep,
        method="dice_ce", rare_classes=["right ventricle"], context_labels={"enabled": context}))
    stamps = []
    train(cfg, cases, [], work / f"{int(context)}_{rep}", resume=False,
          log=lambda m: stamps.append(time.perf_counter()) if m.startswith("iter ") else None)
    return float(np.diff(stamps)[SKIP - 1:].mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iterations", type=int, default=25)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPORT))
    args = ap.parse_args(argv)
    if (args.iterations - SKIP) % 5:
        ap.error(f"--iterations minus {SKIP} must be a multiple of 5 (whole meta cycles)")
    command = "python " + " ".join([os.path.relpath(__file__, ROOT)] + (argv if argv is not None else sys.argv[1:]))
    import torch
    from benchmark_common import machine
    torch.set_num_threads(args.threads)
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    load0 = os.getloadavg()[0]
    cases = [case(s) for s in range(4)]
    res = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            for ctx in ((False, True) if rep % 2 == 0 else (True, False)):
                res[ctx].append(seconds_per_iteration(cases, ctx, rep, args.iterations, args.threads, Path(tmp)))
                print(f"rep {rep} context_labels={ctx}: {res[ctx][-1]:.3f} s/iteration", flush=True)
    ratios = [on / off for on, off in zip(res[True], res[False])]
    lines = ["# Context labels: cost per training iteration", "",
             f"Command: `{command}`  ",
             f"Machine: {machine(f'torch {torch.__version__}, {args.threads} thread(s)')}  ",
             f"Date: {started}; load average at the start {load0:.2f}, at the end {os.getloadavg()[0]:.2f}", "",
             "Same training with and without `context_labels` (module docstring), arms interleaved and alternating "
             f"in order, {args.reps} repetitions, iterations {SKIP + 1}-{args.iterations} timed.", "",
             "| repetition | without s/it | with s/it | ratio |", "|---|---|---|---|"]
    for i, (a, b, r) in enumerate(zip(res[False], res[True], ratios)):
        lines.append(f"| {i} | {a:.3f} | {b:.3f} | {r:.2f} |")
    lines += ["", f"Ratio with / without: median {statistics.median(ratios):.2f} (range {min(ratios):.2f}-"
              f"{max(ratios):.2f}); ratio of the means {statistics.mean(res[True]) / statistics.mean(res[False]):.2f}.",
              "", "The generator's forward pass runs every iteration and its meta step (a look-ahead and a "
              "central-difference Hessian-vector product) every 5th; inference is unchanged (the context "
              "channels are merged into the background inside the bundled network).", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
