"""Bounded-memory sliding-window inference against MONAI's sliding window and predict()."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference

from imbalanceseglib.inference import predict
from imbalanceseglib.streaming import predict_streaming, stream_logits, window_starts

from test_inference import _bundle, _image


@pytest.mark.parametrize("size,roi,overlap", [(100, 16, 0.5), (33, 16, 0.25), (16, 16, 0.5), (17, 16, 0.5),
                                              (64, 24, 0.6)])
def test_window_starts_are_monais(size, roi, overlap):
    step = max(1, int(roi * (1 - overlap))) if roi < size else roi
    monai = sorted({s[0].start for s in dense_patch_slices((size,), (roi,), (step,))})
    assert window_starts(size, roi, overlap) == monai


@pytest.mark.parametrize("shape", [(40, 30, 35), (10, 30, 20)])  # the second is thinner than the window in z
def test_streamed_logits_equal_monai_sliding_window(shape):
    b = _bundle()
    vol = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    slabs = []
    stream_logits(b.network, vol, [16, 16, 16], lambda z0, lg: slabs.append((z0, lg.clone())), overlap=0.5,
                  sw_batch_size=3)
    # the slabs tile the volume exactly once, in order
    zs = [z0 for z0, _ in slabs]
    assert zs == sorted(zs) and zs[0] == 0
    assert sum(lg.shape[1] for _, lg in slabs) == shape[0]
    ours = torch.cat([lg for _, lg in slabs], dim=1)
    with torch.inference_mode():
        ref = sliding_window_inference(torch.from_numpy(vol)[None, None], [16, 16, 16], 3, b.network,
                                       overlap=0.5, mode="gaussian")[0]
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("storage,tol", [("float32", 1e-5), ("float16", 1e-3), ("uint8", 0.5 / 255 + 1e-6)])
def test_predict_streaming_matches_predict(storage, tol):
    img, b = _image(shape=(40, 30, 35)), _bundle()
    full = predict(img, b)
    comp = predict_streaming(img, b, storage=storage, sw_batch_size=2)
    assert comp.stored.dtype == {"float32": np.float32, "float16": np.float16, "uint8": np.uint8}[storage]
    for c in range(3):
        np.testing.assert_allclose(comp.probabilities[c], full.probabilities[c], atol=tol)
    # labels equal except where two classes are tied within float rounding
    top2 = np.sort(full.probabilities, axis=0)[-2:]
    clear = (top2[1] - top2[0]) > 1e-4
    np.testing.assert_array_equal(comp.labels[clear], full.labels[clear])
    np.testing.assert_allclose(comp.uncertainty, full.uncertainty, atol=max(tol, 1e-5) * 2)
    for a, e in zip(comp.performance.classes, full.performance.classes):
        assert a["predicted_voxels"] == pytest.approx(e["predicted_voxels"], abs=2)
        if e["dice"] is not None:
            assert a["dice"] == pytest.approx(e["dice"], abs=1e-3)
    assert comp.probability_image(1).GetSize() == img.GetSize()


def test_resampled_input_comes_back_on_the_input_grid():
    c, s = np.cos(0.3), np.sin(0.3)
    img = _image(shape=(10, 18, 22), spacing=(0.9, 0.8, 2.5), direction=(c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    b = _bundle(target_spacing=(1.0, 1.0, 1.0))
    full = predict(img, b)
    comp = predict_streaming(img, b, storage="float32")
    np.testing.assert_allclose(comp.probabilities[2], full.probabilities[2], atol=1e-5)
    assert comp.probability_image(0).GetDirection() == pytest.approx(img.GetDirection())


def test_tiles_are_written_to_memory_maps(tmp_path):
    img, b = _image(shape=(40, 30, 35)), _bundle()
    comp = predict_streaming(img, b, storage="uint8", out_dir=tmp_path)
    assert set(comp.files) == {"probabilities", "labels", "uncertainty"}
    on_disk = np.load(comp.files["probabilities"], mmap_mode="r")
    assert on_disk.shape == (3, 40, 30, 35) and on_disk.dtype == np.uint8
    np.testing.assert_array_equal(on_disk, comp.stored)
    np.testing.assert_array_equal(np.load(comp.files["labels"]), comp.labels)


def test_bad_arguments_are_refused():
    img, b = _image(), _bundle()
    with pytest.raises(ValueError, match="storage must be one of"):
        predict_streaming(img, b, storage="int4")
    with pytest.raises(ValueError, match="overlap"):
        stream_logits(b.network, np.zeros((8, 8, 8), np.float32), [4, 4, 4], lambda z, l: None, overlap=1.0)


def test_cli_predict_stream_writes_maps_that_evaluate_reads_back(tmp_path):
    from imbalanceseglib.bundle import save_bundle
    from imbalanceseglib.cli import main as cli_main
    from imbalanceseglib.evaluation import _read_probability
    img, b = _image(shape=(40, 30, 35)), _bundle()
    model = save_bundle(tmp_path / "m.imbseg", b.card, b.network)
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    out_f, out_s = tmp_path / "float", tmp_path / "stream"
    assert cli_main(["predict", "--model", str(model), "--input", str(tmp_path / "in.nrrd"),
                     "--output", str(out_f)]) == 0
    assert cli_main(["predict", "--model", str(model), "--input", str(tmp_path / "in.nrrd"),
                     "--output", str(out_s), "--stream", "--storage", "uint8"]) == 0
    assert (out_s / "probabilities.npy").is_file()
    raw = sitk.ReadImage(str(out_s / "probability_01.nrrd"))
    assert raw.GetPixelID() == sitk.sitkUInt8
    for k in range(3):
        np.testing.assert_allclose(_read_probability(out_s / f"probability_{k:02d}.nrrd", "c"),
                                   _read_probability(out_f / f"probability_{k:02d}.nrrd", "c"), atol=0.5 / 255 + 1e-5)
    assert cli_main(["predict", "--model", str(model), "--input", str(tmp_path / "in.nrrd"),
                     "--output", str(out_s), "--stream", "--tta", "identity,flip_x"]) == 2


def _monai_logits(network, vol, roi):
    with torch.inference_mode():
        return sliding_window_inference(torch.from_numpy(vol)[None, None], roi, 2, network,
                                        overlap=0.5, mode="gaussian")[0]


def _streamed(network, vol, roi, **kw):
    slabs = []
    plan = {}
    stream_logits(network, vol, roi, lambda z0, lg: slabs.append(lg.clone()), overlap=0.5, plan_out=plan, **kw)
    return torch.cat(slabs, dim=1), plan


@pytest.mark.parametrize("machine", ["x86_64", "arm64"])
def test_auto_plan_times_every_candidate_on_real_windows_and_keeps_monais_logits(machine, monkeypatch):
    """On x86-64, where the engine was measured faster, only its plans are tried; on a CPU we have
    not measured (arm64 here) the module's plans compete with it."""
    import platform
    from imbalanceseglib import streaming
    monkeypatch.setattr(platform, "machine", lambda: machine)
    streaming._TUNED.clear()
    b = _bundle()
    vol = np.random.default_rng(5).normal(size=(40, 64, 64)).astype(np.float32)  # 4 x 7 x 7 = 196 windows
    ours, plan = _streamed(b.network, vol, [16, 16, 16])
    assert plan["source"] == "tuned"
    threads = torch.get_num_threads()
    tried = {(t["engine"], t["layout"], t["sw_batch_size"], t["workers"]) for t in plan["trials"]}
    expected = {("onednn", "channels_last", bs, 1) for bs in (1, 2)}
    if threads > 1:  # calls run at once in threads, each with its share of torch's threads
        expected |= {("onednn", "channels_last", 1, threads)}
    if machine == "arm64":
        expected |= {("module", lay, bs, 1) for lay in ("contiguous", "channels_last") for bs in (1, 2)}
        if threads > 1:
            expected |= {("module", lay, 1, threads) for lay in ("contiguous", "channels_last")}
    assert tried == expected
    # the fastest plan, or the engine's fastest when no plan beats it by more than ENGINE_MARGIN
    best = min(plan["trials"], key=lambda t: t["seconds_per_window"])
    engine_best = min((t for t in plan["trials"] if t["engine"] == "onednn"), key=lambda t: t["seconds_per_window"])
    if engine_best["seconds_per_window"] <= streaming.ENGINE_MARGIN * best["seconds_per_window"]:
        best = engine_best
    assert (plan["engine"], plan["layout"], plan["sw_batch_size"], plan["workers"]) == \
        (best["engine"], best["layout"], best["sw_batch_size"], best["workers"])
    # every candidate timed at least once, twice unless its first timing was clearly slower
    for t in plan["trials"]:
        assert 1 <= len(t["timings"]) <= 2 and t["seconds_per_window"] == min(t["timings"])
        assert len(t["timings"]) == 2 or t.get("pruned")
    # the engine's first window was also run by the module, and they agreed
    assert plan["engine_check"]["passed"] and plan["engine_check"]["max_relative_difference"] < 1e-5
    assert torch.get_num_threads() == threads  # the thread count is restored
    # every window was blended exactly once, whatever batch and layout it ran in
    torch.testing.assert_close(ours, _monai_logits(b.network, vol, [16, 16, 16]), atol=2e-5, rtol=1e-5)
    # the network's parameters are back in their own layout
    assert all(p.is_contiguous() for p in b.network.parameters())
    # a second run in the process reuses the measurement
    _, again = _streamed(b.network, vol, [16, 16, 16])
    assert again["source"] == "tuned (cached)" and again["layout"] == plan["layout"]


