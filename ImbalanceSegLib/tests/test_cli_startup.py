"""Which modules the command line imports (issue #18): ``--help`` and argument errors answer
with the standard library alone, ``card`` needs no torch, and ``evaluate`` without surface
Dice imports no MONAI (nor torch).  Each call runs in a fresh interpreter; the time it takes
is measured by Testing/Benchmarks/cli_startup.py, not here."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import imbalanceseglib

SRC = str(Path(imbalanceseglib.__file__).resolve().parents[1])
DEMO = Path(__file__).resolve().parents[2] / "Resources" / "Models" / "demo_brain.imbseg"
HEAVY = ("torch", "monai", "scipy", "SimpleITK", "safetensors", "numpy")

# argv[1]: JSON {"src", "blocked": [...], "argv": [...]}; runs the CLI as ``python -m`` would,
# then prints (on the last line of stderr) the heavy packages that were imported.
CHILD = r'''
import json, runpy, sys

args = json.loads(sys.argv[1])
blocked = tuple(args["blocked"])


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {name!r} (blocked by the test)")
        return None


sys.meta_path.insert(0, Blocker())
sys.path.insert(0, args["src"])
sys.argv = ["imbalanceseg"] + args["argv"]
code = 0
try:
    runpy.run_module("imbalanceseglib.cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(args["heavy"]))
print("\nLOADED " + json.dumps(heavy), file=sys.stderr)
sys.exit(code)
'''


def _cli(argv, blocked=HEAVY, cwd=None):
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"src": SRC, "blocked": list(blocked),
                                                                   "argv": list(argv), "heavy": list(HEAVY)})],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    head, _, tail = res.stderr.rpartition("\nLOADED ")
    return res.returncode, res.stdout, head, json.loads(tail)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["predict", "--help"], ["evaluate", "--help"],
                                  ["calibrate", "--help"], ["estimate", "--help"], ["card", "--help"],
                                  ["suggest", "--help"]])
def test_help_answers_without_heavy_packages(argv):
    code, out, err, loaded = _cli(argv)
    assert code == 0, err
    assert out.startswith("usage: imbalanceseg") and loaded == []


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: command"),
    (["segment"], "invalid choice: 'segment'"),
    (["predict", "--model", "m.imbseg"], "the following arguments are required: --input, --output"),
    (["evaluate", "--pred", "p", "--ref", "r", "--out", "o", "--bins", "many"], "invalid int value: 'many'"),
    (["calibrate", "--model", "m", "--images", "i", "--labels", "l", "--out", "o", "--method", "platt"],
     "invalid choice: 'platt'"),
    (["predict", "--model", "m.imbseg", "--input", "i.nrrd", "--output", "o", "--flag-threshold", "2"],
     "--flag-threshold must be between 0 and 1, got 2.0"),
    (["suggest", "--model", "m.imbseg", "--images", "i", "-n", "2", "--strategy", "coreset"],
     "invalid choice: 'coreset'"),
])
def test_argument_errors_answer_without_heavy_packages(argv, message):
    code, out, err, loaded = _cli(argv)
    assert code == 2 and message in err and loaded == []


def test_card_reads_the_model_card_without_torch():
    code, out, err, loaded = _cli(["card", str(DEMO)], blocked=("torch", "monai", "safetensors"))
    assert code == 0, err
    assert out.startswith("demo_brain: ") and "val Dice" in out
    assert not {"torch", "monai", "safetensors"} & set(loaded)


def test_evaluate_without_surface_dice_imports_no_monai(tmp_path):
    for folder in ("pred", "ref"):
        (tmp_path / folder).mkdir()
    lab = np.zeros((6, 6, 6), np.uint8)
    lab[2:4, 2:4, 2:4] = 1
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "ref" / "c1.nrrd"))
    lab[2, 2, 2] = 0
    sitk.WriteImage(sitk.GetImageFromArray(lab), str(tmp_path / "pred" / "c1.nrrd"))
    argv = ["evaluate", "--pred", "pred", "--ref", "ref", "--out", "out", "--metrics", "overlap,distance,detection"]
    code, out, err, loaded = _cli(argv, blocked=(), cwd=tmp_path)
    assert code == 0, err
    assert "[evaluate] 1 case(s)" in out and (tmp_path / "out" / "summary.csv").is_file()
    assert "monai" not in loaded and "torch" not in loaded
    # with surface Dice (the default metrics) MONAI is what computes it
    code, out, err, loaded = _cli(argv[:-2] + ["--out", "out_nsd"], blocked=(), cwd=tmp_path)
    assert code == 0, err
    assert "monai" in loaded
