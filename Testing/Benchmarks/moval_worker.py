#!/usr/bin/env python
"""Runs the peer, MOVAL, for ``performance_estimation.py`` in its own interpreter.

MOVAL 0.3.25's class-specific solver assigns a one-element array into a float
array (``param[k] = x``), which NumPy 2 refuses, so the peer runs in an
environment with NumPy 1.26 (see the report for the exact versions), on the
same cropped logits our library gets.  Usage (called by the benchmark)::

    python moval_worker.py MANIFEST.json OUT.json
"""

import contextlib
import io
import json
import sys
import time

import numpy as np

MOVAL_NAME = {"none": "ac-model", "ts": "ts-model", "doc": "doc-model", "atc": "atc-model", "ts-atc": "ts-atc-model"}


def main(manifest_path, out_path):
    import moval
    import scipy
    man = json.load(open(manifest_path))
    val = [np.load(p) for p in man["val"]]
    logits_v = [v["logits"].astype(np.float64) for v in val]
    labels_v = [v["labels"].astype(np.int64) for v in val]
    tests = {k: [np.load(p)["logits"].astype(np.float64) for p in v] for k, v in man["tests"].items()}
    out = {"versions": {"moval": getattr(moval, "__version__", "0.3.25"), "numpy": np.__version__,
                        "scipy": scipy.__version__, "python": sys.version.split()[0]}, "runs": []}
    for method, cs in man["methods"]:
        model = moval.MOVAL(mode="segmentation", metric="f1score", confidence_scores="max_class_probability-conf",
                            estim_algorithm=MOVAL_NAME[method], class_specific=cs)
        t1 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            model.fit(logits_v, labels_v)
        fit_s = time.perf_counter() - t1
        times, estimates = [], {}
        for key, cases in tests.items():
            estimates[key] = []
            for lg in cases:
                t2 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    e = np.asarray(model.estimate([lg]), dtype=np.float64)
                times.append(time.perf_counter() - t2)
                estimates[key].append([None if not np.isfinite(x) else float(x) for x in e])
        out["runs"].append({"method": method, "class_specific": cs, "fit_s": fit_s,
                            "estimate_s": float(np.mean(times)), "estimates": estimates})
        print(f"[{time.strftime('%H:%M:%S')}] moval {method:<6} {'CS' if cs else 'global':<6} fit {fit_s:.1f} s, "
              f"estimate {np.mean(times):.2f} s/case", flush=True)
        json.dump(out, open(out_path + ".tmp", "w"))
    import os
    os.replace(out_path + ".tmp", out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