def _drive_tuner(seconds):
    """Run a tuner over three candidates with fixed per-window timings (a list per candidate, used
    in turn); returns the order the candidates were run in and the tuner. The CPU is taken as one
    the engine was not measured on (arm64), where the module's plans compete with it."""
    from unittest import mock
    from imbalanceseglib import streaming
    streaming._TUNED.clear()
    net = torch.nn.Conv3d(1, 2, 3, padding=1)
    with mock.patch("platform.machine", return_value="arm64"):
        tuner = streaming._Tuner(net, [8, 8, 8], torch.device("cpu"), n_windows=1000, sw_batch_size=1,
                                 layout="auto", workers=1, engine="auto", engine_available=True)
    order, used = [], {c: 0 for c in seconds}
    while tuner.queue:
        cand = tuner.next()
        order.append((cand[:2], tuner.queue[0][1]))
        t = seconds[cand][min(used[cand], len(seconds[cand]) - 1)] if tuner.queue[0][1] else 9.0
        used[cand] += tuner.queue[0][1]
        tuner.report(cand, 1, t)
    return order, tuner


def test_tuner_times_candidates_in_interleaved_rounds_and_keeps_the_engine_unless_beaten_clearly():
    from imbalanceseglib import streaming
    eng, con, cl = ("onednn", "channels_last", 1, 1), ("module", "contiguous", 1, 1), ("module", "channels_last", 1, 1)
    # module contiguous 5 % faster than the engine on its best timing: within the margin, the engine stays
    order, tuner = _drive_tuner({eng: [0.100, 0.104], con: [0.120, 0.095], cl: [0.110, 0.108]})
    names = [c for c, _ in order]
    assert names == [c[:2] for c in (eng, con, cl)] * 3  # warm-up round, then two timed rounds, interleaved
    assert [t for _, t in order] == [False] * 3 + [True] * 6
    assert tuner.best == eng
    assert {t["engine"] + "/" + t["layout"]: t["seconds_per_window"] for t in tuner.trials} == \
        {"onednn/channels_last": 0.100, "module/contiguous": 0.095, "module/channels_last": 0.108}
    # 20 % faster: a clear win, the module plan is chosen
    _, tuner = _drive_tuner({eng: [0.100, 0.100], con: [0.080, 0.083], cl: [0.110, 0.108]})
    assert tuner.best == con
    # a candidate more than PRUNE_RATIO x the best first timing gets no second timing
    order, tuner = _drive_tuner({eng: [0.100, 0.099], con: [0.130, 0.050], cl: [0.110, 0.108]})
    assert sum(1 for c, t in order if t and c == con[:2]) == 1
    trial = next(t for t in tuner.trials if t["layout"] == "contiguous")
    assert trial["pruned"] and trial["timings"] == [0.130]
    assert tuner.best == eng and streaming._TUNED  # the choice is cached


