"""Big-volume inference: ImbalanceSegLib's streaming sliding window against MONAI's.

For each volume size, in separate processes (so peak memory is each method's own):
* ``monai``: intensity normalisation, MONAI ``sliding_window_inference`` (Gaussian blending),
  softmax. Logits and probabilities only: no calibration, no estimate, no uncertainty.
* ``ours``: :func:`imbalanceseglib.streaming.predict_streaming`, which also produces the
  calibrated confidence maps (uint8), labels, the uncertainty map and the label-free estimate.

Same network (the bundled demo model), same window (its 64^3 patch) and overlap (0.5), same
windows per network call (4). Also measures this machine's fp32 matmul peak and the network's
achieved GFLOP/s (FLOPs of one window counted by torch.utils.flop_counter).

Volumes are synthetic CT-like int16 volumes at the model's 2 mm spacing (so no resampling).

    python Testing/Benchmarks/streaming_inference.py [--sizes 128x256x256,400x512x512,960x512x512]

Writes Testing/Benchmarks/reports/streaming_inference.md (z x y x x sizes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "streaming_inference.md"
MODEL = ROOT / "Resources" / "Models" / "demo_brain.imbseg"
OVERLAP, SW_BATCH = 0.5, 4


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


def worker(method: str, shape) -> dict:
    import numpy as np
    import torch
    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.inference import count_windows
    bundle = load_bundle(MODEL)
    spacing = bundle.preprocessing["target_spacing"]
    roi = bundle.preprocessing["patch_size"]
    arr = make_volume(shape)
    t0 = time.perf_counter()
    if method == "ours":
        from imbalanceseglib.streaming import predict_streaming
        pred = predict_streaming(image_of(arr, spacing), bundle, overlap=OVERLAP, sw_batch_size=SW_BATCH,
                                 storage="uint8")
        wall = time.perf_counter() - t0
        net = pred.timings["network"]
        check = float(np.asarray(pred.stored[1], dtype=np.float64).mean() / 255.0)
        extra = {k: round(v, 2) for k, v in pred.timings.items()}
    else:
        from imbalanceseglib.images import normalise_intensities
        from monai.inferers import sliding_window_inference
        vol = normalise_intensities(arr, bundle.preprocessing.get("normalization", {}))
        net_t = [0.0]

        def predictor(x):
            t = time.perf_counter()
            out = bundle.network(x)
            net_t[0] += time.perf_counter() - t
            return out
        with torch.inference_mode():
            logits = sliding_window_inference(torch.from_numpy(vol)[None, None], roi, SW_BATCH, predictor,
                                              overlap=OVERLAP, mode="gaussian")
            del vol
            probs = torch.softmax(logits, dim=1)
            del logits
        wall = time.perf_counter() - t0
        net = net_t[0]
        check = float(probs[0, 1].double().mean())
        extra = {}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    windows = count_windows([max(s, r) for s, r in zip(shape, roi)], roi, OVERLAP)
    return {"method": method, "shape": list(shape), "wall_s": wall, "network_s": net, "peak_bytes": peak,
            "windows": windows, "mean_p1": check, "timings": extra, "voxels": int(np.prod(shape))}


def flops_per_window() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(MODEL)
    roi = bundle.preprocessing["patch_size"]
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        bundle.network(torch.zeros(1, 1, *roi))
    return float(fc.get_total_flops())


def matmul_peak(n: int = 4096, repeats: int = 5) -> float:
    import torch
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = 1e9
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def run_child(method: str, shape) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, "--shape", "x".join(map(str, shape))]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "shape": list(shape), "error": (proc.stderr or proc.stdout)[-400:],
                "wall_s": time.perf_counter() - t}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def gb(b):
    return f"{b / 1e9:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="128x256x256,400x512x512,960x512x512",
                        help="comma-separated z x y x x sizes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--skip-monai-above", type=float, default=0.8,
                        help="skip MONAI when its estimated need exceeds this fraction of available memory")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, [int(v) for v in args.shape.split("x")])))
        return 0
    import torch
    from imbalanceseglib.bundle import load_bundle
    bundle = load_bundle(MODEL)
    n_classes = bundle.num_classes
    peak = matmul_peak()
    fpw = flops_per_window()
    print(f"matmul peak {peak:.1f} GFLOP/s; {fpw / 1e9:.2f} GFLOP per window", flush=True)
    rows = []
    for size in args.sizes.split(","):
        shape = [int(v) for v in size.split("x")]
        n = 1
        for v in shape:
            n *= v
        # MONAI: float32 input + aggregator + count map + output + softmax copy (C channels each)
        monai_need = 4 * n * (2 + 3 * n_classes)
        for method in ("monai", "ours"):
            if method == "monai" and monai_need > args.skip_monai_above * available_bytes():
                rows.append({"method": "monai", "shape": shape, "skipped": f"needs about {gb(monai_need)} GB, "
                             f"{gb(available_bytes())} GB available"})
                print(f"{size} monai skipped", flush=True)
                continue
            r = run_child(method, shape)
            rows.append(r)
            print(f"{size} {method}: " + (f"{r['wall_s']:.1f} s, peak {gb(r['peak_bytes'])} GB"
                                          if "error" not in r else f"failed: {r['error']}"), flush=True)
    write_report(rows, peak, fpw, n_classes, " ".join(sys.argv[1:]))
    print(f"report written to {REPORT}")
    return 0


def write_report(rows, peak, fpw, n_classes, argv) -> None:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch
    lines = ["# Big-volume inference: streaming sliding window vs MONAI", "",
             f"Command: `python Testing/Benchmarks/streaming_inference.py {argv}`".rstrip() + "  ",
             f"Machine: {platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} logical cores, "
             f"torch {torch.__version__} ({torch.get_num_threads()} threads)  ",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
             f"Network: the bundled demo model (UNet3D [12, 24, 48, 96], {n_classes} classes), window 64³, "
             f"overlap {OVERLAP}, {SW_BATCH} windows per network call, Gaussian blending, fp32 on CPU. Volumes: "
             "synthetic CT-like int16 at 2 mm (the model's spacing, so no resampling). Each method runs in its "
             "own process; peak memory is that process's maximum resident set (includes the volume itself).",
             "", f"This machine's fp32 peak: {peak:.1f} GFLOP/s (best of 5 4096² matmuls). One window: "
             f"{fpw / 1e9:.2f} GFLOP (torch.utils.flop_counter).", "",
             "MONAI produces logits and softmax only; ours also produces the calibrated confidence maps (uint8), "
             "labels, the uncertainty map and the label-free performance estimate.", "",
             "| volume (z×y×x) | voxels | method | wall s | peak memory GB | network s | network GFLOP/s | "
             "% of matmul peak | windows |", "|---|---|---|---|---|---|---|---|---|"]
    by = {}
    for r in rows:
        shape = "×".join(map(str, r["shape"]))
        by.setdefault(shape, {})[r["method"]] = r
        if "skipped" in r:
            lines.append(f"| {shape} | | {r['method']} | not run: {r['skipped']} | | | | | |")
            continue
        if "error" in r:
            lines.append(f"| {shape} | | {r['method']} | failed after {r['wall_s']:.0f} s | | | | | |")
            continue
        gf = r["windows"] * fpw / r["network_s"] / 1e9 if r["network_s"] else 0
        lines.append(f"| {shape} | {r['voxels'] / 1e6:.1f} M | {r['method']} | {r['wall_s']:.1f} | "
                     f"{gb(r['peak_bytes'])} | {r['network_s']:.1f} | {gf:.1f} | {100 * gf / peak:.0f} % | "
                     f"{r['windows']} |")
    lines += ["", "Speed-up (MONAI wall / ours wall) and memory ratio, where both ran:", ""]
    for shape, d in by.items():
        if "ours" in d and "monai" in d and "wall_s" in d["monai"] and "peak_bytes" in d["monai"] \
                and "peak_bytes" in d["ours"]:
            lines.append(f"* {shape}: {d['monai']['wall_s'] / d['ours']['wall_s']:.2f}× faster, "
                         f"{d['monai']['peak_bytes'] / d['ours']['peak_bytes']:.1f}× less memory; mean p(class 1) "
                         f"{d['monai']['mean_p1']:.4f} (MONAI, uncalibrated) vs {d['ours']['mean_p1']:.4f} (ours)")
    lines += ["", "Our timings per step (s):", ""]
    for r in rows:
        if r.get("method") == "ours" and "timings" in r:
            lines.append(f"* {'×'.join(map(str, r['shape']))}: " + ", ".join(f"{k} {v}" for k, v in r["timings"].items()))
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    tmp = REPORT.with_suffix(".md.part")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, REPORT)


if __name__ == "__main__":
    sys.exit(main())
