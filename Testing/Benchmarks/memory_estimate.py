#!/usr/bin/env python
"""How well does the memory estimate cover what a run really allocates? (issue #19 item 3)

    .venv/bin/python Testing/Benchmarks/memory_estimate.py [--quick]

Each configuration runs in a fresh process: it builds the input volume (noise of the given size
and spacing), loads the model and runs the network once on a tiny input (so that the libraries'
one-off allocations are not counted), takes the process's peak resident memory as the baseline,
then segments the volume, with :func:`imbalanceseglib.inference.predict` alone or with the
module Logic on a slicer-core scene (``ImbalanceSegLogic.process``: prediction and the result
nodes: segmentation, one probability volume per class, uncertainty, tables). Reported: the
growth of the peak resident memory over the baseline, the estimate
(:func:`imbalanceseglib.inference.estimate_memory_bytes`, and
``ImbalanceSegLogic.estimateMemoryBytes`` for the Logic), and measured / estimated. The goal
is an estimate that is never below what was used and not far above it.

Networks: the bundled models (brain: UNet3D [12, 24, 48, 96], window 64^3, 6 classes;
hippocampus: [16, 32, 64, 128], 40x56x40, 3 classes) and wider/larger-window variants with
random weights (memory does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_common import machine  # noqa: E402

REPORT = ROOT / "Testing" / "Benchmarks" / "reports" / "memory_estimate.md"

CHILD = r'''
import json, resource, sys
sys.path.insert(0, ROOT + "/ImbalanceSegLib/src"); sys.path.insert(0, ROOT + "/ImbalanceSeg")
import numpy as np, SimpleITK as sitk, torch
torch.set_num_threads(2)
from imbalanceseglib.bundle import load_bundle, ModelBundle
from imbalanceseglib.networks import build_network
from imbalanceseglib.inference import estimate_memory_bytes, predict
cfg = json.loads(sys.argv[1])
bundle = load_bundle(ROOT + "/Resources/Models/" + cfg["model"])
if cfg.get("features") or cfg.get("patch"):
    card = json.loads(json.dumps(bundle.card))
    params = dict(card["network"]["params"])
    if cfg.get("features"):
        params["features"] = cfg["features"]
    card["network"]["params"] = params
    if cfg.get("patch"):
        card["preprocessing"]["patch_size"] = cfg["patch"]
    card.pop("input_profile", None)
    bundle = ModelBundle(card=card, network=build_network("UNet3D", params).eval())
rng = np.random.default_rng(0)
arr = (rng.normal(size=cfg["size"][::-1]) * 100).astype(np.int16)
img = sitk.GetImageFromArray(arr)
img.SetSpacing(cfg["spacing"])
del arr
with torch.inference_mode():
    bundle.network(torch.zeros(1, 1, *[bundle.network.size_divisor * 2] * 3))
pre = bundle.model_card.preprocessing
est = estimate_memory_bytes(img.GetSize(), img.GetSpacing(), pre.get("target_spacing"), bundle.num_classes,
                            patch_size=pre.get("patch_size"), features=bundle.model_card.network.get("params", {}).get("features"))
if cfg["what"] == "logic":
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.logic import ImbalanceSegLogic
    scene = sc.create_scene()
    volume = sc.volume_node_from_sitk(scene, img, "V")
    del img
    logic = ImbalanceSegLogic(scene)
    est = logic.estimateMemoryBytes(volume, bundle)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    logic.process(volume, bundle)
else:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    predict(img, bundle, memory_limit_bytes=1 << 62)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"used": peak - base, "estimate": est}))
'''

CONFIGS = [
    # (label, what, model, size xyz, spacing, features, patch)
    ("brain model, 2 mm, 128x128x96", "predict", "demo_brain.imbseg", [128, 128, 96], [2.0, 2.0, 2.0], None, None),
    ("brain model, 1 mm input (resampled to 2 mm), 200^3", "predict", "demo_brain.imbseg", [200, 200, 200],
     [1.0, 1.0, 1.0], None, None),
    ("brain model, 0.5 mm input, 300^3", "predict", "demo_brain.imbseg", [300, 300, 300], [0.5, 0.5, 0.5], None, None),
    ("brain model, 0.5 mm input, 300^3, Logic + result nodes", "logic", "demo_brain.imbseg", [300, 300, 300],
     [0.5, 0.5, 0.5], None, None),
    ("brain model, 2 mm, 128x128x96, Logic + result nodes", "logic", "demo_brain.imbseg", [128, 128, 96],
     [2.0, 2.0, 2.0], None, None),
    ("width x2 [24..192], 2 mm, 128x128x96", "predict", "demo_brain.imbseg", [128, 128, 96], [2.0, 2.0, 2.0],
     [24, 48, 96, 192], None),
    ("window 128^3, 2 mm, 160x160x128", "predict", "demo_brain.imbseg", [160, 160, 128], [2.0, 2.0, 2.0], None,
     [128, 128, 128]),
    ("width [32..256] + window 96^3, 2 mm, 128^3", "predict", "demo_brain.imbseg", [128, 128, 128],
     [2.0, 2.0, 2.0], [32, 64, 128, 256], [96, 96, 96]),
    ("hippocampus model, 1 mm crop 40x56x40", "predict", "demo_hippocampus.imbseg", [40, 56, 40], [1.0, 1.0, 1.0],
     None, None),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the small configurations")
    args = ap.parse_args(argv)
    rows = []
    for label, what, model, size, spacing, features, patch in CONFIGS:
        if args.quick and max(size) > 160:
            continue
        cfg = {"what": what, "model": model, "size": size, "spacing": spacing, "features": features, "patch": patch}
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", f"ROOT = {str(ROOT)!r}\n" + CHILD, json.dumps(cfg)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{label}: the child failed")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        out.update(label=label, seconds=time.perf_counter() - t)
        rows.append(out)
        print(f"{label}: used {out['used'] / 2**30:.2f} GiB, estimated {out['estimate'] / 2**30:.2f} GiB, "
              f"ratio {out['used'] / out['estimate']:.2f} ({out['seconds']:.0f} s)", flush=True)
    lines = ["# Memory estimate against measured peak memory", "",
             "Command: `.venv/bin/python Testing/Benchmarks/memory_estimate.py" + (" --quick" if args.quick else "")
             + "`  ", f"Machine: {machine()}  ", f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             __doc__.split("\n\n", 2)[1].strip(), "",
              "| configuration | used (GiB) | estimated (GiB) | used / estimated |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['used'] / 2**30:.2f} | {r['estimate'] / 2**30:.2f} | "
                     f"{r['used'] / r['estimate']:.2f} |")
    worst = max(r["used"] / r["estimate"] for r in rows)
    lines += ["", f"Largest used / estimated: {worst:.2f} "
              + ("(the estimate covered every run)" if worst <= 1.0 else "(**the estimate was too low at least once**)")]
    REPORT.write_text("\n".join(lines) + "\n")
    print(f"report: {REPORT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
