"""Benchmark: wall time of each step of the demo job (module Logic on slicer-core).

    .venv/bin/python Testing/Benchmarks/demo_inference.py [--repeats 3]

Runs the demo scenario several times in fresh scenes and writes
Testing/Benchmarks/reports/demo_inference.md (command, machine, date, figures).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_common import machine as _machine, write_report_atomic  # noqa: E402
sys.path[:0] = [str(ROOT / "ImbalanceSeg"), str(ROOT / "ImbalanceSegLib" / "src")]


def machine() -> str:
    import torch
    return _machine(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    from ImbalanceSeg import ImbalanceSegLogic
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.scenarios import load_demo_case, repository_paths

    torch.set_num_threads(os.cpu_count() or 1)
    paths = repository_paths()
    runs = []
    for r in range(args.repeats):
        scene = sc.create_scene()
        volume, reference = load_demo_case(scene, paths)
        logic = ImbalanceSegLogic(scene)
        t = time.perf_counter()
        bundle = logic.loadModel(paths["model"])
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        result = logic.process(volume, bundle, reference)
        total = time.perf_counter() - t
        row = {"load model": load_s, **{k: v for k, v in result.timings.items()}, "process total": total}
        runs.append(row)
        print(f"run {r + 1}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items()), flush=True)
    keys = list(runs[0])
    cmd = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute() else sys.argv[0]] + sys.argv[1:])
    lines = [
        "# Demo inference timing",
        "",
        f"Command: `{cmd}` (from the repository root, in `.venv`)",
        f"Machine: {machine()}",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"Demo case 90x108x90 voxels at 2 mm, model `{paths['model'].name}`, "
        f"window {bundle.preprocessing['patch_size']}, overlap 0.5, Gaussian blending, CPU. "
        f"{args.repeats} runs, each in a fresh slicer-core scene.",
        "",
        "| step | median s | min s | max s |",
        "|---|---:|---:|---:|",
    ]
    for k in keys:
        vals = [r[k] for r in runs]
        lines.append(f"| {k} | {statistics.median(vals):.2f} | {min(vals):.2f} | {max(vals):.2f} |")
    out = ROOT / "Testing" / "Benchmarks" / "reports" / "demo_inference.md"
    write_report_atomic(out, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
