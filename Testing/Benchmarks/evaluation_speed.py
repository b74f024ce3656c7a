"""Benchmark: speed and agreement of ImbalanceSeg's evaluation against MONAI and DeepMind surface-distance.

    .venv/bin/python Testing/Benchmarks/evaluation_speed.py \\
        [--surface-distance /path/to/checkout] [--repeats 5]

Scenarios (both on a 256 x 256 x 128 voxel grid at 0.8 x 0.8 x 2.5 mm):

1. binary pair: a sphere of 30 mm diameter against a shifted, lobed sphere plus a
   small false-positive blob far away; HD95 alone, and Dice + HD95 + ASSD;
2. label map with 14 foreground classes of 75 to 40,000 voxels (ellipsoids; the
   prediction shifts, grows or shrinks each one and adds a few stray blobs);
   Dice + HD95 + ASSD for all 14 classes.

Libraries: ImbalanceSeg (``imbalanceseglib.evaluation``), MONAI (installed
version, CPU, inputs given as the one-hot tensors it requires, built outside the
timing), DeepMind ``surface-distance`` if it can be imported (from
``--surface-distance`` or the environment; it is not a dependency and not part of
this repository). DeepMind weights distances by surfel area, a different
definition of HD95/ASSD, so its values are shown but not expected to agree.
Each timing is the median of ``--repeats`` runs in this one process. Writes
Testing/Benchmarks/reports/evaluation_speed.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "ImbalanceSegLib" / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_common import machine as _machine  # noqa: E402

SHAPE = (128, 256, 256)          # (z, y, x)
SPACING = (2.5, 0.8, 0.8)        # mm, same order


def machine() -> str:
    import scipy
    import torch
    return _machine(f"NumPy {np.__version__}, SciPy {scipy.__version__}, "
                    f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


def grid_mm():
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    return z * SPACING[0], y * SPACING[1], x * SPACING[2]


def binary_pair():
    z, y, x = grid_mm()
    c = np.array([SHAPE[0] / 2 * SPACING[0], SHAPE[1] / 2 * SPACING[1], SHAPE[2] / 2 * SPACING[2]])
    ref = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= 15.0 ** 2
    s = c + np.array([2.5, 2.4, -1.6])                      # shifted centre
    dz, dy, dx = z - s[0], y - s[1], x - s[2]
    r = np.sqrt(dz ** 2 + dy ** 2 + dx ** 2)
    theta = np.arctan2(dy, dx)
    cos_phi = np.divide(dz, r, out=np.zeros(np.broadcast(dz, r).shape), where=r > 0)
    lobes = 15.0 * (1 + 0.15 * np.cos(4 * theta) * (1 - cos_phi ** 2) + 0.1 * cos_phi)
    pred = r <= lobes
    fp = c + np.array([40.0, 55.0, 60.0])                   # small false-positive blob, 3 mm radius
    pred |= (z - fp[0]) ** 2 + (y - fp[1]) ** 2 + (x - fp[2]) ** 2 <= 3.0 ** 2
    return pred, ref


def label_maps(seed: int = 7):
    rng = np.random.default_rng(seed)
    sizes = np.geomspace(75, 40000, 14)
    ref = np.zeros(SHAPE, np.uint8)
    pred = np.zeros(SHAPE, np.uint8)
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    # 14 cells of a 2 x 3 x 3 grid (z, y, x) keep the structures apart
    cells = [(i, j, k) for i in range(2) for j in range(3) for k in range(3)][:14]
    voxel = float(np.prod(SPACING))
    out_sizes = []
    for lab, (n, cell) in enumerate(zip(sizes, cells), start=1):
        centre = np.array([(cell[0] + 0.5) * SHAPE[0] / 2, (cell[1] + 0.5) * SHAPE[1] / 3,
                           (cell[2] + 0.5) * SHAPE[2] / 3]) + rng.uniform(-3, 3, 3)
        axes_ratio = rng.uniform(0.7, 1.4, 3)
        r_mm = (3 * n * voxel / (4 * np.pi * np.prod(axes_ratio))) ** (1 / 3)
        semi = r_mm * axes_ratio / np.array(SPACING)         # semi-axes in voxels
        q = ((z - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((x - centre[2]) / semi[2]) ** 2
        ref[q <= 1] = lab
        shift = rng.integers(-2, 3, 3)
        scale = rng.uniform(0.85, 1.15)
        cp = centre + shift
        qp = (((z - cp[0]) / semi[0]) ** 2 + ((y - cp[1]) / semi[1]) ** 2 + ((x - cp[2]) / semi[2]) ** 2) / scale ** 2
        pred[qp <= 1] = lab
        out_sizes.append(int((ref == lab).sum()))
    for lab in (3, 8, 12):                                   # stray false-positive blobs
        p = rng.integers([5, 10, 10], [SHAPE[0] - 5, SHAPE[1] - 10, SHAPE[2] - 10])
        pred[p[0] - 1: p[0] + 1, p[1] - 2: p[1] + 2, p[2] - 2: p[2] + 2] = lab
    return pred, ref, out_sizes


def timeit(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# --- libraries -------------------------------------------------------------------------------

def ours_binary(pred, ref, hd95_only=False):
    from imbalanceseglib.evaluation import evaluate_binary
    r = evaluate_binary(pred, ref, SPACING, metrics=("overlap", "distance"))
    return {"dice": r.dice, "hd95": r.hd95_mm, "assd": r.assd_mm}


def ours_labels(pred, ref):
    from imbalanceseglib.evaluation import evaluate_labels
    res = evaluate_labels(pred, ref, SPACING, labels=range(1, 15), metrics=("overlap", "distance"))
    return {c.label: {"dice": c.dice, "hd95": c.hd95_mm, "assd": c.assd_mm} for c in res.classes}


def monai_prepare(pred, ref, n_classes):
    import torch
    from monai.networks.utils import one_hot
    p = torch.from_numpy(pred.astype(np.int64))[None, None]
    r = torch.from_numpy(ref.astype(np.int64))[None, None]
    return one_hot(p, n_classes), one_hot(r, n_classes)


def monai_run(p, r, what):
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {"hd95": compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                                  spacing=SPACING)[0].tolist()}
        if what == "all":
            out["dice"] = compute_dice(p, r, include_background=False)[0].tolist()
            out["assd"] = compute_average_surface_distance(p, r, include_background=False, symmetric=True,
                                                           spacing=SPACING)[0].tolist()
    return out


def deepmind_run(sd, pred, ref, labels, what):
    out = {}
    for lab in labels:
        p, r = pred == lab, ref == lab
        d = sd.compute_surface_distances(r, p, SPACING)
        v = {"hd95": float(sd.compute_robust_hausdorff(d, 95))}
        if what == "all":
            v["dice"] = float(sd.compute_dice_coefficient(r, p))
            a_rp, a_pr = sd.compute_average_surface_distance(d)
            v["assd_surfel_weighted_mean_of_directions"] = (a_rp + a_pr) / 2
        out[lab] = v
    return out


def load_deepmind(path):
    if path:
        sys.path.insert(0, str(Path(path).resolve()))
    try:
        import surface_distance as sd
        a = np.zeros((6, 6, 6), bool)
        a[2:4, 2:4, 2:4] = True
        sd.compute_robust_hausdorff(sd.compute_surface_distances(a, a, (1, 1, 1)), 95)
        return sd, "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the table
        return None, f"not run: {type(exc).__name__}: {exc}"


def fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--surface-distance", help="folder containing DeepMind's surface_distance package")
    ap.add_argument("--out", default=str(ROOT / "Testing" / "Benchmarks" / "reports" / "evaluation_speed.md"))
    args = ap.parse_args()
    import monai
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    command = " ".join([exe.as_posix(), "Testing/Benchmarks/evaluation_speed.py"] + sys.argv[1:])
    sd, sd_status = load_deepmind(args.surface_distance)
    lines = [f"Command: `{command}`", "",
             f"Machine: {machine()}", "",
             f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}", "",
             "# Evaluation speed and agreement", "",
             f"Grid {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} voxels (x, y, z) at "
             f"{SPACING[2]} x {SPACING[1]} x {SPACING[0]} mm. Median of {args.repeats} runs, one process. "
             f"MONAI {monai.__version__} on CPU gets the one-hot tensors it needs, built outside the timing. "
             f"DeepMind surface-distance: {sd_status}"
             + (" (a local checkout; not a dependency; its HD95/ASSD weight distances by surfel area, a different "
                "definition, so its values are shown for comparison only)." if sd else "."), ""]

    # warm-up (imports, first-call costs) for every library
    small_p, small_r = np.zeros((8, 8, 8), np.uint8), np.zeros((8, 8, 8), np.uint8)
    small_p[2:5, 2:5, 2:5] = 1
    small_r[3:6, 2:5, 2:5] = 1
    ours_labels(small_p, small_r)
    monai_run(*monai_prepare(small_p, small_r, 2), "all")

    # --- scenario 1 -----------------------------------------------------------------------------
    pred, ref = binary_pair()
    tp = int((pred & ref).sum())
    lines += ["## 1. Binary pair: 30 mm sphere vs shifted, lobed sphere + false-positive blob", "",
              f"Reference {int(ref.sum())} voxels, prediction {int(pred.sum())} voxels, overlap {tp}.", ""]
    rows = []
    mp, mr = monai_prepare(pred.astype(np.uint8), ref.astype(np.uint8), 2)
    t_o1, v_o = timeit(lambda: ours_binary(pred, ref), args.repeats)
    t_m1, v_m1 = timeit(lambda: monai_run(mp, mr, "hd95"), args.repeats)
    t_mall, v_m = timeit(lambda: monai_run(mp, mr, "all"), args.repeats)
    v_m = {k: v[0] for k, v in v_m.items()}
    rows.append(("ImbalanceSeg", t_o1, t_o1, v_o["dice"], v_o["hd95"], v_o["assd"]))
    rows.append(("MONAI", t_m1, t_mall, v_m["dice"], v_m["hd95"], v_m["assd"]))
    if sd:
        t_d1, _ = timeit(lambda: deepmind_run(sd, pred.astype(np.uint8), ref.astype(np.uint8), [1], "hd95"),
                         args.repeats)
        t_dall, v_d = timeit(lambda: deepmind_run(sd, pred.astype(np.uint8), ref.astype(np.uint8), [1], "all"),
                             args.repeats)
        v_d = v_d[1]
        rows.append(("DeepMind surface-distance", t_d1, t_dall, v_d["dice"], v_d["hd95"],
                     v_d["assd_surfel_weighted_mean_of_directions"]))
    lines += ["| library | HD95 time (s) | Dice+HD95+ASSD time (s) | Dice | HD95 (mm) | ASSD (mm) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, t1, t2, d, h, a in rows:
        lines.append(f"| {name} | {t1:.4f} | {t2:.4f} | {fmt(d, '.6f')} | {fmt(h, '.6f')} | {fmt(a, '.6f')} |")
    diff1 = max(abs(v_o[k] - v_m[k]) for k in ("dice", "hd95", "assd"))
    lines += ["", "ImbalanceSeg computes Dice, HD, HD95 and ASSD in one call, so both its times are that call.", "",
              f"Max |ImbalanceSeg - MONAI| over Dice, HD95, ASSD: {diff1:.2e}. "
              f"Speed-up over MONAI: {t_m1 / t_o1:.1f}x (HD95), {t_mall / t_o1:.1f}x (Dice+HD95+ASSD)"
              + (f"; over DeepMind: {t_dall / t_o1:.1f}x." if sd else "."), ""]

    # --- scenario 2 -----------------------------------------------------------------------------
    pred, ref, sizes = label_maps()
    mp, mr = monai_prepare(pred, ref, 15)
    t_o, v_o = timeit(lambda: ours_labels(pred, ref), args.repeats)
    t_m, v_m = timeit(lambda: monai_run(mp, mr, "all"), max(1, min(args.repeats, 3)))
    v_m = {lab: {k: v_m[k][lab - 1] for k in v_m} for lab in range(1, 15)}
    if sd:
        t_d, v_d = timeit(lambda: deepmind_run(sd, pred, ref, range(1, 15), "all"), max(1, min(args.repeats, 3)))
    lines += ["## 2. Label map: 14 classes of 75 to 40,000 voxels, Dice + HD95 + ASSD for all", "",
              "| library | time (s) | speed-up of ImbalanceSeg |", "|---|---:|---:|",
              f"| ImbalanceSeg | {t_o:.4f} | 1.0x |", f"| MONAI | {t_m:.4f} | {t_m / t_o:.1f}x |"]
    if sd:
        lines.append(f"| DeepMind surface-distance | {t_d:.4f} | {t_d / t_o:.1f}x |")
    lines += ["", "| class | voxels | Dice ours | Dice MONAI | HD95 ours | HD95 MONAI | ASSD ours | ASSD MONAI |"
              + (" HD95 DeepMind | ASSD DeepMind |" if sd else ""),
              "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if sd else "")]
    diff2 = 0.0
    rel_dm = []
    for lab in range(1, 15):
        o, m = v_o[lab], v_m[lab]
        diff2 = max(diff2, *(abs(o[k] - m[k]) for k in ("dice", "hd95", "assd")))
        row = (f"| {lab} | {sizes[lab - 1]} | {o['dice']:.6f} | {m['dice']:.6f} | {o['hd95']:.6f} | {m['hd95']:.6f} "
               f"| {o['assd']:.6f} | {m['assd']:.6f} |")
        if sd:
            d = v_d[lab]
            a_d = d["assd_surfel_weighted_mean_of_directions"]
            rel_dm += [(abs(d["hd95"] - o["hd95"]) / o["hd95"], lab, "HD95"),
                       (abs(a_d - o["assd"]) / o["assd"], lab, "ASSD")]
            row += f" {d['hd95']:.6f} | {a_d:.6f} |"
        lines.append(row)
    lines += ["", f"Max |ImbalanceSeg - MONAI| over all classes and metrics: {diff2:.2e} "
              "(MONAI keeps distances in float32)."]
    if sd:
        worst = max(rel_dm)
        lines.append(f"DeepMind's surfel-weighted HD95/ASSD differ from the border-voxel definition by a median "
                     f"{100 * statistics.median(r[0] for r in rel_dm):.1f}% and at most {100 * worst[0]:.1f}% "
                     f"({worst[2]} of class {worst[1]}; with a small stray false-positive blob, surfel weighting "
                     f"moves the 95th percentile from the main structure's boundary onto the blob).")
    lines += ["", "## Summary", "",
              "| scenario | ImbalanceSeg (s) | MONAI (s) | speed-up vs MONAI |"
              + (" DeepMind (s) | speed-up vs DeepMind |" if sd else ""),
              "|---|---:|---:|---:|" + ("---:|---:|" if sd else ""),
              f"| binary pair, HD95 | {t_o1:.4f} | {t_m1:.4f} | {t_m1 / t_o1:.1f}x |"
              + (f" {t_d1:.4f} | {t_d1 / t_o1:.1f}x |" if sd else ""),
              f"| binary pair, Dice+HD95+ASSD | {t_o1:.4f} | {t_mall:.4f} | {t_mall / t_o1:.1f}x |"
              + (f" {t_dall:.4f} | {t_dall / t_o1:.1f}x |" if sd else ""),
              f"| 14-class map, Dice+HD95+ASSD | {t_o:.4f} | {t_m:.4f} | {t_m / t_o:.1f}x |"
              + (f" {t_d:.4f} | {t_d / t_o:.1f}x |" if sd else ""), ""]
    text = "\n".join(lines) + "\n"
    from imbalanceseglib.atomic import atomic_write_text
    atomic_write_text(args.out, text)
    print(text)
    ok = diff1 < 1e-4 and diff2 < 1e-4
    if not ok:
        print("ERROR: values differ from MONAI", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
