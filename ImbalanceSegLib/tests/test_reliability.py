"""Reliability: bad input gets a clear error, faults lose nothing (issue #9).

Each test's docstring names the case; ``record_property("observed", ...)`` keeps
what actually happened, so ``Testing/Benchmarks/reliability_report.py`` can turn
a run of this file into the committed report.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from imbalanceseglib.bundle import BundleError, ModelBundle, load_bundle
from imbalanceseglib.images import ImageError, read_image
from imbalanceseglib.inference import check_model_fits, predict
from imbalanceseglib.metrics import dice_per_class
from imbalanceseglib.networks import build_network
from imbalanceseglib.training import TrainConfig, make_case, train

from libtest_helpers import CLASSES, sphere_case

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "Resources" / "Models" / "demo_brain.imbseg"
DEMO_T1 = ROOT / "Resources" / "Demo" / "demo_t1.nrrd"
DEMO_LABELS = ROOT / "Resources" / "Demo" / "demo_labels.nrrd"
SRC = ROOT / "ImbalanceSegLib" / "src"


def _bundle(modality="MR T1"):
    torch.manual_seed(0)
    net = build_network("UNet3D", {"in_channels": 1, "out_channels": 3, "features": [4, 8]}).eval()
    card = {"name": "tiny", "network": {"arch": "UNet3D", "params": {"in_channels": 1, "out_channels": 3,
                                                                     "features": [4, 8]}},
            "classes": CLASSES, "preprocessing": {"target_spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                                                   "modality": modality, "normalization": {"scheme": "none"}}}
    return ModelBundle(card=card, network=net)


def _img(arr, spacing=(1.0, 1.0, 1.0)):
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(spacing)
    return im


# --- bad input ------------------------------------------------------------------------------

BAD_IMAGES = {
    "2-D image": (lambda: sitk.Image(16, 16, sitk.sitkFloat32), "2-D"),
    "4-D image": (lambda: sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), "4-D"),
    "zero-sized dimension": (lambda: sitk.Image(0, 8, 8, sitk.sitkFloat32), "empty dimension"),
    "single slice": (lambda: sitk.Image(16, 16, 1, sitk.sitkFloat32), "single slice"),
    "RGB voxels": (lambda: sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), "3 components per voxel"),
    "complex voxels": (lambda: sitk.Image(8, 8, 8, sitk.sitkComplexFloat32), "complex voxels"),
    "NaN intensities": (lambda: _img(np.where(np.arange(512).reshape(8, 8, 8) == 7, np.nan, 1.0).astype(np.float32)),
                        "1 NaN or infinite"),
    "infinite intensities": (lambda: _img(np.full((8, 8, 8), np.inf, np.float32)), "512 NaN or infinite"),
}


def _non_orthonormal():
    im = _img(np.zeros((8, 8, 8), np.float32))
    im.SetDirection((1, 0, 0, 0, 2, 0, 0, 0, 1))
    return im


BAD_IMAGES["skewed direction matrix"] = (_non_orthonormal, "not a rotation/reflection")


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images_get_a_clear_error(case, record_property):
    """Bad input image (2-D, 4-D, empty, single slice, RGB, complex, NaN, inf, bad spacing or direction)."""
    make, message = BAD_IMAGES[case]
    with pytest.raises(ImageError, match=message) as err:
        predict(make(), _bundle())
    record_property("observed", f"ImageError: {err.value}")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.int64, np.float64])
def test_unusual_data_types_give_the_same_result_as_float32(dtype, record_property):
    """Unusual voxel types (uint8 ... int64, float64) are cast and segmented like float32."""
    img, _ = sphere_case(1, shape=(16, 16, 16), noise=0.0)
    arr = (img * 50 + 60).round()
    b = _bundle()
    ref = predict(_img(arr.astype(np.float32)), b).probabilities
    got = predict(_img(arr.astype(dtype)), b).probabilities
    np.testing.assert_allclose(got, ref, atol=1e-6)
    record_property("observed", f"{np.dtype(dtype).name}: probabilities equal to float32 within 1e-6")


def test_header_declaring_a_huge_image_is_refused_before_allocation(tmp_path, record_property):
    """A file whose header declares an enormous volume (100000^3 voxels) is refused from the header."""
    p = tmp_path / "huge.nhdr"
    p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 100000 100000 100000\n"
                 "encoding: raw\nendian: little\ndata file: huge.raw\n")
    (tmp_path / "huge.raw").write_bytes(b"\0" * 64)
    t = time.perf_counter()
    with pytest.raises(ImageError, match="declares 100000x100000x100000 voxels") as err:
        read_image(p)
    assert time.perf_counter() - t < 5.0
    record_property("observed", f"ImageError: {err.value}")


def test_zero_spacing_in_a_file_header_gets_a_clear_error(tmp_path, record_property):
    """A file header with a zero voxel spacing."""
    p = tmp_path / "zero.nhdr"
    p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nspacings: 1 0 1\n"
                 "encoding: raw\nendian: little\ndata file: zero.raw\n")
    (tmp_path / "zero.raw").write_bytes(b"\0" * 256)
    with pytest.raises(ImageError) as err:
        read_image(p)
    record_property("observed", f"ImageError: {err.value}")


def test_truncated_image_file_gets_a_clear_error(tmp_path, record_property):
    """A truncated image file."""
    p = tmp_path / "t.nrrd"
    sitk.WriteImage(_img(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32)), str(p), False)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot be read as an image") as err:
        read_image(p)
    record_property("observed", f"ImageError: {err.value}")


def test_volume_too_large_for_memory_is_refused_early(record_property):
    """A volume too large for the memory available is refused before any work."""
    img = _img(np.zeros((64, 64, 64), np.float32))
    with pytest.raises(ImageError, match=r"needs about \d+\.\d MiB .* only 1\.0 MiB is available") as err:
        predict(img, _bundle(), memory_limit_bytes=1 << 20)
    record_property("observed", f"ImageError: {err.value}")


def test_model_for_another_modality_or_without_the_class_is_refused(record_property):
    """A model whose modality or classes do not fit the request."""
    with pytest.raises(BundleError, match="is for MR T1 images, but the input is CT") as e1:
        check_model_fits(_bundle("MR T1"), modality="CT")
    check_model_fits(_bundle("MR T1"), modality="MR")  # same modality: fine
    with pytest.raises(BundleError, match=r"does not segment \['Liver'\]") as e2:
        check_model_fits(_bundle(), class_names=["Ball", "Liver"])
    record_property("observed", f"BundleError: {e1.value} | BundleError: {e2.value}")


def test_oblique_anisotropic_input_lands_in_the_right_physical_place(record_property):
    """Oblique direction + strongly anisotropic spacing: the result is in the right physical place.

    The demo volume is resampled onto a rotated (20 deg) 1.5 x 1.5 x 4 mm grid; the
    prediction is mapped back onto the demo grid and compared with the demo reference.
    """
    bundle = load_bundle(DEMO_MODEL)
    t1 = read_image(DEMO_T1)
    ref = sitk.ReadImage(str(DEMO_LABELS))
    rot = sitk.VersorTransform((0.3, 0.2, 1.0), math.radians(20.0))
    direction = np.array(rot.GetMatrix()).reshape(3, 3) @ np.array(t1.GetDirection()).reshape(3, 3)
    spacing = (1.5, 1.5, 4.0)
    size = [int(round(n * s / t)) for n, s, t in zip(t1.GetSize(), t1.GetSpacing(), spacing)]
    centre = t1.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in t1.GetSize()])
    origin = np.array(centre) - direction @ ((np.array(size) - 1) / 2 * np.array(spacing))
    oblique = sitk.Resample(t1, size, sitk.Transform(), sitk.sitkLinear, tuple(origin), spacing,
                            tuple(direction.ravel()), 0.0, sitk.sitkFloat32)
    pred = predict(oblique, bundle)
    assert pred.label_image().GetDirection() == pytest.approx(oblique.GetDirection())
    back = sitk.Resample(pred.label_image(), ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    dice = dice_per_class(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ref), bundle.num_classes)
    assert dice[1] > 0.8 and dice[2] > 0.8, dice  # cortex, cerebellum
    # A wrong axis order or flip would put the cerebellum on the wrong side: check its centre too.
    lab = sitk.GetArrayFromImage(back)
    r = sitk.GetArrayFromImage(ref)
    assert np.abs(np.argwhere(lab == 2).mean(0) - np.argwhere(r == 2).mean(0)).max() < 2.0
    record_property("observed", "Dice after mapping back: " + ", ".join(
        f"{n}={d:.3f}" for n, d in zip(bundle.class_names[1:], dice[1:])))


# --- training data --------------------------------------------------------------------------

def _cfg(**kw):
    base = dict(name="tiny", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[16, 16, 16],
                features=[4, 8], iterations=20, batch_size=2, learning_rate=1e-2, val_every=1000,
                checkpoint_every=5, log_every=5, normalization={"scheme": "none"}, seed=1)
    base.update(kw)
    return TrainConfig.from_dict(base)


def test_training_on_empty_label_maps_is_refused(tmp_path, record_property):
    """Training where every label map is empty."""
    cases = [make_case(np.zeros((16, 16, 16), np.float32), np.zeros((16, 16, 16), np.uint8), f"e{i}") for i in range(2)]
    with pytest.raises(ValueError, match="every training label map is empty") as err:
        train(_cfg(), cases, [], tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()
    record_property("observed", f"ValueError: {err.value}")


def test_training_without_a_class_names_it_but_single_class_cases_are_fine(tmp_path, record_property):
    """Single-class and empty label maps mixed in training; a class present in no case."""
    img, lab = sphere_case(0, shape=(16, 16, 16))
    only_ball = np.where(lab == 2, 0, lab).astype(np.uint8)
    empty = np.zeros_like(lab)
    with pytest.raises(ValueError, match=r"classes \['Bead'\] have no voxels") as err:
        train(_cfg(), [make_case(img, only_ball, "a"), make_case(img, empty, "b")], [], tmp_path / "x")
    only_bead = np.where(lab == 1, 0, lab).astype(np.uint8)
    path = train(_cfg(iterations=5), [make_case(img, only_ball, "a"), make_case(img, only_bead, "b"),
                                      make_case(img, empty, "c")], [], tmp_path / "y")
    assert load_bundle(path).card["training"]["train_cases"] == 3
    record_property("observed", f"ValueError: {err.value}; mixed single-class/empty cases train normally")


def test_nan_loss_stops_and_says_where(tmp_path, monkeypatch, record_property):
    """A NaN loss during training: stops with a message naming the iteration and cases; the checkpoint stays valid."""
    import imbalanceseglib.training_loop as tr  # where both trainers build their loss

    real = tr.build_loss

    def poisoned(settings, *args, **kwargs):
        loss = real(settings, *args, **kwargs)
        calls = {"n": 0}

        def fn(logits, target, **kw):
            calls["n"] += 1
            out = loss(logits, target, **kw)
            return out * float("nan") if calls["n"] == 8 else out
        return fn
    monkeypatch.setattr(tr, "build_loss", poisoned)
    with pytest.raises(FloatingPointError, match=r"loss became nan at iteration 8 \(batch from cases") as err:
        train(_cfg(), [make_case(*sphere_case(0, shape=(16, 16, 16)), name="sphere-0")], [], tmp_path)
    assert "checkpoint of iteration 5" in str(err.value) and "sphere-0" in str(err.value)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["iteration"] == 5
    record_property("observed", f"FloatingPointError: {err.value}")


# --- faults: killed processes ---------------------------------------------------------------

def _write_folder_dataset(root: Path, n=3):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        img, lab = sphere_case(i)
        sitk.WriteImage(_img(img), str(root / "images" / f"case{i}.nrrd"))
        sitk.WriteImage(_img(lab), str(root / "labels" / f"case{i}.nrrd"))
    cfg = {"data": {"kind": "folders", "images": "images", "labels": "labels"},
           "train": dict(name="killtest", classes=CLASSES, target_spacing=[1.0, 1.0, 1.0], patch_size=[32, 32, 32],
                         features=[4, 8], iterations=120, batch_size=2, learning_rate=1e-2, val_every=1000,
                         checkpoint_every=10, log_every=10, normalization={"scheme": "none"}, seed=5, num_threads=1)}
    (root / "config.json").write_text(json.dumps(cfg))
    return root / "config.json"


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(SRC))
    return subprocess.Popen([sys.executable, "-m", "imbalanceseglib.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _assert_no_half_written_files(out: Path):
    if (out / "checkpoint.pt").exists():
        ck = torch.load(out / "checkpoint.pt", weights_only=True)  # loads: never half-written
        assert 0 < ck["iteration"] <= 120
    if (out / "killtest.imbseg").exists():
        load_bundle(out / "killtest.imbseg")


def test_training_killed_at_random_points_resumes_to_the_same_result(tmp_path, record_property):
    """Training killed (SIGKILL) at random points, then resumed: same weights as an uninterrupted run."""
    cfg = _write_folder_dataset(tmp_path / "data")
    full = _cli("train", str(cfg), "--out", str(tmp_path / "full"))
    assert full.wait(timeout=300) == 0, full.stdout.read()
    rng = np.random.default_rng(2026)
    out = tmp_path / "killed"
    kills, resumed_from = 0, []
    for attempt in range(12):
        proc = _cli("train", str(cfg), "--out", str(out))
        if attempt < 4:
            time.sleep(float(rng.uniform(4.5, 10.0)))  # start-up takes ~4 s, the run ~8 s more
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                _assert_no_half_written_files(out)
                if (out / "checkpoint.pt").exists():
                    resumed_from.append(int(torch.load(out / "checkpoint.pt", weights_only=True)["iteration"]))
                continue
        assert proc.wait(timeout=300) == 0, proc.stdout.read()
        break
    assert kills >= 1
    a = load_bundle(tmp_path / "full" / "killtest.imbseg").network.state_dict()
    b = load_bundle(out / "killtest.imbseg").network.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    record_property("observed", f"{kills} kills; checkpoints on disk after each kill at iterations {resumed_from}; "
                                "final weights equal to the uninterrupted run (atol 1e-6)")


def test_killed_inference_leaves_existing_output_files_intact(tmp_path, record_property):
    """Inference process killed (SIGKILL) while writing results: every file under its final name stays valid."""
    out = tmp_path / "out"
    t0 = time.perf_counter()
    first = _cli("predict", "--model", str(DEMO_MODEL), "--input", str(DEMO_T1), "--output", str(out))
    assert first.wait(timeout=300) == 0, first.stdout.read()
    duration = time.perf_counter() - t0  # kill within the run, however fast this machine is
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rng = np.random.default_rng(7)
    kills = []
    for _ in range(3):
        proc = _cli("predict", "--model", str(DEMO_MODEL), "--input", str(DEMO_T1), "--output", str(out))
        delay = float(rng.uniform(0.4, 0.9)) * duration
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append(round(delay, 1))
        proc.wait()
        for name, old in before.items():
            p = out / name
            assert p.exists(), name
            if name.endswith(".nrrd"):
                sitk.ReadImage(str(p))  # complete and readable, old or new
    assert kills, "the process finished before every kill; the test did not test anything"
    record_property("observed", f"killed after {kills} s; every output file under its final name stayed "
                                "complete and readable (old or new)")


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.99])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused_not_zero_filled(tmp_path, fraction, suffix, record_property):
    """A NIfTI file cut short after its header (ITK alone loads it with zeros for the missing voxels)."""
    p = tmp_path / f"img{suffix}"
    sitk.WriteImage(_img(np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32)), str(p))
    data = p.read_bytes()
    p.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageError, match="truncated|damaged") as err:
        read_image(p)
    record_property("observed", f"ImageError: {err.value}")


def test_nrrd_data_file_outside_its_folder_is_refused(tmp_path, record_property):
    """An NRRD header whose 'data file' points outside its own folder (would read any local file)."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\1" * 64)
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "leak.nhdr"
    p.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: ../secret.bin\n")
    with pytest.raises(ImageError, match="outside the header's folder") as err:
        read_image(p)
    # The same layout inside the folder reads fine.
    (tmp_path / "sub" / "ok.raw").write_bytes(b"\1" * 64)
    ok = tmp_path / "sub" / "ok.nhdr"
    ok.write_text("NRRD0004\ntype: uint8\ndimension: 3\nsizes: 4 4 4\nencoding: raw\ndata file: ok.raw\n")
    assert sitk.GetArrayFromImage(read_image(ok)).sum() == 64
    record_property("observed", f"ImageError: {err.value}")


def test_fuzz_findings_in_header_prechecks_stay_clean(tmp_path, record_property):
    """Regression for fuzz findings: an empty NRRD 'data file' field, a NIfTI header with a NaN data offset."""
    import struct

    p = tmp_path / "empty.nhdr"
    p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: \n")
    with pytest.raises(ImageError, match="'data file' field is empty") as e1:
        read_image(p)
    q = tmp_path / "nan.nii"
    sitk.WriteImage(_img(np.zeros((4, 4, 4), np.float32)), str(q))
    data = bytearray(q.read_bytes())
    data[108:112] = struct.pack("<f", float("nan"))
    q.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="invalid data offset") as e2:
        read_image(q)
    record_property("observed", f"ImageError: {e1.value} | ImageError: {e2.value}")
