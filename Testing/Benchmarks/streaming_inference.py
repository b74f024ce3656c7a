"""Big-volume inference: ImbalanceSegLib's streaming sliding window against MONAI's.

For each volume size, each method in its own process (so peak memory is that method's own):
* ``monai/bN``: intensity normalisation, MONAI ``sliding_window_inference`` (Gaussian blending)
  with N windows per network call, the network as loaded (contiguous layout), then a softmax
  done in place (kind to MONAI's memory). Logits and probabilities only: no calibration, no
  estimate, no uncertainty.
* ``monai+cl/bN`` (first size only): the same, with the network and its input in the
  channels-last layout: a control that shows how much of our gain a MONAI user gets by changing
  the layout alone.
* ``ours``: :func:`imbalanceseglib.streaming.predict_streaming` with its defaults (engine,
  windows per call, layout and calls at once measured on the run's first windows), which also
  produces the calibrated confidence maps (uint8), labels, the uncertainty map and the
  label-free estimate.
* ``ours-module`` (first size only): the same with ``engine="module"`` (the network's own
  forward): what the streaming, blending and tuning give without the CPU engine.
* ``ours-bf16`` (first size only): ``precision="bfloat16"`` (the module under autocast; opt-in,
  not MONAI's arithmetic, so not counted against the goal).

Before the runs it profiles one window (torch.profiler, per operator) through the module in
both layouts and through the CPU engine, to show where the network's time goes.

Same network (the bundled demo model), window (its 64^3 patch) and overlap (0.5). MONAI runs at
every batch size in ``--monai-batches`` on the first volume, and at the fastest of them on the
larger ones. Also measures this machine's fp32 matmul peak and the network's achieved GFLOP/s
(FLOPs of one window counted by torch.utils.flop_counter), and how many voxels get the same
label from MONAI's softmax and from ours (calibration does not move the argmax).

Volumes are synthetic CT-like int16 volumes at the model's 2 mm spacing (so no resampling).

    python Testing/Benchmarks/streaming_inference.py [--sizes 128x256x256,400x512x512,960x512x512] [--rounds 3]

``--rounds N`` runs every method of a size N times, interleaved (issue #19 asks for the ratio in
three runs; on a 2-core machine three rounds of the default sizes take about 2.5 hours).

Writes Testing/Benchmarks/reports/streaming_inference.md (z x y x x sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "streaming_inference.md"
MODEL = ROOT / "Resources" / "Models" / "demo_brain.imbseg"
WORK = ROOT / "work-tmp" / "streaming_inference"
OVERLAP = 0.5
OURS = ("ours", "ours-module", "ours-bf16")  # our methods on the first volume; later volumes run "ours"


def make_volume(shape, seed=0):
    """CT-like int16 volume (z, y, x): smooth structures, a body outline and noise, slab by slab."""
    import numpy as np
    z, y, x = shape
    rng = np.random.default_rng(seed)
    out = np.empty(shape, dtype=np.int16)
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    body = ((yy - y / 2) / (0.45 * y)) ** 2 + ((xx - x / 2) / (0.4 * x)) ** 2 < 1
    base = (40 * np.sin(yy / 9.0) * np.cos(xx / 13.0)).astype(np.float32)
    for k in range(z):
        sl = np.where(body, base + 30 * np.sin(k / 7.0) + rng.normal(0, 20, (y, x)).astype(np.float32), -1000)
        out[k] = sl.astype(np.int16)
    return out


def image_of(arr, spacing):
    import SimpleITK as sitk
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img


def worker(method: str, shape, labels_out: str = "") -> dict:
    import numpy as np
    import torch
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.inference import count_windows
    bundle = load_bundle(MODEL)
    spacing = bundle.preprocessing["target_spacing"]
    roi = bundle.preprocessing["patch_size"]
    arr = make_volume(shape)
    extra, plan = {}, {}
    t0 = time.perf_counter()
    if method.startswith("ours"):
        from imbalanceseglib.streaming import predict_streaming
        precision = "bfloat16" if method == "ours-bf16" else "float32"
        pred = predict_streaming(image_of(arr, spacing), bundle, overlap=OVERLAP, storage="uint8",
                                 precision=precision, engine="module" if method == "ours-module" else "auto")
        wall = time.perf_counter() - t0
        net = pred.timings["network"]
        check = float(pred.stored[1].sum(dtype=np.float64) / pred.stored[1].size / 255.0)  # no float64 copy
        extra = {k: round(v, 2) for k, v in pred.timings.items()}
        plan = pred.execution
        labels = np.asarray(pred.labels)
    else:
        from imbalanceseglib.images import normalise_intensities
        from monai.inferers import sliding_window_inference
        name, batch = method.split("/b")
        sw_batch = int(batch)
        cl = name == "monai+cl"
        fmt = torch.channels_last_3d if cl else torch.contiguous_format
        network = bundle.network.to(memory_format=fmt)
        vol = normalise_intensities(arr, bundle.preprocessing.get("normalization", {}))
        net_t = [0.0]

        def predictor(x):
            t = time.perf_counter()
            out = network(x.contiguous(memory_format=fmt))
            net_t[0] += time.perf_counter() - t
            return out
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(vol)[None, None], roi, sw_batch, predictor,
                                              overlap=OVERLAP, mode="gaussian")
            del vol
            # softmax in place (no second C x N float32 copy)
            logits -= logits.max(dim=1, keepdim=True).values
            logits.exp_()
            logits /= logits.sum(dim=1, keepdim=True)
            probs = logits
        wall = time.perf_counter() - t0
        net = net_t[0]
        check = float(probs[0, 1].sum(dtype=torch.float64) / probs[0, 1].numel())
        labels = np.empty(probs.shape[2:], dtype=np.uint8)
        for k in range(labels.shape[0]):  # plane by plane: no int64 copy of the volume
            labels[k] = torch.argmax(probs[0, :, k], dim=0).numpy()
        plan = {"engine": "module", "sw_batch_size": sw_batch, "layout": "channels_last" if cl else "contiguous",
                "source": "given"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if labels_out:
        np.save(labels_out, labels.astype(np.uint8, copy=False))
    windows = count_windows([max(s, r) for s, r in zip(shape, roi)], roi, OVERLAP)
    return {"method": method, "shape": list(shape), "wall_s": wall, "network_s": net, "peak_bytes": peak,
            "windows": windows, "mean_p1": check, "timings": extra, "plan": plan, "voxels": int(np.prod(shape))}


def flops_per_window() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(MODEL)
    roi = bundle.preprocessing["patch_size"]
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bundle.network(torch.zeros(1, 1, *roi))
    return float(fc.get_total_flops())


def _best_seconds(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls, after one untimed call."""
    fn()
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), repeats) / 1e9


