"""Sliding-window inference for big volumes, with bounded memory.

MONAI's ``sliding_window_inference`` keeps float32 accumulators for every class over the whole
volume (and the output is another float32 copy): for 250 million voxels and 9 classes that is
about 18 GB before any probability is computed. Here the windows are visited slab by slab along
z (the first array axis); only a band of ``roi_z + step_z`` planes is accumulated, and every plane
that no later window touches is finished at once: its logits are calibrated, fed to the
label-free performance estimate (a streaming sum), turned into probabilities, labels and the
uncertainty map, and stored compactly (``uint8``: probability x 255 rounded, or ``float16``) in
memory or in ``.npy`` files on disk, tile by tile.

Blending and window placement are MONAI's (``dense_patch_slices`` positions, Gaussian importance
map from ``compute_importance_map`` with sigma = 0.125 x window), so the logits equal MONAI's up
to float rounding; windows are batched (``sw_batch_size``) and the network runs under
``torch.inference_mode``.

How the network is run is measured, not assumed (:class:`_Tuner`): the engine (the network's
own forward, or for the bundled U-Nets in float32 on a CPU the engine of
:mod:`imbalanceseglib.cpu_engine`, which sends every convolution to oneDNN and normalises without
layout copies), the memory layout (contiguous NCDHW or channels-last NDHWC), the number of
windows per call and the number of calls run at once in threads are picked by timing each
candidate on the run's own first windows, and the choice is cached per network, window, device,
precision and thread count in a process. All give the same logits up to float rounding (the
engine is also checked against the module on one random window first). The estimate, the
calibrated maps, the labels and the uncertainty of each finished slab come from one fused pass
where the calibration allows it
(:meth:`~imbalanceseglib.estimation.EstimateAccumulator.add_with_maps`); the card's calibration is
read once per run into one estimator (:func:`~imbalanceseglib.estimation.estimator_from_card`).
"""

from __future__ import annotations

import contextlib
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

ProgressCallback = Callable[[str, float], None]
SlabSink = Callable[[int, torch.Tensor], None]

STORAGE = ("uint8", "float16", "float32")


def _noop(stage: str, fraction: float) -> None:
    pass