def test_given_plan_is_used_as_given_and_small_volumes_use_the_defaults(monkeypatch):
    b = _bundle()
    vol = np.random.default_rng(6).normal(size=(24, 30, 20)).astype(np.float32)
    ref = _monai_logits(b.network, vol, [16, 16, 16])
    cl, plan = _streamed(b.network, vol, [16, 16, 16], sw_batch_size=3, layout="channels_last", workers=1)
    assert plan == {"engine": "module", "sw_batch_size": 3, "layout": "channels_last", "workers": 1, "source": "given",
                    "trials": []}
    torch.testing.assert_close(cl, ref, atol=2e-5, rtol=1e-5)
    if torch.get_num_threads() > 1:  # two calls at once, in threads: the same windows, the same sums
        threaded, plan = _streamed(b.network, vol, [16, 16, 16], sw_batch_size=1, layout="contiguous", workers=2)
        assert plan["workers"] == 2
        torch.testing.assert_close(threaded, ref, atol=2e-5, rtol=1e-5)
    assert all(p.is_contiguous() for p in b.network.parameters())
    fresh = _bundle()  # another network: nothing cached for it, and too few windows to measure
    default, plan = _streamed(fresh.network, vol, [16, 16, 16])
    assert plan["source"] == "default"
    assert (plan["engine"], plan["sw_batch_size"], plan["layout"], plan["workers"]) == ("onednn", 1, "channels_last", 1)
    torch.testing.assert_close(default, ref, atol=2e-5, rtol=1e-5)
    # on a CPU we have not measured the engine on (not x86-64), the default without trials is the module
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "arm64")
    _, plan = _streamed(_bundle().network, vol, [16, 16, 16])
    assert (plan["source"], plan["engine"], plan["sw_batch_size"]) == ("default", "module", 2)
    monkeypatch.undo()
    # where the engine does not apply (bfloat16 here) the default is the module's
    _, plan = _streamed(fresh.network, vol, [16, 16, 16], precision="bfloat16")
    assert (plan["engine"], plan["sw_batch_size"], plan["layout"], plan["workers"]) == ("module", 2, "contiguous", 1)
    assert "engine_check" not in plan