def onednn_peak(c: int = 1024, s: int = 16, repeats: int = 5) -> float:
    """GFLOP/s of a large 1x1x1 convolution through oneDNN (a GEMM of 4096 x 1024 x 1024): the
    kernels the CPU engine uses, as a second reference next to torch.mm (MKL)."""
    import torch
    x = torch.randn(1, c, s, s, s).contiguous(memory_format=torch.channels_last_3d)
    w = torch.randn(c, c, 1, 1, 1)
    conv = lambda: torch.ops.aten.mkldnn_convolution(x, w, None, [0, 0, 0], [1, 1, 1], [1, 1, 1], 1)
    return 2 * c * c * s ** 3 / _best_seconds(conv, repeats) / 1e9


def profile_window(rows: int = 8):
    """Per-operator self time (ms) of one window: module contiguous, module channels-last, engine."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.cpu_engine import cpu_engine
    bundle = load_bundle(MODEL)
    net = bundle.network.eval()
    roi = bundle.preprocessing["patch_size"]
    x = torch.randn(1, 1, *roi)
    out = {}
    runs = [("module, contiguous", torch.contiguous_format, None),
            ("module, channels-last", torch.channels_last_3d, None),
            ("CPU engine", torch.contiguous_format, cpu_engine(net))]
    for name, fmt, eng in runs:
        net.to(memory_format=fmt)
        f = eng if eng is not None else (lambda v: net(v.contiguous(memory_format=fmt)))
        with torch.inference_mode():
            for _ in range(3):
                f(x)
            t = time.perf_counter()
            for _ in range(5):
                f(x)
            per = (time.perf_counter() - t) / 5
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    f(x)
        ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in ops)
        out[name] = {"seconds": per,
                     "ops": [(e.key, e.self_cpu_time_total / 3 / 1e3, 100 * e.self_cpu_time_total / total)
                             for e in ops[:rows]]}
    net.to(memory_format=torch.contiguous_format)
    return out


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(method: str, shape, labels_out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--shape", "x".join(map(str, shape)),
           "--labels-out", labels_out]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "shape": list(shape), "error": (proc.stderr or proc.stdout)[-400:],
                "wall_s": time.perf_counter() - t}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def label_agreement(a_path: Path, b_path: Path) -> float:
    import numpy as np
    a = np.load(a_path, mmap_mode="r")
    b = np.load(b_path, mmap_mode="r")
    same = 0
    for k in range(a.shape[0]):  # plane by plane: bounded memory
        same += int(np.count_nonzero(a[k] == b[k]))
    return same / a.size


def gb(b):
    return f"{b / 1e9:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128x256x256,400x512x512,960x512x512",
                        help="comma-separated z x y x x sizes")
    parser.add_argument("--monai-batches", default="1,2,4",
                        help="MONAI windows per call tried on the first size; the fastest runs on the others")
    parser.add_argument("--methods", default="",
                        help="run only these methods (comma-separated names or prefixes, e.g. 'ours')")
    parser.add_argument("--report", default=str(REPORT), help="where to write the report (default: %(default)s)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--labels-out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method of a size this many times, interleaved (round 1 of all methods, "
                             "then round 2, ...); the report gives each round's ratio")
    parser.add_argument("--skip-monai-above", type=float, default=0.8,
                        help="skip MONAI when its estimated need exceeds this fraction of available memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [int(v) for v in args.shape.split("x")], args.labels_out)))
        return 0
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(MODEL)
    n_classes = bundle.num_classes
    peak = matmul_peak()
    dnn_peak = onednn_peak()
    fpw = flops_per_window()
    print(f"matmul peak {peak:.1f} GFLOP/s, oneDNN 1x1x1 conv {dnn_peak:.1f} GFLOP/s; "
          f"{fpw / 1e9:.2f} GFLOP per window", flush=True)
    profiles = profile_window()
    for name, p in profiles.items():
        print(f"one window, {name}: {p['seconds']:.3f} s", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    batches = [int(v) for v in args.monai_batches.split(",")]
    best_batch = batches[0]
    for si, size in enumerate(args.sizes.split(",")):
        shape = [int(v) for v in size.split("x")]
        n = 1
        for v in shape:
            n *= v
        # MONAI: int16 volume, float32 normalised input, C-channel aggregator, count map, and the
        # max and sum planes of the in-place softmax
        monai_need = 2 * n + 4 * n * (n_classes + 4)
        if si == 0:
            methods = [f"monai/b{b}" for b in batches] + [f"monai+cl/b{max(1, min(batches, key=lambda b: abs(b - 2)))}",
                                                          *OURS]
        else:
            methods = [f"monai/b{best_batch}", "ours"]
        wanted = [m for m in args.methods.split(",") if m]
        for rnd in range(1, max(1, args.rounds) + 1):
            label_files = {}
            for method in methods:
                if wanted and not any(method.startswith(m) for m in wanted):
                    continue
                if method.startswith("monai") and monai_need > args.skip_monai_above * available_bytes():
                    rows.append({"method": method, "shape": shape, "round": rnd,
                                 "skipped": f"needs about {gb(monai_need)} GB, {gb(available_bytes())} GB available"})
                    print(f"{size} {method} skipped", flush=True)
                    continue
                path = WORK / f"{size}_{method.replace('/', '_').replace('+', '_')}.npy"
                r = run_child(method, shape, str(path))
                r["round"] = rnd
                if "error" not in r:
                    label_files[method] = path
                rows.append(r)
                print(f"{size} round {rnd} {method}: "
                      + (f"{r['wall_s']:.1f} s, peak {gb(r['peak_bytes'])} GB, plan {r['plan']}"
                         if "error" not in r else f"failed: {r['error']}"), flush=True)
            if si == 0 and rnd == 1:
                done = [r for r in rows if r["method"].startswith("monai/b") and "wall_s" in r and "error" not in r]
                if done:
                    best_batch = int(min(done, key=lambda r: r["wall_s"])["method"].split("/b")[1])
            ref = next((m for m in label_files if m.startswith("monai/b")), None)
            for ours in OURS:
                if ref and ours in label_files:
                    agree = label_agreement(label_files[ref], label_files[ours])
                    for r in rows:
                        if r["method"] == ours and r["shape"] == shape and r["round"] == rnd:
                            r["label_agreement"] = {"with": ref, "fraction": agree}
            for path in label_files.values():
                path.unlink(missing_ok=True)
    write_report(rows, peak, fpw, n_classes, " ".join(sys.argv[1:]), Path(args.report), dnn_peak, profiles)
    print(f"report written to {args.report}")
    return 0


def _plan_text(plan) -> str:
    if not plan:
        return ""
    workers = plan.get("workers", 1)
    engine = plan.get("engine", "module")
    what = "engine" if engine == "onednn" else f"module {plan.get('layout')}"
    return (f"{what} × {plan.get('sw_batch_size')}" + (f" × {workers} at once" if workers > 1 else "")
            + f" ({plan.get('source')})")


def write_report(rows, peak, fpw, n_classes, argv, report: Path = REPORT, dnn_peak: float = 0.0,
                 profiles=None) -> None:
    import torch
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmark_common import machine
    n_rounds = max([r.get("round", 1) for r in rows] or [1])
    lines = ["# Big-volume inference: streaming sliding window vs MONAI", "",
             f"Command: `python Testing/Benchmarks/streaming_inference.py {argv}`".rstrip() + "  ",
             f"Machine: {machine(f'torch {torch.__version__} ({torch.get_num_threads()} threads)')}  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Network: the bundled demo model (UNet3D [12, 24, 48, 96], {n_classes} classes), window 64³, "
             f"overlap {OVERLAP}, Gaussian blending, fp32 on CPU, under torch.inference_mode. Volumes: "
             "synthetic CT-like int16 at 2 mm (the model's spacing, so no resampling). Each method runs "
             "in its own process; peak memory is that process's maximum resident set (includes the int16 "
             "volume and Python/torch themselves). "
             + (f"Every method of a size ran {n_rounds} times, interleaved (all methods of round 1, then round 2, "
                "...), so that a slow spell of the shared machine falls on both sides; each round's ratio is given."
                if n_rounds > 1 else
                "One run each: on this shared 2-core machine repeated runs of the same command have differed by "
                "up to about 15 % (`--rounds N` repeats them, interleaved)."), "",
             f"This machine's fp32 peak: {peak:.1f} GFLOP/s (best of 5 4096² matmuls, torch.mm). For "
             f"reference, a large 1×1×1 convolution through oneDNN (a 4096×1024×1024 GEMM) reached "
             f"{dnn_peak:.1f} GFLOP/s"
             + (": oneDNN's kernels outrun torch.mm's here, so a network whose convolutions all run in oneDNN can "
                "pass 100 % of the matmul figure." if dnn_peak > peak else ".")
             + f" One window: {fpw / 1e9:.2f} GFLOP (torch.utils.flop_counter).", "",
             "Methods: `monai/bN` is MONAI's `sliding_window_inference` with N windows per call and the network "
             "as loaded, then an in-place softmax: logits and probabilities only. `monai+cl/bN` is the same with "
             "the network and its windows in the channels-last layout (a control: what a MONAI user gets from "
             "the layout alone). `ours` is `predict_streaming` with its defaults: the engine (the network's own "
             "forward, or the CPU engine of `imbalanceseglib.cpu_engine`: the same network from the same "
             "parameters with every convolution in oneDNN and copy-free instance norms), windows per call, "
             "layout and calls at once are measured on the run's own first windows (the plan column; the trial "
             "batches are real windows and their time is in the totals), and it also produces the calibrated "
             "confidence maps (uint8), labels, the uncertainty map and the label-free estimate. `ours-module` "
             "(first size only) is the same with `engine=\"module\"`: the streaming and tuning without the CPU "
             "engine. `ours-bf16` (first size only) is `precision=\"bfloat16\"`: the module under bfloat16 "
             "autocast, an opt-in that is not the same arithmetic as MONAI's fp32, so it is not counted against "
             "the goal; its label agreement with MONAI's fp32 shows what it costs.", "",
             "| volume (z×y×x) | voxels | method | plan (engine or module layout × windows per call × calls at once) | wall s | peak memory GB | "
             "network s | network GFLOP/s | % of matmul peak | windows |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        shape = "×".join(map(str, r["shape"]))
        rnd = r.get("round", 1)
        by.setdefault((shape, rnd), {})[r["method"]] = r
        name = r["method"] + (f" (round {rnd})" if n_rounds > 1 else "")
        if "skipped" in r:
            lines.append(f"| {shape} | | {name} | | not run: {r['skipped']} | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {shape} | | {name} | | failed after {r['wall_s']:.0f} s | | | | | |")
            continue
        gf = r["windows"] * fpw / r["network_s"] / 1e9 if r["network_s"] else 0
        lines.append(f"| {shape} | {r['voxels'] / 1e6:.1f} M | {name} | {_plan_text(r.get('plan'))} | "
                     f"{r['wall_s']:.1f} | {gb(r['peak_bytes'])} | {r['network_s']:.1f} | {gf:.1f} | "
                     f"{100 * gf / peak:.0f} % | {r['windows']} |")
    if profiles:
        lines += ["", "Where one window's time goes (torch.profiler self time per operator, ms per window, the "
                  "largest few; the window time is measured without the profiler):", ""]
        for name, p in profiles.items():
            ops = "; ".join(f"{k} {ms:.1f} ({pct:.0f} %)" for k, ms, pct in p["ops"])
            lines.append(f"* {name}: {1e3 * p['seconds']:.0f} ms per window "
                         f"({fpw / p['seconds'] / 1e9:.0f} GFLOP/s). {ops}")
    lines += ["", "Ours against the fastest plain MONAI run of the same volume"
              + (" in the same round" if n_rounds > 1 else "") + " (wall time and peak memory):", ""]
    ratios: Dict[str, List[float]] = {}
    for (shape, rnd), d in by.items():
        monai = [r for m, r in d.items() if m.startswith("monai/b") and "peak_bytes" in r]
        for name in OURS:
            ours = d.get(name)
            if not monai or not ours or "peak_bytes" not in ours:
                continue
            m = min(monai, key=lambda r: r["wall_s"])
            agree = ours.get("label_agreement")
            if name == "ours":
                ratios.setdefault(shape, []).append(m["wall_s"] / ours["wall_s"])
            lines.append(f"* {shape}{f', round {rnd}' if n_rounds > 1 else ''}, {name}: "
                         f"{m['wall_s'] / ours['wall_s']:.2f}× faster than {m['method']}, "
                         f"{m['peak_bytes'] / ours['peak_bytes']:.1f}× less memory; mean p(class 1) "
                         f"{m['mean_p1']:.4f} (MONAI, uncalibrated) vs {ours['mean_p1']:.4f} (ours, calibrated)"
                         + (f"; same label as {agree['with']} at {100 * agree['fraction']:.4f} % of voxels"
                            if agree else ""))
    if ratios:
        met = all(min(v) >= 2.0 for v in ratios.values())
        lines += ["", "Goal (issue #19): `ours` at least 2× the fastest MONAI run end to end at every size, in every "
                  f"round: **{'met' if met else 'not met'}**. Per size, the ratio of each round: "
                  + "; ".join(f"{shape} " + ", ".join(f"{v:.2f}×" for v in vals) + f" (lowest {min(vals):.2f}×)"
                              for shape, vals in ratios.items()) + "."]
    lines += ["", "Our timings per step (s; calibrate_store is part of blend) and the measured trials "
              "(seconds per window):", ""]
    for r in rows:
        if r.get("method", "").startswith("ours") and "timings" in r:
            trials = ", ".join(_plan_text({**t, "source": ""}).replace(" ()", "") + f" {t['seconds_per_window']:.3f}"
                               for t in r.get("plan", {}).get("trials", []))
            check = r.get("plan", {}).get("engine_check")
            if check:
                trials += (f"; engine check (one random window): max |engine − module| = "
                           f"{check['max_relative_difference']:.1e} of the largest logit "
                           f"({'passed' if check['passed'] else 'failed, module used'})")
            lines.append(f"* {'×'.join(map(str, r['shape']))} {r['method']}"
                         + (f" (round {r.get('round', 1)})" if n_rounds > 1 else "") + ": "
                         + ", ".join(f"{k} {v}" for k, v in r["timings"].items())
                         + (f"; trials: {trials}" if trials else ""))
    report.parent.mkdir(parents=True, exist_ok=True)
    tmp = report.with_suffix(".md.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, report)


if __name__ == "__main__":
    sys.exit(main())
