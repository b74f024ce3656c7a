"""Segmentation in a background process, so Slicer's GUI never freezes (Qt-free).

:class:`SegmentationJob` copies the input volume to a temporary file, starts
:mod:`ImbalanceSegSlicer.worker` in a separate Python process and reads its progress lines.
The scene is only touched once, at the end, when :meth:`SegmentationJob.poll` sees the
worker finish and adds the result nodes through the Logic (which removes them again if that
fails). Cancel or a failure leaves the scene exactly as it was. The widget calls ``poll`` from
a Qt timer; scripts and tests call :meth:`SegmentationJob.wait`.

Both jobs read the same structured event stream from their child (:mod:`imbalanceseglib.events`:
JSON lines ``progress``, ``iteration``, ``validation``, ``artifact``, ``log``, ``warning``,
``done``, ``error``), through one reader, :meth:`_ProcessJob._events`; other lines only go to
``log``; ``warning`` events (e.g. the classes a training run never learned) are kept in ``warnings``.
Cancel stops the child's whole process tree: its process group on POSIX, ``taskkill /T`` on
Windows (where the child is started without a console window).
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from imbalanceseglib.estimation import REVIEW_THRESHOLD
from imbalanceseglib.events import parse_event
from imbalanceseglib.presets import semi_supervised_choice

CREATED, RUNNING, DONE, FAILED, CANCELLED = "created", "running", "done", "failed", "cancelled"

_MODULE_DIR = Path(__file__).resolve().parent.parent


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` inside the application (it sets up Slicer's Python environment),
    else the running interpreter."""
    exe = Path(sys.executable)
    for name in ("PythonSlicer", "PythonSlicer.exe"):
        for folder in (exe.parent, exe.parent.parent / "bin"):
            if (folder / name).is_file():
                return str(folder / name)
    found = shutil.which("PythonSlicer")
    if found and "Slicer" in exe.as_posix():
        return found
    return sys.executable


def _library_paths() -> List[str]:
    paths = [str(_MODULE_DIR)]
    src = _MODULE_DIR.parent / "ImbalanceSegLib" / "src"
    if src.is_dir():
        paths.append(str(src))
    return paths


class JobError(RuntimeError):
    """A background job failed or was cancelled; the message says why (the worker's own error)."""


# Windows process creation flags (the subprocess module only defines them on Windows).
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)


def _windows() -> bool:
    return os.name == "nt"


