"""Train the bundled demo model and record its Dice on the demo case in the model card.

    bash Testing/run_demo.sh --help   # (sets up .venv once)
    .venv/bin/python Resources/Scripts/train_demo.py [--out work-tmp/demo_train] [--iterations N]

Steps: ``imbalanceseg train Resources/Models/demo_brain.train.json`` (resumable:
rerunning continues from the last checkpoint), then inference on the demo case
(which no training case equals: every training variant is deformed), then the
per-class Dice/sensitivity/precision on the demo case go into the card's
``demo_case`` entry and the bundle is copied to Resources/Models/demo_brain.imbseg.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))

from imbalanceseglib.bundle import load_bundle, save_bundle  # noqa: E402
from imbalanceseglib.cli import main as cli_main  # noqa: E402
from imbalanceseglib.images import read_image  # noqa: E402
from imbalanceseglib.inference import predict  # noqa: E402
from imbalanceseglib.metrics import overlap_metrics  # noqa: E402

import SimpleITK as sitk  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "work-tmp" / "demo_train"))
    ap.add_argument("--iterations", type=int)
    args = ap.parse_args()
    config = ROOT / "Resources" / "Models" / "demo_brain.train.json"
    argv = ["train", str(config), "--out", args.out]
    if args.iterations:
        argv += ["--iterations", str(args.iterations)]
    rc = cli_main(argv)
    if rc:
        return rc
    bundle_path = Path(args.out) / "demo_brain.imbseg"
    bundle = load_bundle(bundle_path)
    image = read_image(ROOT / "Resources" / "Demo" / "demo_t1.nrrd")
    ref = sitk.GetArrayFromImage(read_image(ROOT / "Resources" / "Demo" / "demo_labels.nrrd"))
    t = time.perf_counter()
    pred = predict(image, bundle)
    secs = time.perf_counter() - t
    metrics = overlap_metrics(pred.labels, ref, bundle.num_classes)
    per_class = {bundle.class_names[c]: {k: metrics[c][k] for k in ("dice", "sensitivity", "precision",
                                                                      "reference_voxels", "predicted_voxels")}
                 for c in range(1, bundle.num_classes)}
    bundle.card["demo_case"] = {
        "description": "Resources/Demo/demo_t1.nrrd (Colin27, 2 mm) against Resources/Demo/demo_labels.nrrd; "
                       "never a training case.",
        "per_class": per_class, "inference_seconds": round(secs, 2)}
    save_bundle(bundle_path, bundle.card, bundle.network)
    final = ROOT / "Resources" / "Models" / "demo_brain.imbseg"
    tmp = final.with_name(".demo_brain.imbseg.tmp")
    shutil.copyfile(bundle_path, tmp)
    tmp.replace(final)
    print(f"{'class':<20}{'Dice':>8}{'Sens':>8}{'Prec':>8}")
    for name, m in per_class.items():
        print(f"{name:<20}{m['dice']:>8.3f}{m['sensitivity']:>8.3f}{m['precision']:>8.3f}")
    print(f"demo inference {secs:.1f} s; bundle: {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
