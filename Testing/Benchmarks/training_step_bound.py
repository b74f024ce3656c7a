"""How much faster than the module can the CPU training path make a training step? A bound from
the convolutions' own time.

The network of the demo model (``Resources/Models/demo_hippocampus.train.json``: UNet3D, its
features and patch), one forward and backward pass on a random batch (the network's time does not
depend on the data), at batch 1 and 2:

1. interleaved timing of the module (what a plain MONAI loop runs) and of the CPU training path
   (``imbalanceseglib.training_engine``), ``--repeats`` rounds of ``--steps`` steps each;
2. a ``torch.profiler`` profile of the training path's steps: the time in convolution kernels
   (oneDNN forward, transposed and backward) and in everything else (instance norm, leaky ReLU,
   concatenation, layout copies: memory-bound element-wise work);
3. the bound: if everything but the convolutions took no time at all, the training path's step
   would take its convolution time, so ``module step / path convolution time`` is the largest
   speed-up over the module this path could reach without faster convolution kernels.

It measures the network alone; a whole training iteration adds patch sampling, augmentation, the
loss and the optimizer (``training_speed.py`` times whole iterations against a MONAI loop).

    python Testing/Benchmarks/training_step_bound.py [--repeats 5] [--steps 5]

Writes Testing/Benchmarks/reports/training_step_bound.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_common import machine, write_report_atomic  # noqa: E402
from training_speed import OthersCpu, matmul_gflops, wait_for_quiet  # noqa: E402

CONFIG = ROOT / "Resources" / "Models" / "demo_hippocampus.train.json"
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "training_step_bound.md"
THREADS = 2
CONV_OPS = ("aten::convolution_backward", "aten::mkldnn_convolution", "mkldnn::_convolution_transpose_pointwise",
            "aten::slow_conv3d_forward", "aten::slow_conv_transpose3d", "aten::mm")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--max-wait", type=float, default=120.0, help="seconds to wait for a quiet machine")
    ap.add_argument("--out", default=str(REPORT))
    args = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from imbalanceseglib import training_engine as te
    from imbalanceseglib.networks import UNet3D

    torch.set_num_threads(THREADS)
    base = json.loads(CONFIG.read_text())["train"]
    features = tuple(int(f) for f in base["features"])
    patch = [int(p) for p in base["patch_size"]]
    n_out = len(base["classes"])
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    waited = wait_for_quiet(args.max_wait)
    gflops = matmul_gflops(THREADS)
    rows = []
    for batch in (1, 2):
        torch.manual_seed(0)
        net = UNet3D(1, n_out, features)
        path = te.TrainingPath(net)
        x = torch.randn(batch, 1, *patch)
        g = torch.randn(batch, n_out, *patch)

        def step(f):
            net.zero_grad(set_to_none=True)
            f(x).backward(g)

        runs = {"module": net, "path": path}
        for f in runs.values():
            for _ in range(2):
                step(f)
        times = {k: [] for k in runs}
        others = []
        for r in range(args.repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                with OthersCpu() as oc:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        step(runs[name])
                    times[name].append((time.perf_counter() - t0) / args.steps * 1000)
                others.append(oc.cores)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(path)
            prof_wall = (time.perf_counter() - t0) / args.steps * 1000
        conv = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in CONV_OPS) / 1000 / args.steps
        total = sum(e.self_cpu_time_total for e in prof.key_averages()) / 1000 / args.steps
        module_ms, path_ms = statistics.median(times["module"]), statistics.median(times["path"])
        rows.append({"batch": batch, "module_ms": module_ms, "path_ms": path_ms, "module_all": times["module"],
                     "path_all": times["path"], "prof_wall_ms": prof_wall, "conv_ms": conv, "total_ms": total,
                     "others": statistics.median(others)})
        print(f"batch {batch}: module {module_ms:.0f} ms, path {path_ms:.0f} ms, profiled path step {prof_wall:.0f} ms "
              f"of which convolutions {conv:.0f} ms", flush=True)

    lines = ["# How far the CPU training path can go: the convolutions' share of a training step", "",
             f"Command: `python Testing/Benchmarks/training_step_bound.py --repeats {args.repeats} --steps {args.steps}`  ",
             f"Machine: {machine(f'torch {torch.__version__}, {THREADS} threads')}  ",
             f"Date: {started}; waited {waited:.0f} s for other processes to use under 0.25 cores", "",
             f"Network: the demo model's UNet3D {list(features)}, {n_out} outputs, patch {'x'.join(map(str, patch))}, "
             f"one forward and backward pass on a random batch. This machine's float32 matrix product: {gflops:.0f} "
             "GFLOP/s. Timing: module and training path interleaved, "
             f"{args.repeats} rounds of {args.steps} steps, median (all rounds listed). Profile: {args.steps} steps of "
             "the training path under `torch.profiler` (its own overhead makes them slower than the timed steps); "
             "convolution kernels: " + ", ".join(f"`{o}`" for o in CONV_OPS) + ".", "",
             "| batch | module ms | training path ms | path / module speed-up | profiled path step ms | "
             "of it convolutions ms | everything else ms | bound: module / path convolutions | other processes (cores) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        # the profile's convolution share applied to the timed (unprofiled) step
        conv_timed = r["path_ms"] * r["conv_ms"] / r["total_ms"]
        r["bound"] = r["module_ms"] / conv_timed
        lines.append(f"| {r['batch']} | {r['module_ms']:.0f} | {r['path_ms']:.0f} | {r['module_ms'] / r['path_ms']:.2f}× | "
                     f"{r['prof_wall_ms']:.0f} | {r['conv_ms']:.0f} ({100 * r['conv_ms'] / r['total_ms']:.0f} %) | "
                     f"{r['total_ms'] - r['conv_ms']:.0f} | {r['bound']:.2f}× | {r['others']:.2f} |")
    lines += ["", "Timed steps (ms): " + "; ".join(
        f"batch {r['batch']} module {', '.join(f'{t:.0f}' for t in r['module_all'])}, path "
        f"{', '.join(f'{t:.0f}' for t in r['path_all'])}" for r in rows), "",
        "The bound takes the profile's share of convolution time and applies it to the timed step. A "
        "speed-up of the network beyond it needs convolution kernels faster than oneDNN's at this size, "
        "or fused element-wise kernels (norm, activation, layout) that plain PyTorch does not have. At "
        "batch 1 the module sends the small convolutions to `slow_conv3d`, so the training path gains most "
        "there. At batch 2 the module's convolutions already run on oneDNN, and the path gains only the "
        "layout and the norm.", ""]
    write_report_atomic(Path(args.out), lines)
    print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