def test_bad_plan_and_precision_are_refused():
    b = _bundle()
    vol = np.zeros((16, 16, 16), np.float32)
    with pytest.raises(ValueError, match="layout must be"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, layout="nhwc")
    with pytest.raises(ValueError, match="sw_batch_size must be at least 1"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, sw_batch_size=0)
    with pytest.raises(ValueError, match="workers must be between 1 and"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, workers=99)
    with pytest.raises(ValueError, match="precision must be one of"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, precision="int8")
    with pytest.raises(ValueError, match="engine must be"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, engine="fast")
    with pytest.raises(ValueError, match="float32 on a CPU"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, engine="onednn", precision="bfloat16")
    with pytest.raises(ValueError, match="runs the bundled U-Nets"):
        stream_logits(torch.nn.Conv3d(1, 3, 3, padding=1), vol, [16, 16, 16], lambda z, l: None, engine="onednn")
    with pytest.raises(ValueError, match="is for engine='module'"):
        stream_logits(b.network, vol, [16, 16, 16], lambda z, l: None, engine="onednn", layout="contiguous")


def test_bfloat16_precision_stays_close_to_float32():
    b = _bundle()
    vol = np.random.default_rng(7).normal(size=(24, 24, 24)).astype(np.float32)
    f32, _ = _streamed(b.network, vol, [16, 16, 16], sw_batch_size=2, layout="contiguous")
    bf, _ = _streamed(b.network, vol, [16, 16, 16], sw_batch_size=2, layout="contiguous", precision="bfloat16")
    assert bf.dtype == torch.float32
    diff = (bf - f32).abs()
    assert 0 < float(diff.max()) < 0.05 * float(f32.abs().max())  # it is bfloat16 arithmetic, and close
    assert float((bf.argmax(0) == f32.argmax(0)).float().mean()) > 0.97


