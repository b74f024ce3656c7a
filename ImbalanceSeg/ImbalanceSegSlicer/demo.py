"""The main job: segment the embedded demo case through the module Logic on a real MRML scene.

Usage: ``python -m ImbalanceSegSlicer.demo [--output DIR]`` (with ``ImbalanceSeg/`` on
``sys.path``; ``Testing/run_demo.sh`` sets everything up). Writes the
segmentation (.seg.nrrd), per-class probability maps and the uncertainty map
(.nrrd), the class table (.tsv), a scene (.mrml) that opens in 3D Slicer, and
axial/coronal/sagittal PNG snapshots rendered by Slicer's slice view logic.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE.parent))


class StepTimer:
    def __init__(self) -> None:
        self.steps: List[Tuple[str, float]] = []

    def run(self, name: str, fn, *args, **kwargs):
        print(f"==> {name}", flush=True)
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        self.steps.append((name, time.perf_counter() - t))
        return out


def progress_bar(stage: str, fraction: float) -> None:
    width = 30
    filled = int(round(width * fraction))
    end = "\n" if fraction >= 1.0 else ""
    print(f"\r    {stage:<12} [{'#' * filled}{'.' * (width - filled)}] {100 * fraction:5.1f}%", end=end, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="output/demo", help="output folder (default: output/demo)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-snapshots", action="store_true", help="skip the PNG rendering")
    args = parser.parse_args(argv)
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    import numpy as np
    import SimpleITK as sitk
    import torch

    from ImbalanceSeg import ImbalanceSegLogic
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.scenarios import load_demo_case, repository_paths

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    timer = StepTimer()
    t_all = time.perf_counter()
    paths = repository_paths()
    scene = timer.run("create MRML scene (slicer-core)", sc.create_scene)
    volume, reference = timer.run("load demo volume and reference", load_demo_case, scene, paths)
    logic = ImbalanceSegLogic(scene)
    bundle = timer.run("load model bundle", logic.loadModel, paths["model"])
    print(f"    model: {bundle.card['name']} ({paths['model'].name}), classes: {', '.join(bundle.class_names[1:])}")
    result = timer.run("segment (module Logic)", logic.process, volume, bundle, reference,
                       device=args.device, progress=progress_bar)

    written: Dict[str, List[Path]] = {}

    def save_all():
        files = []
        files.append(sc.save_node(scene, volume, str(out / "DemoBrainT1.nrrd")))
        files.append(sc.save_node(scene, reference, str(out / "DemoBrainT1_reference.seg.nrrd")))
        files.append(sc.save_node(scene, result.segmentationNode, str(out / "DemoBrainT1_segmentation.seg.nrrd")))
        for name, node in zip(result.classNames, result.probabilityNodes):
            files.append(sc.save_node(scene, node, str(out / f"DemoBrainT1_probability_{sc.safe_file_name(name)}.nrrd")))
        files.append(sc.save_node(scene, result.uncertaintyNode, str(out / "DemoBrainT1_uncertainty.nrrd")))
        files.append(sc.save_node(scene, result.tableNode, str(out / "DemoBrainT1_class_table.tsv")))
        files.append(sc.save_node(scene, result.performanceTableNode,
                                  str(out / "DemoBrainT1_performance_estimate.tsv")))
        files.append(sc.save_scene(scene, str(out / "DemoBrainT1.mrml")))
        written["data"] = [Path(f) for f in files]

    timer.run("write segmentation, maps, table and scene", save_all)

    if not args.no_snapshots:
        from ImbalanceSegSlicer.rendering import render_slice_snapshots

        # Overlay the probability of the smallest foreground class: the one a reviewer checks first.
        fg_counts = [(r["Voxel count"], i + 1) for i, r in enumerate(result.rows) if r["Voxel count"] > 0]
        overlay_index = min(fg_counts)[1] if fg_counts else 1

        def snapshots():
            # Centre the three views on the most confident voxel of that class, so the overlay shows.
            prob_image = sc.sitk_from_volume_node(result.probabilityNodes[overlay_index])
            arr = sitk.GetArrayViewFromImage(prob_image)
            k, j, i = np.unravel_index(int(np.argmax(arr)), arr.shape)
            lps = prob_image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
            centre_ras = (-lps[0], -lps[1], lps[2])
            shots = render_slice_snapshots(scene, volume, result.segmentationNode,
                                           result.probabilityNodes[overlay_index], foreground_opacity=0.5,
                                           out_dir=str(out), size=(512, 512), prefix="DemoBrainT1_",
                                           center_ras=centre_ras, segmentation_fill_opacity=0.0)
            written["snapshots"] = [Path(p) for p in shots.values()]
        timer.run(f"render slice snapshots (overlay: probability of {result.classNames[overlay_index]})", snapshots)

    total = time.perf_counter() - t_all
    print()
    print("Per-class results on the demo case (Dice against the demo reference):")
    print(ImbalanceSegLogic.formatRows(result.rows))
    print()
    print(f"Label-free performance estimate ({result.calibration}), next to the true Dice:")
    print(ImbalanceSegLogic.formatPerformanceRows(result.performanceRows,
                                                  {r["Segment"]: r["Dice"] for r in result.rows}))
    print()
    print(f"Outputs in {out}:")
    for group, files in written.items():
        for f in files:
            print(f"    {f.name}")
    print()
    print("Step timings:")
    for name, secs in timer.steps:
        print(f"    {secs:8.2f} s  {name}")
    for k, v in result.timings.items():
        if k.startswith("inference."):
            print(f"    {v:8.2f} s    {k}")
    print(f"    {total:8.2f} s  total")
    print(f"\nOpen {out / 'DemoBrainT1.mrml'} in 3D Slicer (File > Add Data) to inspect the results.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
