"""Background segmentation worker: runs in its own Python process (Slicer's ``PythonSlicer``
or any Python with ImbalanceSegLib), started by :class:`ImbalanceSegSlicer.jobs.SegmentationJob`.

It never touches a scene. It reads the input volume from a file, runs the model with the
bounded-memory sliding window (:func:`imbalanceseglib.streaming.predict_streaming`) and writes
the calibrated probabilities, the uncertainty map and the label-free performance estimate to
an output folder. Progress, completion and errors are JSON lines on stdout, the events of
:mod:`imbalanceseglib.events` (the same stream ``imbalanceseg train --events`` writes):

    {"event": "progress", "stage": "network", "fraction": 0.42}
    {"event": "done", "timings": {...}}
    {"event": "error", "type": "BundleError", "message": "..."}

Usage: python -m ImbalanceSegSlicer.worker --input in.nrrd --model m.imbseg --output DIR [--device cpu]
       [--agreement default]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from imbalanceseglib import events as ev

_emit = ev.JsonLinesWriter()  # sys.stdout, one JSON line an event


def _save_npy(path: Path, array) -> None:
    import numpy as np
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
    os.replace(tmp, path)


def run(input_path: str, model_path: str, output: str, device: str = "cpu", modality: Optional[str] = None,
        agreement: Optional[str] = None) -> int:
    import numpy as np

    from imbalanceseglib.bundle import load_bundle
    from imbalanceseglib.cli import parse_agreement
    from imbalanceseglib.images import read_image
    from imbalanceseglib.inference import check_model_fits
    from imbalanceseglib.streaming import predict_streaming

    t0 = time.perf_counter()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    views = parse_agreement(agreement)  # refused before any work
    _emit(ev.progress("load model", 0.0))
    bundle = load_bundle(model_path)
    check_model_fits(bundle, modality=modality)
    image = read_image(input_path, "input volume")
    _emit(ev.progress("load model", 1.0))
    last = {"t": 0.0}

    def progress(stage: str, fraction: float) -> None:
        now = time.perf_counter()
        if fraction in (0.0, 1.0) or now - last["t"] > 0.2:  # at most 5 lines a second
            last["t"] = now
            _emit(ev.progress(stage, fraction))

    # Bounded-memory sliding window (imbalanceseglib.streaming); float32 storage, so the maps
    # equal the in-process predict() up to float rounding. ``agreement``: the stability check,
    # one more bounded-memory pass per view.
    prediction = predict_streaming(image, bundle, device=device, progress=progress, storage="float32",
                                   agreement=views)
    _emit(ev.progress("write", 0.0))
    _save_npy(out / "probabilities.npy", np.asarray(prediction.stored, dtype=np.float32))
    _save_npy(out / "uncertainty.npy", np.asarray(prediction.uncertainty_stored, dtype=np.float32))
    est = prediction.estimator
    timings = dict(prediction.timings, worker_total=time.perf_counter() - t0)
    summary = {"class_names": prediction.class_names, "classes": bundle.classes,
               "findings": [f.as_dict() for f in prediction.findings],
               "performance": {"classes": prediction.performance.classes, "method": prediction.performance.method,
                               "class_specific": prediction.performance.class_specific},
               "estimator": {"method": est.method, "class_specific": est.class_specific,
                             "confidence": est.confidence},
               "timings": timings,
               # how the network ran (engine, windows per call, layout, threads; measured or default)
               "execution": prediction.execution}
    tmp = out / "result.json.part"
    tmp.write_text(json.dumps(summary))
    os.replace(tmp, out / "result.json")
    _emit(ev.done(timings=timings))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ImbalanceSegSlicer.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--modality", default=None)
    parser.add_argument("--agreement", default=None,
                        help="stability check: default (shift, gamma_low, gamma_high), members, or view names")
    args = parser.parse_args(argv)
    try:
        return run(args.input, args.model, args.output, args.device, args.modality, args.agreement)
    except KeyboardInterrupt:
        _emit(ev.error("Cancelled", "cancelled"))
        return 130
    except Exception as exc:  # reported to the parent, which shows it to the user
        _emit(ev.error_from(exc))
        return 1


if __name__ == "__main__":
    sys.exit(main())