def _launch(cmd: List[str], cwd: Path, threads: Optional[int]) -> subprocess.Popen:
    """Start a child in its own process group with the library on its path (on Windows without
    a console window)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(_library_paths() + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    popen_kw: Dict[str, Any] = ({"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW} if _windows()
                                else {"start_new_session": True})
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                            cwd=str(cwd), **popen_kw)


def _kill_tree_windows(proc: subprocess.Popen, timeout: float) -> None:
    """Kill a Windows child and all its descendants. ``PythonSlicer.exe`` is a launcher: the
    Python doing the work is its child, which ``proc.kill()`` alone would leave running."""
    try:
        killed = subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                creationflags=CREATE_NO_WINDOW, timeout=max(timeout, 1.0),
                                check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        killed = False
    if not killed and proc.poll() is None:  # no taskkill, or it failed: at least the launcher goes
        try:
            proc.kill()
        except OSError:
            pass


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    """Terminate a child and its process tree: on POSIX its process group (SIGTERM, SIGKILL if it
    does not stop within ``timeout``), on Windows ``taskkill /F /T`` (``proc.kill()`` if that fails)."""
    if proc.poll() is not None:
        return
    if _windows():
        _kill_tree_windows(proc, timeout)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
    except ProcessLookupError:
        pass


class _ProcessJob:
    """What both background jobs share: a child process in its own group, its event stream on
    stdout and its stderr tail read by threads, cancel, wait and clean-up of the temporary folder."""

    _what = "job"
    _cancel_timeout = 5.0

    def __init__(self, python: Optional[str], threads: Optional[int]):
        self.python = python or python_executable()
        self.threads = threads
        self.state = CREATED
        self.error: Optional[str] = None
        self.log: List[str] = []
        self.warnings: List[dict] = []  # the child's ``warning`` events, in order (kept across phases)
        self._proc: Optional[subprocess.Popen] = None
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: List[str] = []
        self._eof = False
        self._tmp: Optional[Path] = None
        self._done_event: Optional[dict] = None
        self._error_event: Optional[dict] = None

    def _start_process(self, cmd: List[str]) -> None:
        self._eof = False
        self._done_event = self._error_event = None
        self._proc = _launch(cmd, self._tmp, self.threads)
        threading.Thread(target=self._read_stdout, args=(self._proc,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self._proc,), daemon=True).start()

    def _read_stdout(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self._stderr.append(line.rstrip())
            del self._stderr[:-200]

    def _new_lines(self) -> List[str]:
        """Lines the child wrote since the last call (sets ``_eof`` at the end of its output)."""
        lines = []
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return lines
            if line is None:
                self._eof = True
            else:
                lines.append(line)

    def _events(self) -> List[dict]:
        """The events the child sent since the last call (:mod:`imbalanceseglib.events`), in order.

        The one place where the child's output is read: ``log`` events and lines that are not
        events go to ``log``; ``warning`` events to ``warnings`` (their message is in the child's
        log already); ``done`` and ``error`` are remembered for the end (``error`` also sets
        ``error``). Every event is returned, so the job can follow the kinds it shows."""
        events = []
        for line in self._new_lines():
            event = parse_event(line)
            if event is None:
                if line.strip():
                    self.log.append(line.rstrip())
                continue
            kind = event["event"]
            if kind == "log":
                self.log.append(str(event.get("message", "")))
            elif kind == "warning":
                self.warnings.append(event)
            elif kind == "done":
                self._done_event = event
            elif kind == "error":
                self._error_event = event
                self.error = f"{event.get('type', 'Error')}: {event.get('message', '')}"
            events.append(event)
        return events

    def _exited(self) -> bool:
        return self._proc.poll() is not None and self._eof

    def _failure(self, what: str) -> str:
        tail = "\n".join((self._stderr or self.log)[-5:])
        return f"{what} (exit code {self._proc.returncode})" + (f":\n{tail}" if tail else "")

    def poll(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def cancel(self, timeout: Optional[float] = None) -> str:
        """Stop the child; returns the final state."""
        if self.state != RUNNING:
            return self.state
        _stop(self._proc, self._cancel_timeout if timeout is None else timeout)
        self.state = CANCELLED
        self.error = "cancelled by the user"
        self._cleanup()
        return self.state

    def _wait(self, timeout: Optional[float], interval: float,
              progress: Optional[Callable[[str, float], None]] = None) -> None:
        t0 = time.monotonic()
        while self.poll() == RUNNING:
            if progress:
                progress(self.stage, self.fraction)
            if timeout is not None and time.monotonic() - t0 > timeout:
                self.cancel()
                raise JobError(f"{self._what} took longer than {timeout:g} s and was cancelled")
            time.sleep(interval)
        if self.state != DONE:
            raise JobError(self.error or self.state)

    def _cleanup(self) -> None:
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def __del__(self):
        try:
            if self.state == RUNNING:
                self.cancel(timeout=1.0)
        except Exception:
            pass


class SegmentationJob(_ProcessJob):
    """One segmentation run in a background process.

    ``poll()`` returns the state (``running``, ``done``, ``failed``, ``cancelled``) and updates
    ``stage``/``fraction`` (named progress steps: load model, preprocess, network, estimate,
    postprocess, write, results). After ``done``, ``result`` is the Logic's
    :class:`SegmentationResult`; after ``failed``, ``error`` says what went wrong.

    ``agreement``: the stability check, as ``imbalanceseg predict --agreement`` (``"default"``:
    the segmentation compared with itself shifted and under two gammas; ``"members"``: between the
    networks of a semi-supervised model); unstable classes are marked unreliable. One more
    bounded-memory network pass per view.
    """

    _what = "segmentation"

    def __init__(self, logic, inputVolumeNode, modelPath, referenceSegmentationNode=None, device: str = "cpu",
                 flagThreshold: float = REVIEW_THRESHOLD, baseName: Optional[str] = None,
                 modality: Optional[str] = None, python: Optional[str] = None, threads: Optional[int] = None,
                 agreement: Optional[str] = None):
        self.logic = logic
        self.inputVolumeNode = inputVolumeNode
        self.modelPath = Path(modelPath)
        self.referenceSegmentationNode = referenceSegmentationNode
        self.device = device
        self.flagThreshold = flagThreshold
        self.baseName = baseName
        self.modality = modality
        self.agreement = agreement
        super().__init__(python, threads)
        self.stage, self.fraction = "", 0.0
        self.result = None
        self.execution: Dict[str, Any] = {}  # how the worker ran the network (streaming's plan)
        self.stages: List[str] = []  # progress steps in the order the worker reported them
        self._input_id = None

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> "SegmentationJob":
        import SimpleITK as sitk

        from ImbalanceSegSlicer import scene as sc
        if self.state != CREATED:
            raise RuntimeError("a job can be started once")
        self.logic.checkInputs(self.inputVolumeNode, self.flagThreshold)
        if not self.modelPath.is_file():
            raise FileNotFoundError(f"model file {self.modelPath} does not exist")
        if self.agreement:  # refused now, not after inference
            from imbalanceseglib.cli import parse_agreement
            from imbalanceseglib.container import read_card
            views = parse_agreement(self.agreement)
            arch = read_card(self.modelPath).get("network", {}).get("arch")
            if "members" in views and arch != "UNet3DEnsemble":
                raise ValueError(f"model {self.modelPath.name} has one network ({arch}): the 'members' stability "
                                 "check needs a semi-supervised model with two networks; use 'default'")
        if self.referenceSegmentationNode is not None:  # refused now, not after inference
            from imbalanceseglib.container import read_card
            names = [c["name"] for c in read_card(self.modelPath)["classes"]]
            self.logic.checkReference(self.inputVolumeNode, self.referenceSegmentationNode, names)
        self._input_id = self.inputVolumeNode.GetID()
        self._tmp = Path(tempfile.mkdtemp(prefix="imbalanceseg-job-"))
        try:
            image = sc.sitk_from_volume_node(self.inputVolumeNode)
            sitk.WriteImage(image, str(self._tmp / "input.nrrd"), useCompression=False)
            cmd = [self.python, "-u", "-m", "ImbalanceSegSlicer.worker", "--input", str(self._tmp / "input.nrrd"),
                   "--model", str(self.modelPath), "--output", str(self._tmp / "out"), "--device", self.device]
            if self.modality:
                cmd += ["--modality", self.modality]
            if self.agreement:
                cmd += ["--agreement", self.agreement]
            self._start_process(cmd)
        except BaseException:
            self._cleanup()
            raise
        self.state = RUNNING
        self.stage = "starting"
        return self

    def poll(self) -> str:
        """Read the worker's progress; when it has finished, add the results to the scene."""
        if self.state != RUNNING:
            return self.state
        for event in self._events():
            if event["event"] == "progress":
                self.stage, self.fraction = str(event.get("stage", "")), float(event.get("fraction") or 0.0)
                if not self.stages or self.stages[-1] != self.stage:
                    self.stages.append(self.stage)
        if not self._exited():
            return self.state
        return self._finish()

    def _finish(self) -> str:
        rc = self._proc.returncode
        try:
            if rc != 0 or self._done_event is None:
                if self.error is None:
                    self.error = self._failure("the segmentation process stopped")
                self.state = FAILED
                return self.state
            try:
                self.stage, self.fraction = "results", 0.0
                self.stages.append("results")
                self.result = self._add_results()
                self.stage, self.fraction = "results", 1.0
                self.state = DONE
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                self.state = FAILED
            return self.state
        finally:
            self._cleanup()

    def _add_results(self):
        from imbalanceseglib.inference import Prediction
        from imbalanceseglib.estimation import CaseEstimate

        from ImbalanceSegSlicer import scene as sc
        node = self.logic.scene.GetNodeByID(self._input_id)
        if node is None or node is not self.inputVolumeNode:
            raise ValueError("the input volume was removed from the scene while it was being segmented; "
                             "nothing was added")
        out = self._tmp / "out"
        summary = json.loads((out / "result.json").read_text())
        probs = np.load(out / "probabilities.npy", allow_pickle=False)
        uncertainty = np.load(out / "uncertainty.npy", allow_pickle=False)
        reference = sc.sitk_from_volume_node(self.inputVolumeNode)
        if probs.shape[1:] != tuple(reversed(reference.GetSize())):
            raise ValueError("the input volume changed size while it was being segmented; nothing was added")
        perf = summary["performance"]
        self.execution = summary.get("execution") or {}
        if self.execution:
            logging.info("ImbalanceSeg: the network ran as %s (%s)", {k: v for k, v in self.execution.items()
                                                                      if k not in ("trials", "engine_check")},
                         self.execution.get("source"))
        prediction = Prediction(probabilities=probs, labels=np.argmax(probs, axis=0).astype(np.uint8),
                                uncertainty=uncertainty, reference=reference, class_names=summary["class_names"],
                                timings=summary["timings"],
                                performance=CaseEstimate(summary["class_names"], perf["classes"], perf["method"],
                                                         perf["class_specific"]),
                                estimator=SimpleNamespace(**summary["estimator"]),
                                findings=[SimpleNamespace(**f) for f in summary.get("findings", [])])
        timings = {f"inference.{k}": v for k, v in summary["timings"].items()}
        return self.logic.createResultNodes(self.inputVolumeNode, prediction, summary["classes"],
                                            self.referenceSegmentationNode, baseName=self.baseName,
                                            flagThreshold=self.flagThreshold, timings=timings)

    def wait(self, timeout: Optional[float] = None, interval: float = 0.1,
             progress: Optional[Callable[[str, float], None]] = None):
        """Poll until the job ends; returns the result, raises :class:`JobError` on failure or cancel
        (cancel leaves the scene as it was)."""
        self._wait(timeout, interval, progress)
        return self.result


