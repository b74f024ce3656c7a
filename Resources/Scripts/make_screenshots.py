"""Screenshots for the Extensions Index, rendered from a real run (no mock-ups).

Runs the module Logic on the demo case (slicer-core scene), then renders Slicer's own slice
pipeline offscreen: the segmentation, the confidence map of the smallest class centred on its
least confident region, and the uncertainty map. Writes Resources/Screenshots/*.png.

    .venv/bin/python Resources/Scripts/make_screenshots.py
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "ImbalanceSeg"), str(ROOT / "ImbalanceSegLib" / "src")]
if sys.platform.startswith("linux"):
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")


def main() -> int:
    from ImbalanceSeg import ImbalanceSegLogic
    from ImbalanceSegSlicer import scene as sc
    from ImbalanceSegSlicer.rendering import render_slice_snapshots
    from ImbalanceSegSlicer.scenarios import run_demo_scenario

    out = ROOT / "Resources" / "Screenshots"
    out.mkdir(exist_ok=True)
    scene = sc.create_scene()
    demo = run_demo_scenario(scene)
    result, volume = demo["result"], demo["volume"]
    logic = ImbalanceSegLogic(scene)
    smallest = result.classNames[-1]
    region = logic.leastConfidentRegions(result.segmentationNode, smallest, count=1)[0]
    shots = {}
    shots.update(render_slice_snapshots(scene, volume, result.segmentationNode, None, out_dir=str(out),
                                        size=(640, 640), prefix="segmentation_", center_ras=region["ras"],
                                        orientations=("Axial", "Coronal"), segmentation_fill_opacity=0.45))
    shots.update(render_slice_snapshots(scene, volume, result.segmentationNode,
                                        logic.probabilityNodeForClass(result.segmentationNode, smallest),
                                        foreground_opacity=0.6, out_dir=str(out), size=(640, 640),
                                        prefix=f"confidence_{smallest.lower()}_", center_ras=region["ras"],
                                        orientations=("Coronal",), segmentation_fill_opacity=0.0))
    shots.update(render_slice_snapshots(scene, volume, None, result.uncertaintyNode, foreground_opacity=0.7,
                                        out_dir=str(out), size=(640, 640), prefix="uncertainty_",
                                        center_ras=region["ras"], orientations=("Axial",)))
    for p in sorted(out.glob("*.png")):
        print(p.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
