"""Benchmark: how fast the command line answers ``--help`` and argument errors (goal: under 2 s).

    .venv/bin/python Testing/Benchmarks/cli_startup.py [--repeats 5]

Each call is a fresh ``python -m imbalanceseglib.cli ...`` process (wall time from start to
exit, interpreter start-up included), repeated ``--repeats`` times; the report gives the
median and the maximum, and the heavy packages each call imported (from a separate run under
``-X importtime``).  ``evaluate`` on one tiny case without surface Dice is timed too (it needs
SciPy and SimpleITK, not torch or MONAI).  Which modules get imported is also checked by
ImbalanceSegLib/tests/test_cli_startup.py; the time is only measured here.  Writes
Testing/Benchmarks/reports/cli_startup.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_common import machine  # noqa: E402

GOAL_S = 2.0
HEAVY = ("torch", "monai", "scipy", "SimpleITK", "safetensors", "numpy")


def _env() -> dict:
    env = dict(os.environ)
    src = str(ROOT / "ImbalanceSegLib" / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(argv, cwd, importtime=False):
    cmd = [sys.executable] + (["-X", "importtime"] if importtime else []) + ["-m", "imbalanceseglib.cli"] + argv
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t0, res


def _heavy_imports(stderr: str):
    found = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name.split(".")[0] in HEAVY:
                found.add(name.split(".")[0])
    return sorted(found)


def _tiny_case(folder: Path) -> None:
    import numpy as np
    import SimpleITK as sitk
    for sub in ("pred", "ref"):
        (folder / sub).mkdir()
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(folder / "ref" / "c1.nrrd"))
    lab[2, 2, 2] = 0
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(folder / "pred" / "c1.nrrd"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    calls = [
        ("--help", ["--help"], 0, True),
        ("train --help", ["train", "--help"], 0, True),
        ("predict --help", ["predict", "--help"], 0, True),
        ("no command (argument error)", [], 2, True),
        ("unknown command (argument error)", ["segment"], 2, True),
        ("predict without --input/--output (argument error)", ["predict", "--model", "m.imbseg"], 2, True),
        ("predict --flag-threshold 2 (value error)",
         ["predict", "--model", "m.imbseg", "--input", "i.nrrd", "--output", "o", "--flag-threshold", "2"], 2, True),
        ("evaluate, 1 tiny case, no surface Dice",
         ["evaluate", "--pred", "pred", "--ref", "ref", "--out", "out", "--metrics", "overlap,distance,detection"],
         0, False),
    ]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_case(Path(tmp))
        for label, argv, want, in_goal in calls:
            _, res = _run(argv, tmp, importtime=True)
            if res.returncode != want:
                raise SystemExit(f"{label}: exit status {res.returncode}, expected {want}\n{res.stderr[-2000:]}")
            heavy = _heavy_imports(res.stderr)
            times = [_run(argv, tmp)[0] for _ in range(args.repeats)]
            rows.append((label, statistics.median(times), max(times), heavy, in_goal))
            print(f"{label:<55} median {statistics.median(times):.3f} s  max {max(times):.3f} s  "
                  f"heavy imports: {', '.join(heavy) or 'none'}", flush=True)
    command = f"python Testing/Benchmarks/cli_startup.py --repeats {args.repeats}"
    met = all(mx < GOAL_S for _, _, mx, _, in_goal in rows if in_goal)
    lines = ["# Command-line start-up", "",
             f"Command: `{command}` (from the repository root, in `.venv`)", "",
             f"Machine: {machine()}", "",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             f"Goal: `--help` and argument errors answer in under {GOAL_S:g} s "
             f"({'met' if met else 'NOT met'}: every such call's slowest run below). Each call is a fresh "
             f"`python -m imbalanceseglib.cli ...` process, wall time including interpreter start-up, "
             f"{args.repeats} runs; heavy imports from a separate `-X importtime` run.", "",
             "| call | median s | max s | heavy packages imported |", "|---|---:|---:|---|"]
    lines += [f"| {label}{'' if in_goal else ' (not in the goal)'} | {med:.3f} | {mx:.3f} | "
              f"{', '.join(heavy) or 'none'} |" for label, med, mx, heavy, in_goal in rows]
    out = ROOT / "Testing" / "Benchmarks" / "reports" / "cli_startup.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