class TrainingJob(_ProcessJob):
    """Training in a background process (``imbalanceseg train``) on scene nodes, or on a data
    folder (``images/``, ``labels/``, optional ``val_images/`` and ``val_labels/``, same file names).

    The labelled pairs (volume, segmentation; segments matched to the config's classes by name),
    optional validation pairs and unlabelled volumes are written to a temporary folder; the
    trainer writes checkpoints and the final bundle to ``outputFolder``, so a cancelled run
    resumes from its last checkpoint when started again with ``resume=True``. With validation
    pairs, the trained model is then calibrated on them (``calibration``: ts-atc by default, as
    ``imbalanceseg calibrate``) and ``bundlePath`` is the calibrated bundle. Both run with
    ``--events``: ``history`` holds the loss (``iteration`` events) and validation Dice
    (``validation`` events) as they come (for the live plot); ``bundlePath`` is set by the
    bundle's ``artifact`` event, ``checkpointPath`` by the checkpoints'; ``progressStage`` and
    ``progressFraction`` follow ``progress`` events (data preparation, calibration); ``warnings``
    holds the trainer's ``warning`` events (classes never learned or not checked). The scene
    is never changed.
    """

    _what = "training"
    _cancel_timeout = 10.0

    def __init__(self, logic, config, pairs: Sequence[Tuple[Any, Any]], outputFolder,
                 unlabeledVolumeNodes: Sequence[Any] = (), validationPairs: Sequence[Tuple[Any, Any]] = (),
                 resume: bool = True, python: Optional[str] = None, threads: Optional[int] = None,
                 calibration: str = "ts-atc", dataFolder=None):
        self.logic, self.config = logic, config
        self.dataFolder = Path(dataFolder) if dataFolder else None
        self.calibration = calibration
        self.phase = "train"  # then "calibrate" when there are validation pairs
        self.trainedBundlePath: Optional[Path] = None
        self.pairs, self.validationPairs = list(pairs), list(validationPairs)
        self.unlabeledVolumeNodes = list(unlabeledVolumeNodes)
        self.outputFolder = Path(outputFolder)
        self.resume = resume
        super().__init__(python, threads)
        self.iteration, self.total = 0, int(config.iterations)
        self.history: List[Dict[str, Any]] = []
        self.bundlePath: Optional[Path] = None
        self.checkpointPath: Optional[Path] = None
        self.progressStage, self.progressFraction = "", 0.0
        self._data: Dict[str, Any] = {}

    @property
    def fraction(self) -> float:
        return min(1.0, self.iteration / max(1, self.total))

    @property
    def stage(self) -> str:
        return self.phase

    def _export(self, folder: Path, pairs, prefix: str) -> Tuple[str, str]:
        import SimpleITK as sitk
        from ImbalanceSegSlicer import scene as sc
        from ImbalanceSegSlicer.reference import reference_label_array
        names = [c["name"] for c in self.config.classes]
        images, labels = folder / f"{prefix}images", folder / f"{prefix}labels"
        images.mkdir()
        labels.mkdir()
        for k, (volume, segmentation) in enumerate(pairs):
            if volume is None or segmentation is None:
                raise ValueError("each training pair needs a volume and a segmentation")
            if volume.GetImageData() is None:
                raise ValueError(f"training volume {volume.GetName()!r} has no image data")
            image = sc.sitk_from_volume_node(volume)
            arr, matched = reference_label_array(self.logic.scene, segmentation, volume, names)
            if not matched:
                raise ValueError(f"segmentation {segmentation.GetName()!r} has no segment named like a class of "
                                 f"the model ({', '.join(names[1:])})")
            lab = sitk.GetImageFromArray(arr)
            lab.CopyInformation(image)
            stem = f"case{k:03d}"
            sitk.WriteImage(image, str(images / f"{stem}.nrrd"))
            sitk.WriteImage(lab, str(labels / f"{stem}.nrrd"))
        return images.name, labels.name

    def start(self) -> "TrainingJob":
        import SimpleITK as sitk
        from ImbalanceSegSlicer import scene as sc
        if self.state != CREATED:
            raise RuntimeError("a job can be started once")
        if self.dataFolder is not None:
            if self.pairs or self.validationPairs:
                raise ValueError("train either on scene segmentations or on a data folder, not both")
            for sub in (() if (self.dataFolder / "dataset.json").is_file() else ("images", "labels")):
                if not (self.dataFolder / sub).is_dir():
                    raise FileNotFoundError(f"data folder {self.dataFolder} has no '{sub}' folder "
                                            "(expected images/, labels/ and classes.json, or dataset.json "
                                            "of the nnU-Net v2 or MSD layout)")
        elif not self.pairs:
            raise ValueError("choose at least one (volume, segmentation) pair to train on")
        self.config.validated()  # checks again only a config changed since it was validated
        if self.unlabeledVolumeNodes and not self.config.is_semi_supervised:
            raise ValueError(f"unlabelled volumes were given but method {self.config.method!r} is supervised; "
                             f"choose {semi_supervised_choice()}")
        self.outputFolder.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="imbalanceseg-train-"))
        try:
            if self.dataFolder is not None:
                # Any layout imbalanceseglib.datasets reads; label values mapped to the config's classes.
                data: Dict[str, Any] = {"kind": "dataset", "folder": str(self.dataFolder)}
                if (self.dataFolder / "val_images").is_dir() and (self.dataFolder / "val_labels").is_dir():
                    data["val_images"] = str(self.dataFolder / "val_images")
                    data["val_labels"] = str(self.dataFolder / "val_labels")
            else:
                images, labels = self._export(self._tmp, self.pairs, "")
                data = {"kind": "folders", "images": images, "labels": labels}
                if self.validationPairs:
                    data["val_images"], data["val_labels"] = self._export(self._tmp, self.validationPairs, "val_")
            self._data = data
            if self.unlabeledVolumeNodes:
                folder = self._tmp / "unlabeled"
                folder.mkdir()
                for k, volume in enumerate(self.unlabeledVolumeNodes):
                    if volume is None or volume.GetImageData() is None:
                        raise ValueError("an unlabelled volume has no image data")
                    sitk.WriteImage(sc.sitk_from_volume_node(volume), str(folder / f"unlabeled{k:03d}.nrrd"))
                data["unlabeled_images"] = "unlabeled"
            (self._tmp / "config.json").write_text(json.dumps({"train": self.config.to_dict(), "data": data}))
            cmd = [self.python, "-u", "-m", "imbalanceseglib.cli", "train", str(self._tmp / "config.json"),
                   "--out", str(self.outputFolder), "--events"] + ([] if self.resume else ["--no-resume"])
            self._start_process(cmd)
        except BaseException:
            self._cleanup()
            raise
        self.state = RUNNING
        return self

    def poll(self) -> str:
        if self.state != RUNNING:
            return self.state
        for event in self._events():
            kind = event["event"]
            if kind == "iteration":
                self.iteration = int(event.get("iteration", self.iteration))
                self.total = int(event.get("total", self.total))
                loss = event.get("loss")
                self.history.append({"iteration": self.iteration, "loss": math.nan if loss is None else float(loss)})
            elif kind == "validation":
                dice = event.get("dice") or {}
                self.history.append({"iteration": int(event.get("iteration", self.iteration)),
                                     "val": {str(k): (None if v is None else float(v)) for k, v in dice.items()}})
            elif kind == "artifact" and event.get("kind") == "bundle":
                self.bundlePath = Path(event["path"])
            elif kind == "artifact" and event.get("kind") == "checkpoint":
                self.checkpointPath = Path(event["path"])
            elif kind == "progress":
                self.progressStage = str(event.get("stage", ""))
                self.progressFraction = float(event.get("fraction") or 0.0)
        if not self._exited():
            return self.state
        rc = self._proc.returncode
        if rc == 0 and self.phase == "train" and self.bundlePath is not None and self.bundlePath.is_file() \
                and "val_images" in self._data and self.calibration != "none":
            self.trainedBundlePath = self.bundlePath
            calibrated = self.bundlePath.with_name(self.bundlePath.name.replace(".imbseg", "") + "_calibrated.imbseg")
            cmd = [self.python, "-u", "-m", "imbalanceseglib.cli", "calibrate", "--model", str(self.bundlePath),
                   "--images", str(self._tmp / self._data["val_images"]),
                   "--labels", str(self._tmp / self._data["val_labels"]),
                   "--method", self.calibration, "--out", str(calibrated), "--events"]
            self.phase = "calibrate"
            self.bundlePath = None
            self._start_process(cmd)
            return self.state
        if rc == 0 and self.bundlePath is not None and self.bundlePath.is_file():
            self.state = DONE
        else:
            if self._error_event is not None:
                self.error = f"training stopped ({self.phase}): {self.error}"
            else:
                self.error = self._failure("training stopped")
            self.state = FAILED
        self._cleanup()
        return self.state

    def wait(self, timeout: Optional[float] = None, interval: float = 0.2) -> Path:
        """Poll until training (and calibration) ends; returns the bundle path. Cancelling keeps the
        checkpoints already written in the output folder (resume later)."""
        self._wait(timeout, interval)
        return self.bundlePath