def test_cli_predict_stream_takes_a_fixed_plan(tmp_path, capsys):
    from imbalanceseglib.bundle import save_bundle
    from imbalanceseglib.cli import main as cli_main
    img, b = _image(shape=(40, 30, 35)), _bundle()
    model = save_bundle(tmp_path / "m.imbseg", b.card, b.network)
    sitk.WriteImage(img, str(tmp_path / "in.nrrd"))
    args = ["predict", "--model", str(model), "--input", str(tmp_path / "in.nrrd"), "--stream", "--storage", "float32"]
    assert cli_main(args + ["--output", str(tmp_path / "auto")]) == 0
    assert cli_main(args + ["--output", str(tmp_path / "fixed"), "--layout", "channels_last", "--workers", "1",
                            "--sw-batch-size", "3"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "fixed" / "probabilities.npy"),
                               np.load(tmp_path / "auto" / "probabilities.npy"), atol=1e-5)
    capsys.readouterr()
    assert cli_main(args + ["--output", str(tmp_path / "engine"), "--engine", "onednn"]) == 0
    assert "[predict] network ran as the oneDNN engine, " in capsys.readouterr().out
    np.testing.assert_allclose(np.load(tmp_path / "engine" / "probabilities.npy"),
                               np.load(tmp_path / "fixed" / "probabilities.npy"), atol=1e-5)
    # a plan that cannot run is refused with the CLI's error exit, naming the problem
    assert cli_main(args + ["--output", str(tmp_path / "bad"), "--workers", "64"]) == 2


def test_slabs_reach_the_sink_in_small_pieces_and_still_tile_the_volume(monkeypatch):
    from imbalanceseglib import streaming
    monkeypatch.setattr(streaming, "SINK_VOXELS", 2 * 30 * 35 + 1)  # two planes of 30 x 35 per piece
    b = _bundle()
    vol = np.random.default_rng(8).normal(size=(40, 30, 35)).astype(np.float32)
    pieces = []
    stream_logits(b.network, vol, [16, 16, 16], lambda z0, lg: pieces.append((z0, lg.clone())), overlap=0.5,
                  sw_batch_size=2, layout="contiguous", workers=1)
    assert all(lg.shape[1] <= 2 for _, lg in pieces)
    assert [z0 for z0, _ in pieces] == list(range(0, 40, 2))
    ours = torch.cat([lg for _, lg in pieces], dim=1)
    torch.testing.assert_close(ours, _monai_logits(b.network, vol, [16, 16, 16]), atol=2e-5, rtol=1e-5)


def test_the_input_image_is_left_as_it_was():
    img, b = _image(shape=(40, 30, 35)), _bundle()
    b.card["preprocessing"]["normalization"] = {"scheme": "percentile_zscore"}  # normalised in place
    before = sitk.GetArrayFromImage(img).copy()
    predict_streaming(img, b, storage="float32")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), before)


def test_an_engine_that_disagrees_with_the_module_is_not_used(monkeypatch):
    """The engine's first window is checked against the network's own forward: a wrong engine
    (here one that adds 1 to every logit) is dropped with engine='auto' and refused when asked for."""
    from imbalanceseglib import cpu_engine as ce, streaming
    real = ce.cpu_engine

    def wrong(network):
        eng = real(network)
        return None if eng is None else (lambda x: eng(x) + 1.0)

    monkeypatch.setattr(ce, "cpu_engine", wrong)
    streaming._TUNED.clear()
    b = _bundle()
    vol = np.random.default_rng(9).normal(size=(40, 64, 64)).astype(np.float32)
    ours, plan = _streamed(b.network, vol, [16, 16, 16])
    assert plan["engine_check"]["passed"] is False and plan["engine_check"]["max_relative_difference"] > 1e-2
    assert plan["engine"] == "module" and all(t["engine"] == "module" for t in plan["trials"])
    torch.testing.assert_close(ours, _monai_logits(b.network, vol, [16, 16, 16]), atol=2e-5, rtol=1e-5)
    small = vol[:24, :30, :20].copy()  # the default plan (engine first) falls back the same way
    ours, plan = _streamed(_bundle().network, small, [16, 16, 16])
    assert plan["source"] == "default" and plan["engine"] == "module" and not plan["engine_check"]["passed"]
    torch.testing.assert_close(ours, _monai_logits(b.network, small, [16, 16, 16]), atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="engine's logits differ from the network's own"):
        _streamed(b.network, small, [16, 16, 16], engine="onednn")
    streaming._TUNED.clear()