def window_starts(size: int, roi: int, overlap: float) -> List[int]:
    """Window start positions along one axis of a (padded) size, as MONAI places them."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    n = next(d for d in range(int(math.ceil(size / step))) if d * step + roi >= size) + 1
    return [i * step - max(i * step + roi - size, 0) for i in range(n)]


LAYOUTS = ("contiguous", "channels_last")
ENGINES = ("module", "onednn")
PRECISIONS = ("float32", "bfloat16")
DEFAULT_SW_BATCH = 2
SINK_VOXELS = 1 << 22        # voxels per piece handed to the sink (about 100 MB of 6-class logits)
DEFAULT_LAYOUT = "contiguous"
PRUNE_RATIO = 1.25           # a candidate this much slower than the best after the first round gets no second timing
ENGINE_MARGIN = 1.10         # the engine is kept unless a module plan is faster per window by more than this
_TUNED: Dict[Tuple[Any, ...], Tuple["Candidate", List[Dict[str, Any]]]] = {}


def _memory_format(layout: str):
    return torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format


def _network_layout(network: torch.nn.Module) -> str:
    for p in network.parameters():
        if p.ndim == 5:
            return "channels_last" if (p.is_contiguous(memory_format=torch.channels_last_3d)
                                       and not p.is_contiguous()) else "contiguous"
    return "contiguous"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


Candidate = Tuple[str, str, int, int]  # engine, layout, windows per call, concurrent calls
_MODULE_DEFAULT: Candidate = ("module", DEFAULT_LAYOUT, DEFAULT_SW_BATCH, 1)


class _Tuner:
    """Chooses how the network runs by timing the run's own first windows.

    A candidate is an engine (``"module"``: the network's own forward; ``"onednn"``: the CPU
    engine of :mod:`imbalanceseglib.cpu_engine`, same parameters, every convolution in oneDNN,
    channels-last), a memory layout (for the module), a number of windows per network call and a
    number of calls run at once (``workers``: on a CPU with T threads, W calls in W threads with
    T/W threads each: small 3D convolutions use one core better than they split over two). Every
    candidate first runs one group that is not timed (the backend builds its kernels for a new
    shape); then every candidate is timed once, in turn, and again in a second round (interleaved,
    so that a slow spell of a shared machine hits every candidate rather than one; the faster of
    a candidate's two timings counts). A candidate whose first timing is more than
    ``PRUNE_RATIO`` times the best first timing gets no second one. All of these are real windows
    of the volume, so the trials cost only the difference in speed. Then the fastest candidate per
    window runs the rest, except that the CPU engine is preferred to a module plan that is not
    faster by more than ``ENGINE_MARGIN`` (the engine's advantage grows with the volume, the
    module's shows mostly in noisy trials: a module plan chosen on one lucky timing made a
    128x256x256 run 0.87x MONAI's speed, Testing/Benchmarks/reports/streaming_inference.md).
    On an x86-64 CPU (:func:`~imbalanceseglib.cpu_engine.measured_faster_here`) with
    ``engine="auto"`` only the engine's plans are tried; the module's are tried only if the engine
    fails its check (or is asked for with ``engine="module"``). Given values are fixed; the measured choice is cached for the process by network, window,
    device, precision, thread count and candidates."""

    def __init__(self, network: torch.nn.Module, roi: Sequence[int], dev: torch.device, n_windows: int,
                 sw_batch_size: Optional[int], layout: str, precision: str = "float32",
                 workers: Optional[int] = None, engine: str = "auto", engine_available: bool = False):
        if layout != "auto" and layout not in LAYOUTS:
            raise ValueError(f"layout must be 'auto' or one of {', '.join(LAYOUTS)}, got {layout!r}")
        if engine != "auto" and engine not in ENGINES:
            raise ValueError(f"engine must be 'auto' or one of {', '.join(ENGINES)}, got {engine!r}")
        if sw_batch_size is not None and (isinstance(sw_batch_size, bool) or int(sw_batch_size) < 1):
            raise ValueError("sw_batch_size must be at least 1")
        threads = torch.get_num_threads()
        if workers is not None and (isinstance(workers, bool) or not 1 <= int(workers) <= max(1, threads)):
            raise ValueError(f"workers must be between 1 and the number of threads ({threads}), got {workers!r}")
        if workers is not None:
            worker_counts = [int(workers)]
        else:
            worker_counts = [1, threads] if dev.type == "cpu" and threads > 1 else [1]

        def sizes(w: int) -> List[int]:
            if sw_batch_size is not None:
                return [int(sw_batch_size)]
            if dev.type == "cuda":
                return [1, 2, 4, 8]
            # On CPUs more windows per call were never faster in our measurements (a window's
            # activations stop fitting in cache), so the trials stay short.
            return [1, 2] if w == 1 else [1]

        if engine == "onednn" and layout == "contiguous":
            raise ValueError("layout='contiguous' is for engine='module'; the oneDNN engine runs channels-last")
        # a given layout is the module's: with engine='auto' it means the module
        use_engine = engine == "onednn" or (engine == "auto" and engine_available and layout == "auto")
        from .cpu_engine import measured_faster_here
        module_plans: List[Candidate] = []
        if engine in ("auto", "module"):
            for lay in (list(LAYOUTS) if layout == "auto" else [layout]):
                module_plans += [("module", lay, bs, w) for w in worker_counts for bs in sizes(w)]
        self.candidates: List[Candidate] = []
        if use_engine:  # first: it is usually the fastest, and sets the bar for pruning
            self.candidates += [("onednn", "channels_last", bs, w) for w in worker_counts for bs in sizes(w)]
        # Where the engine is known to be faster (x86-64: 1.5-1.7x the module's best plan per window
        # in every trial of the streaming benchmark) the module's plans are not tried: their trial
        # windows cost time and could only win on a noisy timing. They come back if the engine
        # fails its check (drop_engine); elsewhere they compete.
        self._module_plans = module_plans
        known_faster = measured_faster_here()
        if not (use_engine and engine == "auto" and known_faster):
            self.candidates += module_plans
        self.n_windows = n_windows
        self.given = {"sw_batch_size": sw_batch_size, "layout": layout, "workers": workers}
        self.trials: List[Dict[str, Any]] = []
        self.queue: List[Tuple[Candidate, bool]] = []
        self.source = ""
        self._key_base = (id(network), type(network).__name__, precision,
                          tuple(tuple(p.shape) for p in network.parameters()), tuple(int(r) for r in roi), str(dev),
                          threads)
        self.best: Optional[Candidate] = None
        self._set_up(use_engine and (engine == "onednn" or known_faster))  # sets trials, queue, source, best

    def _set_up(self, engine_default: bool) -> None:
        """Choose between a single candidate, a cached choice, the defaults and trials."""
        self.key = self._key_base + (tuple(self.candidates),)
        self.trials, self.queue = [], []
        if len(self.candidates) == 1:
            self.best = self.candidates[0]
            self.source = "given"
        elif self.key in _TUNED:
            self.best, self.trials = _TUNED[self.key]
            self.source = "tuned (cached)"
        elif self.n_windows < 1.5 * sum(3 * bs * w for _, _, bs, w in self.candidates):
            # too few windows left after the trials for them to pay off
            bs, lay, w = self.given["sw_batch_size"], self.given["layout"], self.given["workers"]
            if engine_default:
                self.best = ("onednn", "channels_last", int(bs or 1), int(w or 1))
            else:
                self.best = ("module", DEFAULT_LAYOUT if lay == "auto" else lay, int(bs or DEFAULT_SW_BATCH), int(w or 1))
            self.source = "default"
        else:
            self.queue = [(cand, timed) for timed in (False, True, True) for cand in self.candidates]
            self.source = "tuned"

    def next(self) -> Candidate:
        return self.queue[0][0] if self.queue else self.best

    def may_run_engine(self) -> bool:
        return any(c[0] == "onednn" for c, _ in self.queue) or (self.best is not None and self.best[0] == "onednn")

    def drop_engine(self) -> None:
        """The engine failed its check (before any window ran): the module runs instead, its plans
        tried as they would be without the engine."""
        self.candidates = list(self._module_plans)
        self.best = None
        if not self.candidates:
            self.candidates = [_MODULE_DEFAULT]
        self._set_up(False)

    def _finish(self) -> None:
        fastest = min(self.trials, key=lambda r: r["seconds_per_window"])
        engines = [r for r in self.trials if r["engine"] == "onednn"]
        if engines:
            engine_best = min(engines, key=lambda r: r["seconds_per_window"])
            if engine_best["seconds_per_window"] <= ENGINE_MARGIN * fastest["seconds_per_window"]:
                fastest = engine_best
        self.best = (fastest["engine"], fastest["layout"], fastest["sw_batch_size"], fastest["workers"])
        _TUNED[self.key] = (self.best, list(self.trials))

    def _drop_pruned(self) -> None:
        """Skip second timings of candidates whose first was more than PRUNE_RATIO x the best first one
        (decided once every candidate has its first timing)."""
        timed = {(r["engine"], r["layout"], r["sw_batch_size"], r["workers"]): r for r in self.trials}
        while self.queue and self.queue[0][1]:
            cand = self.queue[0][0]
            first_round_left = any(t and c not in timed for c, t in self.queue)
            if first_round_left or cand not in timed or len(timed) < 2:
                return
            best = min(r["seconds_per_window"] for r in timed.values())
            if timed[cand]["seconds_per_window"] <= PRUNE_RATIO * best:
                return
            timed[cand]["pruned"] = True
            self.queue.pop(0)  # clearly slower: no second timing

    def report(self, cand: Candidate, n: int, seconds: float) -> None:
        if not self.queue or self.queue[0][0] != cand:
            return
        eng, lay, bs, w = cand
        if self.queue[0][1]:
            if n != bs * w:  # a short group at the end of a row: its timing is not comparable
                return
            same = [r for r in self.trials if (r["engine"], r["layout"], r["sw_batch_size"], r["workers"]) == cand]
            if same:
                same[0]["seconds_per_window"] = min(same[0]["seconds_per_window"], seconds / n)
                same[0]["timings"].append(seconds / n)
            else:
                self.trials.append({"engine": eng, "sw_batch_size": bs, "layout": lay, "workers": w,
                                    "seconds_per_window": seconds / n, "timings": [seconds / n]})
        self.queue.pop(0)
        self._drop_pruned()
        if not self.queue:
            self._finish()

    def plan(self) -> Dict[str, Any]:
        eng, lay, bs, w = self.next()
        return {"engine": eng, "sw_batch_size": bs, "layout": lay, "workers": w, "source": self.source,
                "trials": list(self.trials)}


def _importance_map(roi: Sequence[int]) -> torch.Tensor:
    from monai.data.utils import compute_importance_map
    return compute_importance_map(tuple(int(r) for r in roi), mode="gaussian", sigma_scale=0.125,
                                  device="cpu", dtype=torch.float32)


def stream_logits(network: torch.nn.Module, volume: np.ndarray, roi_size: Sequence[int], sink: SlabSink,
                  overlap: float = 0.5, sw_batch_size: Optional[int] = None, device: str = "cpu",
                  progress: Optional[ProgressCallback] = None, layout: str = "auto",
                  plan_out: Optional[Dict[str, Any]] = None, precision: str = "float32",
                  workers: Optional[int] = None, engine: str = "auto", engine_checked: bool = False) -> Dict[str, float]:
    """Run ``network`` over ``volume`` (z, y, x; normalised float32) window by window and call
    ``sink(z0, logits)`` with finished slabs of blended logits ``(C, dz, y, x)`` (float32, CPU), in
    order of z, covering the volume exactly once. Returns timings (network, blending, tuning).

    ``engine`` (``"module"``: the network's own forward; ``"onednn"``: the CPU engine of
    :mod:`imbalanceseglib.cpu_engine` for the bundled U-Nets, float32 on a CPU only),
    ``sw_batch_size`` (windows per network call), ``layout`` (``"contiguous"``,
    ``"channels_last"``; a given layout means the module) and ``workers`` (network calls run at once, each in its
    own thread with its share of torch's threads): given values are used as they are;
    ``None``/``"auto"`` are measured on the run's own first windows (see :class:`_Tuner`; on an
    x86-64 CPU where the engine applies, only the engine's plans) when
    the volume has enough of them, else the defaults are used (the engine with one window per
    call where it applies on an x86-64 CPU, otherwise the module with 2, contiguous; one call at
    once). Before any window, if the engine may run, engine and module both run one fixed random
    window (:func:`~imbalanceseglib.cpu_engine.probe_agreement`): if their logits differ by more
    than ``cpu_engine.TOLERANCE`` of the largest logit the module is used instead (with ``engine="auto"``)
    or a ``RuntimeError`` says so (``engine="onednn"``); ``engine_checked``: an earlier pass of this
    run already made that check on this network (skipped). ``plan_out`` receives the plan used, the
    trials and that check. The network's parameters are back in their own layout afterwards.

    ``precision``: ``"float32"`` (default, logits equal MONAI's up to rounding) or ``"bfloat16"``
    (the network under ``torch.autocast``; blending, calibration and the estimate stay float32).
    bfloat16 is an opt-in for speed on hardware with bfloat16 arithmetic (AVX512-BF16/AMX CPUs,
    recent GPUs); it changes logits by about 1 % and labels where classes are close, so check
    the agreement on your data (Testing/Benchmarks/reports/streaming_inference.md has ours)."""
    progress = progress or _noop
    if volume.ndim != 3:
        raise ValueError(f"volume must be 3D (z, y, x), got shape {volume.shape}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    roi = [int(r) for r in roi_size]
    dev = torch.device(device)
    network = network.to(dev).eval()
    # Symmetric zero padding where the volume is smaller than the window (as MONAI does).
    pads = [(max(r - s, 0) // 2, max(r - s, 0) - max(r - s, 0) // 2) for s, r in zip(volume.shape, roi)]
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    if any(a or b for a, b in pads):
        vol = torch.nn.functional.pad(vol, [p for ab in reversed(pads) for p in ab])
    Z, Y, X = vol.shape
    starts = [window_starts(n, r, overlap) for n, r in zip((Z, Y, X), roi)]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    from .cpu_engine import TOLERANCE, cpu_engine, probe_agreement
    fast = cpu_engine(network) if dev.type == "cpu" and precision == "float32" else None
    if engine == "onednn" and fast is None:
        raise ValueError("engine='onednn' runs the bundled U-Nets (UNet3D, UNet3DEnsemble) in float32 on a CPU "
                         f"with oneDNN; this run has {type(network).__name__} on {dev} in {precision}"
                         + ("" if torch.backends.mkldnn.is_available() else " and this torch build has no oneDNN"))
    tuner = _Tuner(network, roi, dev, len(starts[0]) * len(starts[1]) * len(starts[2]), sw_batch_size, layout,
                   precision, workers, engine=engine, engine_available=fast is not None)
    threads = torch.get_num_threads()
    check: Dict[str, Any] = {}
    if fast is not None and tuner.may_run_engine() and not engine_checked:
        # engine and module run one random window first: the same logits?
        tc = time.perf_counter()
        diff = probe_agreement(fast, network, (1, *roi))
        check = {"max_relative_difference": diff, "passed": diff <= TOLERANCE, "seconds": time.perf_counter() - tc}
        if not check["passed"]:
            if engine == "onednn":
                raise RuntimeError(f"the oneDNN engine's logits differ from the network's own by {diff:.2e} of the "
                                   f"largest logit on a random window (tolerance {TOLERANCE:g}); run with "
                                   "engine='module'")
            tuner.drop_engine()

    def run(inp: torch.Tensor, eng: str, fmt, n_threads: int) -> torch.Tensor:
        # inference mode, autocast and the OpenMP thread count are per thread: set them here
        if torch.get_num_threads() != n_threads:
            torch.set_num_threads(n_threads)
        if eng == "onednn":
            return fast(inp).contiguous()
        autocast = (torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bfloat16"
                    else contextlib.nullcontext())
        with torch.inference_mode(), autocast:
            out = network(inp.to(dev).contiguous(memory_format=fmt))
        return out.float().cpu().contiguous()
    pool: Optional[ThreadPoolExecutor] = None
    original_layout = current_layout = _network_layout(network)
    imp = _importance_map(roi)
    step_z = max(1, int(roi[0] * (1 - overlap))) if roi[0] < Z else roi[0]
    span = min(Z, roi[0] + step_z)
    n_windows = len(starts[0]) * len(starts[1]) * len(starts[2])
    done = 0
    acc: Optional[torch.Tensor] = None
    wsum = torch.zeros((span, Y, X), dtype=torch.float32)
    bz0 = 0  # padded z of the first plane in the band
    t_net = t_blend = 0.0
    yx = [(ys, xs) for ys in starts[1] for xs in starts[2]]
    (z_lo, _), (y_lo, _), (x_lo, _) = pads
    orig = volume.shape
    with torch.inference_mode(), _restore_layout(network, original_layout, threads):
        for zi, zs in enumerate(starts[0]):
            b = 0
            while b < len(yx):
                cand = tuner.next()
                eng, lay, size, n_workers = cand
                if eng == "module" and lay != current_layout:
                    network.to(memory_format=_memory_format(lay))
                    current_layout = lay
                batch = yx[b:b + size * n_workers]
                b += len(batch)
                t0 = time.perf_counter()
                inputs = [torch.stack([vol[zs:zs + roi[0], ys:ys + roi[1], xs:xs + roi[2]]
                                       for ys, xs in batch[i:i + size]])[:, None]
                          for i in range(0, len(batch), size)]
                fmt = _memory_format(lay)
                if n_workers == 1 or len(inputs) == 1:
                    outs = [run(x, eng, fmt, threads) for x in inputs]
                else:
                    if pool is None:
                        pool = ThreadPoolExecutor(max(threads, 2), thread_name_prefix="imbalanceseg-window")
                    per = max(1, threads // n_workers)
                    outs = list(pool.map(lambda x: run(x, eng, fmt, per), inputs))
                out = outs[0] if len(outs) == 1 else torch.cat(outs)
                _sync(dev)
                t1 = time.perf_counter()
                t_net += t1 - t0
                tuner.report(cand, len(batch), t1 - t0)
                if acc is None:
                    acc = torch.zeros((out.shape[1], span, Y, X), dtype=torch.float32)
                z0 = zs - bz0
                for k, (ys, xs) in enumerate(batch):
                    acc[:, z0:z0 + roi[0], ys:ys + roi[1], xs:xs + roi[2]].addcmul_(out[k], imp)
                    wsum[z0:z0 + roi[0], ys:ys + roi[1], xs:xs + roi[2]].add_(imp)
                t_blend += time.perf_counter() - t1
                done += len(batch)
                progress("network", done / n_windows)
            t1 = time.perf_counter()
            next_z = starts[0][zi + 1] if zi + 1 < len(starts[0]) else Z
            n = next_z - bz0  # planes no later window touches
            if n > 0:
                # crop the padding and hand the finished planes on in pieces of at most
                # SINK_VOXELS voxels, so the sink's temporaries stay small whatever the slice size
                a, e = max(bz0, z_lo), min(bz0 + n, z_lo + orig[0])
                step = max(1, SINK_VOXELS // (orig[1] * orig[2]))
                for p0 in range(a, e, step):
                    p1 = min(e, p0 + step)
                    piece = acc[:, p0 - bz0:p1 - bz0] / wsum[p0 - bz0:p1 - bz0]
                    sink(p0 - z_lo, piece[:, :, y_lo:y_lo + orig[1], x_lo:x_lo + orig[2]])
                    del piece
                # move the planes still in use to the front, plane by plane (front to back, so
                # nothing is overwritten before it is read) instead of through a copy of the band
                keep = span - n
                for i in range(keep):
                    acc[:, i].copy_(acc[:, n + i])
                    wsum[i].copy_(wsum[n + i])
                acc[:, keep:] = 0
                wsum[keep:] = 0
                bz0 = next_z
            t_blend += time.perf_counter() - t1
    if pool is not None:
        pool.shutdown(wait=True)
    if plan_out is not None:
        plan_out.update(tuner.plan())
        if check:
            plan_out["engine_check"] = dict(check)
    return {"network": t_net, "blend": t_blend}


class _restore_layout:
    """Context manager: put the network's parameters back in ``layout`` and torch's thread
    count back to ``threads`` on exit."""

    def __init__(self, network: torch.nn.Module, layout: str, threads: int):
        self.network, self.layout, self.threads = network, layout, threads

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.network.to(memory_format=_memory_format(self.layout))
        torch.set_num_threads(self.threads)


def _is_canonical(image: sitk.Image) -> bool:
    """Whether the axes already run L, P, S (identity direction in ITK's LPS world), so
    :func:`~imbalanceseglib.images.to_canonical` would return the same voxels."""
    return tuple(float(v) for v in image.GetDirection()) == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass
class CompactPrediction:
    """Result of :func:`predict_streaming`: probabilities stored compactly, on the input grid.

    ``probabilities[c]`` decodes one class to float32 (so code written for
    :class:`imbalanceseglib.inference.Prediction` works unchanged); ``stored`` is the raw
    ``(C, z, y, x)`` array (uint8: p x 255, float16 or float32, possibly a memory map).
    """

    stored: np.ndarray
    storage: str
    labels: np.ndarray
    uncertainty_stored: np.ndarray
    reference: sitk.Image
    class_names: List[str]
    timings: Dict[str, float] = field(default_factory=dict)
    performance: Any = None
    estimator: Any = None
    files: Dict[str, Path] = field(default_factory=dict)
    execution: Dict[str, Any] = field(default_factory=dict)
    findings: List[Any] = field(default_factory=list)  # as imbalanceseglib.inference.Prediction.findings

    @property
    def probabilities(self) -> "_Decoded":
        return _Decoded(self.stored, self.storage)

    @property
    def uncertainty(self) -> np.ndarray:
        return decode(self.uncertainty_stored, self.storage)

    def _image(self, array: np.ndarray) -> sitk.Image:
        out = sitk.GetImageFromArray(array)
        out.CopyInformation(self.reference)
        return out

    def probability_image(self, index: int) -> sitk.Image:
        return self._image(self.probabilities[index])

    def label_image(self) -> sitk.Image:
        return self._image(np.asarray(self.labels))

    def uncertainty_image(self) -> sitk.Image:
        return self._image(self.uncertainty)


class _Decoded:
    def __init__(self, stored: np.ndarray, storage: str):
        self.stored, self.storage = stored, storage

    def __getitem__(self, c: int) -> np.ndarray:
        return decode(self.stored[c], self.storage)

    def __len__(self) -> int:
        return self.stored.shape[0]

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self.stored.shape)


def encode(p: torch.Tensor, storage: str) -> np.ndarray:
    if storage == "uint8":
        q = p.clamp(0, 1)          # one temporary, scaled and rounded in place
        return q.mul_(255.0).round_().to(torch.uint8).numpy()
    if storage == "float16":
        return p.to(torch.float16).numpy()
    return p.to(torch.float32).numpy()


def decode(a: np.ndarray, storage: str) -> np.ndarray:
    if storage == "uint8":
        return np.asarray(a, dtype=np.float32) * np.float32(1.0 / 255.0)
    return np.asarray(a, dtype=np.float32)


def _stream_labels(network: torch.nn.Module, roi: Sequence[int], overlap: float, device: str, precision: str,
                   plan: Dict[str, Any], progress: ProgressCallback) -> Callable[[np.ndarray], np.ndarray]:
    """A function from a normalised working-grid volume to ``network``'s argmax labels on it,
    computed slab by slab with :func:`stream_logits` (only the labels are kept)."""
    def labels(volume: np.ndarray) -> np.ndarray:
        out = np.empty(volume.shape, dtype=np.uint8)

        def sink(z0: int, logits: torch.Tensor) -> None:
            out[z0:z0 + logits.shape[1]] = logits.argmax(0).numpy()

        stream_logits(network, volume, roi, sink, overlap=overlap, device=device, progress=progress,
                      precision=precision, sw_batch_size=plan.get("sw_batch_size"), layout=plan.get("layout", "auto"),
                      workers=plan.get("workers"), engine=plan.get("engine", "auto"),
                      engine_checked=plan.get("engine") == "onednn")
        return out
    return labels


def predict_streaming(image: sitk.Image, bundle, device: str = "cpu", overlap: float = 0.5,
                      sw_batch_size: Optional[int] = None, progress: Optional[ProgressCallback] = None,
                      storage: str = "uint8", out_dir: Optional[Path] = None,
                      layout: str = "auto", precision: str = "float32",
                      workers: Optional[int] = None, engine: str = "auto",
                      agreement: Optional[Sequence[str]] = None) -> CompactPrediction:
    """Segment one volume with bounded memory (see the module docstring).

    ``storage``: how probabilities and the uncertainty map are kept (``uint8``: 1/255 steps,
    ``float16``, ``float32``). ``out_dir``: write them as ``.npy`` memory maps there (tile by
    tile, as slabs finish) instead of keeping them in memory: ``probabilities.npy`` (C, z, y, x),
    ``labels.npy``, ``uncertainty.npy``. ``sw_batch_size`` and ``layout``: see :func:`stream_logits`
    (``None``/``"auto"``: measured on this hardware); the plan used is in ``execution``.
    ``precision``, ``workers`` and ``engine``: see :func:`stream_logits`.

    ``agreement``: views to compare the prediction with, as in :func:`imbalanceseglib.inference.predict`
    (:func:`imbalanceseglib.inference.agreement_check`); each view is one more bounded-memory pass
    with the plan the first pass chose, keeping only its labels (one byte a voxel).

    The volume must already be on the model's grid and in its orientation for the bounded-memory
    path; otherwise it is resampled first (whole volume, float32).
    """
    from .estimation import estimator_from_card
    from .images import check_image, needs_resampling, normalise_intensities, resample_to_spacing, to_canonical
    from .inference import check_against_training, check_estimate, to_input_grid
    from .input_checks import refuse_blank

    progress = progress or _noop
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {', '.join(STORAGE)}, got {storage!r}")
    if bundle.network is None:
        from .bundle import BundleError
        raise BundleError("bundle was loaded without weights; use load_bundle()")
    check_image(image, "input volume", min_size=2)
    refuse_blank(image)
    card = bundle.model_card  # read once; everything below takes its sections
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    progress("preprocess", 0.0)
    pre = card.preprocessing
    # no reoriented copy when the axes already run L, P, S (a big volume is usually read so)
    canonical = image if _is_canonical(image) else to_canonical(image)
    resampled = needs_resampling(canonical, pre.get("target_spacing"))
    work = resample_to_spacing(sitk.Cast(canonical, sitk.sitkFloat32), pre["target_spacing"]) if resampled else canonical
    # one float32 copy straight from the image's buffer (no intermediate copy in its own type)
    volume = normalise_intensities(np.array(sitk.GetArrayViewFromImage(work), dtype=np.float32),
                                   pre.get("normalization", {}), copy=False)
    findings = check_against_training(image, bundle, volume)
    geometry = sitk.Image(1, 1, 1, sitk.sitkUInt8)
    geometry.SetOrigin(work.GetOrigin())
    geometry.SetSpacing(work.GetSpacing())
    geometry.SetDirection(work.GetDirection())
    same_grid = not resampled and canonical.GetDirection() == image.GetDirection()
    del work
    timings["preprocess"] = time.perf_counter() - t0
    progress("preprocess", 1.0)

    c = card.num_classes
    shape = volume.shape
    estimator = estimator_from_card(card.calibration, c)  # once per run, not per slab
    acc = estimator.accumulator(c)
    store_dtype = {"uint8": np.uint8, "float16": np.float16, "float32": np.float32}[storage]
    files: Dict[str, Path] = {}

    def alloc(name: str, shp: Tuple[int, ...], dtype) -> np.ndarray:
        if out_dir is None or not same_grid:
            return np.empty(shp, dtype=dtype)
        path = Path(out_dir) / f"{name}.npy"
        files[name] = path
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shp)

    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    probs_out = alloc("probabilities", (c, *shape), store_dtype)
    labels_out = alloc("labels", shape, np.uint8 if c <= 256 else np.uint16)
    unc_out = alloc("uncertainty", shape, store_dtype)
    log_c = math.log(c)
    t_post = [0.0]
    # the raw logits' argmax on the working grid: the plain prediction the agreement check compares
    raw_labels = np.empty(shape, dtype=np.uint8 if c <= 256 else np.uint16) if agreement else None

    def sink(z0: int, logits: torch.Tensor) -> None:
        t = time.perf_counter()
        # One pass for the estimate, the maps, the labels and the uncertainty where the
        # calibration allows it (EstimateAccumulator.add_with_maps), two passes otherwise.
        scaled = estimator.scale_logits(logits[None])[0]
        fused = acc.add_with_maps(scaled)
        if fused is not None:
            p, lab, ent = fused
        else:
            acc.add(scaled)
            p = estimator.probabilities(logits[None])[0]
            lab = torch.argmax(p, dim=0)
            ent = (-(p * torch.log(p.clamp_min(1e-12))).sum(0) / log_c).clamp(0, 1)
        dz = p.shape[1]
        probs_out[:, z0:z0 + dz] = encode(p, storage)
        labels_out[z0:z0 + dz] = lab.numpy()
        unc_out[z0:z0 + dz] = encode(ent, storage)
        if raw_labels is not None:
            raw_labels[z0:z0 + dz] = logits.argmax(0).numpy()
        t_post[0] += time.perf_counter() - t

    roi = pre.get("patch_size") or [min(s, 96) for s in shape]
    t1 = time.perf_counter()
    execution: Dict[str, Any] = {}
    parts = stream_logits(bundle.network, volume, roi, sink, overlap=overlap, sw_batch_size=sw_batch_size,
                          device=device, progress=progress, layout=layout, plan_out=execution,
                          precision=precision, workers=workers, engine=engine)
    timings["network"] = parts["network"]
    timings["blend"] = parts["blend"]
    timings["calibrate_store"] = t_post[0]
    timings["sliding_window_total"] = time.perf_counter() - t1
    agree = None
    if agreement:
        from .inference import agreement_check
        t_agree = time.perf_counter()
        plan = {k: execution[k] for k in ("sw_batch_size", "layout", "workers", "engine") if k in execution}
        if plan.get("engine") == "onednn":
            plan["layout"] = "auto"  # a given layout means the module
        agree, more = agreement_check(bundle, volume, None, list(agreement), roi, overlap, plain=raw_labels,
                                      labels_of=lambda net: _stream_labels(net, roi, overlap, device, precision,
                                                                           plan, progress))
        findings = findings + more
        timings["agreement"] = time.perf_counter() - t_agree
    del volume
    raw_labels = None

    progress("estimate", 0.0)
    performance = acc.result(card.class_names)
    voxel_ml = float(np.prod(geometry.GetSpacing())) / 1000.0
    for row in performance.classes:
        row["predicted_ml"] = row["predicted_voxels"] * voxel_ml
        row["expected_ml"] = row["expected_voxels"] * voxel_ml
    findings = check_estimate(performance, bundle, findings, voxel_ml, agree)
    progress("estimate", 1.0)

    t2 = time.perf_counter()
    progress("postprocess", 0.0)
    if not same_grid:
        # Back to the input grid (reorientation or resampling): this path holds float32 maps of
        # every class, like the in-memory predict(); the bounded-memory path is the one above.
        work_ref = sitk.Image([int(v) for v in reversed(shape)], sitk.sitkUInt8)
        work_ref.SetOrigin(geometry.GetOrigin())
        work_ref.SetSpacing(geometry.GetSpacing())
        work_ref.SetDirection(geometry.GetDirection())
        dec = np.stack([decode(probs_out[k], storage) for k in range(c)])
        dec = to_input_grid(dec, work_ref, to_canonical(image), image, resampled)
        probs_out = encode(torch.from_numpy(dec), storage)
        labels_out = np.argmax(dec, axis=0).astype(np.uint8 if c <= 256 else np.uint16)
        ent = -(dec * np.log(np.clip(dec, 1e-12, None))).sum(0) / log_c
        unc_out = encode(torch.from_numpy(np.clip(ent, 0, 1).astype(np.float32)), storage)
        del dec
    reference = sitk.Image([int(v) for v in image.GetSize()], sitk.sitkUInt8)
    reference.CopyInformation(image)
    timings["postprocess"] = time.perf_counter() - t2
    progress("postprocess", 1.0)
    for arr in (probs_out, labels_out, unc_out):
        if isinstance(arr, np.memmap):
            arr.flush()
    return CompactPrediction(stored=probs_out, storage=storage, labels=labels_out, uncertainty_stored=unc_out,
                             reference=reference, class_names=card.class_names, timings=timings,
                             performance=performance, estimator=estimator, files=files, execution=execution,
                             findings=findings)

