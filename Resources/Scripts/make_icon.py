"""Make the 128x128 extension icon from a real render of the demo case.

    python Resources/Scripts/make_icon.py
Renders the demo T1 with its reference segmentation (axial, Slicer slice view
logic, offscreen), crops to the head and shrinks to 128x128 by area averaging.
Writes Resources/Icons/ImbalanceSeg.png and ImbalanceSeg/Resources/Icons/ImbalanceSeg.png.
"""

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "ImbalanceSeg"), str(ROOT / "ImbalanceSegLib" / "src")]
os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")

from ImbalanceSegSlicer import scene as sc  # noqa: E402
from ImbalanceSegSlicer.rendering import render_slice_snapshots  # noqa: E402
from ImbalanceSegSlicer.scenarios import load_demo_case  # noqa: E402


def main():
    scene = sc.create_scene()
    volume, reference = load_demo_case(scene)
    with tempfile.TemporaryDirectory() as tmp:
        shots = render_slice_snapshots(scene, volume, reference, out_dir=tmp, size=(512, 512),
                                       orientations=("Axial",), segmentation_fill_opacity=0.6)
        rgb = sitk.GetArrayFromImage(sitk.ReadImage(shots["axial"])).astype(np.float32)[..., :3]
    # Crop to the non-black bounding box (square), then area-average to 128x128.
    mask = rgb.max(axis=2) > 10
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max()) // 2, (xs.min() + xs.max()) // 2
    half = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + 4
    half = int(np.ceil(half / 64) * 64)
    pad = np.pad(rgb, ((half, half), (half, half), (0, 0)))
    crop = pad[cy: cy + 2 * half, cx: cx + 2 * half]
    f = crop.shape[0] // 128
    crop = crop[: 128 * f, : 128 * f]
    icon = crop.reshape(128, f, 128, f, 3).mean(axis=(1, 3)).round().clip(0, 255).astype(np.uint8)
    img = sitk.GetImageFromArray(icon, isVector=True)
    for out in (ROOT / "Resources" / "Icons" / "ImbalanceSeg.png",
                ROOT / "ImbalanceSeg" / "Resources" / "Icons" / "ImbalanceSeg.png"):
        out.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(out))
        print("wrote", out)


if __name__ == "__main__":
    main()
